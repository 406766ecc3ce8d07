"""What a recipe needs to know about the methods, as plain data: each method's parameters (its pydantic Config,
with peft's field names), the checks on them that need no model, and the registry facts (peft type, kind,
whether it merges, the tasks it trains).

Imports no torch, transformers or safetensors: `peftrun validate`, `methods` and `schema` read only this
module. The layers, encoders and `apply` functions live in one module per method (peftrun/methods/<name>.py),
which builds its `METHOD` from the spec here (`SPECS[name].implement(apply=..., ...)`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from peftrun.methods import MethodConfig, MethodSpec, PromptConfig, TunerConfig
from peftrun.tasks import CAUSAL_LM, LANGUAGE_TASKS, SEQ_2_SEQ_LM, TASK_TYPES

# ------------------------------------------------------------------ LoRA and AdaLoRA


class LoraConfig(TunerConfig):
    r: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=8, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)


class AdaLoraConfig(LoraConfig):
    target_r: int = Field(default=8, ge=0)
    init_r: int = Field(default=12, ge=1)
    tinit: int = Field(default=0, ge=0)
    tfinal: int = Field(default=0, ge=0)
    deltaT: int = Field(default=1, ge=1)
    beta1: float = Field(default=0.85, gt=0.0, lt=1.0)
    beta2: float = Field(default=0.85, gt=0.0, lt=1.0)
    orth_reg_weight: float = Field(default=0.5, ge=0.0)
    # None: the training loop's number of optimizer steps (written into the saved config).
    total_step: int | None = Field(default=None, ge=1)
    # peft's layout: "<module path>.lora_E" -> init_r flags, True where the triplet was kept.
    rank_pattern: dict[str, list[bool]] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> AdaLoraConfig:
        if self.use_dora:
            raise ValueError("AdaLoRA has no DoRA variant: set use_dora: false")
        if self.use_rslora:
            raise ValueError("AdaLoRA scales by lora_alpha / init_r; use_rslora does not apply to it")
        if self.alpha_pattern:
            raise ValueError(
                "AdaLoRA uses one lora_alpha for every layer; alpha_pattern does not apply to it"
            )
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        if self.total_step is not None:
            check_schedule(self.tinit, self.tfinal, self.total_step)
        return self


def check_schedule(tinit: int, tfinal: int, total_step: int) -> None:
    if tinit >= total_step - tfinal:
        raise ValueError(
            f"tinit ({tinit}) must be below total_step - tfinal ({total_step} - {tfinal}): "
            "no step is left for moving the rank budget"
        )


# ------------------------------------------------------------------ LyCORIS: LoHa, LoKr


class LycorisConfig(TunerConfig):
    """peft's LycorisConfig fields (LoHaConfig and LoKrConfig add theirs)."""

    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=8, gt=0)
    rank_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(default=0.0, ge=0.0, le=1.0)
    use_effective_conv2d: bool = False  # Conv2d layers with a kernel over 1x1: a CP core per factor
    init_weights: bool = True
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)


class LoHaConfig(LycorisConfig):
    pass


class LoKrConfig(LycorisConfig):
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | Literal["lycoris"] = True


# ------------------------------------------------------------------ (IA)³, bottleneck adapters, full fine-tuning


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


BOTTLENECK_DEFAULT_REDUCTION = 16


class BottleneckConfig(TunerConfig):
    reduction_factor: float | None = Field(default=None, gt=0)
    bottleneck_size: int | None = Field(default=None, ge=1)
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    # Which sub-layers get an adapter (ignored when target_modules names the output projections itself).
    sublayers: list[Literal["attention", "ffn"]] = Field(
        default_factory=lambda: ["attention", "ffn"], min_length=1
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    init_weights: bool = True

    @model_validator(mode="after")
    def _one_size(self) -> BottleneckConfig:
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ValueError("give reduction_factor or bottleneck_size, not both")
        return self

    def peft_fields(self) -> dict:
        """Left to defaults, the adapted modules follow from model type and `sublayers`; saved that way."""
        body = super().peft_fields()
        if body.get("target_modules") is None:
            body.pop("target_modules", None)
        return body

    def size_for(self, hidden: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(hidden // (self.reduction_factor or BOTTLENECK_DEFAULT_REDUCTION)))


class FullConfig(MethodConfig):
    """No parameters: everything trains."""


# ------------------------------------------------------------------ LLaMA-Adapter

# Architectures whose attention block is Llama's: q/k/v/o projections, rotary queries, grouped keys/values.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")


class AdaptionPromptConfig(MethodConfig):
    adapter_len: int = Field(default=10, ge=1)
    adapter_layers: int = Field(default=30, ge=1)
    target_modules: str = "self_attn"


def llama_adapter_check_model(model_type: str | None, name_or_path: str) -> str | None:
    """Refuse, before loading anything, a base whose declared architecture (None: unknown) is not Llama's."""
    if model_type is None or model_type in LLAMA_FAMILY:
        return None
    return (
        f"LLaMA-Adapter needs a Llama-family model ({', '.join(LLAMA_FAMILY)}), and "
        f"{name_or_path} is a '{model_type}'"
    )


# ------------------------------------------------------------------ soft prompts


def check_geometry(task_type: str, config: PromptConfig) -> str | None:
    """Refusals every soft-prompt method shares (Method.check)."""
    if config.num_transformer_submodules not in (None, 1) and task_type != SEQ_2_SEQ_LM:
        return (
            f"num_transformer_submodules={config.num_transformer_submodules} means separate encoder and decoder "
            "prompts, which only an encoder-decoder model (SEQ_2_SEQ_LM) has; leave it out or set 1"
        )
    if config.num_transformer_submodules not in (None, 1, 2):
        return "num_transformer_submodules is 1 (encoder) or 2 (encoder and decoder)"
    return None


class PromptTuningConfig(PromptConfig):
    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB"] = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    @model_validator(mode="after")
    def _text_needs_text_and_tokenizer(self):
        if self.prompt_tuning_init == "TEXT":
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init TEXT needs prompt_tuning_init_text")
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    "prompt_tuning_init TEXT needs tokenizer_name_or_path (the base model's tokenizer)"
                )
        return self


SOURCE_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")


class MultitaskPromptTuningConfig(PromptTuningConfig):
    prompt_tuning_init: Literal[  # type: ignore[assignment]
        "RANDOM", "TEXT", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"
    ] = "RANDOM"
    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int | None = Field(default=0, ge=0)
    num_ranks: int = Field(default=1, ge=1)
    num_tasks: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _source_needs_a_path(self):
        if self.prompt_tuning_init in SOURCE_INITS and not self.prompt_tuning_init_state_dict_path:
            raise ValueError(
                f"prompt_tuning_init {self.prompt_tuning_init} needs prompt_tuning_init_state_dict_path "
                "(the source run's adapter folder or adapter_model.safetensors)"
            )
        return self


class PromptEncoderConfig(PromptConfig):
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = Field(default=None, ge=1)
    encoder_num_layers: int = Field(default=2, ge=1)
    encoder_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


def p_tuning_check(task_type: str, config: PromptEncoderConfig) -> str | None:
    if config.encoder_reparameterization_type == "MLP" and config.encoder_num_layers != 2:
        return (
            f"encoder_num_layers={config.encoder_num_layers} sets the LSTM's depth; the MLP encoder always has "
            "3 layers (d -> h -> h -> d): use encoder_reparameterization_type LSTM or leave encoder_num_layers out"
        )
    if config.encoder_reparameterization_type == "MLP" and config.encoder_dropout > 0:
        return "encoder_dropout applies between LSTM layers; the MLP encoder has no dropout"
    return check_geometry(task_type, config)


class PrefixTuningConfig(PromptConfig):
    encoder_hidden_size: int | None = Field(default=None, ge=1)
    prefix_projection: bool = False
    init_weights: Literal["zero"] | None = None


def prefix_tuning_check(task_type: str, config: PrefixTuningConfig) -> str | None:
    expected = 2 if task_type == SEQ_2_SEQ_LM else 1
    if config.num_transformer_submodules not in (None, expected):
        return f"num_transformer_submodules is {expected} for {task_type} (prefixes for the decoder only, or the one stack)"
    return None


def _soft_prompt(**fields) -> MethodSpec:
    defaults = dict(kind="soft prompt", mergeable=False, task_types=LANGUAGE_TASKS, check=check_geometry)
    return MethodSpec(**{**defaults, **fields})


# ------------------------------------------------------------------ the registry, in `peftrun methods` order

SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            name="lora",
            peft_type="LORA",
            kind="reparameterisation",
            summary="low-rank update B·A added to frozen weights (rsLoRA scaling and DoRA magnitude/direction "
            "options)",
            mergeable=True,
            task_types=TASK_TYPES,
            Config=LoraConfig,
        ),
        _soft_prompt(
            name="prompt_tuning",
            peft_type="PROMPT_TUNING",
            summary="n learned virtual-token embeddings prepended to the input (init random, from vocab or from "
            "a text)",
            Config=PromptTuningConfig,
        ),
        _soft_prompt(
            name="p_tuning",
            peft_type="P_TUNING",
            summary="virtual tokens produced by a prompt encoder (MLP or BiLSTM+MLP) from n learned embeddings",
            Config=PromptEncoderConfig,
            check=p_tuning_check,
        ),
        _soft_prompt(
            name="multitask_prompt_tuning",
            peft_type="MULTITASK_PROMPT_TUNING",
            summary="a shared prompt rescaled per task by low-rank factors u_k v_k^T; source-trained, then "
            "transferred",
            Config=MultitaskPromptTuningConfig,
        ),
        MethodSpec(
            name="prefix_tuning",
            peft_type="PREFIX_TUNING",
            kind="soft prompt",
            summary="learned key/value prefixes in every attention layer, optionally through a "
            "reparameterisation MLP",
            mergeable=False,
            Config=PrefixTuningConfig,
            check=prefix_tuning_check,
        ),
        MethodSpec(
            name="llama_adapter",
            peft_type="ADAPTION_PROMPT",
            kind="additive",
            summary="adaption prompts with zero-initialised gated attention on the top layers of Llama-family "
            "models",
            mergeable=False,
            Config=AdaptionPromptConfig,
            task_types=(CAUSAL_LM,),
            check_model=llama_adapter_check_model,
        ),
        MethodSpec(
            name="adalora",
            peft_type="ADALORA",
            kind="reparameterisation",
            summary="SVD-form low-rank update P·Λ·Q whose rank budget is pruned to the most important triplets",
            mergeable=True,
            Config=AdaLoraConfig,
        ),
        MethodSpec(
            name="bottleneck",
            peft_type="BOTTLENECK",
            kind="additive",
            summary="Houlsby adapters: down-project, nonlinearity, up-project, residual, after attention and "
            "feed-forward",
            mergeable=False,
            Config=BottleneckConfig,
        ),
        MethodSpec(
            name="ia3",
            peft_type="IA3",
            kind="additive",
            summary="learned vectors rescaling attention keys/values and the feed-forward input ((IA)³)",
            mergeable=True,
            Config=IA3Config,
        ),
        MethodSpec(
            name="loha",
            peft_type="LOHA",
            kind="reparameterisation",
            summary="low-rank Hadamard product update (W1a·W1b)⊙(W2a·W2b) added to frozen weights "
            "(FedPara/LyCORIS)",
            mergeable=True,
            task_types=TASK_TYPES,
            Config=LoHaConfig,
        ),
        MethodSpec(
            name="lokr",
            peft_type="LOKR",
            kind="reparameterisation",
            summary="Kronecker-product update W1⊗W2 (optionally low-rank factors) added to frozen weights "
            "(LyCORIS)",
            mergeable=True,
            task_types=TASK_TYPES,
            Config=LoKrConfig,
        ),
        MethodSpec(
            name="full",
            peft_type="FULL",
            kind="selective/hybrid",
            summary="full fine-tuning (not PEFT): every base parameter trains; saves the whole model, the "
            "baseline adapters are compared with",
            mergeable=True,
            Config=FullConfig,
            trains_base_weights=True,
        ),
    )
}
