r"""What LoHa and LoKr share (the LyCORIS family): a structured weight update ΔW applied as x ΔWᵀ.

Each method builds its (out, in) update ΔW from small factors and a scale s = alpha / r. Training adds two
regularisers from LyCORIS:
  - rank_dropout: each output row of ΔW is kept with probability 1 - p (the kept rows are rescaled by
    1 / mean(mask) where the method asks for it);
  - module_dropout: with probability p a training step skips the adapter of a layer altogether.
Merge folds ΔW into the base weight (AdapterLayer.merge); unmerge restores it exactly.

On a Conv2d (out, in, kh, kw) the update is built as an (out, in·kh·kw) matrix and reshaped to the
weight's shape, or, with use_effective_conv2d on a kernel larger than 1x1, from a (r, r, kh, kw) core
tensor (peft's `*_t1`/`*_t2`, a CP decomposition); the layer then adds conv2d(x, ΔW) with the base's
stride, padding and dilation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftrun.methods.configs import LycorisConfig
from peftrun.methods.inject import Injected, inject
from peftrun.methods.layers import AdapterLayer
from peftrun.methods.lora import pattern_value
from peftrun.methods.targets import LORA_TARGETS


class LycorisLayer(AdapterLayer):
    """A layer whose adapter is a full (out, in) update built by `make_delta`; dropout as above."""

    supports_conv2d = True

    def __init__(self, base_layer: nn.Module, name: str = ""):
        super().__init__(base_layer)
        self.module_name = name
        # (kh, kw) of a Conv2d base, else (1, 1): the update's columns are in·kh·kw (the unrolled kernel).
        self.kernel: tuple[int, int] = tuple(base_layer.kernel_size) if self.is_conv else (1, 1)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}

    def make_delta(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        """The method's unscaled update: (out, in·kh·kw), or a Conv2d weight's own shape."""
        raise NotImplementedError

    def add_adapter(self, name: str, config: LycorisConfig) -> None:
        r = pattern_value(config.rank_pattern, self.module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, self.module_name, config.alpha)
        self.r[name] = r
        self.scaling[name] = alpha / r
        self.rank_dropout[name] = config.rank_dropout
        self.module_dropout[name] = config.module_dropout
        self.create_factors(name, config)
        self.active_adapters = [name]

    def create_factors(self, name: str, config: LycorisConfig) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def effective_conv2d(self, config: LycorisConfig) -> bool:
        """Whether this layer's factors take a CP core: use_effective_conv2d on a kernel over 1x1."""
        return self.is_conv and config.use_effective_conv2d and self.kernel != (1, 1)

    def rescales_rank_dropout(self, name: str) -> bool:
        """Whether rows kept by rank_dropout are scaled by 1 / mean(mask) (LoHa always; LoKr on request)."""
        return True

    def new_factor(self, *shape: int, zero: bool = False) -> nn.Parameter:
        """A factor with He-uniform init (a = sqrt 5, as nn.Linear), or zeros."""
        tensor = torch.empty(shape, **self.adapter_tensor_kwargs())
        if zero:
            nn.init.zeros_(tensor)
        elif not tensor.is_meta:
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        return nn.Parameter(tensor)

    def delta_weight(self, name: str, *, rank_dropout: bool = False) -> torch.Tensor:
        delta = self.make_delta(name) * self.scaling[name]
        if self.is_conv:
            delta = delta.reshape(self.base_layer.weight.shape)
        if rank_dropout:
            keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout[name]).to(delta.dtype)
            if self.rescales_rank_dropout(name):
                keep = keep / keep.mean().clamp_min(1e-12)  # all rows dropped: ΔW = 0
            delta = delta * keep.view(-1, *[1] * (delta.dim() - 1))
        return delta

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        # One draw per training forward whatever p is, as peft does, so seeded runs agree with it.
        if self.training and torch.rand(1).item() <= self.module_dropout[name]:
            return result
        drop = self.training and self.rank_dropout[name] > 0
        delta = self.delta_weight(name, rank_dropout=drop)
        if self.is_conv:
            base = self.base_layer
            update = nn.functional.conv2d(
                x.to(delta.dtype), delta, stride=base.stride, padding=base.padding, dilation=base.dilation
            )
            return result + update.to(result.dtype)
        return result + nn.functional.linear(x.to(delta.dtype), delta).to(result.dtype)


def apply_lycoris(
    peft_model, config: LycorisConfig, adapter_name: str, layer_cls: type[LycorisLayer], method: str
) -> Injected:
    """Wrap the targets (peft's LoRA defaults per architecture, named in adapter_config.json as peft
    writes them), add task heads, freeze the base."""
    return inject(
        peft_model, config, adapter_name, method=method, layer=layer_cls, targets=LORA_TARGETS, save_defaults=True
    )
