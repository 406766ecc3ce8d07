"""Putting a weight-wrapping method into a model: find targets, wrap, mark task heads, freeze, train biases.

Every reparameterisation and additive method (lora, adalora, ia3, bottleneck, loha, lokr) goes through
`inject()`; its `apply` names the layer class, the default-target table and its own extras. The config is
read, never written: what was resolved from defaults comes back in `Injected`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from peftrun.errors import PeftrunError
from peftrun.methods import TunerConfig
from peftrun.methods.layers import AdapterLayer, ModulesToSave
from peftrun.methods.targets import default_targets, find_targets, set_module
from peftrun.tasks import TASK_HEADS


@dataclass(frozen=True)
class Injected:
    """What `inject()` resolved for one adapter.

    target_modules: paths of the wrapped layers; modules_to_save: paths of the modules trained whole;
    defaults: config fields left out and filled from the model type (target_modules, ia3's
    feedforward_modules...); saved_fields: those of them adapter_config.json writes out, as peft does.
    """

    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    saved_fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def model_type_of(model: nn.Module) -> str:
    """The transformers model type ("?" for modules without one: a diffusers UNet, a plain nn.Module)."""
    return getattr(getattr(model, "config", None), "model_type", None) or "?"


def inject(
    peft_model,
    config: TunerConfig,
    adapter_name: str,
    *,
    method: str,
    layer: type[AdapterLayer],
    targets: Mapping[str, list[str]] | Callable[[str], str | list[str]],
    make_layer: Callable[[nn.Module, str, Mapping[str, Any]], AdapterLayer] | None = None,
    more_defaults: Mapping[str, Callable[[str], Any]] | None = None,
    save_defaults: bool = False,
    bias: str = "none",
    check: Callable[[Sequence[str]], None] | None = None,
) -> Injected:
    """Add adapter `adapter_name` of a layer-wrapping method to `peft_model.model`.

    targets: the default targets (table by model type, or a function of it) where config.target_modules
    is None. more_defaults: other fields the method fills from the model type when left None, resolved in
    order after the targets (field -> function of the model type). make_layer(module, path, resolved):
    builds a wrapper, given the resolved fields (default: `layer(module, path)`). save_defaults: whether
    adapter_config.json names the defaults taken. bias: "none", "all" (every bias trains) or any other
    value (the biases of this method's layers train). check(paths): refuses the resolved targets before
    anything is wrapped.
    """
    model = peft_model.model
    model_type = model_type_of(model)
    defaults: dict[str, Any] = {}
    if config.target_modules is None:
        defaults["target_modules"] = (
            targets(model_type) if callable(targets) else default_targets(targets, model_type, method)
        )
    for name, resolve in (more_defaults or {}).items():
        if getattr(config, name) is None:
            defaults[name] = resolve(model_type)
    resolved = {name: getattr(config, name) for name in ("target_modules", *(more_defaults or {}))}
    resolved.update(defaults)

    names = find_targets(
        model,
        resolved["target_modules"],
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        exclude_modules=config.exclude_modules,
        skip=modules_to_save_names(model, config, peft_model.task_type),
        conv2d=layer.supports_conv2d,
    )
    if check is not None:
        check(names)
    build = make_layer or (lambda module, path, _resolved: layer(module, path))
    wrap_layers(model, names, adapter_name, config, lambda module, path: build(module, path, resolved), layer)
    saved = add_modules_to_save(model, config, adapter_name, peft_model.task_type)
    freeze_base(model)
    train_biases(model, bias, layer)
    return Injected(
        target_modules=tuple(names),
        modules_to_save=tuple(saved),
        defaults=MappingProxyType(defaults),
        saved_fields=MappingProxyType(dict(defaults) if save_defaults else {}),
    )


def wrap_layers(
    model: nn.Module,
    names: Sequence[str],
    adapter_name: str,
    config: TunerConfig,
    make_layer: Callable[[nn.Module, str], AdapterLayer],
    layer_cls: type[AdapterLayer],
) -> None:
    """Wrap each named layer (or add to an existing wrapper of the same kind) with adapter `adapter_name`."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, layer_cls):
            layer = module
        elif isinstance(module, AdapterLayer):
            raise PeftrunError(
                f"module '{name}' already carries a {type(module).__name__}; one base layer takes one method kind"
            )
        else:
            layer = make_layer(module, name)
            set_module(model, name, layer)
        layer.add_adapter(adapter_name, config)


def modules_to_save_names(model: nn.Module, config, task_type: str | None) -> list[str]:
    names = list(getattr(config, "modules_to_save", None) or [])
    names += [n for n in TASK_HEADS.get(task_type, []) if n not in names]
    found = []
    for name, module in model.named_modules():
        if not name or isinstance(module, ModulesToSave) or ".original_module" in name or ".modules_to_save" in name:
            continue
        if any(name == n or name.endswith("." + n) for n in names) and not any(
            name.startswith(f + ".") for f in found
        ):
            found.append(name)
    return found


def add_modules_to_save(model: nn.Module, config, adapter_name: str, task_type: str) -> list[str]:
    """Give adapter `adapter_name` its trainable copy of each module trained whole; returns their paths."""
    names = modules_to_save_names(model, config, task_type)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            set_module(model, name, module)
        module.add_adapter(adapter_name)
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name not in module.adapter_names():
            if any(name == n or name.endswith("." + n) for n in TASK_HEADS.get(task_type, [])):
                module.add_adapter(adapter_name)
                names.append(name)
    return names


def freeze_base(model: nn.Module) -> None:
    """Freeze everything, then unfreeze the adapter tensors (all tensors under an adapter container)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for attr in module.adapter_attrs:
                for p in getattr(module, attr).parameters():
                    p.requires_grad_(True)
        elif isinstance(module, ModulesToSave):
            for p in module.modules_to_save.parameters():
                p.requires_grad_(True)


def train_biases(model: nn.Module, bias: str, layer: type[AdapterLayer]) -> None:
    """peft's `bias` option: "all" trains every bias, "<method>_only" those of the method's layers."""
    if bias == "none":
        return
    for module in model.modules():
        param = getattr(module, "bias", None)
        if isinstance(param, nn.Parameter) and (bias == "all" or isinstance(module, layer)):
            param.requires_grad_(True)
