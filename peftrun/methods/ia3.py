r"""(IA)³ (Liu et al., 2022): learned vectors that rescale a frozen layer's activations.

For a frozen layer y = W x + b, (IA)³ learns one vector l per adapted layer:

    attention keys/values (and other targets):  y = l ⊙ (W x + b),   l ∈ R^{out}, stored (out, 1)
    feedforward_modules:                        y = W (l ⊙ x) + b,   l ∈ R^{in},  stored (1, in)

l = 1 at init (init_ia3_weights), so training starts from the base model. A feed-forward module must also
be a target. peft key: `ia3_l`.
Merge: W <- diag(l) W, b <- l ⊙ b (output scaling) or W <- W diag(l) (input scaling); unmerge restores
the kept original weight and bias exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from peftrun.methods.configs import SPECS, IA3Config
from peftrun.methods.inject import Injected, inject
from peftrun.methods.layers import AdapterLayer
from peftrun.methods.targets import IA3_FEEDFORWARD, IA3_TARGETS, default_targets


def is_feedforward(name: str, feedforward_modules: str | Sequence[str]) -> bool:
    """peft's rule: a regex must match the whole path; list entries match as plain suffixes of it."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(suffix) for suffix in feedforward_modules)


class IA3Layer(AdapterLayer):
    adapter_attrs = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__(base_layer)
        self.is_feedforward = feedforward
        self.ia3_l = nn.ParameterDict()

    def add_adapter(self, name: str, config: IA3Config) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        kwargs = self.adapter_tensor_kwargs()
        vector = torch.ones(shape, **kwargs) if config.init_ia3_weights else torch.randn(shape, **kwargs)
        self.ia3_l[name] = nn.Parameter(vector)
        self.active_adapters = [name]

    def scale(self, names: Iterable[str]) -> torch.Tensor:
        vectors = [self.ia3_l[n].flatten() for n in names]
        out = vectors[0]
        for v in vectors[1:]:
            out = out * v
        return out

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        vec = self.scale([name])
        if self.is_feedforward:  # the base output does not help here: W must see the scaled input
            return self.base_layer((x.to(vec.dtype) * vec).to(x.dtype))
        return (result * vec).to(result.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plain = (
            self.disabled or self.merged_adapters or self.row_adapters is not None or not self.active_adapters
        )
        if not self.is_feedforward or plain:
            return super().forward(x, *args, **kwargs)
        vec = self.scale(self.active_adapters)
        return self.base_layer((x.to(vec.dtype) * vec).to(x.dtype), *args, **kwargs)

    # (IA)³ rescales rather than adds, and scales the bias with the output: AdapterLayer's merge and
    # unmerge with its own fold.
    def merged_tensors(self) -> list[torch.Tensor]:
        bias = self.bias
        return [self.base_layer.weight] + ([bias] if bias is not None else [])

    def fold(self, name: str, *, undo: bool = False) -> None:
        weight, bias = self.base_layer.weight, self.bias
        vec = self.ia3_l[name]  # (out, 1) or (1, in): broadcasts over an (out, in) weight
        scale = (vec.T if self.fan_in_fan_out else vec).to(weight.dtype)
        weight.div_(scale) if undo else weight.mul_(scale)
        if not self.is_feedforward and bias is not None:
            bias_scale = vec.flatten().to(bias.dtype)
            bias.div_(bias_scale) if undo else bias.mul_(bias_scale)


def default_feedforward(model_type: str) -> list[str]:
    hint = "list the targets whose input ia3 scales (e.g. [down_proj]), or [] for none"
    return default_targets(IA3_FEEDFORWARD, model_type, "ia3", field="feedforward_modules", hint=hint)


def apply(peft_model, config: IA3Config, adapter_name: str) -> Injected:
    # Defaults taken are named in adapter_config.json, as peft writes them.
    return inject(
        peft_model,
        config,
        adapter_name,
        method="ia3",
        layer=IA3Layer,
        targets=IA3_TARGETS,
        more_defaults={"feedforward_modules": default_feedforward},
        make_layer=lambda module, name, resolved: IA3Layer(
            module, is_feedforward(name, resolved["feedforward_modules"])
        ),
        save_defaults=True,
    )


METHOD = SPECS["ia3"].implement(apply=apply)
