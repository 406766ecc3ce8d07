"""The recipe: one pydantic schema for the YAML a user writes, loading with line numbers, --set overrides.

Every check here runs before any model loads, so a typo costs a second, not a download.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from peftrun.errors import PeftrunError, did_you_mean

TaskType = Literal["SEQ_2_SEQ_LM", "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS"]
TASK_TYPES: tuple[str, ...] = ("SEQ_2_SEQ_LM", "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(Section):
    name_or_path: str = Field(min_length=1)
    task_type: TaskType
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer: str | None = None
    num_labels: int | None = Field(default=None, ge=1)
    gguf_file: str | None = None
    random_init: bool = False
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    low_cpu_mem_usage: bool = True
    allow_pickle: bool = False
    # Accelerate's big-model inference: "auto" spreads the layers over GPUs, CPU and disk (offload_folder).
    device_map: str | dict[str, Any] | None = None
    offload_folder: str | None = None

    @model_validator(mode="after")
    def _one_quantisation(self) -> ModelSection:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit exclude each other: choose one")
        return self


class MethodSection(BaseModel):
    """`name` picks the method; every other key is that method's own parameter (peft's names)."""

    model_config = ConfigDict(extra="allow")
    name: str = "lora"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataSection(Section):
    path: str | None = None
    name: str | None = None
    train_file: str | None = None
    eval_file: str | None = None
    test_file: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    test_split: str | None = None
    format: Literal["plain", "alpaca", "chat", "tokens"] = "plain"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    template: str | None = None
    target_template: str | None = None
    verbalizer: dict[str, str] | None = None
    label_names: list[str] | None = None
    max_length: int = Field(default=128, ge=8)
    target_max_length: int = Field(default=32, ge=1)
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    max_train_samples: int | None = Field(default=None, ge=1)
    max_eval_samples: int | None = Field(default=None, ge=1)
    train_on_inputs: bool = False
    drop_empty: bool = True
    group_by_length: bool = False
    packing: bool = False

    @model_validator(mode="after")
    def _has_a_source(self) -> DataSection:
        if self.path is None and self.train_file is None:
            raise ValueError("give data.path (a hub dataset or a local folder/file) or data.train_file")
        return self


class TrainingSection(Section):
    num_epochs: int = Field(default=3, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    learning_rate: float = Field(default=3e-4, gt=0.0, le=1.0)
    batch_size: int = Field(default=8, ge=1)
    eval_batch_size: int | None = Field(default=None, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(default=0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    seed: int = 42
    eval_each_epoch: bool = True
    logging_steps: int = Field(default=10, ge=1)
    save_steps: int | None = Field(default=None, ge=1)
    save_each_epoch: bool = True
    keep_last_n: int | None = Field(default=2, ge=1)
    auto_resume: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    num_workers: int = Field(default=0, ge=0)
    compile: bool = False
    progress_bar: bool = True


class DistributedSection(Section):
    accelerate_config: str | None = None
    num_processes: int = Field(default=1, ge=1)
    num_machines: int = Field(default=1, ge=1)
    machine_rank: int = Field(default=0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int | None = Field(default=None, ge=1, le=65535)
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    strategy: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    deepspeed: dict[str, Any] | None = None
    fsdp: dict[str, Any] | None = None


class Recipe(Section):
    model: ModelSection
    method: MethodSection = Field(default_factory=MethodSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    output_dir: str = "out"
    overwrite: bool = False

    _method_config: Any = PrivateAttr(default=None)
    _source: str | None = PrivateAttr(default=None)

    @property
    def method_config(self) -> Any:
        """The method's own validated config (peft's field names), built by load_recipe."""
        if self._method_config is None:
            self._method_config = build_method_config(self, lines={}, source=self._source)
        return self._method_config

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["method"] = {"name": self.method.name, **self.method.params}
        return data


# ---------------------------------------------------------------- YAML with line numbers


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map every key path in a YAML document to its 1-based line, for messages that say where."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                lines[(*path, str(i))] = value.start_mark.line + 1
                walk(value, (*path, str(i)))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _where(source: str | None, lines: dict[tuple[str, ...], int], loc: tuple[Any, ...]) -> str:
    path = tuple(str(p) for p in loc)
    line = None
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            line = lines[path[:n]]
            break
    key = ".".join(path) if path else "recipe"
    if source and line:
        return f"{source}:{line}: {key}"
    if source:
        return f"{source}: {key}"
    return key


def _fields_at(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at the parent of `loc`, for did-you-mean on unknown keys."""
    cls: Any = model_cls
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(str(part))
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}).keys())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def raise_validation_error(
    err: ValidationError,
    *,
    schema: type[BaseModel],
    source: str | None,
    lines: dict[tuple[str, ...], int],
    prefix: tuple[str, ...] = (),
) -> None:
    """Turn pydantic's report into one PeftrunError: the key path, its line, the bad value, a hint."""
    errors = err.errors()
    first = errors[0]
    loc = (*prefix, *first["loc"])
    hint = None
    if first["type"] == "extra_forbidden":
        msg = f"unknown key '{loc[-1]}'"
        hint = did_you_mean(str(loc[-1]), _fields_at(schema, tuple(first["loc"])))
    elif first["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = f"{first['msg'].removeprefix('Value error, ')} (got {_short(first.get('input'))})"
    if len(errors) > 1:
        msg += f"; and {len(errors) - 1} more problem(s)"
    raise PeftrunError(msg, where=_where(source, lines, loc), hint=hint) from None


# ---------------------------------------------------------------- overrides


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise PeftrunError(f"--set expects key.path=value, got '{item}'")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise PeftrunError(f"--set expects key.path=value, got '{item}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides or []:
        parts, value = _parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


# ---------------------------------------------------------------- loading


def build_method_config(recipe: Recipe, *, lines: dict[tuple[str, ...], int], source: str | None) -> Any:
    from peftrun.methods import get_method

    try:
        method = get_method(recipe.method.name)
    except PeftrunError as exc:
        raise PeftrunError(exc.message, where=_where(source, lines, ("method", "name")), hint=exc.hint) from None
    try:
        config = method.Config.model_validate(recipe.method.params)
    except ValidationError as err:
        raise_validation_error(err, schema=method.Config, source=source, lines=lines, prefix=("method",))
    reason = method.unsupported_reason(recipe.model.task_type, config)
    if reason:
        raise PeftrunError(
            f"method '{method.name}' cannot train task_type {recipe.model.task_type}: {reason}",
            where=_where(source, lines, ("model", "task_type")),
        )
    return config


def recipe_from_dict(
    data: Any, *, source: str | None = None, lines: dict[tuple[str, ...], int] | None = None
) -> Recipe:
    lines = lines or {}
    if not isinstance(data, dict):
        raise PeftrunError(
            f"a recipe is a YAML mapping with model, method, data and training sections, got {type(data).__name__}",
            where=source,
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise_validation_error(err, schema=Recipe, source=source, lines=lines)
    recipe._source = source
    recipe._method_config = build_method_config(recipe, lines=lines, source=source)
    _check_hardware(recipe, source, lines)
    return recipe


def _check_hardware(recipe: Recipe, source: str | None, lines: dict[tuple[str, ...], int]) -> None:
    import torch

    if (recipe.model.load_in_8bit or recipe.model.load_in_4bit) and not torch.cuda.is_available():
        key = "load_in_8bit" if recipe.model.load_in_8bit else "load_in_4bit"
        raise PeftrunError(
            "8-bit and 4-bit base weights use bitsandbytes, which needs a CUDA GPU; none is present here",
            where=_where(source, lines, ("model", key)),
            hint=f"set model.{key}=false to train in full precision on this machine",
        )


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; raise PeftrunError on any user mistake."""
    source = str(path)
    file = Path(path)
    if not file.is_file():
        raise PeftrunError("recipe file not found", where=source)
    text = file.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise PeftrunError(f"not valid YAML: {getattr(exc, 'problem', exc)}", where=where) from None
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, source=source, lines=_yaml_lines(text))
