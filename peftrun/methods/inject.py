"""Putting a weight-wrapping method into a model: find targets, wrap, freeze, mark what trains."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from peftrun.methods import TunerConfig
from peftrun.methods.layers import AdapterLayer, ModulesToSave
from peftrun.methods.targets import default_targets, find_targets, set_module

# Task heads that are new for a task and so train whole, as peft does for these task types.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"]}


def resolve_targets(
    model: nn.Module, config: TunerConfig, table: dict[str, list[str]], method: str, task_type: str
) -> list[str]:
    targets = config.target_modules
    if targets is None:
        targets = default_targets(table, getattr(model.config, "model_type", "?"), method)
    return find_targets(
        model,
        targets,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        exclude_modules=config.exclude_modules,
        skip=modules_to_save_names(model, config, task_type),
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
            from peftrun.errors import PeftrunError

            raise PeftrunError(
                f"module '{name}' already carries a {type(module).__name__}; one base layer takes one method kind"
            )
        else:
            layer = make_layer(module, name)
            set_module(model, name, layer)
        layer.add_adapter(adapter_name, config)


def modules_to_save_names(model: nn.Module, config, task_type: str | None) -> list[str]:
    names = list(getattr(config, "modules_to_save", None) or [])
    if task_type in TASK_HEADS:
        names += [n for n in TASK_HEADS[task_type] if n not in names]
    found = []
    for name, module in model.named_modules():
        if not name or isinstance(module, ModulesToSave) or ".original_module" in name or ".modules_to_save" in name:
            continue
        if any(name == n or name.endswith("." + n) for n in names) and not any(
            name.startswith(f + ".") for f in found
        ):
            found.append(name)
    return found


def add_modules_to_save(model: nn.Module, config, adapter_name: str, task_type: str) -> None:
    for name in modules_to_save_names(model, config, task_type):
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            set_module(model, name, module)
        module.add_adapter(adapter_name)
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name not in module.adapter_names():
            if any(name == n or name.endswith("." + n) for n in TASK_HEADS.get(task_type, [])):
                module.add_adapter(adapter_name)


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
