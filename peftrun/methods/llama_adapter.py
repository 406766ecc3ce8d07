r"""LLaMA-Adapter (Zhang et al., 2023): adaption prompts with zero-initialised gated attention.

The top `adapter_layers` attention blocks of a Llama-family model each learn an adaption prompt
P ∈ R^{K × D} (K = adapter_len) and a gate g, initialised to 0. The block's output gains a second attention
of the same queries over the prompt's keys and values, scaled by the gate:

    out = Attn(x) + W_o · g · softmax( q(x) (W_k P)^T / sqrt(d_h) ) (W_v P),

with q(x) rotated by the token's position (RoPE) as in the block itself, the prompt unrotated, and W_k, W_v,
W_o the block's own frozen projections (keys and values shared across head groups as the block shares them).
g = 0 at the start, so training begins exactly at the base model and the prompt's influence grows only as
the gate learns to open. Only P and g train; peft saves them as `adaption_prompt` and `adaption_gate`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftrun.errors import PeftrunError
from peftrun.methods.configs import LLAMA_FAMILY, SPECS, AdaptionPromptConfig
from peftrun.methods.inject import freeze_base, model_type_of
from peftrun.methods.layers import AdapterLayer, adapter_dtype, row_groups
from peftrun.methods.targets import set_module


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class AdaptedAttention(AdapterLayer):
    """A frozen Llama attention block plus, per adapter, an adaption prompt and its gate."""

    adapter_attrs = ("adaption_prompt", "adaption_gate")

    def __init__(self, attention: nn.Module):
        # An attention block has no single weight: (out, in) is (hidden, hidden); AdapterLayer's switching,
        # disabling, deleting, state and mixed-batch plumbing apply as they are.
        hidden = attention.config.hidden_size
        super().__init__(attention, shape=(hidden, hidden))
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    def add_adapter(self, name: str, config: AdaptionPromptConfig) -> None:
        weight = self.base_layer.q_proj.weight
        dtype = adapter_dtype(weight)
        prompt = torch.empty(1, config.adapter_len, self.in_features, device=weight.device, dtype=dtype)
        if not prompt.is_meta:
            prompt.normal_()  # the official code's embedding init: standard normal
        self.adaption_prompt[name] = nn.Parameter(prompt)
        self.adaption_gate[name] = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))
        self.active_adapters = [name]

    def adaption(
        self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], name: str
    ) -> torch.Tensor:
        """W_o · g · softmax(q Kᵀ / sqrt(d_h)) V over adapter `name`'s prompt."""
        attn = self.base_layer
        batch, length, _ = hidden.shape
        heads = attn.config.num_attention_heads
        kv_heads = getattr(attn.config, "num_key_value_heads", None) or heads
        head_dim = attn.head_dim
        q = attn.q_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in rotary)
        q = q * cos + rotate_half(q) * sin
        prompt = self.adaption_prompt[name].to(hidden.dtype)
        size = prompt.shape[1]
        k = attn.k_proj(prompt).view(1, size, kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(prompt).view(1, size, kv_heads, head_dim).transpose(1, 2)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(head_dim)
        weights = self.adaption_gate[name].to(q.dtype) * torch.softmax(
            scores, dim=-1, dtype=torch.float32
        ).to(q.dtype)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
        return attn.o_proj(out)

    def forward(self, *args, **kwargs):
        output, *rest = self.base_layer(*args, **kwargs)
        if self.disabled or not self.adapter_names():
            return (output, *rest)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rotary = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
        if self.row_adapters is None:
            for name in self.active_adapters:
                output = output + self.adaption(hidden, rotary, name).to(output.dtype)
            return (output, *rest)
        extra = torch.zeros_like(output)
        for name, idx in row_groups(self.row_adapters, output.shape[0], self.adapter_names(), output.device):
            rows = tuple(t[idx] if t.shape[0] == output.shape[0] else t for t in rotary)
            extra[idx] = self.adaption(hidden[idx], rows, name).to(output.dtype)
        return (output + extra, *rest)


def apply(peft_model, config: AdaptionPromptConfig, adapter_name: str) -> None:
    model = peft_model.model
    model_type = model_type_of(model)
    if model_type not in LLAMA_FAMILY:
        raise PeftrunError(
            f"LLaMA-Adapter needs a Llama-family model ({', '.join(LLAMA_FAMILY)}); this one is '{model_type}'",
            where="method.name",
            hint="its gated attention reuses the block's q/k/v/o projections and rotary queries",
        )
    blocks = [name for name, _ in model.named_modules() if name.endswith("." + config.target_modules)]
    if len(blocks) < config.adapter_layers:
        raise PeftrunError(
            f"adapter_layers is {config.adapter_layers} but the model has {len(blocks)} '{config.target_modules}' blocks",
            where="method.adapter_layers",
            hint=f"choose at most {len(blocks)}",
        )
    for name in blocks[len(blocks) - config.adapter_layers :]:  # the top layers
        block = model.get_submodule(name)
        if not isinstance(block, AdaptedAttention):
            block = AdaptedAttention(block)
            set_module(model, name, block)
        block.add_adapter(adapter_name, config)
    freeze_base(model)



METHOD = SPECS["llama_adapter"].implement(apply=apply)
