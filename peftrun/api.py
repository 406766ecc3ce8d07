"""The Python API: load a base with several adapters, generate, combine adapters; for notebooks and scripts.

    >>> import peftrun
    >>> model = peftrun.load(adapters={"a": "out/a", "b": "out/b"})   # a PeftrunModel; model.tokenizer
    >>> model.set_adapter("b"); model.delete_adapter("a")             # and `with model.disable_adapters():`
    >>> peftrun.generate(model, ["Hello"], adapters=["b"])            # one adapter name (or None) per prompt
    >>> peftrun.combine({"a": ("out/a", 0.7), "b": ("out/b", 0.3)}, "out/ab", method="cat")
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from peftrun.adapted import PeftrunModel
from peftrun.combination import Combined
from peftrun.errors import PeftrunError
from peftrun.generation import DEFAULT, GenerationOptions, build_prompt, generate_texts, prompt_style
from peftrun.io.outputs import user_path
from peftrun.tasks import CAUSAL_LM

NAME = re.compile(r"^[A-Za-z_][\w.-]*$")
AdapterSpec = str | Path | Mapping[str, str | Path] | Sequence[str | Path] | None


def parse_adapter_spec(spec: str, *, with_weight: bool = False) -> tuple[str | None, str, float | None]:
    """`DIR`, `name=DIR` and, with_weight, `DIR:0.7` / `name=DIR:0.7` -> (name, folder, weight)."""
    name, folder, weight = None, spec, None
    left, sep, right = spec.partition("=")
    if sep and NAME.match(left):
        name, folder = left, right
    if with_weight:
        head, sep, tail = folder.rpartition(":")
        if sep:
            try:
                folder, weight = head, float(tail)
            except ValueError:
                pass
    if not folder:
        raise PeftrunError(f"'{spec}' names no adapter folder", hint="write DIR or name=DIR")
    return name, folder, weight


def name_adapters(specs: AdapterSpec) -> dict[str, Path]:
    """A name for each adapter folder: the given one, `default` for a lone folder, else the folder's name."""
    if specs is None:
        return {}
    if isinstance(specs, (str, Path)):
        specs = [specs]
    if isinstance(specs, Mapping):
        return {str(n): user_path(f) for n, f in specs.items()}
    named: dict[str, Path] = {}
    for spec in specs:
        name, folder, _ = parse_adapter_spec(str(spec))
        if name is None:
            name = "default" if len(specs) == 1 else Path(folder).name
        if name in named:
            raise PeftrunError(
                f"two adapters are named '{name}'", hint="name them: --adapter a=DIR --adapter b=DIR"
            )
        named[name] = user_path(folder)
    return named


def load(
    base: str | None = None,
    adapters: AdapterSpec = None,
    *,
    use: str | None = None,
    task_type: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> PeftrunModel:
    """A base model with adapters loaded side by side (adapters: a folder, a list, or {name: folder}).

    The base is the one the first adapter names unless `base` is given; `use` picks the active adapter
    (default: the first). device_map ("auto", ...) and offload_folder go to from_pretrained (Accelerate's
    big-model inference); otherwise the model goes to `device` (default: CUDA when present, else CPU).
    The tokenizer is `model.tokenizer`. trust_remote_code and allow_pickle are the caller's alone: an adapter
    folder's saved recipe that asks for either is refused without them (io.loading.model_section_for).
    """
    from peftrun.io.loading import adapter_tokenizer, load_adapted, model_section_for
    from peftrun.io.peft_format import read_adapter
    from peftrun.models import load_model
    from peftrun.recipe import ModelSection

    named = name_adapters(adapters)
    base = str(user_path(base)) if base else base
    if not named and not base:
        raise PeftrunError("give a base model, adapters, or both")
    if use is not None and use not in named:
        raise PeftrunError(f"no adapter named '{use}' to use", hint=f"given: {', '.join(named) or 'none'}")
    extra: dict[str, Any] = {"device_map": device_map, "offload_folder": offload_folder}
    if dtype:
        extra["dtype"] = dtype
    if named:
        first_name, first = next(iter(named.items()))
        config, state = read_adapter(first, allow_pickle=allow_pickle)
        _same_base(named, config, base, allow_pickle)
        section = model_section_for(
            first, config, base, state, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        ).model_copy(update=extra)
        section = ModelSection.model_validate(section.model_dump())
        model, tokenizer = load_adapted(
            first, name=first_name, model_section=section, allow_pickle=allow_pickle
        )
        for name, folder in list(named.items())[1:]:
            model.load_adapter(folder, name, allow_pickle=allow_pickle)
        model.set_adapter(use or first_name)
    else:
        section = ModelSection(
            name_or_path=base, task_type=task_type or CAUSAL_LM, trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle, **extra,
        )
        model = PeftrunModel(load_model(section), section.task_type)
        tokenizer = adapter_tokenizer(Path(base), section)
    if device_map is None:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.tokenizer = tokenizer
    return model.eval()


def _same_base(named: dict[str, Path], first_config: dict, base: str | None, allow_pickle: bool) -> None:
    from peftrun.io.peft_format import read_adapter

    want = first_config.get("base_model_name_or_path")
    for name, folder in list(named.items())[1:]:
        config, _ = read_adapter(folder, allow_pickle=allow_pickle)
        if base is None and config.get("base_model_name_or_path") != want:
            raise PeftrunError(
                f"adapter '{name}' was trained on {config.get('base_model_name_or_path')!r}, the first on {want!r}",
                where=str(folder),
                hint="pass base=... (--base) if they share the architecture",
            )


def generate(
    model: PeftrunModel,
    prompts: str | Sequence[str],
    *,
    adapters: Sequence[str | None] | None = None,
    template: str = "auto",
    system: str | None = None,
    tokenizer=None,
    **options: Any,
) -> list[str]:
    """Answers to prompts; adapters[i] (an adapter name, or None for the base) runs prompt i in one batch.

    template: "auto" (as the adapter's recipe trained, else the chat template), "chat", "alpaca" or "raw".
    options: max_new_tokens, do_sample, temperature, top_p, top_k, num_beams, repetition_penalty, seed.
    """
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise PeftrunError("this model has no tokenizer attached; pass tokenizer=...")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    names = list(adapters) if adapters is not None else [DEFAULT] * len(prompts)
    texts = [
        build_prompt(
            tokenizer,
            prompt_style(model, model.active_adapter if n == DEFAULT else n, tokenizer, template),
            p,
            system=system,
        )
        for p, n in zip(prompts, names)
    ]
    return generate_texts(model, tokenizer, texts, names, GenerationOptions(**options))


def combine(
    adapters: Mapping[str, tuple[str | Path, float]] | Sequence[tuple[str | Path, float]],
    output: str | Path,
    *,
    method: str = "cat",
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
    majority_sign_method: str = "total",
    svd_clamp: float | None = None,
    overwrite: bool = False,
) -> Combined:
    """Combine LoRA adapters {name: (folder, weight)} (or [(folder, weight), ...]) into a new adapter folder.

    method: peft's names, meaning what peft's add_weighted_adapter means by them (linear, cat, svd, ties,
    ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd;
    rank is peft's svd_rank), or peftrun's own formulas (linear_factors, ties_delta, dare_linear_delta,
    dare_ties_delta). See peftrun.combination for each one's equation.
    """
    from peftrun.combination import combine as run

    pairs = list(adapters.values()) if isinstance(adapters, Mapping) else list(adapters)
    return run(
        pairs,
        output,
        method=method,
        rank=rank,
        density=density,
        seed=seed,
        majority_sign_method=majority_sign_method,
        svd_clamp=svd_clamp,
        overwrite=overwrite,
    )


# ------------------------------------------------------------------ training: wrap a model, or train a recipe

# transformers class name endings -> task type (wrap's default when task_type is not given)
_CLASS_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
)


def _task_of(model) -> str:
    name = type(model).__name__
    for ending, task in _CLASS_TASKS:
        if name.endswith(ending) and (task != "SEQ_2_SEQ_LM" or getattr(model.config, "is_encoder_decoder", False)):
            return task
    raise PeftrunError(
        f"cannot tell the task of a {name}", hint="pass task_type= CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS or TOKEN_CLS"
    )


class WrappedModel(PeftrunModel):
    """A PeftrunModel as peftrun.wrap returns it, for code written against peft's PeftModel: `.config` is the
    base model's config (transformers' Trainer reads and writes it), `.peft_config` the adapters' configs."""

    @property
    def config(self):
        return self.model.config

    @property
    def peft_config(self) -> dict[str, Any]:
        return dict(self.configs)


def wrap(model, method: str = "lora", task_type: str | None = None, *, adapter_name: str = "default", **params):
    """A transformers model with a new adapter to train (peft's get_peft_model): `params` are the method's
    parameters with peft's names (r, lora_alpha, target_modules, ...), checked as a recipe's method section is.

    The result is a PeftrunModel: only the adapter (and a classification head) trains; `.trainable_report()` is
    peft's parameter line; train it in your own loop or in transformers' Trainer (its forward takes the base
    model's arguments); `.save_pretrained(folder)` writes peft's format.
    """
    import inspect
    import types

    from pydantic import ValidationError

    from peftrun.methods import get_method
    from peftrun.recipe import raise_validation_error
    from peftrun.tasks import TASK_TYPES

    task_type = task_type or _task_of(model)
    if task_type not in TASK_TYPES:
        raise PeftrunError(f"unknown task_type '{task_type}'", hint=f"one of {', '.join(TASK_TYPES)}")
    chosen = get_method(method)
    try:
        config = chosen.Config.model_validate(params)
    except ValidationError as err:
        raise_validation_error(err, schema=chosen.Config, source=None, lines={}, prefix=("method",))
    reason = chosen.unsupported_reason(task_type, config)
    if reason:
        raise PeftrunError(f"method '{chosen.name}' cannot train task_type {task_type}: {reason}")
    wrapped = WrappedModel(model, task_type)
    wrapped.add_adapter(adapter_name, chosen, config)
    # Trainer keeps the dataset columns the model's forward names: show it the base model's arguments
    base = inspect.signature(model.forward)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def forward(self, *args, **kwargs):
        return PeftrunModel.forward(self, *args, **kwargs)

    forward.__signature__ = base.replace(parameters=[self_param, *base.parameters.values()])
    forward.__doc__ = PeftrunModel.forward.__doc__
    wrapped.forward = types.MethodType(forward, wrapped)  # a bound method: a deep copy binds to the copy
    return wrapped


def train(recipe: str | Path | Mapping[str, Any], *, resume: bool = False, overrides: Sequence[str] = ()):
    """Train a recipe (a YAML path, or the same content as a dict) as `peftrun train` does; returns the last
    epoch's record (metrics.jsonl's last line). The adapter is in the recipe's output_dir."""
    from peftrun.recipe import apply_overrides, load_recipe, recipe_from_dict
    from peftrun.training.loop import train as run

    if isinstance(recipe, Mapping):
        loaded = recipe_from_dict(apply_overrides(dict(recipe), list(overrides)), source="recipe")
    else:
        loaded = load_recipe(recipe, list(overrides))
    return run(loaded, resume=resume)
