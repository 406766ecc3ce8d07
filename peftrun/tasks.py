"""Per-task facts, in one place: the task types, their transformers auto classes, the label value the loss
ignores, the heads a task adds, and which tasks are language modelling or per-label classification.

Everything else asks this module (`is_lm(task)`, `TASK_HEADS[task]`...) instead of spelling task names out.
Imports nothing heavy: `peftrun validate` reads it.
"""

from __future__ import annotations

SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
CAUSAL_LM = "CAUSAL_LM"
SEQ_CLS = "SEQ_CLS"
TOKEN_CLS = "TOKEN_CLS"
# Stable Diffusion components (diffusers UNet, CLIP text encoder, VAE, noise scheduler): peftrun/diffusion/
TEXT_TO_IMAGE = "TEXT_TO_IMAGE"

# The transformers tasks (one model, one auto class); every method trains these.
LANGUAGE_TASKS: tuple[str, ...] = (SEQ_2_SEQ_LM, CAUSAL_LM, SEQ_CLS, TOKEN_CLS)
TASK_TYPES: tuple[str, ...] = (*LANGUAGE_TASKS, TEXT_TO_IMAGE)

# The label value cross-entropy skips (transformers' and torch's default): prompt tokens, padding, sub-words.
IGNORE_INDEX = -100

# transformers' auto class per task type (looked up by name so importing this module imports no transformers).
AUTO_CLASS: dict[str, str] = {
    SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    CAUSAL_LM: "AutoModelForCausalLM",
    SEQ_CLS: "AutoModelForSequenceClassification",
    TOKEN_CLS: "AutoModelForTokenClassification",
}

# Task heads that are new for a task and so train whole (peft's modules_to_save for these task types).
TASK_HEADS: dict[str, list[str]] = {SEQ_CLS: ["classifier", "score"], TOKEN_CLS: ["classifier", "score"]}


def is_lm(task_type: str) -> bool:
    """Tasks whose labels are token sequences (generation, perplexity)."""
    return task_type in (SEQ_2_SEQ_LM, CAUSAL_LM)


def has_label_names(task_type: str) -> bool:
    """Tasks with a fixed set of classes read from the data (a head with one output per class)."""
    return task_type in (SEQ_CLS, TOKEN_CLS)


def is_diffusion(task_type: str | None) -> bool:
    """Tasks on a diffusers pipeline's components rather than one transformers model."""
    return task_type == TEXT_TO_IMAGE


def auto_class(task_type: str):
    """The transformers auto class that loads a base model for `task_type`."""
    import transformers

    return getattr(transformers, AUTO_CLASS[task_type])
