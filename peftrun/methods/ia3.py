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
from pydantic import model_validator
from torch import nn

from peftrun.errors import PeftrunError
from peftrun.methods import Method, TunerConfig
from peftrun.methods.inject import add_modules_to_save, freeze_base, resolve_targets, wrap_layers
from peftrun.methods.layers import AdapterLayer
from peftrun.methods.targets import IA3_FEEDFORWARD, IA3_TARGETS, default_targets


class IA3Config(TunerConfig):
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False  # each layer knows its orientation; saved True for GPT-2-style Conv1D
    init_ia3_weights: bool = True

    @model_validator(mode="after")
    def _feedforward_are_targets(self) -> IA3Config:
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ValueError(
                f"feedforward_modules {sorted(set(ff) - set(targets))} are not in target_modules; "
                "a feed-forward module must also be a target"
            )
        return self

    def peft_fields(self):
        body = super().peft_fields()
        for key in ("layers_to_transform", "layers_pattern"):  # not IA3Config fields in peft
            if body.get(key) is None:
                body.pop(key, None)
        return body


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

    # (IA)³ rescales rather than adds, and touches the bias: merge and unmerge are its own.
    def merge(self, names: Iterable[str] | None = None, *, keep_original: bool = True) -> None:
        todo = [
            n
            for n in (list(names) if names is not None else self.active_adapters)
            if n not in self.merged_adapters
        ]
        if not todo:
            return
        weight, bias = self.base_layer.weight, self.bias
        if keep_original and not self.merged_adapters:
            self._original_weight = weight.detach().clone()
            self._original_bias = bias.detach().clone() if bias is not None else None
        with torch.no_grad():
            for name in todo:
                vec = self.ia3_l[name]  # (out, 1) or (1, in): broadcasts over an (out, in) weight
                weight.mul_((vec.T if self.fan_in_fan_out else vec).to(weight.dtype))
                if not self.is_feedforward and bias is not None:
                    bias.mul_(vec.flatten().to(bias.dtype))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        weight, bias = self.base_layer.weight, self.bias
        with torch.no_grad():
            if hasattr(self, "_original_weight"):
                weight.copy_(self._original_weight)
                if bias is not None and self._original_bias is not None:
                    bias.copy_(self._original_bias)
                del self._original_weight, self._original_bias
                self.merged_adapters.clear()
                return
            while self.merged_adapters:  # no copy kept: divide back (exact up to rounding)
                vec = self.ia3_l[self.merged_adapters.pop()]
                weight.div_((vec.T if self.fan_in_fan_out else vec).to(weight.dtype))
                if not self.is_feedforward and bias is not None:
                    bias.div_(vec.flatten().to(bias.dtype))


def apply(peft_model, config: IA3Config, adapter_name: str) -> None:
    model = peft_model.model
    model_type = getattr(model.config, "model_type", "?")
    # Resolved now so that adapter_config.json names them, as peft writes them.
    if config.target_modules is None:
        config.target_modules = default_targets(IA3_TARGETS, model_type, "ia3")
    if config.feedforward_modules is None:
        if model_type not in IA3_FEEDFORWARD:
            raise PeftrunError(
                f"ia3 has no default feedforward_modules for model type '{model_type}'",
                where="method.feedforward_modules",
                hint="list the targets whose input ia3 scales (e.g. [down_proj]), or [] for none",
            )
        config.feedforward_modules = list(IA3_FEEDFORWARD[model_type])
    names = resolve_targets(model, config, IA3_TARGETS, "ia3", peft_model.task_type)
    ff = config.feedforward_modules

    def make_layer(module: nn.Module, name: str) -> IA3Layer:
        return IA3Layer(module, is_feedforward(name, ff))

    wrap_layers(model, names, adapter_name, config, make_layer, IA3Layer)
    add_modules_to_save(model, config, adapter_name, peft_model.task_type)
    freeze_base(model)


METHOD = Method(
    name="ia3",
    peft_type="IA3",
    kind="additive",
    summary="learned vectors rescaling attention keys/values and the feed-forward input ((IA)³)",
    mergeable=True,
    Config=IA3Config,
    apply=apply,
)
