"""The recipe: one pydantic schema for the YAML a user writes, loading with line numbers, --set overrides.

Every check here runs before any model loads, so a typo costs a second, not a download.
"""

from __future__ import annotations

import copy
import math
import os
import re
import string
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from peftrun.errors import SECRET_KEYS, PeftrunError, did_you_mean, looks_secret, mask_secrets
from peftrun.tasks import CAUSAL_LM, SEQ_CLS, TASK_TYPES, TEXT_TO_IMAGE
from peftrun.yaml_safe import MAX_DEPTH, YamlSyntaxError, parse_yaml, parse_yaml_lines, read_yaml_text

# Upper bounds on what a recipe may ask for, so that a value that validates cannot crash a run later.
MAX_SIZE = 2**20  # a batch, a sequence length, a rank, a label count: beyond any model or device of today
MAX_COUNT = 2**31 - 1  # steps, samples: what every library's counters hold
MAX_SEED = 2**32 - 1  # numpy's seeds are 0..2**32-1
MAX_INT = 2**63 - 1  # any other integer, anywhere (config_overrides, DeepSpeed keys): an int64
MAX_WORKERS = 64  # data loader worker processes
MAX_PROCESSES = 1024  # training processes on one machine
MAX_MACHINES = 2**16
MAX_WEIGHT_DECAY = 100.0
MAX_DATASETS = 64  # entries of data.datasets

TaskType = Literal[TASK_TYPES]  # type: ignore[valid-type]  # the task types of peftrun.tasks


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(Section):
    name_or_path: str = Field(min_length=1)
    task_type: TaskType
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer: str | None = None
    num_labels: int | None = Field(default=None, ge=1, le=MAX_SIZE)
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


# method keys that hold another component's own method parameters (TEXT_TO_IMAGE: the text encoder's adapter)
COMPONENT_KEYS = ("text_encoder",)


class MethodSection(BaseModel):
    """`name` picks the method; every other key is that method's own parameter (peft's names), except
    `text_encoder`: the text encoder's own parameters of the same method (TEXT_TO_IMAGE)."""

    model_config = ConfigDict(extra="allow")
    name: str = "lora"

    @property
    def params(self) -> dict[str, Any]:
        return {k: v for k, v in (self.model_extra or {}).items() if k not in COMPONENT_KEYS}

    @property
    def components(self) -> dict[str, Any]:
        return {k: v for k, v in (self.model_extra or {}).items() if k in COMPONENT_KEYS}


class DataSection(Section):
    path: str | None = None
    name: str | None = None
    train_file: str | None = None
    eval_file: str | None = None
    test_file: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    test_split: str | None = None
    # preference: chosen/rejected pairs (reward, dpo, orpo); prompts: prompts alone (grpo); see peftrun/preference.py
    # images: a folder of instance images (DreamBooth, objective diffusion; see the dreambooth section)
    format: Literal["plain", "alpaca", "chat", "tokens", "text", "preference", "prompts", "images", "conll"] = "plain"
    # preference/prompt rows that cannot teach (identical answers, no room for an answer): drop and count, or refuse
    bad_rows: Literal["drop", "error"] = "drop"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    template: str | None = None
    target_template: str | None = None
    verbalizer: dict[str, str] | None = None
    label_names: list[str] | None = None
    max_length: int = Field(default=128, ge=8, le=MAX_SIZE)
    target_max_length: int = Field(default=32, ge=1, le=MAX_SIZE)
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    max_train_samples: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    max_eval_samples: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    train_on_inputs: bool = False
    drop_empty: bool = True
    # {name the recipe uses: column in the data}, as LLaMA-Factory's dataset_info `columns`
    columns: dict[str, str] | None = None
    # format: chat reads OpenAI (role/content) or ShareGPT (from/value) turns from this column when present
    messages_column: str = "messages"
    system_prompt: str | None = None
    # format: chat (peftrun/chat.py): which assistant turns are learned (every one; the last; the row as prompt +
    # completion), and the template: the tokenizer's own (unset), chatml, llama-3, alpaca, plain, or a .jinja file
    train_on: Literal["all_assistant", "last_assistant", "completion"] = "all_assistant"
    chat_template: str | None = None
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
        # YAML reads `{1: complaint}` with an int key; labels are matched as text. A list or mapping
        # where a label belongs stays as it is, for the schema to refuse.
        if isinstance(value, dict):
            return {_text(k): _text(v) for k, v in value.items()}
        return value

    @field_validator("label_names", mode="before")
    @classmethod
    def _string_names(cls, value: Any) -> Any:
        return [_text(v) for v in value] if isinstance(value, list) else value

    @field_validator("template", "target_template")
    @classmethod
    def _valid_template(cls, value: str | None) -> str | None:
        if value is not None:
            check_template(value)
        return value

    @field_validator("chat_template")
    @classmethod
    def _known_chat_template(cls, value: str | None) -> str | None:
        from peftrun.chat import TEMPLATES, is_template_file

        if value and value not in TEMPLATES and not is_template_file(value):
            close = did_you_mean(value, TEMPLATES)
            raise ValueError(
                f"unknown chat template '{value}'" + (f" ({close})" if close else "")
                + f": use one of {', '.join(TEMPLATES)}, a .jinja file, or leave it unset for the tokenizer's own"
            )
        return value

    # several datasets in one recipe (peftrun/datamix.py): each entry names its own source and may set any
    # key above that is not global (DATA_GLOBAL_KEYS); the keys of data are the defaults every entry takes
    datasets: list[DatasetEntry] | None = Field(default=None, min_length=1, max_length=MAX_DATASETS)
    # concat: every row of every dataset; weights: mix_size training rows drawn by the entries' weights
    # (default: weights when an entry has one, else concat)
    mix: Literal["concat", "weights"] | None = None
    mix_size: int | None = Field(default=None, ge=1, le=MAX_COUNT)  # default: all the datasets' training rows
    # per_dataset: each dataset's eval file/split, else eval_fraction of its rows; global: data.eval_file, else
    # eval_fraction of all the datasets' training rows together (default: global when data.eval_file is given)
    held_out: Literal["per_dataset", "global"] | None = None

    @model_validator(mode="after")
    def _has_a_source(self) -> DataSection:
        if self.datasets is not None:
            given = [k for k in ("path", "train_file") if getattr(self, k) is not None]
            if given:
                raise ValueError(
                    f"give data.datasets or data.{given[0]}, not both (one dataset is a list of one entry)"
                )
            return self
        mixing = [k for k in ("mix", "mix_size", "held_out") if getattr(self, k) is not None]
        if mixing:
            raise ValueError(f"data.{mixing[0]} mixes the entries of data.datasets, and there is none")
        if self.path is None and self.train_file is None:
            raise ValueError(
                "give data.path (a hub dataset or a local folder/file), data.train_file, or data.datasets"
            )
        if self.chat_template and self.format != "chat":
            raise ValueError(
                f"data.chat_template applies to format: chat, not {self.format} "
                "(preference and prompt rows use the tokenizer's own template)"
            )
        return self


# data keys that hold for the whole run, not per dataset: the model's input length, the classes, batching, the mix
DATA_GLOBAL_KEYS = (
    "datasets", "mix", "mix_size", "held_out", "max_length", "target_max_length", "verbalizer", "label_names",
    "constrain_labels", "group_by_length", "packing", "task_names",
)
# data keys naming a dataset's own files: an entry never takes them from data
DATA_SOURCE_KEYS = ("path", "name", "train_file", "eval_file", "test_file")


def _dataset_entry_model() -> type[BaseModel]:
    """One entry of data.datasets: every per-dataset key of DataSection (unset: data's value) and its weight.
    Built from DataSection's fields, so a key added there is an entry key too; the entry is validated again
    as a whole DataSection (recipe._check_datasets), with data's keys under it."""
    from pydantic import create_model

    fields: dict[str, Any] = {}
    for name, info in DataSection.model_fields.items():
        if name in DATA_GLOBAL_KEYS:
            continue
        copied = copy.copy(info)
        copied.default, copied.default_factory = None, None
        fields[name] = (info.annotation | None, copied)
    fields["weight"] = (float | None, Field(default=None, gt=0.0, le=1e6))
    return create_model(
        "DatasetEntry", __base__=Section, __doc__="One dataset of data.datasets (peftrun/datamix.py).", **fields
    )


DatasetEntry = _dataset_entry_model()
DataSection.model_rebuild()


class EarlyStopping(Section):
    """Stop when the metric has not improved for `patience` evaluations in a row (training.eval_steps and
    epoch ends); peftrun/training/best.py. patience null: never stop, only track the best (load_best_at_end)."""

    metric: str = Field(default="eval_loss", min_length=1)  # any metric an evaluation reports; eval_ optional
    mode: Literal["min", "max", "auto"] = "auto"  # auto: min for a loss or perplexity, max otherwise
    patience: int | None = Field(default=3, ge=1, le=MAX_COUNT)
    min_delta: float = Field(default=0.0, ge=0.0)  # a smaller change is no improvement


class TrainingSection(Section):
    num_epochs: int = Field(default=3, ge=1, le=MAX_SIZE)
    max_steps: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    learning_rate: float = Field(default=3e-4, gt=0.0, le=1.0)
    batch_size: int = Field(default=8, ge=1, le=MAX_SIZE)
    eval_batch_size: int | None = Field(default=None, ge=1, le=MAX_SIZE)
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=MAX_SIZE)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(default=0, ge=0, le=MAX_COUNT)
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=MAX_WEIGHT_DECAY)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)  # null: no clipping (inf is refused)
    seed: int = Field(default=42, ge=0, le=MAX_SEED)
    eval_each_epoch: bool = True
    # also evaluate every N optimizer steps (the held-out metrics go into metrics.jsonl at that step)
    eval_steps: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    early_stopping: EarlyStopping | None = None
    # the adapter of the best evaluation (early_stopping's metric, else eval_loss) becomes the final adapter
    load_best_at_end: bool = False
    logging_steps: int = Field(default=10, ge=1, le=MAX_COUNT)
    save_steps: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    save_each_epoch: bool = True
    keep_last_n: int | None = Field(default=2, ge=1, le=MAX_COUNT)
    auto_resume: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    num_workers: int = Field(default=0, ge=0, le=MAX_WORKERS)
    # torch.compile of the base model's forward: true (inductor) or a backend name; the first steps compile.
    compile: bool | Literal["inductor", "aot_eager", "eager"] = False
    # a causal or seq2seq LM's loss in chunks, never holding the batch's full logits (peftrun/lm_loss.py)
    chunked_loss: bool = True
    # LoRA's update as one fused function (peftrun/methods/lora_kernels.py); false runs the plain modules
    fused_lora: bool = True
    progress_bar: bool = True
    # what is learned (peftrun/training/objectives/): the task's labels, or a reward model, DPO, ORPO, GRPO
    # diffusion: DreamBooth's noise-prediction loss on a TEXT_TO_IMAGE pipeline (the dreambooth section)
    objective: Literal["supervised", "reward", "dpo", "orpo", "grpo", "diffusion"] = "supervised"
    # experiment trackers that get metrics.jsonl's numbers too (peftrun/training/tracking.py); none by default
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(default_factory=list, max_length=4)

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value


class PreferenceSection(Section):
    """Settings of the preference objectives (reward, dpo, orpo), with trl's names."""

    beta: float = Field(default=0.1, gt=0.0, le=1000.0)  # DPO's KL strength; ORPO's lambda
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # dpo
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)  # dpo (sigmoid): conservative DPO
    reward_margin: float = Field(default=0.0, ge=-1000.0, le=1000.0)  # reward: when rows carry no `margin`


class RewardSpec(Section):
    """One reward of GRPO (peftrun/rewards.py): a rule, or a saved classifier adapter."""

    type: Literal["regex", "length", "classifier"]
    name: str | None = None  # reported as rewards/<name>
    weight: float = Field(default=1.0, ge=-1000.0, le=1000.0)
    pattern: str | None = None  # regex
    min_chars: int = Field(default=0, ge=0, le=MAX_SIZE)  # length
    max_chars: int = Field(default=MAX_SIZE, ge=0, le=MAX_SIZE)
    adapter: str | None = None  # classifier: a saved SEQ_CLS adapter folder
    label: str | None = None  # classifier: the class whose probability is the reward (none for a reward model)
    with_prompt: bool = False  # classifier: score prompt + completion instead of the completion alone

    @model_validator(mode="after")
    def _complete(self) -> RewardSpec:
        if self.type == "regex":
            if not self.pattern:
                raise ValueError("a regex reward needs `pattern`")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a regular expression: {exc}") from None
        if self.type == "classifier" and not self.adapter:
            raise ValueError("a classifier reward needs `adapter` (a saved SEQ_CLS adapter folder)")
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars is above max_chars")
        return self


class GRPOSection(Section):
    """Group-relative policy optimisation (peftrun/training/objectives/grpo.py), with trl's names."""

    num_generations: int = Field(default=4, ge=2, le=256)  # completions sampled per prompt (the group)
    max_new_tokens: int = Field(default=32, ge=1, le=MAX_SIZE)
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    beta: float = Field(default=0.04, ge=0.0, le=1000.0)  # KL to the reference (the base, adapter off)
    epsilon: float = Field(default=0.2, gt=0.0, lt=1.0)  # clip range of the probability ratio
    # the KL term times the ratio rho (value 1, gradient d log pi): the unbiased gradient of the expected KL
    use_bias_correction_kl: bool = True
    eval_greedy: bool = True  # held-out prompts answered greedily, one each
    rewards: list[RewardSpec] = Field(default_factory=list)


class DreamBoothSection(Section):
    """DreamBooth (Ruiz et al., 2022) on a TEXT_TO_IMAGE pipeline: data.path holds the instance images;
    peftrun/training/objectives/diffusion.py. Names as diffusers' and peft's DreamBooth scripts."""

    instance_prompt: str | None = None  # e.g. "a photo of sks dog"
    class_prompt: str | None = None  # e.g. "a photo of dog" (prior preservation)
    class_data_dir: str | None = None  # class images; missing ones are generated with the base pipeline first
    with_prior_preservation: bool = False
    prior_loss_weight: float = Field(default=1.0, ge=0.0, le=1000.0)
    num_class_images: int = Field(default=100, ge=1, le=MAX_COUNT)
    sample_batch_size: int = Field(default=4, ge=1, le=MAX_SIZE)  # generating class images
    class_inference_steps: int = Field(default=50, ge=1, le=10_000)
    resolution: int = Field(default=512, ge=8, le=MAX_SIZE)
    center_crop: bool = False
    random_flip: bool = False
    train_text_encoder: bool = False  # its adapter takes method.text_encoder (default q_proj, v_proj)
    noise_offset: float = Field(default=0.0, ge=0.0, le=10.0)

    @model_validator(mode="after")
    def _prior(self) -> DreamBoothSection:
        if self.with_prior_preservation and (not self.class_prompt or not self.class_data_dir):
            raise ValueError("with_prior_preservation needs class_prompt and class_data_dir")
        if self.resolution % 8:
            raise ValueError("resolution must be a multiple of 8 (the VAE downsamples by 8)")
        return self


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
        # accelerate's keys set to other than their defaults (a saved recipe copy writes every key out)
        mixed = sorted(
            key for key in ACCELERATE_DEEPSPEED_KEYS
            if getattr(self, key) != DeepSpeedSection.model_fields[key].get_default(call_default_factory=True)
        )
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
    min_num_params: int = Field(default=100_000_000, ge=1, le=MAX_INT)  # for SIZE_BASED_WRAP
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = "FULL_STATE_DICT"
    cpu_ram_efficient_loading: bool = True
    activation_checkpointing: bool = False


class DistributedSection(Section):
    """How many processes train and on what engine; or `accelerate_config`, a ready accelerate config file.

    num_processes counts the processes on each machine (one per GPU); accelerate's config gets the total.
    """

    accelerate_config: str | None = None
    num_processes: int = Field(default=1, ge=1, le=MAX_PROCESSES)
    num_machines: int = Field(default=1, ge=1, le=MAX_MACHINES)
    machine_rank: int = Field(default=0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int | None = Field(default=None, ge=1, le=65535)
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # a collective waiting longer than this on a rank that died or hangs fails, and so ends the whole run
    timeout_seconds: int = Field(default=600, ge=1, le=86400)
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
            extra = sorted(changed - {"accelerate_config", "timeout_seconds"})  # the ranks read it
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
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    dreambooth: DreamBoothSection = Field(default_factory=DreamBoothSection)
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
        data["method"] = {"name": self.method.name, **self.method.params, **self.method.components}
        return data


# ---------------------------------------------------------------- messages that say where (lines: yaml_safe.py)


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
        if isinstance(part, int):  # an item of a list (data.datasets)
            continue
        field = getattr(cls, "model_fields", {}).get(str(part))
        if field is None:
            return []
        cls = _model_in(field.annotation)
    return list(getattr(cls, "model_fields", {}).keys())


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside `X | None` or `list[X]` (itself where it is one)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _short(value: Any) -> str:
    if isinstance(value, str) and looks_secret(value):
        return "'<redacted>'"
    text = mask_secrets(repr(value))  # before cutting: a cut token no longer looks like one
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value: Any) -> Any:
    """A YAML scalar as text (labels and column names are matched as text); anything else unchanged."""
    if value is None or isinstance(value, (list, dict, set, tuple, bytes)):
        return value
    return str(value)


def check_template(template: str) -> None:
    """A data.template / target_template is filled with str.format_map(row): refuse what that cannot do.

    Only plain {column} fields (with an optional !s / !r / !a) are filled in; a literal brace is {{ or }}.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc} (write a literal brace as {{{{ or }}}})") from None
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise ValueError(f"template field {{{field}}} names no column: write {{column_name}}")
        if any(c in field for c in ".[]"):
            raise ValueError(
                f"template field {{{field}}} reaches into a value ('.' or '[]'); a template only fills in whole "
                "columns (rename such a column with data.columns)"
            )
        if conversion not in (None, "s", "r", "a"):
            raise ValueError(f"template field {{{field}!{conversion}}}: the conversion must be !s, !r or !a")
        if spec:
            raise ValueError(
                f"template field {{{field}:{spec}}}: format specs are not supported; a template fills in "
                "column text as it is"
            )


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
    if len(parts) > MAX_DEPTH:
        raise PeftrunError(f"--set {key.strip()[:60]}: a key path of {len(parts)} parts is deeper than any recipe")
    try:
        value = parse_yaml(raw, source=f"--set {key.strip()}") if raw.strip() else ""
    except YamlSyntaxError:
        value = raw
    return parts, value


def _list_index(items: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise PeftrunError(f"--set {item.split('=', 1)[0]}: '{part}' is not an index of that list (0..{len(items) - 1})")
    return int(part)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides or []:
        parts, value = _parse_override(item)
        node: Any = data
        for part in parts[:-1]:
            if isinstance(node, list):  # an item of a list by its index: data.datasets.1.weight=2
                node = node[_list_index(node, part, item)]
                if not isinstance(node, (dict, list)):
                    raise PeftrunError(f"--set {item.split('=', 1)[0]}: that list item holds a value, not keys")
                continue
            child = node.get(part)
            if not isinstance(child, (dict, list)):
                child = {}
                node[part] = child
            node = child
        if isinstance(node, list):
            node[_list_index(node, parts[-1], item)] = value
        else:
            node[parts[-1]] = value
    return data


# ---------------------------------------------------------------- numbers and text that would fail later


def find_unusable_value(value: Any, path: tuple[str, ...] = (), *, max_abs: float = MAX_INT):
    """The first value under `value` that validates but would break a run: (key path, reason) or None.

    Walks every mapping and list (typed fields, `Any` fields such as config_overrides, extra keys):
    a float must be finite, an integer or float at most `max_abs` in size, a string free of NUL bytes.
    """
    stack: list[tuple[tuple[str, ...], Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, BaseModel):
            item = item.model_dump()  # with extra keys (method parameters, DeepSpeed's own keys)
        if isinstance(item, dict):
            stack.extend(((*where, str(k)), v) for k, v in reversed(list(item.items())))
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(((*where, str(i)), v) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, bool):
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                return where, f"must be a finite number (got {item!r})"
            if abs(item) > max_abs:
                return where, f"must be at most {max_abs:g} in size (got {item:g})"
        elif isinstance(item, int):
            if abs(item) > max_abs:
                return where, f"must be at most {max_abs} in size (got {_short(item)})"
        elif isinstance(item, str) and "\x00" in item:
            return where, "holds a NUL character"
    return None


def check_values(
    value: Any, *, source: str | None, lines: dict[tuple[str, ...], int], prefix: tuple[str, ...] = (),
    max_abs: float = MAX_INT,
) -> None:
    """Raise a PeftrunError naming the key of the first value find_unusable_value finds."""
    found = find_unusable_value(value, max_abs=max_abs)
    if found:
        where, reason = found
        raise PeftrunError(reason, where=_where(source, lines, (*prefix, *where)))


# ---------------------------------------------------------------- loading


def build_method_config(recipe: Recipe, *, lines: dict[tuple[str, ...], int], source: str | None) -> Any:
    from peftrun.methods import get_spec

    try:
        method = get_spec(recipe.method.name)
    except PeftrunError as exc:
        raise PeftrunError(exc.message, where=_where(source, lines, ("method", "name")), hint=exc.hint) from None
    try:
        config = method.Config.model_validate(recipe.method.params)
    except ValidationError as err:
        raise_validation_error(err, schema=method.Config, source=source, lines=lines, prefix=("method",))
    # every method's numbers, whatever their fields: finite, and no larger than a size a model can take
    check_values(config, source=source, lines=lines, prefix=("method",), max_abs=MAX_SIZE)
    reason = method.unsupported_reason(recipe.model.task_type, config)
    quantised = "load_in_8bit" if recipe.model.load_in_8bit else "load_in_4bit" if recipe.model.load_in_4bit else None
    if method.trains_base_weights and quantised:
        raise PeftrunError(
            f"method '{method.name}' trains the base weights themselves, and 8-bit or 4-bit weights cannot train",
            where=_where(source, lines, ("model", quantised)),
        )
    if not reason and method.check_model is not None:
        from peftrun.model_files import declared_model_type

        name = recipe.model.name_or_path
        reason = method.check_model(declared_model_type(name), name)
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


# objective -> (the task type it trains, the data format it reads); supervised fits every task and format
OBJECTIVE_FIT = {
    "reward": (SEQ_CLS, "preference"),
    "dpo": (CAUSAL_LM, "preference"),
    "orpo": (CAUSAL_LM, "preference"),
    "grpo": (CAUSAL_LM, "prompts"),
    "diffusion": (TEXT_TO_IMAGE, "images"),
}


def entry_data(data: DataSection, index: int) -> DataSection:
    """The data section that dataset `index` of data.datasets is read with: data's keys (but the mix and the
    sources) with the entry's own keys over them. Raises pydantic's ValidationError for a bad combination."""
    base = data.model_dump(exclude={"datasets", "mix", "mix_size", "held_out", *DATA_SOURCE_KEYS})
    base.update(data.datasets[index].model_dump(exclude_unset=True, exclude={"weight"}))
    return DataSection.model_validate(base)


def _check_datasets(recipe: Recipe, source: str | None, lines: dict[tuple[str, ...], int]) -> None:
    """Every entry of data.datasets makes a valid data section with data's keys under it; weights need mix:
    weights; the entries' own held-out data fits held_out. Each error names the entry."""
    data = recipe.data
    if data.datasets is None:
        return
    weighted = [i for i, e in enumerate(data.datasets) if e.weight is not None]
    for i, entry in enumerate(data.datasets):
        at = ("data", "datasets", str(i))
        if entry.path is None and entry.train_file is None:
            raise PeftrunError(
                "a dataset entry needs path (a hub dataset or a local folder/file) or train_file",
                where=_where(source, lines, at),
            )
        try:
            entry_data(data, i)
        except ValidationError as err:
            raise_validation_error(err, schema=DataSection, source=source, lines=lines, prefix=at)
        if data.mix == "concat" and entry.weight is not None:
            raise PeftrunError(
                "a weight is read when mixing by weights; data.mix is concat (every row of every dataset)",
                where=_where(source, lines, (*at, "weight")),
                hint="set data.mix: weights, or remove the weight",
            )
        own_eval = [k for k in ("eval_file", "eval_split") if getattr(entry, k) is not None]
        if own_eval and held_out(data) == "global":
            raise PeftrunError(
                f"{own_eval[0]} gives this dataset its own held-out rows, but data.held_out is global "
                "(one eval set for all)",
                where=_where(source, lines, (*at, own_eval[0])),
                hint="set data.held_out: per_dataset, or remove it",
            )
    if mix_mode(data) == "concat" and data.mix_size is not None:
        raise PeftrunError(
            "data.mix_size is the number of rows drawn when mixing by weights; data.mix is concat (every row)",
            where=_where(source, lines, ("data", "mix_size")),
            hint="set data.mix: weights (and a weight on each entry), or remove mix_size",
        )
    if mix_mode(data) == "weights" and len(weighted) != len(data.datasets):
        missing = next(i for i in range(len(data.datasets)) if i not in weighted)
        raise PeftrunError(
            "mixing by weights needs a weight on every dataset entry",
            where=_where(source, lines, ("data", "datasets", str(missing))),
            hint="e.g. weight: 1",
        )
    if data.eval_file is not None and held_out(data) == "per_dataset":
        raise PeftrunError(
            "data.eval_file is one eval set for all the datasets, but data.held_out is per_dataset",
            where=_where(source, lines, ("data", "eval_file")),
            hint="set data.held_out: global, or give each entry its own eval_file",
        )


def mix_mode(data: DataSection) -> str:
    """How data.datasets are combined: data.mix, else weights when an entry has a weight, else concat."""
    if data.mix is not None:
        return data.mix
    return "weights" if any(e.weight is not None for e in data.datasets or []) else "concat"


def held_out(data: DataSection) -> str:
    """Where data.datasets' eval rows come from: data.held_out, else global when data.eval_file is given."""
    if data.held_out is not None:
        return data.held_out
    return "global" if data.eval_file is not None else "per_dataset"


def data_formats(recipe: Recipe) -> list[tuple[tuple[str, ...], str]]:
    """(recipe key, format) of the data: data.format, or each dataset entry's."""
    data = recipe.data
    if data.datasets is None:
        return [(("data", "format"), data.format)]
    return [(("data", "datasets", str(i), "format"), entry_data(data, i).format) for i in range(len(data.datasets))]


def _check_objective(recipe: Recipe, source: str | None, lines: dict[tuple[str, ...], int]) -> None:
    objective, task = recipe.training.objective, recipe.model.task_type
    if recipe.method.components and task != TEXT_TO_IMAGE:
        raise PeftrunError(
            "method.text_encoder gives a text encoder's adapter its own parameters, which only TEXT_TO_IMAGE has",
            where=_where(source, lines, ("method", "text_encoder")),
        )
    if task == TEXT_TO_IMAGE and objective == "supervised":
        raise PeftrunError(
            "task_type TEXT_TO_IMAGE learns by denoising: set training.objective: diffusion",
            where=_where(source, lines, ("training", "objective")),
        )
    if objective == "supervised":
        for key, fmt in data_formats(recipe):
            if fmt in ("preference", "prompts"):
                raise PeftrunError(
                    f"data.format '{fmt}' is read by the preference objectives, not by supervised training",
                    where=_where(source, lines, key),
                    hint="set training.objective (reward, dpo or orpo for pairs; grpo for prompts)",
                )
        return
    if objective == "diffusion" and recipe.data.datasets is not None:
        raise PeftrunError(
            "DreamBooth reads one folder of instance images (data.path), not data.datasets",
            where=_where(source, lines, ("data", "datasets")),
        )
    want_task, want_format = OBJECTIVE_FIT[objective]
    if task != want_task:
        what = "a reward model is a one-output classifier" if objective == "reward" else "it trains a causal LM"
        raise PeftrunError(
            f"training.objective '{objective}' needs task_type {want_task} ({what}), not {task}",
            where=_where(source, lines, ("model", "task_type")),
        )
    for key, fmt in data_formats(recipe):
        if fmt != want_format:
            raise PeftrunError(
                f"training.objective '{objective}' reads data.format '{want_format}', not '{fmt}'",
                where=_where(source, lines, key),
            )
    if objective == "diffusion":
        _check_dreambooth(recipe, source, lines)
    if objective == "grpo" and not recipe.grpo.rewards:
        raise PeftrunError(
            "training.objective 'grpo' needs at least one reward",
            where=_where(source, lines, ("grpo", "rewards")),
            hint="e.g. grpo.rewards: [{type: regex, pattern: 'great'}] or a classifier adapter",
        )
    if recipe.data.packing or recipe.data.group_by_length:
        raise PeftrunError(
            f"training.objective '{objective}' batches pairs or prompts whole: no packing or length grouping",
            where=_where(source, lines, ("data", "packing" if recipe.data.packing else "group_by_length")),
        )


def _check_dreambooth(recipe: Recipe, source: str | None, lines: dict[tuple[str, ...], int]) -> None:
    db = recipe.dreambooth
    if not db.instance_prompt:
        raise PeftrunError(
            "DreamBooth needs the prompt of the instance images",
            where=_where(source, lines, ("dreambooth", "instance_prompt")),
            hint='e.g. dreambooth.instance_prompt: "a photo of sks dog"',
        )
    if recipe.data.path is None:
        raise PeftrunError(
            "DreamBooth reads the instance images from data.path (a folder of images)",
            where=_where(source, lines, ("data", "path")),
        )
    text = recipe.method.components.get("text_encoder")
    if text is not None and not db.train_text_encoder:
        raise PeftrunError(
            "method.text_encoder is set but dreambooth.train_text_encoder is false",
            where=_where(source, lines, ("method", "text_encoder")),
            hint="set dreambooth.train_text_encoder: true, or remove method.text_encoder",
        )
    if db.train_text_encoder:
        text_encoder_config(recipe, lines=lines, source=source)


def text_encoder_config(recipe: Recipe, *, lines: dict[tuple[str, ...], int] | None = None, source: str | None = None):
    """The text encoder's method config (TEXT_TO_IMAGE with dreambooth.train_text_encoder): method.text_encoder,
    or the method's defaults on q_proj and v_proj (peft's DreamBooth example)."""
    from peftrun.methods import get_spec

    method = get_spec(recipe.method.name)
    params = recipe.method.components.get("text_encoder")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise PeftrunError(
            "method.text_encoder is a mapping of the method's parameters, e.g. {r: 8, lora_alpha: 32}",
            where=_where(source, lines or {}, ("method", "text_encoder")),
        )
    params = {"target_modules": ["q_proj", "v_proj"], **params}
    try:
        config = method.Config.model_validate(params)
    except ValidationError as err:
        raise_validation_error(
            err, schema=method.Config, source=source, lines=lines or {}, prefix=("method", "text_encoder")
        )
    check_values(config, source=source, lines=lines or {}, prefix=("method", "text_encoder"), max_abs=MAX_SIZE)
    return config


def recipe_from_dict(
    data: Any, *, source: str | None = None, lines: dict[tuple[str, ...], int] | None = None, machine: bool = True
) -> Recipe:
    """Validate a recipe; `machine`: also check that this machine can run it (machine_problems)."""
    lines = lines or {}
    if data is None:
        raise PeftrunError(
            "the recipe is empty: a recipe is a YAML mapping with model, method, data and training sections",
            where=source,
        )
    if not isinstance(data, dict):
        raise PeftrunError(
            f"a recipe is a YAML mapping with model, method, data and training sections, got {type(data).__name__}",
            where=source,
        )
    refuse_secrets(data, source=source, lines=lines)
    data = expand_home(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise_validation_error(err, schema=Recipe, source=source, lines=lines)
    check_values(recipe, source=source, lines=lines)
    recipe._source = source
    recipe._method_config = build_method_config(recipe, lines=lines, source=source)
    _check_task_ids(recipe, source, lines)
    _check_datasets(recipe, source, lines)
    _check_objective(recipe, source, lines)
    if machine:
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


def cuda_present(exact: bool = True) -> bool:
    """Whether this machine has a CUDA GPU. `exact`: torch says (importing it); otherwise, where torch is not
    loaded yet, whether an NVIDIA device node exists: the advisory note of `peftrun validate`, which imports
    no torch (`--here` and `train` ask torch)."""
    import sys

    if exact or "torch" in sys.modules:
        import torch

        return torch.cuda.is_available()
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*"))


def machine_problems(recipe: Recipe, *, exact: bool = True) -> list[tuple[tuple[str, ...], str, str]]:
    """What this machine lacks to run the recipe, as (key, problem, hint); empty when it can. Apart from the
    recipe's validity: a GPU recipe is valid on a CPU machine (`peftrun validate`), but not trainable there.
    `exact=False`: the quick look of `peftrun validate`, without importing torch (cuda_present)."""
    import importlib.util

    problems = []
    if recipe.model.load_in_8bit or recipe.model.load_in_4bit:
        key = "load_in_8bit" if recipe.model.load_in_8bit else "load_in_4bit"
        if not cuda_present(exact):
            problems.append((
                ("model", key),
                "8-bit and 4-bit base weights use bitsandbytes, which needs a CUDA GPU; none is present here",
                f"set model.{key}=false to train in full precision on this machine",
            ))
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append((
                ("model", key), "8-bit and 4-bit base weights use bitsandbytes, which is not installed",
                "pip install bitsandbytes",
            ))
    return problems


def _check_hardware(recipe: Recipe, source: str | None, lines: dict[tuple[str, ...], int]) -> None:
    for key, problem, hint in machine_problems(recipe)[:1]:
        raise PeftrunError(problem, where=_where(source, lines, key), hint=hint)


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None, *, machine: bool = True) -> Recipe:
    """Read, override and validate a recipe file; raise PeftrunError on any user mistake. `machine=False`
    checks the recipe alone, not whether this machine can run it (`peftrun validate` without --here)."""
    source = str(path)
    text = read_yaml_text(path, what="recipe file")
    data, lines = parse_yaml_lines(text, source=source, mapping=False, what="recipe file")
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
    recipe = recipe_from_dict(data, source=source, lines=lines, machine=machine)
    recipe._overrides = list(overrides or [])
    return recipe


# ---------------------------------------------------------------- checks beyond the schema


def refuse_secrets(data: Any, *, source: str | None, lines: dict[tuple[str, ...], int], path: tuple = ()) -> None:
    """Credentials belong in the environment (HF_TOKEN), never in a recipe that gets copied beside adapters."""
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and looks_secret(key):
                raise PeftrunError(
                    "this key looks like a hub token; peftrun does not take secrets from recipes",
                    where=_where(source, lines, (*path, str(key))),
                    hint="remove it and export HF_TOKEN in the environment instead; the value is not shown here",
                )
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
    """output_dir gets files written and (checkpoints/) deleted: the one output policy decides (io.outputs)."""
    from peftrun.io.outputs import check_output_dir_value as check

    check(output_dir, where=where)


# Recipe keys that hold a local path: `~` is expanded in them before anything reads them.
PATH_KEYS = (
    ("output_dir",),
    ("model", "name_or_path"), ("model", "tokenizer"), ("model", "gguf_file"), ("model", "offload_folder"),
    ("data", "path"), ("data", "train_file"), ("data", "eval_file"), ("data", "test_file"),
    ("distributed", "accelerate_config"), ("distributed", "deepspeed", "config_file"),
    ("distributed", "deepspeed", "offload_optimizer_nvme_path"), ("distributed", "deepspeed", "offload_param_nvme_path"),
)


def expand_home(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw recipe with `~` expanded in its path keys (and data.datasets' files, grpo.rewards[*].adapter)."""
    data = copy.deepcopy(data)

    def expand(node: Any, key: str) -> None:
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key].startswith("~"):
            from peftrun.io.outputs import user_path

            node[key] = str(user_path(node[key]))

    for keys in PATH_KEYS:
        node: Any = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        expand(node, keys[-1])
    entries = data["data"].get("datasets") if isinstance(data.get("data"), dict) else None
    for entry in entries if isinstance(entries, list) else []:
        for key in DATA_SOURCE_KEYS:
            if key != "name":
                expand(entry, key)
    rewards = (data.get("grpo") or {}).get("rewards") if isinstance(data.get("grpo"), dict) else None
    for reward in rewards if isinstance(rewards, list) else []:
        expand(reward, "adapter")
    return data


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
