"""The adapter core: the registry of methods and the contract each fulfils.

A method is a spec in configs.py (plain data, no torch: what `peftrun validate`, `methods` and `schema` read)
and one module exposing `METHOD = SPECS[name].implement(...)`:
  - `Config` (in configs.py): a pydantic model with peft's field names (so a config moves across), extra keys
    refused;
  - `apply(peft_model, config, adapter_name)`: wraps target layers or registers a prompt encoder;
  - for soft-prompt methods, `forward` (and `generate`) taking over the base model's call;
  - `state` / `load_state` where the checkpoint layout is not the generic per-layer one;
  - `extra_loss` / `after_step` where training needs more than the task loss (AdaLoRA);
  - `resume_state` / `load_resume_state` where the loop keeps state outside the parameters (AdaLoRA's
    importance EMAs and masks), so that a resumed run carries on exactly.
Adding a method = one file, its spec in configs.py and one line in `_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from peftrun.errors import PeftrunError, did_you_mean
from peftrun.tasks import LANGUAGE_TASKS
from peftrun.tasks import TASK_TYPES as TASK_TYPES  # re-exported for callers that import it from here


class MethodConfig(BaseModel):
    """Fields every method has. Subclasses add theirs with peft's names and defaults."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    inference_mode: bool = False

    def peft_fields(self) -> dict[str, Any]:
        """The adapter_config.json body (peft_type, task_type and base model are added by checkpoint.py)."""
        return self.model_dump(mode="json")


class TunerConfig(MethodConfig):
    """Methods that wrap existing layers share how the layers are chosen."""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None


class PromptConfig(MethodConfig):
    """Soft-prompt methods share the virtual-token geometry (filled in from the model where left out)."""

    num_virtual_tokens: int = Field(default=20, ge=1)
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None


Kind = Literal["reparameterisation", "additive", "soft prompt", "selective/hybrid"]


@dataclass(frozen=True)
class MethodSpec:
    """What a recipe, `peftrun methods` and `peftrun schema` need of a method: plain data and checks that
    need no model (peftrun/methods/configs.py holds one per method; no torch behind them)."""

    name: str
    peft_type: str
    kind: Kind
    summary: str
    mergeable: bool
    Config: type[MethodConfig]
    # the transformers tasks by default; methods that adapt convolutions add TEXT_TO_IMAGE (tasks.TASK_TYPES)
    task_types: tuple[str, ...] = LANGUAGE_TASKS
    check: Callable[[str, Any], str | None] | None = None
    # check_model(model_type, name_or_path) -> reason or None: refuse an architecture before any weights
    # load (model_type as the base's config declares it, None where that is not known without loading).
    check_model: Callable[[str | None, str], str | None] | None = None
    # the base model's own weights train (full fine-tuning): refused on 8-bit/4-bit weights, which cannot train
    trains_base_weights: bool = False
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def is_prompt_learning(self) -> bool:
        return self.kind == "soft prompt"

    def unsupported_reason(self, task_type: str, config: Any) -> str | None:
        if task_type not in self.task_types:
            return f"it supports {', '.join(self.task_types)}"
        return self.check(task_type, config) if self.check else None

    def implement(self, **functions: Any) -> Method:
        """The whole method: this spec plus its implementation (`apply`, and the hooks it has)."""
        return Method(**{f.name: getattr(self, f.name) for f in fields(MethodSpec)}, **functions)


@dataclass(frozen=True)
class Method(MethodSpec):
    """A method's spec and its implementation; built in the method's module (`SPECS[name].implement(...)`)."""

    # apply(peft_model, config, adapter_name): layer-wrapping methods return inject()'s Injected (what was
    # resolved from defaults); the config is left as it was given.
    apply: Callable[..., Any] | None = None
    forward: Callable[..., Any] | None = None
    generate: Callable[..., Any] | None = None
    state: Callable[..., dict] | None = None
    load_state: Callable[..., None] | None = None
    # Training hooks for methods whose update depends on the loop (AdaLoRA's rank allocator):
    # extra_loss(peft_model, name) -> tensor added to the loss; after_step(peft_model, name, step, total_steps).
    extra_loss: Callable[..., Any] | None = None
    after_step: Callable[..., None] | None = None
    # resume_state(peft_model, name) -> {key: tensor} written to resume checkpoints beside the trainable
    # parameters; load_resume_state(peft_model, name, tensors) puts it back.
    resume_state: Callable[..., dict] | None = None
    load_resume_state: Callable[..., None] | None = None


# method name -> the module that implements it (imports torch); its spec is in configs.py (imports none).
_MODULES: dict[str, str] = {
    "lora": "peftrun.methods.lora",
    "prompt_tuning": "peftrun.methods.prompt_tuning",
    "p_tuning": "peftrun.methods.p_tuning",
    "multitask_prompt_tuning": "peftrun.methods.multitask_prompt",
    "prefix_tuning": "peftrun.methods.prefix_tuning",
    "llama_adapter": "peftrun.methods.llama_adapter",
    "adalora": "peftrun.methods.adalora",
    "bottleneck": "peftrun.methods.bottleneck",
    "ia3": "peftrun.methods.ia3",
    "loha": "peftrun.methods.loha",
    "lokr": "peftrun.methods.lokr",
    "full": "peftrun.methods.full",
}


def method_names() -> list[str]:
    return list(_MODULES)


def _known(name: str) -> str:
    key = str(name).lower()
    if key not in _MODULES:
        raise PeftrunError(
            f"unknown method '{name}'",
            where="method.name",
            hint=did_you_mean(str(name), _MODULES) or f"choose one of {', '.join(_MODULES)}",
        )
    return key


def get_spec(name: str) -> MethodSpec:
    """A method's parameters and registry facts, without importing its implementation (or torch)."""
    from peftrun.methods.configs import SPECS

    return SPECS[_known(name)]


def get_method(name: str) -> Method:
    """The whole method, its implementation imported (torch with it)."""
    return importlib.import_module(_MODULES[_known(name)]).METHOD


def method_for_peft_type(peft_type: str) -> Method:
    for name in _MODULES:
        if get_spec(name).peft_type == peft_type:
            return get_method(name)
    raise PeftrunError(f"peft_type '{peft_type}' is not a method peftrun knows")
