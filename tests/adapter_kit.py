"""Tiny language models saved with a tokenizer, and LoRA adapters with random (non-zero) weights, for the
tests of generate, several adapters, combinations and mixed batches."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import save_tiny

# A byte-level tokenizer (no files needed) with 384 ids; the tiny models get the same vocabulary size.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def save_lm(path: Path, arch: str = "llama", task_type: str = "CAUSAL_LM", **overrides) -> Path:
    """A tiny model plus a ByT5 tokenizer (with a chat template) in one folder, as a real base would be."""
    from transformers import ByT5Tokenizer

    if not (path / "config.json").is_file():
        model = save_tiny(path, arch, task_type, vocab_size=384, **overrides)
        if task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            letters_only(model)
            model.save_pretrained(path)
        tokenizer = ByT5Tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(path)
    return path


def letters_only(model) -> None:
    """Make the output head favour the bytes a-z (ByT5 ids 100..125), so that generated text is printable
    and runs to max_new_tokens (eos is never the likeliest): answers compare as plain strings."""
    head = model.get_output_embeddings().weight
    keep = torch.zeros(head.shape[0], dtype=torch.bool)
    keep[100:126] = True
    with torch.no_grad():
        head[~keep] = 0
        head[keep] *= 20


def load_base(path: Path, task_type: str):
    import transformers
    from tiny import TASK_CLASSES

    return getattr(transformers, TASK_CLASSES[task_type]).from_pretrained(path).eval()


def save_lora(base_dir: Path, out: Path, task_type: str = "CAUSAL_LM", *, seed: int, **config) -> Path:
    """A LoRA adapter on `base_dir` whose A and B are both random, saved in peft's format."""
    from peftrun.adapted import wrap
    from peftrun.io.peft_format import save_adapter
    from peftrun.methods.lora import LoraConfig

    base = load_base(base_dir, task_type)
    torch.manual_seed(seed)
    cfg = LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config})
    model = wrap(base, task_type, "lora", cfg)
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):  # a trained head differs from the base's
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".modules_to_save." in name:
                    p.add_(torch.randn_like(p) * 0.5)
    save_adapter(model, out, base_model=str(base_dir))
    return out


def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits
