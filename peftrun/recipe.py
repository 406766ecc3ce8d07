"""The recipe: one pydantic schema for the YAML a user writes, loading with line numbers, --set overrides.

Every check here runs before any model loads, so a typo costs a second, not a download.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

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
    format: Literal["plain", "alpaca", "chat", "tokens", "text", "conll"] = "plain"
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
    # {name the recipe uses: column in the data}, as LLaMA-Factory's dataset_info `columns`
    columns: dict[str, str] | None = None
    # format: chat reads OpenAI (role/content) or ShareGPT (from/value) turns from this column when present
    messages_column: str = "messages"
    system_prompt: str | None = None
    # generating models answer with one of the verbaliser's label strings (eval and predict)
    constrain_labels: bool = True
    group_by_length: bool = False
    packing: bool = False
    # multitask prompt tuning: the column holding each row's task (an id 0..num_tasks-1, or a name in task_names)
    task_column: str | None = None
    task_names: list[str] | None = None
    # token classification: a prefix stripped from each token that has it (WikiANN's "en:"); and, reading CoNLL
    # files, an I-X after neither B-X nor I-X: an error naming the line (check), read as B-X (repair), or allowed (off)
    token_prefix: str | None = None
    bio: Literal["check", "repair", "off"] = "check"

    @field_validator("verbalizer", "columns", mode="before")
    @classmethod
    def _string_keys(cls, value: Any) -> Any:
        # YAML reads `{1: complaint}` with an int key; labels are matched as text
        if isinstance(value, dict):
            return {str(k): v if v is None else str(v) for k, v in value.items()}
        return value

    @field_validator("label_names", mode="before")
    @classmethod
    def _string_names(cls, value: Any) -> Any:
        return [str(v) for v in value] if isinstance(value, list) else value

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
    # torch.compile of the base model's forward: true (inductor) or a backend name; the first steps compile.
    compile: bool | Literal["inductor", "aot_eager", "eager"] = False
    # a causal LM's loss in chunks, never holding the batch's full logits (peftrun/lm_loss.py)
    chunked_loss: bool = True
    progress_bar: bool = True


Offload = Literal["none", "cpu", "nvme"]


# DeepSpeed's own config keys (its JSON), accepted inline in the deepspeed section instead of accelerate's.
DEEPSPEED_JSON_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "amp", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "activation_checkpointing", "steps_per_print", "wall_clock_breakdown",
    "communication_data_type", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
    "flops_profiler", "comms_logger", "data_types", "seq_parallel_communication_data_type",
)
ACCELERATE_DEEPSPEED_KEYS = (
    "config_file", "zero_stage", "offload_optimizer_device", "offload_param_device",
    "offload_optimizer_nvme_path", "offload_param_nvme_path", "zero3_save_16bit_model",
)


class DeepSpeedSection(Section):
    """accelerate's `deepspeed_config` keys, as in the seed's ds_zero3_cpu.yaml; or DeepSpeed's own config
    keys (zero_optimization, bf16, optimizer, ...) inline; or `config_file`, a DeepSpeed JSON."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    config_file: str | None = None  # a DeepSpeed JSON; when given, the keys below come from it instead
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer_device: Offload = "none"
    offload_param_device: Offload = "none"
    offload_optimizer_nvme_path: str | None = None
    offload_param_nvme_path: str | None = None
    zero3_init_flag: bool = True
    zero3_save_16bit_model: bool = True
    gradient_clipping: float | None = Field(default=None, gt=0.0)  # default: training.max_grad_norm

    @property
    def json_config(self) -> dict[str, Any]:
        """DeepSpeed's own keys given inline (empty when the section uses accelerate's keys)."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _offload_fits_stage(self) -> DeepSpeedSection:
        for key in self.json_config:
            if key not in DEEPSPEED_JSON_KEYS:
                hint = did_you_mean(key, [*DeepSpeedSection.model_fields, *DEEPSPEED_JSON_KEYS])
                raise ValueError(
                    f"unknown key '{key}': neither accelerate's deepspeed_config keys nor DeepSpeed's own"
                    + (f" ({hint})" if hint else "")
                )
        mixed = sorted(self.model_fields_set & set(ACCELERATE_DEEPSPEED_KEYS))
        if self.json_config and mixed:
            raise ValueError(
                f"give accelerate's keys ({', '.join(mixed)}) or DeepSpeed's own config "
                f"({', '.join(self.json_config)}), not both"
            )
        if self.offload_param_device != "none" and self.zero_stage != 3:
            raise ValueError("offload_param_device needs zero_stage 3 (only ZeRO-3 partitions parameters)")
        if self.offload_optimizer_device != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer_device needs zero_stage 1, 2 or 3")
        return self


class FsdpSection(Section):
    """accelerate's `fsdp_config` keys without the `fsdp_` prefix."""

    version: Literal[1, 2] = 2
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD"
    offload_params: bool = False
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = "TRANSFORMER_BASED_WRAP"
    transformer_layer_cls_to_wrap: str | None = None  # default: the model's own block class(es)
    min_num_params: int = Field(default=100_000_000, ge=1)  # for SIZE_BASED_WRAP
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = "FULL_STATE_DICT"
    cpu_ram_efficient_loading: bool = True
    activation_checkpointing: bool = False


class DistributedSection(Section):
    """How many processes train and on what engine; or `accelerate_config`, a ready accelerate config file.

    num_processes counts the processes on each machine (one per GPU); accelerate's config gets the total.
    """

    accelerate_config: str | None = None
    num_processes: int = Field(default=1, ge=1)
    num_machines: int = Field(default=1, ge=1)
    machine_rank: int = Field(default=0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int | None = Field(default=None, ge=1, le=65535)
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    strategy: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    fsdp: FsdpSection = Field(default_factory=FsdpSection)

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSection:
        # keys whose value differs from the default (a saved recipe copy writes every key out)
        changed = {
            name for name, f in DistributedSection.model_fields.items()
            if getattr(self, name) != f.get_default(call_default_factory=True)
        }
        if self.accelerate_config is not None:
            extra = sorted(changed - {"accelerate_config"})
            if extra:
                raise ValueError(
                    f"accelerate_config names a complete accelerate config; {', '.join(extra)} would be ignored: "
                    "set them in that file, or pass accelerate options after `peftrun launch RECIPE --`"
                )
            return self
        for engine in ("deepspeed", "fsdp"):
            if engine in changed:
                if "strategy" not in self.model_fields_set:
                    self.strategy = engine  # a deepspeed (fsdp) section alone means that engine
                elif self.strategy != engine:
                    raise ValueError(f"a {engine} section needs strategy: {engine} (it says {self.strategy})")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank {self.machine_rank} must be below num_machines {self.num_machines}")
        return self


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
    _overrides: list[str] = PrivateAttr(default_factory=list)

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
    from peftrun.checkpoint import looks_secret

    if isinstance(value, str) and looks_secret(value):
        return "'<redacted>'"
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
    if not reason and method.check_model is not None:
        reason = method.check_model(recipe.model)
        if reason:
            raise PeftrunError(
                f"method '{method.name}' cannot adapt this model: {reason}",
                where=_where(source, lines, ("model", "name_or_path")),
            )
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
    refuse_secrets(data, source=source, lines=lines)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise_validation_error(err, schema=Recipe, source=source, lines=lines)
    recipe._source = source
    recipe._method_config = build_method_config(recipe, lines=lines, source=source)
    _check_task_ids(recipe, source, lines)
    _check_hardware(recipe, source, lines)
    check_output_dir_value(recipe.output_dir, where=_where(source, lines, ("output_dir",)))
    if recipe.distributed.deepspeed.json_config:
        check_deepspeed_config(
            recipe.distributed.deepspeed.json_config, recipe,
            where=lambda *key: _where(source, lines, ("distributed", "deepspeed", *key)),
        )
    return recipe


def _check_task_ids(recipe: Recipe, source: str | None, lines: dict[tuple[str, ...], int]) -> None:
    """Per-row task ids (data.task_column) exist for multitask prompt tuning and only for it."""
    num_tasks = getattr(recipe.method_config, "num_tasks", None)
    column, names = recipe.data.task_column, recipe.data.task_names
    if num_tasks is None:
        if column or names:
            key = "task_column" if column else "task_names"
            raise PeftrunError(
                f"data.{key} gives each row a task id, which only multitask_prompt_tuning reads",
                where=_where(source, lines, ("data", key)),
                hint="remove it, or set method.name: multitask_prompt_tuning",
            )
        return
    if num_tasks > 1 and not column:
        raise PeftrunError(
            f"multitask prompt tuning over {num_tasks} tasks needs each row's task",
            where=_where(source, lines, ("method", "num_tasks")),
            hint="name the column that holds it with data.task_column (ids 0..num_tasks-1, or names in data.task_names)",
        )
    if names is not None and len(names) != num_tasks:
        raise PeftrunError(
            f"data.task_names lists {len(names)} task(s) but method.num_tasks is {num_tasks}",
            where=_where(source, lines, ("data", "task_names")),
        )


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
    recipe = recipe_from_dict(data, source=source, lines=_yaml_lines(text))
    recipe._overrides = list(overrides or [])
    return recipe


# ---------------------------------------------------------------- checks beyond the schema


def refuse_secrets(data: Any, *, source: str | None, lines: dict[tuple[str, ...], int], path: tuple = ()) -> None:
    """Credentials belong in the environment (HF_TOKEN), never in a recipe that gets copied beside adapters."""
    from peftrun.checkpoint import SECRET_KEYS, looks_secret

    if isinstance(data, dict):
        for key, value in data.items():
            if str(key).lower() in SECRET_KEYS:
                raise PeftrunError(
                    f"'{key}' looks like a credential; peftrun does not take secrets from recipes",
                    where=_where(source, lines, (*path, str(key))),
                    hint="remove it and export HF_TOKEN in the environment instead; the value is not shown here",
                )
            refuse_secrets(value, source=source, lines=lines, path=(*path, str(key)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            refuse_secrets(value, source=source, lines=lines, path=(*path, str(i)))
    elif isinstance(data, str) and looks_secret(data):
        raise PeftrunError(
            "this value looks like a hub token; peftrun does not take secrets from recipes",
            where=_where(source, lines, path),
            hint="export HF_TOKEN in the environment instead; the value is not shown here",
        )


def check_output_dir_value(output_dir: str, *, where: str) -> None:
    """output_dir gets files written and (checkpoints/) deleted: it must be a folder of its own."""
    if not output_dir.strip():
        raise PeftrunError("output_dir is empty", where=where)
    out = Path(output_dir).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    protected = (
        (Path(out.anchor), "the filesystem root"),
        (Path.home().resolve(), "your home folder"),
        (Path.cwd().resolve(), "the current folder"),
        (repo, "the peftrun source folder"),
    )
    for folder, what in protected:
        if out == folder or out in folder.parents:
            raise PeftrunError(
                f"output_dir '{output_dir}' is {what} or a folder above it; a run writes and prunes files there",
                where=where,
                hint="give a folder of its own, e.g. out/my_run",
            )


def _ds_value(config: dict[str, Any], *keys: str) -> Any:
    node: Any = config
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return None if node == "auto" else node


def check_deepspeed_config(config: dict[str, Any], recipe: Recipe, *, where) -> None:
    """A DeepSpeed config must agree with the recipe on what both set; "auto" takes the recipe's value.

    `where(*key)` renders the location of a key under the DeepSpeed config for messages.
    """
    t = recipe.training
    world = recipe.distributed.num_processes * recipe.distributed.num_machines
    expected = {
        ("gradient_accumulation_steps",): (t.gradient_accumulation_steps, "training.gradient_accumulation_steps"),
        ("train_micro_batch_size_per_gpu",): (t.batch_size, "training.batch_size"),
        ("train_batch_size",): (
            t.batch_size * t.gradient_accumulation_steps * world,
            "training.batch_size x gradient_accumulation_steps x processes",
        ),
        ("optimizer", "params", "lr"): (t.learning_rate, "training.learning_rate"),
    }
    for keys, (want, source_key) in expected.items():
        got = _ds_value(config, *keys)
        if got is None:
            continue
        if isinstance(got, bool) or not isinstance(got, (int, float)) or float(got) != float(want):
            raise PeftrunError(
                f"the DeepSpeed config sets {'.'.join(keys)}={got!r} but the recipe's {source_key} gives {want!r}",
                where=where(*keys),
                hint=f'set it to "auto" (DeepSpeed then takes the recipe\'s value) or to {want!r}',
            )
    for precision in ("fp16", "bf16"):
        enabled = _ds_value(config, precision, "enabled")
        if enabled is True and t.mixed_precision != precision:
            raise PeftrunError(
                f"the DeepSpeed config enables {precision} but training.mixed_precision is '{t.mixed_precision}'",
                where=where(precision, "enabled"),
                hint=f'set training.mixed_precision: {precision}, or {precision}.enabled: "auto"',
            )
    stage = _ds_value(config, "zero_optimization", "stage")
    if stage is not None and stage not in (0, 1, 2, 3):
        raise PeftrunError(
            f"zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})", where=where("zero_optimization", "stage")
        )
