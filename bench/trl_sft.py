"""The peer for the SFT end-to-end comparison: trl's SFTTrainer + peft LoRA on a peftrun chat recipe.

Same model (the recipe's SmolLM2-135M-Instruct, the HF folder peftrun converted it to), same rows (the recipe's
seeded eval carving and max_train/max_eval_samples, read through peftrun's data code), same template and
masking: every row rendered through the model's chat template and cut to data.max_length exactly as peftrun
cuts it (the answer kept whole, the prompt cut from the left), handed to trl as a tokenized prompt-completion
dataset (input_ids + completion_mask), so trl builds completion-only labels itself. Same LoRA (r, alpha,
dropout, all-linear), batch, epochs, learning rate, warm-up ratio, linear decay, weight decay, seed, bf16 autocast.
trl's own speed settings: fused AdamW (adamw_torch_fused), and with --packing trl's packing (best-fit
decreasing, which turns on padding-free batches: position_ids restarting per example, no pad tokens), the
counterpart of peftrun's data.packing.

The held-out loss is measured after training the way peftrun's evaluation measures it: the answer tokens'
cross-entropy averaged per token over the whole eval set, under the same autocast. Prints one BENCH_E2E line.

    python bench/trl_sft.py --recipe R --output-dir D [--max-train-samples N] [--epochs N] [--max-steps N] [--packing]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "offline" / "smollm2_alpaca_chat_lora.yaml"


def load_recipe_with(path: str, overrides: list[str]):
    """The recipe as peftrun reads it, with --set style overrides."""
    from peftrun.recipe import load_recipe

    return load_recipe(path, overrides)


def held_out_loss(model, rows: list[dict], pad_id: int, batch_size: int, bf16: bool) -> float:
    """Per-token mean of the answer tokens' cross-entropy over every eval row (peftrun's eval_loss)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in chunk])
            mask = torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk]
            )
            labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in chunk])
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--output-dir", default="out/bench_trl_sft")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--packing", action="store_true", help="trl's packing (bfd: padding-free batches)")
    parser.add_argument("--train-file", default=None, help="override the recipe's data.train_file")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import datasets
    import peft
    import torch
    import transformers
    import trl

    from peftrun.data import load_splits, tokenize_split
    from peftrun.models import resolve_model_path

    overrides = []
    if args.max_train_samples:
        overrides.append(f"data.max_train_samples={args.max_train_samples}")
    if args.train_file:
        overrides.append(f"data.train_file={args.train_file}")
    recipe = load_recipe_with(args.recipe, overrides)
    data_cfg, training, method = recipe.data, recipe.training, recipe.method
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    path = str(resolve_model_path(recipe.model.name_or_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    splits = load_splits(data_cfg, training.seed)

    def rows_of(ds, for_eval: bool) -> list[dict]:
        tok = tokenize_split(ds, data_cfg, tokenizer, "CAUSAL_LM", None, for_eval=for_eval)
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in tok]

    train_rows, eval_rows = rows_of(splits.train, False), rows_of(splits.eval, True)
    train_ds = datasets.Dataset.from_list(
        [
            {"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]}
            for r in train_rows
        ]
    )

    transformers.set_seed(training.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=method.r,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules="all-linear"
        if method.target_modules in ("all-linear", None)
        else method.target_modules,
    )
    bf16 = training.mixed_precision == "bf16"
    config = trl.SFTConfig(
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
        bf16=bf16,
        optim="adamw_torch_fused",
        gradient_checkpointing=True,  # trl's own default, stated: peftrun's side sets it too
        max_length=data_cfg.max_length,
        packing=args.packing,
        completion_only_loss=True,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=train_ds, processing_class=tokenizer, peft_config=lora
    )
    train_output = trainer.train()
    trained = time.perf_counter() - started
    loss = held_out_loss(
        trainer.model,
        eval_rows,
        tokenizer.pad_token_id,
        training.eval_batch_size or training.batch_size,
        bf16,
    )
    trainer.save_model(args.output_dir)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    out = {
        "eval_loss": loss,
        "train_loss": train_output.training_loss,  # the mean over the run's steps
        "last_logged_loss": losses[-1] if losses else None,
        "steps": trainer.state.global_step,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "train_s": trained,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }
    sys.stdout.write("BENCH_E2E " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
