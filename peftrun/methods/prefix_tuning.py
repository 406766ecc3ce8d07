r"""Prefix tuning (Li & Liang, 2021): learned keys and values that every attention layer prepends.

Layer l attends over n virtual tokens before the real ones; for each head

    head_l(x) = softmax( q(x) [P_k^l ; k(x)]^T / sqrt(d_h) ) [P_v^l ; v(x)],

and only the prefixes P train. All of them form one table E ∈ R^{n × 2·L·d} (n = num_virtual_tokens,
L = num_layers, d = token_dim = heads × head size; row j of a layer's slice is virtual token j). E is
learned directly, or (prefix_projection) produced by the reparameterisation MLP the paper uses to
steady training,

    E = W_2 tanh(W_1 Z + b_1) + b_2,   Z ∈ R^{n × d},  W_1 ∈ R^{h × d},  W_2 ∈ R^{2Ld × h}  (h = encoder_hidden_size),

after which the MLP is no longer needed: the checkpoint holds E itself as `prompt_embeddings`, as peft saves it.

The prefixes reach the model as a prefilled transformers cache: a DynamicCache for decoder-only and encoder
models, an EncoderDecoderCache for encoder-decoder models, whose decoder self-attention takes them (peft's
layout: decoder layer l reads rows 4l, 4l+1 modulo 2L of E's layer slices). The attention mask gains n ones
in front, and the real tokens' positions start at n, as the cache length says.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from peftrun.errors import PeftrunError
from peftrun.methods.configs import SPECS, PrefixTuningConfig
from peftrun.methods.inject import add_modules_to_save, freeze_base
from peftrun.tasks import SEQ_2_SEQ_LM

# ------------------------------------------------------------------ geometry


def _model_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _first(config, *names: str):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of the model's attention, as its cache holds them."""
    cfg = _model_config(model)
    layers = _first(cfg, "num_hidden_layers", "num_layers", "n_layer")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads")
    if layers is None or hidden is None or heads is None:
        raise PeftrunError(
            f"cannot read the layer count, width and heads of a '{getattr(cfg, 'model_type', '?')}' model",
            where="method",
            hint="set num_layers, token_dim and num_attention_heads",
        )
    head_dim = _first(cfg, "head_dim", "d_kv") or hidden // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return int(layers), int(kv_heads), int(head_dim)


def fill_geometry(config: PrefixTuningConfig, model: nn.Module, task_type: str) -> None:
    """Fill the fields left out from the model, as peft does; grouped-query models get their key/value width."""
    layers, kv_heads, head_dim = kv_geometry(model)
    if config.num_layers is None:
        config.num_layers = layers
    if config.token_dim is None and config.num_attention_heads is None:
        config.token_dim, config.num_attention_heads = kv_heads * head_dim, kv_heads
    elif config.token_dim is None or config.num_attention_heads is None:
        raise PeftrunError("give token_dim and num_attention_heads together, or neither", where="method")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if task_type == SEQ_2_SEQ_LM else 1
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.token_dim % config.num_attention_heads:
        raise PeftrunError(
            f"token_dim {config.token_dim} is not a multiple of num_attention_heads {config.num_attention_heads}",
            where="method.token_dim",
        )
    if (config.num_attention_heads, config.token_dim // config.num_attention_heads) != (kv_heads, head_dim):
        raise PeftrunError(
            f"prefixes of {config.num_attention_heads} heads x {config.token_dim // config.num_attention_heads} do not "
            f"fit this model's keys and values ({kv_heads} heads x {head_dim})",
            where="method",
            hint=f"leave token_dim and num_attention_heads out, or set {kv_heads * head_dim} and {kv_heads}",
        )


# ------------------------------------------------------------------ the prefix table


class PrefixEncoder(nn.Module):
    """Gives the table E (n, 2·L·d): learned directly, or through the reparameterisation MLP."""

    def __init__(self, config: PrefixTuningConfig, device=None):
        super().__init__()
        n, d, hidden = config.num_virtual_tokens, config.token_dim, config.encoder_hidden_size
        self.width = 2 * config.num_layers * d
        self.transform: nn.Sequential | None = None
        self.projection_dropped = False
        if config.prefix_projection:
            self.embedding = nn.Embedding(n, d, device=device)
            self.transform = nn.Sequential(
                nn.Linear(d, hidden, device=device), nn.Tanh(), nn.Linear(hidden, self.width, device=device)
            )
        else:
            self.embedding = nn.Embedding(n, self.width, device=device)
        if config.init_weights == "zero" and device != torch.device("meta"):
            last = self.transform[-1] if self.transform is not None else self.embedding
            nn.init.zeros_(last.weight)
            if getattr(last, "bias", None) is not None:
                nn.init.zeros_(last.bias)

    def forward(self) -> torch.Tensor:
        z = self.embedding.weight
        return self.transform(z) if self.transform is not None else z

    def load_table(self, table: torch.Tensor) -> None:
        """Hold a saved table directly: a checkpoint keeps E, not the MLP that made it."""
        if tuple(table.shape) != (self.embedding.num_embeddings, self.width):
            raise PeftrunError(
                f"prompt_embeddings has shape {tuple(table.shape)}, this model's prefixes need "
                f"({self.embedding.num_embeddings}, {self.width})",
                hint="num_virtual_tokens, num_layers and token_dim must match the base model the adapter was trained on",
            )
        weight = self.embedding.weight
        if self.transform is not None:
            self.transform = None
            self.projection_dropped = True  # the MLP that trained is gone; see after_step
            self.embedding = nn.Embedding(*table.shape, device=weight.device, dtype=weight.dtype)
            self.embedding.weight.requires_grad_(weight.requires_grad)
        with torch.no_grad():
            self.embedding.weight.copy_(table.to(weight.dtype))


def cache_argument(model: nn.Module) -> str:
    """The keyword the model's forward takes its key/value cache under (`cache` since transformers 5.x)."""
    params = inspect.signature(model.base_model.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise PeftrunError(
        f"prefix tuning needs attention layers that take a key/value cache, and {type(model.base_model).__name__} has none",
        where="method.name",
        hint="use prompt_tuning or lora for this architecture",
    )


def prefix_cache(peft_model, name: str, batch_size: int):
    """A fresh transformers cache holding adapter `name`'s prefixes for `batch_size` rows."""
    from transformers import DynamicCache, EncoderDecoderCache

    config = peft_model.configs[name]
    n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    dtype = peft_model.model.get_input_embeddings().weight.dtype
    table = peft_model.prompt_encoders[name]().to(dtype)
    # (n, 2L·d) -> (2L, batch, heads, n, head size): row 2l holds layer l's keys, row 2l+1 its values.
    kv = (
        table.view(n, 2 * layers, heads, -1)
        .permute(1, 2, 0, 3)
        .unsqueeze(1)
        .expand(-1, batch_size, -1, -1, -1)
    )
    if config.num_transformer_submodules == 2:
        pairs = [(kv[(4 * i) % (2 * layers)], kv[(4 * i + 1) % (2 * layers)]) for i in range(layers)]
        return EncoderDecoderCache(DynamicCache(pairs), DynamicCache())
    return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(layers)])


def _ones(batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(batch, n, dtype=like.dtype, device=like.device)


# ------------------------------------------------------------------ the contract


def apply(peft_model, config: PrefixTuningConfig, adapter_name: str) -> None:
    model = peft_model.model
    cache_argument(model)  # refuses architectures without a key/value cache
    fill_geometry(config, model, peft_model.task_type)
    device = next(model.parameters()).device
    peft_model.prompt_encoders[adapter_name] = PrefixEncoder(config, device=device)
    add_modules_to_save(model, config, adapter_name, peft_model.task_type)
    freeze_base(model)


def forward(peft_model, name: str, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
    config = peft_model.configs[name]
    model, n = peft_model.model, config.num_virtual_tokens
    rows = input_ids if input_ids is not None else inputs_embeds
    if rows is None:
        raise PeftrunError("prefix tuning needs input_ids or inputs_embeds")
    batch = rows.shape[0]
    key = cache_argument(model)
    given = [kwargs.pop(k) for k in ("cache", "past_key_values") if k in kwargs]
    cache = next((c for c in given if c is not None), None)
    if (
        cache is None or cache.get_seq_length() == 0
    ):  # a non-empty one came from an earlier call, prefix included
        cache = prefix_cache(peft_model, name, batch)
    if peft_model.task_type == SEQ_2_SEQ_LM:
        if kwargs.get("decoder_attention_mask") is not None:
            kwargs["decoder_attention_mask"] = torch.cat(
                (_ones(batch, n, kwargs["decoder_attention_mask"]), kwargs["decoder_attention_mask"]), dim=1
            )
    elif attention_mask is not None:
        attention_mask = torch.cat((_ones(batch, n, attention_mask), attention_mask), dim=1)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
    before = cache.get_seq_length()
    out = peft_model.run_base(
        input_ids=input_ids,
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        **{key: cache},
        **kwargs,
    )
    if cache.get_seq_length() == before:
        raise PeftrunError(
            f"{type(model).__name__} never read the prefix cache, so prefix tuning would change nothing",
            hint="prefix tuning needs a model whose attention layers take a key/value cache",
        )
    return out


def _expansion(model: nn.Module, kwargs: dict[str, Any]) -> int:
    gen = kwargs.get("generation_config") or model.generation_config
    beams = kwargs.get("num_beams") or getattr(gen, "num_beams", 1) or 1
    sequences = kwargs.get("num_return_sequences") or getattr(gen, "num_return_sequences", 1) or 1
    return max(int(beams), int(sequences))  # generate repeats each row this many times


def generate(peft_model, name: str, input_ids=None, attention_mask=None, **kwargs):
    """transformers' generate over a cache prefilled with the prefixes.

    generate counts a prefilled cache as tokens already in the sequence, so n placeholder ids stand for the
    virtual tokens (their mask is 1) and are cut from the output again.
    """
    config = peft_model.configs[name]
    model, n = peft_model.model, config.num_virtual_tokens
    if input_ids is None:
        raise PeftrunError("prefix tuning generates from input_ids")
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    cache = prefix_cache(peft_model, name, batch * _expansion(model, kwargs))
    if kwargs.get("max_length") is not None:
        kwargs["max_length"] += n
    if peft_model.task_type == SEQ_2_SEQ_LM:
        start = (
            _first(model.generation_config, "decoder_start_token_id") or model.config.decoder_start_token_id
        )
        decoder_ids = kwargs.pop("decoder_input_ids", None)
        if decoder_ids is None:
            decoder_ids = torch.full((batch, 1), start, dtype=input_ids.dtype, device=input_ids.device)
        placeholders = torch.full((batch, n), start, dtype=decoder_ids.dtype, device=decoder_ids.device)
        decoder_ids = torch.cat((placeholders, decoder_ids), dim=1)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=torch.ones_like(decoder_ids),
            **{cache_argument(model): cache},
            **kwargs,
        )
        return out[:, n:]
    pad = model.generation_config.pad_token_id
    placeholders = torch.full(
        (batch, n), pad if pad is not None else 0, dtype=input_ids.dtype, device=input_ids.device
    )
    out = model.generate(
        input_ids=torch.cat((placeholders, input_ids), dim=1),
        attention_mask=torch.cat((_ones(batch, n, attention_mask), attention_mask), dim=1),
        **{cache_argument(model): cache},
        **kwargs,
    )
    return out[:, n:]


def state(peft_model, name: str) -> dict[str, torch.Tensor]:
    return {"prompt_embeddings": peft_model.prompt_encoders[name]()}


def load_state(peft_model, name: str, tensors: dict[str, torch.Tensor]) -> None:
    if "prompt_embeddings" not in tensors:
        raise PeftrunError("the adapter has no 'prompt_embeddings' tensor: not a prefix-tuning checkpoint")
    peft_model.prompt_encoders[name].load_table(tensors.pop("prompt_embeddings"))


def after_step(peft_model, name: str, step: int, total_steps: int) -> None:
    """Refuse to train an adapter loaded from peft's format, which replaced the reparameterisation MLP by
    its output table: the optimizer would keep updating an MLP that no longer computes anything.
    """
    if peft_model.prompt_encoders[name].projection_dropped:
        raise PeftrunError(
            "this prefix_projection adapter was loaded from peft's format, which holds the MLP's output, not the "
            "MLP: it cannot train further",
            where="method.prefix_projection",
            hint="continue an interrupted run with --resume (peftrun's checkpoints keep the MLP)",
        )



METHOD = SPECS["prefix_tuning"].implement(
    apply=apply,
    forward=forward,
    generate=generate,
    state=state,
    load_state=load_state,
    after_step=after_step,
)
