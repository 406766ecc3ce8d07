"""A tiny, fast training run for reliability tests: a 2-layer BERT classifier, a byte tokenizer, 40 rows."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

WORDS_POS = ["good", "great", "fine", "lovely", "happy", "nice"]
WORDS_NEG = ["bad", "awful", "poor", "sad", "ugly", "grim"]


def write_rows(path: Path, n: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(n):
            words = WORDS_POS if i % 2 == 0 else WORDS_NEG
            writer.writerow(
                [f"a {words[i % 6]} and {words[(i * 5 + 1) % 6]} day {i}", "pos" if i % 2 == 0 else "neg"]
            )
    return path


def tiny_recipe_dict(model_dir: Path, data_dir: Path, output_dir: Path, **training) -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "task_type": "SEQ_CLS", "tokenizer": "byt5"},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        "data": {"path": str(data_dir), "max_length": 32},
        "training": {
            "num_epochs": 3,
            "learning_rate": 0.01,
            "batch_size": 4,
            "seed": 7,
            "logging_steps": 1,
            "progress_bar": False,
            "eval_each_epoch": True,
            **training,
        },
        "output_dir": str(output_dir),
    }


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_model_dir(root: Path) -> Path:
    """A tiny BERT classifier whose vocabulary covers the byte tokenizer's 384 ids."""
    from tiny import save_tiny

    path = root / "tiny-bert-cls"
    if not (path / "config.json").is_file():
        save_tiny(path, "bert", "SEQ_CLS", vocab_size=384, num_labels=2)
    return path
