"""Loading a saved adapter onto its base, and folding it in for good (`peftrun merge`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftrun.adapted import PeftrunModel
from peftrun.checkpoint import atomic_dir, read_adapter, read_recipe_copy
from peftrun.errors import PeftrunError
from peftrun.methods import method_for_peft_type
from peftrun.models import load_model, load_tokenizer
from peftrun.recipe import ModelSection

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
    if section.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") and not section.get("num_labels"):
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


def probe_batch(model, task_type: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small fixed input for comparing two versions of a model."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    ids = torch.randint(3, min(vocab, 1000), (2, 12), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task_type == "SEQ_2_SEQ_LM":
        batch["decoder_input_ids"] = torch.randint(3, min(vocab, 1000), (2, 5), generator=gen)
    return batch


@torch.no_grad()
def probe_logits(model, task_type: str) -> torch.Tensor:
    model.eval()
    inner = model.model if isinstance(model, PeftrunModel) else model
    batch = {k: v.to(next(inner.parameters()).device) for k, v in probe_batch(inner, task_type).items()}
    return model(**batch).logits.float().cpu()


def merge(
    adapter: str | Path, output: str | Path | None = None, *, base: str | None = None,
    allow_pickle: bool = False, tolerance: float = 1e-4,
) -> tuple[Path, float]:
    """Write base + adapter as one plain transformers model; returns (folder, max |merged - unmerged|)."""
    adapter = Path(adapter)
    output = Path(output) if output else adapter.parent / f"{adapter.name}-merged"
    if output.resolve() == adapter.resolve():
        raise PeftrunError("--output must differ from the adapter folder; merging never overwrites an adapter")
    peft_model, tokenizer = load_adapted(adapter, base=base, allow_pickle=allow_pickle)
    if not peft_model.method.mergeable:
        raise PeftrunError(
            f"method '{peft_model.method.name}' adds modules of its own and cannot be folded into the base weights",
            hint="load the adapter with its base instead (peftrun generate / eval --adapter)",
        )
    before = probe_logits(peft_model, peft_model.task_type)
    merged = peft_model.merge_and_unload()
    after = probe_logits(merged, peft_model.task_type)
    diff = (before - after).abs().max().item()
    if not diff <= tolerance:
        raise PeftrunError(
            f"merged and unmerged outputs differ by {diff:.3g} on a probe input (tolerance {tolerance:g}); nothing written"
        )
    with atomic_dir(output) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return output, diff
