"""Loading a saved adapter (peft's format) onto its base model, with the tokenizer saved beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from peftrun.adapted import PeftrunModel
from peftrun.errors import PeftrunError
from peftrun.io.outputs import user_path
from peftrun.io.peft_format import ADAPTER_CONFIG, RECIPE_COPY, read_adapter, read_recipe_copy
from peftrun.methods import method_for_peft_type
from peftrun.models import load_model, load_tokenizer
from peftrun.recipe import ModelSection
from peftrun.tasks import has_label_names

HEAD_KEYS = ("classifier.out_proj.weight", "classifier.weight", "score.weight")


def _num_labels_from_state(state: dict[str, torch.Tensor]) -> int | None:
    for key, tensor in state.items():
        if key.endswith(HEAD_KEYS):
            return int(tensor.shape[0])
    return None


# What an adapter folder may never decide: running code, loading pickle, where files get written.
TRUST_KEYS = ("trust_remote_code", "allow_pickle")
CALLER_ONLY = (*TRUST_KEYS, "offload_folder", "random_init")


def _asks(value: Any) -> bool:
    return value not in (None, False, 0, "", "false", "False", "no")


def saved_section(folder: str | Path, name: str) -> dict[str, Any]:
    """Section `name` (model, data...) of the recipe saved beside an adapter: untrusted input, read within the
    YAML limits and checked for shape; {} where there is no saved recipe or no such section."""
    recipe = read_recipe_copy(folder)
    if recipe is None:
        return {}
    where = str(Path(folder) / RECIPE_COPY)
    if not isinstance(recipe, dict):
        raise PeftrunError("the saved recipe is not a mapping", where=where)
    section = recipe.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict) or not all(isinstance(k, str) for k in section):
        raise PeftrunError(f"the saved recipe's {name} section is not a mapping of keys", where=where)
    return dict(section)


def model_section_for(
    folder: Path, config: dict[str, Any], base: str | None, state, *,
    trust_remote_code: bool = False, allow_pickle: bool = False,
) -> ModelSection:
    """The base model's section for an adapter folder: the recipe saved beside it, else adapter_config.json.

    The one place that decides what an adapter folder may set. Running the base model's own code
    (trust_remote_code) and loading pickle (allow_pickle) come from the caller alone (the user's command
    line or recipe); a folder that asks for either without the caller's consent is refused, saying so.
    """
    folder = Path(folder)
    saved = saved_section(folder, "model")
    where = str(folder / RECIPE_COPY)
    granted = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    flags = {"trust_remote_code": "--trust-remote-code", "allow_pickle": "--allow-pickle"}
    for key in TRUST_KEYS:
        if _asks(saved.get(key)) and not granted[key]:
            raise PeftrunError(
                f"the adapter folder's saved recipe asks for model.{key}; peftrun never takes that from an "
                "adapter folder",
                where=where,
                hint=f"read what it would run or load; if you trust it, pass {flags[key]} (or set model.{key} "
                "in your own recipe)",
            )
    section = {k: v for k, v in saved.items() if k not in CALLER_ONLY}
    section.setdefault("name_or_path", config.get("base_model_name_or_path"))
    section.setdefault("task_type", config.get("task_type"))
    if base:
        section["name_or_path"] = str(user_path(base))
    if not section.get("name_or_path"):
        raise PeftrunError("the adapter does not name its base model", where=str(folder), hint="pass --base MODEL")
    if not section.get("task_type"):
        raise PeftrunError("the adapter does not name its task_type", where=str(folder / "adapter_config.json"))
    if has_label_names(section.get("task_type")) and not section.get("num_labels"):
        section["num_labels"] = _num_labels_from_state(state)
    section.update(granted, random_init=False)
    try:
        return ModelSection.model_validate(section)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(map(str, first["loc"]))
        raise PeftrunError(
            f"the adapter's base model settings are not valid: model.{key}: {first['msg']}",
            where=where if saved else str(folder / ADAPTER_CONFIG),
        ) from None


def load_adapted(
    folder: str | Path, *, base: str | None = None, allow_pickle: bool = False, name: str = "default",
    model_section: ModelSection | None = None, trust_remote_code: bool = False,
) -> tuple[PeftrunModel, Any]:
    """A PeftrunModel with the saved adapter loaded, and its tokenizer.

    model_section: the caller's own (a user's recipe), used as it is; else the folder's (model_section_for),
    with trust_remote_code and allow_pickle from the caller only."""
    folder = user_path(folder)
    config, state = read_adapter(folder, allow_pickle=allow_pickle)
    method_for_peft_type(config.get("peft_type", ""))  # an unknown method fails before the base loads
    section = model_section or model_section_for(
        folder, config, base, state, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    peft_model = PeftrunModel(load_model(section), section.task_type)
    peft_model.load_adapter(folder, name, allow_pickle=allow_pickle)
    return peft_model, adapter_tokenizer(folder, section)


def adapter_tokenizer(folder: Path, section: ModelSection):
    """The tokenizer saved beside the adapter, else the base model's, else None."""
    if (Path(folder) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # no code from an adapter folder
    try:
        return load_tokenizer(section)
    except PeftrunError:
        return None  # a bare model folder: merge and logits need no tokenizer
