"""Adapters on disk in peft's format.

An adapter folder holds `adapter_config.json` (peft's fields) and `adapter_model.safetensors`
(peft's keys), so peft, vLLM and anything else that reads peft adapters reads ours, and back.
Saving is atomic (io.atomic) and scrubbed of credentials (io.scrub).

Everything in an adapter folder is untrusted input and is checked where it is read (`read_adapter`,
`read_recipe_copy`): adapter_config.json must be a JSON object whose peft fields have their types (peft_type
naming a method peftrun knows; r and target_modules where the method has them; finite numbers within the
recipe's bounds), the weights must load and be finite, and a saved recipe's sections must be mappings
with the types a recipe has. Each refusal is one PeftrunError naming the file and the key or tensor.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftrun.errors import PeftrunError, did_you_mean
from peftrun.io.atomic import atomic_dir, atomic_files, naming_files
from peftrun.io.scrub import scrub
from peftrun.models import portable_name
from peftrun.tasks import TASK_HEADS, TASK_TYPES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
RECIPE_COPY = "peftrun_recipe.yaml"
# peft config fields that change what the adapter computes and that peftrun does not implement.
UNSUPPORTED_WHEN_SET = (
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "lora_bias",
)
MAX_CONFIG_BYTES = 16 << 20  # a peft config is a few KB; rank patterns of a huge model stay far below this
# Fields a method with a rank cannot do without: peft always writes them, and a default would only fail later
# as a mismatch of shapes (or build layers of the wrong size).
RANKED_REQUIRED = ("r", "target_modules")


def adapter_config_dict(
    peft_model, name: str, base_model: str, revision: str | None = None
) -> dict[str, Any]:
    method = peft_model.methods[name]
    body = peft_model.configs[name].peft_fields()
    body.update(resolved_fields(peft_model, name, body))
    return {
        **body,
        "peft_type": method.peft_type,
        "task_type": peft_model.task_type,
        "base_model_name_or_path": portable_name(base_model) if base_model else base_model,
        "revision": revision,
        "inference_mode": True,
    }


def resolved_fields(peft_model, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """What the recipe left to defaults, written out as peft does: the adapted module names,
    the trained task heads, and fan_in_fan_out for GPT-2-style Conv1D layers."""
    from peftrun.methods.layers import AdapterLayer

    layers = [(p, m) for p, m in peft_model.model.named_modules() if isinstance(m, AdapterLayer) and name in m.adapter_names()]
    out: dict[str, Any] = {}
    if "target_modules" in body:
        targets = body["target_modules"]
        if targets is None or targets == "all-linear":
            out["target_modules"] = sorted({p.rsplit(".", 1)[-1] for p, _ in layers})
        elif isinstance(targets, list):
            out["target_modules"] = sorted(set(targets))
    if "modules_to_save" in body and peft_model.task_type in TASK_HEADS:
        extra = body.get("modules_to_save") or []
        out["modules_to_save"] = extra + [h for h in TASK_HEADS[peft_model.task_type] if h not in extra]
    if "fan_in_fan_out" in body and layers and all(m.fan_in_fan_out for _, m in layers):
        out["fan_in_fan_out"] = True
    return out


def write_adapter(
    tmp: Path, peft_model, name: str, base_model: str, tokenizer=None, recipe=None, state=None
) -> None:
    """`state`: the adapter's tensors when the caller gathered them whole (sharded training). A model of
    several components (TEXT_TO_IMAGE: peftrun/diffusion/adapted.py) writes one such folder per component."""
    if state is None:
        state = peft_model.adapter_state_dict(name)
    if hasattr(peft_model, "write_components"):
        peft_model.write_components(tmp, name, base_model, state)
    else:
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        save_tensors(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config = adapter_config_dict(peft_model, name, base_model)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(scrub(config), indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if recipe is not None:
        (tmp / RECIPE_COPY).write_text(yaml.safe_dump(scrub(recipe.to_dict()), sort_keys=False))


def save_adapter(
    peft_model,
    folder: str | os.PathLike[str],
    *,
    name: str | None = None,
    base_model: str,
    tokenizer=None,
    recipe=None,
    whole_folder: bool = True,
    state=None,
) -> Path:
    """Save adapter `name` in peft's format. whole_folder: `folder` is the adapter alone (atomic swap).

    `state`: the adapter's tensors, gathered whole where training sharded them (see distributed.whole_adapter)."""
    name = name or peft_model.active_adapter

    def write(tmp: Path) -> None:
        write_adapter(tmp, peft_model, name, base_model, tokenizer, recipe, state)

    if whole_folder:
        with atomic_dir(folder) as tmp:
            write(tmp)
    else:
        atomic_files(folder, write, last=ADAPTER_CONFIG)
    return Path(folder)


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """torch.load restricted to tensors and plain containers: a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError... all mean the same to a user
        raise PeftrunError(
            f"cannot be read safely as tensors ({str(exc).splitlines()[0][:160]})",
            where=str(path),
            hint="a file that needs full pickle may run code when loaded; peftrun will not load it",
        ) from None


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata=None) -> None:
    """safetensors' save_file, whose failure to write (a full disk) is an OSError naming `path`."""
    with naming_files(path):
        save_file(tensors, str(path), metadata=metadata)


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save through memory, then one plain write: a failed write (a full disk) is an OSError naming
    `path`, where torch's own writer would raise a RuntimeError that names nothing."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with open(path, "wb") as fh:
            fh.write(buffer.getbuffer())
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first key (in order) whose floating-point tensor holds NaN or an infinity, else None."""
    for key, tensor in tensors.items():
        if torch.is_tensor(tensor) and (tensor.is_floating_point() or tensor.is_complex()):
            if not bool(torch.isfinite(tensor).all()):
                return key
    return None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _json_kind(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _NonFinite(Exception):
    """JSON's NaN / Infinity / -Infinity literals, which Python's json module would otherwise accept."""


def _refuse_constant(name: str) -> float:
    raise _NonFinite(name)


def read_adapter_config(file: str | os.PathLike[str]) -> dict[str, Any]:
    """adapter_config.json as a checked dict (see check_adapter_config); every fault names the file."""
    file = Path(file)
    where = str(file)
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise PeftrunError(f"{ADAPTER_CONFIG} has {size:,} bytes, over the limit of {MAX_CONFIG_BYTES:,}", where=where)
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PeftrunError(
            f"{ADAPTER_CONFIG} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})", where=where
        ) from None
    try:
        config = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise PeftrunError(
            f"{ADAPTER_CONFIG} is not valid JSON: {exc.msg} at line {exc.lineno}", where=where
        ) from None
    except _NonFinite as exc:
        raise PeftrunError(f"{ADAPTER_CONFIG} holds {exc.args[0]}: its numbers must be finite", where=where) from None
    except RecursionError:
        raise PeftrunError(f"{ADAPTER_CONFIG} is nested too deeply to be a peft config", where=where) from None
    except ValueError as exc:  # an integer of thousands of digits
        raise PeftrunError(f"{ADAPTER_CONFIG} cannot be read: {one_line_of(exc)}", where=where) from None
    return check_adapter_config(config, where)


def one_line_of(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type where the message is empty), cut to `limit`."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def check_adapter_config(config: Any, where: str) -> dict[str, Any]:
    """Refuse what is not a usable peft config, naming the key; return it with the method's fields in the
    types peftrun uses (pydantic's validated values), so every reader of the dict may trust them."""
    from peftrun.methods import get_spec, method_for_peft_type, method_names
    from peftrun.recipe import MAX_SIZE, find_unusable_value

    if not isinstance(config, dict):
        raise PeftrunError(
            f"{ADAPTER_CONFIG} must hold a JSON object of peft's fields, not {_json_kind(config)}", where=where
        )
    found = find_unusable_value(config)
    if found:
        path, reason = found
        raise PeftrunError(f"'{'.'.join(path)}' {reason}", where=where)
    if "peft_type" not in config:
        raise PeftrunError("'peft_type' is missing: this is not a peft adapter config", where=where)
    peft_type = config["peft_type"]
    if not isinstance(peft_type, str):
        raise PeftrunError(f"'peft_type' must be a string such as \"LORA\", got {_short(peft_type)}", where=where)
    try:
        method = method_for_peft_type(peft_type)
    except PeftrunError as exc:
        known = [get_spec(m).peft_type for m in method_names()]
        raise PeftrunError(exc.message, where=where, hint=did_you_mean(peft_type, known)) from None
    for key in ("base_model_name_or_path", "revision"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise PeftrunError(f"'{key}' must be a string or null, got {_short(config[key])}", where=where)
    task_type = config.get("task_type")
    if task_type is not None and task_type not in TASK_TYPES:
        raise PeftrunError(
            f"'task_type' {_short(task_type)} is not a task peftrun runs", where=where,
            hint=f"one of {', '.join(TASK_TYPES)}, or null",
        )
    if "r" in method.Config.model_fields:
        for key in RANKED_REQUIRED:
            if config.get(key) is None:
                raise PeftrunError(
                    f"'{key}' is missing: a {peft_type} adapter names its rank and the modules it adapts", where=where
                )
    validated = config_from_peft(method, config, where)
    found = find_unusable_value(validated, max_abs=MAX_SIZE)
    if found:
        path, reason = found
        raise PeftrunError(f"'{'.'.join(path)}' {reason}", where=where)
    typed = validated.model_dump(mode="json")
    return {k: typed[k] if k in typed and k != "inference_mode" else v for k, v in config.items()}


def read_weights(file: Path, *, pickle: bool = False) -> dict[str, torch.Tensor]:
    """An adapter's tensors: loadable (safetensors, or a pickle read safely) and finite, else the file named."""
    if pickle:
        state = safe_torch_load(file)
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise PeftrunError(
                f"holds {type(state).__name__}, not a mapping of tensor names to tensors", where=str(file)
            )
    else:
        try:
            state = load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            raise PeftrunError(
                f"the weights file is truncated or corrupt ({one_line_of(exc, 120)})",
                where=str(file),
                hint="restore it from a checkpoint under <output_dir>/checkpoints",
            ) from None
    bad = first_non_finite(state)
    if bad is not None:
        raise PeftrunError(
            f"tensor '{bad}' holds NaN or infinite values", where=str(file),
            hint="these weights are broken (training diverged?); use an earlier checkpoint",
        )
    return state


def read_adapter(
    folder: str | os.PathLike[str], *, allow_pickle: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, state dict) from a peft-format folder, both checked (see the module's docstring)."""
    folder = Path(folder)
    config_file = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise PeftrunError("adapter folder not found", where=str(folder))
    if not config_file.is_file():
        raise PeftrunError(f"no {ADAPTER_CONFIG} here: not an adapter folder", where=str(folder))
    config = read_adapter_config(config_file)
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        state = read_weights(weights)
    elif (folder / PICKLE_WEIGHTS).is_file():
        if not allow_pickle:
            raise PeftrunError(
                f"only a pickle file ({PICKLE_WEIGHTS}) is here; pickle can run code when loaded",
                where=str(folder),
                hint="pass --allow-pickle if you trust this file",
            )
        state = read_weights(folder / PICKLE_WEIGHTS, pickle=True)
    else:
        raise PeftrunError(f"no {ADAPTER_WEIGHTS} here", where=str(folder))
    return config, state


def config_from_peft(method, data: dict[str, Any], where: str = ADAPTER_CONFIG):
    """Our method config from peft's adapter_config.json; refuses features peftrun does not compute."""
    for key in UNSUPPORTED_WHEN_SET:
        if data.get(key) not in (None, False, {}, [], ""):
            raise PeftrunError(f"this adapter uses '{key}', which peftrun does not support", where=where)
    known = {k: v for k, v in data.items() if k in method.Config.model_fields}
    # Soft prompts read a saved table as it is (peft's inference mode: no text init, no p-tuning head).
    known["inference_mode"] = bool(data.get("inference_mode")) and method.is_prompt_learning
    from pydantic import ValidationError

    try:
        return method.Config.model_validate(known)
    except ValidationError as err:
        first = err.errors()[0]
        got = f" (got {_short(first['input'])})" if "input" in first and first["type"] != "missing" else ""
        raise PeftrunError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}{got}", where=where) from None


# The sections of a saved recipe that peftrun reads back, and placeholders for the keys a partial copy may leave
# out (a copy holds what its writer wrote; a user may keep only `data: {format: alpaca}`).
_SECTION_PLACEHOLDERS = {"model": {"name_or_path": "-", "task_type": TASK_TYPES[0]}}


def read_recipe_copy(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The recipe saved beside an adapter, or None where there is none. Untrusted: read within the YAML limits,
    a mapping whose sections are mappings, its `model` section typed as a recipe's, the `data` keys peftrun
    reads back (format, label_names) checked, and its numbers finite; else a PeftrunError naming file and key."""
    from peftrun.yaml_safe import read_yaml_lines

    file = Path(folder) / RECIPE_COPY
    if not file.is_file():
        return None
    data, lines = read_yaml_lines(file, what="saved recipe")
    check_recipe_copy(data, source=str(file), lines=lines)
    return data


def check_recipe_copy(data: dict[str, Any], *, source: str, lines: dict) -> None:
    from pydantic import ValidationError

    from peftrun.recipe import DataSection, ModelSection, Recipe, _where, check_values, raise_validation_error

    for key, section in data.items():
        if key in Recipe.model_fields and section is not None and not isinstance(section, dict) and key not in (
            "output_dir", "overwrite"
        ):
            raise PeftrunError(
                f"section '{key}' must be a mapping, not {type(section).__name__}",
                where=_where(source, lines, (str(key),)),
            )
    check_values(data, source=source, lines=lines)
    model = data.get("model")
    if model:
        try:
            ModelSection.model_validate({**_SECTION_PLACEHOLDERS["model"], **model})
        except ValidationError as err:
            raise_validation_error(err, schema=ModelSection, source=source, lines=lines, prefix=("model",))
    section = data.get("data") or {}
    if "format" in section:
        from pydantic import TypeAdapter

        try:
            TypeAdapter(DataSection.model_fields["format"].annotation).validate_python(section["format"])
        except ValidationError as err:
            raise_validation_error(err, schema=DataSection, source=source, lines=lines, prefix=("data", "format"))
    names = section.get("label_names")
    if names is not None and (
        not isinstance(names, list) or any(isinstance(n, (list, dict)) or n is None for n in names)
    ):
        raise PeftrunError(
            "must be a list of class names (single values)", where=_where(source, lines, ("data", "label_names"))
        )
