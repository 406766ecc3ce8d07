"""Loading a saved adapter (peft's format) onto its base model, with the tokenizer saved beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftrun.adapted import PeftrunModel
from peftrun.errors import PeftrunError
from peftrun.io.peft_format import read_adapter, read_recipe_copy
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


def model_section_for(folder: Path, config: dict[str, Any], base: str | None, state) -> ModelSection:
    """The base model's section: the recipe saved beside the adapter, else adapter_config.json."""
    recipe = read_recipe_copy(folder) or {}
    section = dict(recipe.get("model") or {})
    section.setdefault("name_or_path", config.get("base_model_name_or_path"))
    section.setdefault("task_type", config.get("task_type"))
    if base:
        section["name_or_path"] = base
    if not section.get("name_or_path"):
        raise PeftrunError("the adapter does not name its base model", where=str(folder), hint="pass --base MODEL")
    if not section.get("task_type"):
        raise PeftrunError("the adapter does not name its task_type", where=str(folder / "adapter_config.json"))
    if has_label_names(section.get("task_type")) and not section.get("num_labels"):
        section["num_labels"] = _num_labels_from_state(state)
    section["random_init"] = False
    return ModelSection.model_validate(section)


def load_adapted(
    folder: str | Path, *, base: str | None = None, allow_pickle: bool = False, name: str = "default",
    model_section: ModelSection | None = None,
) -> tuple[PeftrunModel, Any]:
    """A PeftrunModel with the saved adapter loaded, and its tokenizer."""
    folder = Path(folder)
    config, state = read_adapter(folder, allow_pickle=allow_pickle)
    method_for_peft_type(config.get("peft_type", ""))  # an unknown method fails before the base loads
    section = model_section or model_section_for(folder, config, base, state)
    peft_model = PeftrunModel(load_model(section), section.task_type)
    peft_model.load_adapter(folder, name, allow_pickle=allow_pickle)
    return peft_model, adapter_tokenizer(folder, section)


def adapter_tokenizer(folder: Path, section: ModelSection):
    """The tokenizer saved beside the adapter, else the base model's, else None."""
    if (Path(folder) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    try:
        return load_tokenizer(section)
    except PeftrunError:
        return None  # a bare model folder: merge and logits need no tokenizer
