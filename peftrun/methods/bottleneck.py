r"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP after each sub-layer.

On the output projection of a transformer sub-layer (attention, feed-forward), before its residual add:

    h = W_o a + b_o,     h <- h + W_up f(W_down dropout(h) + b_down) + b_up,
    W_down ∈ R^{m×d},  W_up ∈ R^{d×m},  m = bottleneck_size or d // reduction_factor,

with f one of relu/gelu/silu/tanh and W_up, b_up zero at init, so the adapted model starts equal to the
base. Each adapted layer trains 2·d·m + m + d parameters.

peft has no such method; its checkpoint is peft-shaped all the same: adapter_config.json with
peft_type "BOTTLENECK" and these fields, and adapter_model.safetensors with, per adapted module,

    base_model.model.<module path>.adapter_down.weight  (m, d)     .adapter_down.bias  (m,)
    base_model.model.<module path>.adapter_up.weight    (d, m)     .adapter_up.bias    (d,)

The adapter is nonlinear in h, so it cannot be folded into W_o: merging is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from peftrun.errors import PeftrunError
from peftrun.methods.configs import SPECS, BottleneckConfig
from peftrun.methods.inject import Injected, inject
from peftrun.methods.layers import AdapterLayer
from peftrun.methods.targets import SUBLAYER_OUTPUTS

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckLayer(AdapterLayer):
    adapter_attrs = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module, name: str = ""):
        super().__init__(base_layer)
        self.module_name = name
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()

    def add_adapter(self, name: str, config: BottleneckConfig) -> None:
        hidden, size = self.out_features, config.size_for(self.out_features)
        kw = self.adapter_tensor_kwargs()
        self.adapter_down[name] = nn.Linear(hidden, size, **kw)
        self.adapter_up[name] = nn.Linear(size, hidden, **kw)
        self.adapter_act[name] = ACTIVATIONS[config.non_linearity]()
        self.adapter_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.init_weights and not self.adapter_up[name].weight.is_meta:
            nn.init.zeros_(self.adapter_up[name].weight)
            nn.init.zeros_(self.adapter_up[name].bias)
        self.active_adapters = [name]

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        down, up = self.adapter_down[name], self.adapter_up[name]
        h = self.adapter_dropout[name](result.to(down.weight.dtype))
        return result + up(self.adapter_act[name](down(h))).to(result.dtype)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for container in (self.adapter_act, self.adapter_dropout):
            if name in container:
                del container[name]


def sublayer_regex(model_type: str, sublayers: list[str]) -> str:
    if model_type not in SUBLAYER_OUTPUTS:
        raise PeftrunError(
            f"bottleneck has no default sub-layer outputs for model type '{model_type}'",
            where="method.target_modules",
            hint="name the output projections to adapt, e.g. target_modules: [o_proj, down_proj]",
        )
    attention, ffn = SUBLAYER_OUTPUTS[model_type]
    chosen = [p for kind, p in (("attention", attention), ("ffn", ffn)) if kind in sublayers]
    return "|".join(f"(?:{p})" for p in chosen)


def apply(peft_model, config: BottleneckConfig, adapter_name: str) -> Injected:
    return inject(
        peft_model,
        config,
        adapter_name,
        method="bottleneck",
        layer=BottleneckLayer,
        targets=lambda model_type: sublayer_regex(model_type, config.sublayers),
    )


METHOD = SPECS["bottleneck"].implement(apply=apply)
