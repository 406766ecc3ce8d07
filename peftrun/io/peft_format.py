"""Adapters on disk in peft's format.

An adapter folder holds `adapter_config.json` (peft's fields) and `adapter_model.safetensors`
(peft's keys), so peft, vLLM and anything else that reads peft adapters reads ours, and back.
Saving is atomic (io.atomic) and scrubbed of credentials (io.scrub).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftrun.errors import PeftrunError
from peftrun.io.atomic import atomic_dir, atomic_files
from peftrun.io.scrub import scrub
from peftrun.tasks import TASK_HEADS

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
        "base_model_name_or_path": base_model,
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
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
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


def read_adapter(
    folder: str | os.PathLike[str], *, allow_pickle: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, state dict) from a peft-format folder, with clear errors for what is wrong."""
    folder = Path(folder)
    config_file = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise PeftrunError("adapter folder not found", where=str(folder))
    if not config_file.is_file():
        raise PeftrunError(f"no {ADAPTER_CONFIG} here: not an adapter folder", where=str(folder))
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise PeftrunError(
            f"{ADAPTER_CONFIG} is not valid JSON: {exc.msg} at line {exc.lineno}", where=str(config_file)
        ) from None
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PeftrunError(
                f"the weights file is truncated or corrupt ({str(exc).splitlines()[0][:120]})",
                where=str(weights),
                hint="restore it from a checkpoint under <output_dir>/checkpoints",
            ) from None
    elif (folder / PICKLE_WEIGHTS).is_file():
        if not allow_pickle:
            raise PeftrunError(
                f"only a pickle file ({PICKLE_WEIGHTS}) is here; pickle can run code when loaded",
                where=str(folder),
                hint="pass --allow-pickle if you trust this file",
            )
        state = safe_torch_load(folder / PICKLE_WEIGHTS)
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
        raise PeftrunError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}", where=where) from None


def read_recipe_copy(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The recipe saved beside an adapter (untrusted: read within the YAML limits), or None where there is none."""
    from peftrun.yaml_safe import read_yaml

    file = Path(folder) / RECIPE_COPY
    return read_yaml(file, what="saved recipe") if file.is_file() else None
