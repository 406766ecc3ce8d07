r"""LoRA (Hu et al., 2021), with rsLoRA (Kalajdzievski, 2023) and DoRA (Liu et al., 2024).

For a frozen layer y = W x + b, LoRA learns a low-rank update

    y = W x + b + s · B A dropout(x),     A ∈ R^{r×in}, B ∈ R^{out×r},  B = 0 at init,

with s = lora_alpha / r, or s = lora_alpha / sqrt(r) with use_rslora. DoRA splits the adapted weight
into a learned magnitude m (one per output feature) and a direction:

    W' = m · (W + s B A) / ||W + s B A||_row,   the norm detached as in the paper (sec. 4.3).

Merge: W <- W + s B A (LoRA) or W <- W' (DoRA).

On a Conv2d (peft's layout): A is a Conv2d in -> r with the base's kernel, stride and padding, B a 1x1
Conv2d r -> out, so ΔW[o, i, :, :] = s Σ_k B[o, k] A[k, i, :, :]. DoRA is not offered on convolutions.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from peftrun.errors import PeftrunError
from peftrun.methods import lora_kernels
from peftrun.methods.configs import SPECS, LoraConfig
from peftrun.methods.inject import Injected, inject
from peftrun.methods.layers import AdapterLayer
from peftrun.methods.targets import LORA_TARGETS


def pattern_value(patterns: dict, name: str, default):
    """peft's rank_pattern/alpha_pattern: a key matches a module path by regex on its tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoraLayer(AdapterLayer):
    adapter_attrs = ("lora_A", "lora_B", "lora_magnitude_vector")
    supports_conv2d = True
    # The fused update of lora_kernels.py where it is exact; False (per layer, on the class, or for one
    # model through `use_fused(model, False)`, which a recipe's training.fused_lora: false asks for) runs
    # the plain modules.
    fast_path: bool = lora_kernels.ENABLED

    def __init__(self, base_layer: nn.Module, name: str = ""):
        super().__init__(base_layer)
        self.module_name = name
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        r = pattern_value(config.rank_pattern, self.module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, self.module_name, config.lora_alpha)
        self.r[name] = r
        self.scaling[name] = lora_scaling(alpha, r, config.use_rslora)
        kw = self.adapter_tensor_kwargs()
        if self.is_conv:
            if config.use_dora:
                raise PeftrunError(
                    f"DoRA is not supported on the Conv2d '{self.module_name}'", where="method.use_dora"
                )
            base = self.base_layer
            self.lora_A[name] = nn.Conv2d(
                self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False, **kw
            )
            self.lora_B[name] = nn.Conv2d(r, self.out_features, 1, 1, bias=False, **kw)
        else:
            self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
            self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kw)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset(name, config.init_lora_weights)
        if config.use_dora:
            with torch.no_grad():
                norm = self._weight_norm(name).to(kw["dtype"])
            self.lora_magnitude_vector[name] = nn.Parameter(norm)
        self.active_adapters = [name]

    def reset(self, name: str, init: bool | str) -> None:
        if init is False:
            return  # nn.Linear's own random init for both: a non-identity start, for tests
        if self.lora_A[name].weight.is_meta:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def delta_weight(self, name: str) -> torch.Tensor:
        if self.is_conv:  # B (out, r, 1, 1) times A (r, in, kh, kw) over r
            b, a = self.lora_B[name].weight, self.lora_A[name].weight
            return torch.einsum("or,rikl->oikl", b.flatten(1), a) * self.scaling[name]
        delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
        if name in self.lora_magnitude_vector:
            w = self.base_weight().to(delta.dtype)
            scale = (self.lora_magnitude_vector[name] / self._weight_norm(name)).unsqueeze(1)
            return scale * (w + delta) - w
        return delta

    def _weight_norm(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        w = self.base_weight().to(a.dtype)
        return torch.linalg.norm(w + (b @ a) * self.scaling[name], dim=1).detach()

    def _fast_dropout(self, name: str) -> float | None:
        """The dropout rate the fused path applies, or None where it does not apply (DoRA, other modules)."""
        if not self.fast_path or self.is_conv or name in self.lora_magnitude_vector:
            return None
        dropout = self.lora_dropout[name]
        if type(dropout) is nn.Identity:
            return 0.0
        if type(dropout) is nn.Dropout:
            return dropout.p if dropout.training else 0.0
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # One function for the frozen Linear and its single active adapter (lora_kernels.LoraLinear).
        if args or kwargs or self.disabled or self.merged_adapters or self.row_adapters is not None:
            return super().forward(x, *args, **kwargs)
        if len(self.active_adapters) != 1:
            return super().forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        p = self._fast_dropout(name)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if p is None or not lora_kernels.linear_applies(x, self.base_layer, a, b):
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return lora_kernels.lora_linear(x, base.weight, base.bias, a, b, self.scaling[name], p)

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        p = self._fast_dropout(name)
        if p is not None and lora_kernels.applies(x, a.weight):
            return lora_kernels.lora_update(x, result, a.weight, b.weight, self.scaling[name], p)
        xd = self.lora_dropout[name](x.to(a.weight.dtype))
        update = b(a(xd)) * self.scaling[name]
        if name in self.lora_magnitude_vector:
            # m/||W+sBA|| rescales the whole adapted weight; the base output already holds W x + b.
            scale = self.lora_magnitude_vector[name] / self._weight_norm(name)
            base = nn.functional.linear(xd, self.base_weight().to(xd.dtype))
            update = (scale - 1) * base + scale * update
        return result + update.to(result.dtype)


def apply(peft_model, config: LoraConfig, adapter_name: str) -> Injected:
    return inject(
        peft_model, config, adapter_name, method="lora", layer=LoraLayer, targets=LORA_TARGETS, bias=config.bias
    )


def use_fused(model: nn.Module, enabled: bool) -> None:
    """Turn the fused LoRA path on or off for the LoRA layers of `model` (the class default is on)."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.fast_path = enabled


METHOD = SPECS["lora"].implement(apply=apply)
