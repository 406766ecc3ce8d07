"""Folding a saved adapter into its base for good (`peftrun merge`), checked on a probe input first."""

from __future__ import annotations

from pathlib import Path

import torch

from peftrun.adapted import PeftrunModel
from peftrun.errors import PeftrunError
from peftrun.io.atomic import atomic_dir
from peftrun.io.loading import load_adapted, model_section_for
from peftrun.io.lock import beside_lock
from peftrun.io.outputs import check_output_folder, user_path, write_marker
from peftrun.io.peft_format import first_non_finite, read_adapter
from peftrun.tasks import SEQ_2_SEQ_LM


def probe_batch(model, task_type: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small fixed input for comparing two versions of a model."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    ids = torch.randint(3, min(vocab, 1000), (2, 12), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task_type == SEQ_2_SEQ_LM:
        batch["decoder_input_ids"] = torch.randint(3, min(vocab, 1000), (2, 5), generator=gen)
    return batch


@torch.no_grad()
def probe_logits(model, task_type: str) -> torch.Tensor:
    model.eval()
    inner = model.model if isinstance(model, PeftrunModel) else model
    batch = {k: v.to(next(inner.parameters()).device) for k, v in probe_batch(inner, task_type).items()}
    return model(**batch).logits.float().cpu()


def verify_finite(adapter: Path, before: torch.Tensor, after: torch.Tensor, merged) -> None:
    """A merge is verified only where the outputs (with the adapter, and merged) and the merged weights are all
    finite: NaN compares unequal to everything, and an overflow to inf would otherwise be written as it is."""
    for name, logits in (("with the adapter", before), ("after merging", after)):
        if not bool(torch.isfinite(logits).all()):
            raise PeftrunError(
                f"the model's output on a probe input {name} is not finite (NaN or inf); nothing written",
                where=str(adapter),
            )
    bad = first_non_finite(merged.state_dict())
    if bad is not None:
        raise PeftrunError(f"merged weight '{bad}' is not finite (NaN or inf); nothing written", where=str(adapter))


def merge(
    adapter: str | Path, output: str | Path | None = None, *, base: str | None = None,
    allow_pickle: bool = False, tolerance: float = 1e-4, trust_remote_code: bool = False, overwrite: bool = False,
) -> tuple[Path, float]:
    """Write base + adapter as one plain transformers model; returns (folder, max |merged - unmerged|).

    The output follows io.outputs' policy: never the adapter, the base model or a folder above either, never
    a protected folder; an existing non-empty folder only with `overwrite` and only when peftrun wrote it."""
    adapter = user_path(adapter)
    output = user_path(output) if output else adapter.parent / f"{adapter.name}-merged"
    if output.resolve() == adapter.resolve():
        raise PeftrunError("--output must differ from the adapter folder; merging never overwrites an adapter")
    config, state = read_adapter(adapter, allow_pickle=allow_pickle)
    section = model_section_for(
        adapter, config, base, state, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    del state
    inputs = [(adapter, "the adapter folder"), (section.name_or_path, "the base model folder")]
    where = f"--output ({output})"
    check_output_folder(output, where=where, inputs=inputs, overwrite=overwrite)
    peft_model, tokenizer = load_adapted(adapter, allow_pickle=allow_pickle, model_section=section)
    if not peft_model.method.mergeable:
        raise PeftrunError(
            f"method '{peft_model.method.name}' adds modules of its own and cannot be folded into the base weights",
            hint="load the adapter with its base instead (peftrun generate / eval --adapter)",
        )
    before = probe_logits(peft_model, peft_model.task_type)
    merged = peft_model.merge_and_unload()
    after = probe_logits(merged, peft_model.task_type)
    verify_finite(adapter, before, after, merged)
    diff = (before - after).abs().max().item()
    if not diff <= tolerance:
        raise PeftrunError(
            f"merged and unmerged outputs differ by {diff:.3g} on a probe input (tolerance {tolerance:g}); nothing written"
        )
    with beside_lock(output, command="merge"):
        # checked again under the lock: another command may have written there since
        check_output_folder(output, where=where, inputs=inputs, overwrite=overwrite)
        with atomic_dir(output) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_marker(tmp, "merge")
    return output, diff
