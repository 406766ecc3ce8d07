"""What the trl peers (trl_sft.py, trl_dpo.py) share: the recipe and its rows read through peftrun's own code,
the peft LoRA config matching the recipe's method, trl's training arguments matching the recipe's, and the
BENCH_E2E line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parser(doc: str, recipe: str, output_dir: str) -> argparse.ArgumentParser:
    """The options both peers take; each adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--recipe", default=recipe)
    p.add_argument("--output-dir", default=output_dir)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    return p


def overrides_of(args) -> list[str]:
    """--set style overrides of the recipe from the options given."""
    out = []
    for option, key in (("max_train_samples", "data.max_train_samples"),
                        ("max_eval_samples", "data.max_eval_samples"), ("train_file", "data.train_file")):
        if getattr(args, option, None):
            out.append(f"{key}={getattr(args, option)}")
    return out


@dataclass
class Setup:
    recipe: Any  # peftrun's Recipe
    path: str  # the HF model folder the recipe's model resolves to
    tokenizer: Any
    splits: Any  # peftrun's train/eval splits (seeded carving, max_*_samples)


def read_setup(recipe_path: str, overrides: list[str]) -> Setup:
    """The recipe as peftrun reads it (with --set style overrides), its model folder, tokenizer and rows."""
    import datasets
    import transformers

    from peftrun.data import load_splits
    from peftrun.models import resolve_model_path
    from peftrun.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    path = str(resolve_model_path(recipe.model.name_or_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return Setup(recipe, path, tokenizer, load_splits(recipe.data, recipe.training.seed))


def base_model(setup: Setup):
    """The base causal LM in fp32, after seeding as the recipe says (peftrun's side seeds the same way)."""
    import torch
    import transformers

    transformers.set_seed(setup.recipe.training.seed)
    return transformers.AutoModelForCausalLM.from_pretrained(setup.path, dtype=torch.float32)


def peft_lora(method):
    """peft's LoraConfig for the recipe's LoRA method (r, alpha, dropout, targets)."""
    import peft

    targets = method.target_modules
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=method.r,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules="all-linear" if targets in ("all-linear", None) else targets,
    )


def trainer_arguments(args, setup: Setup) -> dict[str, Any]:
    """trl config keywords both peers share: the recipe's schedule, batch, seed and precision, trl's speed
    settings (fused AdamW), gradient checkpointing as trl's default (peftrun's side sets it too), no saving or
    evaluation during training, no tracker, CPU."""
    training = setup.recipe.training
    return dict(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs or training.num_epochs,
        max_steps=args.max_steps or -1,
        learning_rate=training.learning_rate,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        warmup_steps=training.warmup_ratio,  # a float below 1: a ratio of the steps
        weight_decay=training.weight_decay,
        lr_scheduler_type=training.lr_scheduler,
        seed=training.seed,
        bf16=training.mixed_precision == "bf16",
        optim="adamw_torch_fused",
        gradient_checkpointing=True,
        max_length=setup.recipe.data.max_length,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )


def report(trainer, train_output, figures: dict[str, Any], train_s: float) -> None:
    """One BENCH_E2E line: the peer's figures, its steps, its mean and last logged train loss, its versions."""
    import peft
    import trl

    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    out = {
        **figures,
        "train_loss": train_output.training_loss,  # the mean over the run's steps
        "last_logged_loss": losses[-1] if losses else None,
        "steps": trainer.state.global_step,
        "train_s": train_s,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }
    sys.stdout.write("BENCH_E2E " + json.dumps(out) + "\n")
