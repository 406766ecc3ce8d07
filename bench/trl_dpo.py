"""The peer for the DPO end-to-end comparison: trl's DPOTrainer + peft LoRA on a peftrun DPO recipe.

Same model (the recipe's SmolLM2-135M-Instruct, the HF folder peftrun converted it to), same pairs: the recipe's
rows (seeded eval carving, max_train/max_eval_samples, read through peftrun's data code), split into prompt turns
and answers and rendered through the chat template as peftrun renders them, keeping the pairs peftrun keeps
(pairs whose prompt leaves no room for an answer in data.max_length are dropped on both sides). trl gets them
as text (prompt, chosen, rejected); it appends EOS to each answer and cuts prompt + answer to max_length from the
end, as peftrun does. The reference model is the base with the adapter switched off: a peft model with
ref_model=None, as peftrun's. Same beta, loss type, label smoothing, LoRA, batch, epochs, learning rate, warm-up
ratio, linear decay, seed, bf16 autocast; fused AdamW. The eval pairs are scored by trl's own evaluate() after
training (eval_loss, eval_rewards/accuracies, eval_rewards/margins...). Prints one BENCH_E2E line.

    python bench/trl_dpo.py --recipe R --output-dir D [--max-train-samples N] [--epochs N] [--max-steps N]
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
RECIPE = REPO / "recipes" / "offline" / "smollm2_dpo_lora.yaml"


def pairs_as_text(ds, data_cfg, tokenizer) -> list[dict]:
    """(prompt, chosen, rejected) texts of the pairs peftrun keeps, rendered as peftrun renders them."""
    from peftrun.preference import _lm_ids, pair_turns, render

    chat = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for row in ds:
        turns, chosen, rejected = pair_turns(row, data_cfg)
        if not chosen.strip() or not rejected.strip() or chosen.strip() == rejected.strip():
            continue
        prompt, chosen_text = render(tokenizer, turns, chosen, data_cfg)
        _, rejected_text = render(tokenizer, turns, rejected, data_cfg)
        if any(
            _lm_ids(tokenizer, prompt, a, data_cfg.max_length, chat) is None
            for a in (chosen_text, rejected_text)
        ):
            continue
        out.append({"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--output-dir", default="out/bench_trl_dpo")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import datasets
    import peft
    import torch
    import transformers
    import trl

    from peftrun.data import load_splits
    from peftrun.models import resolve_model_path
    from peftrun.recipe import load_recipe

    overrides = []
    if args.max_train_samples:
        overrides.append(f"data.max_train_samples={args.max_train_samples}")
    if args.max_eval_samples:
        overrides.append(f"data.max_eval_samples={args.max_eval_samples}")
    recipe = load_recipe(args.recipe, overrides)
    data_cfg, training, method, pref = recipe.data, recipe.training, recipe.method, recipe.preference
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    path = str(resolve_model_path(recipe.model.name_or_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    splits = load_splits(data_cfg, training.seed)
    train_rows = pairs_as_text(splits.train, data_cfg, tokenizer)
    eval_rows = pairs_as_text(splits.eval, data_cfg, tokenizer)

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
    model = peft.get_peft_model(model, lora)
    config = trl.DPOConfig(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs or training.num_epochs,
        max_steps=args.max_steps or -1,
        learning_rate=training.learning_rate,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.eval_batch_size or training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        warmup_steps=training.warmup_ratio,  # a float below 1: a ratio of the steps
        weight_decay=training.weight_decay,
        lr_scheduler_type=training.lr_scheduler,
        seed=training.seed,
        bf16=training.mixed_precision == "bf16",
        optim="adamw_torch_fused",
        gradient_checkpointing=True,  # trl's own default, stated: peftrun's side sets it too
        beta=pref.beta,
        loss_type=[pref.loss_type],
        label_smoothing=pref.label_smoothing,
        max_length=data_cfg.max_length,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=5,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=None,  # the reference is the base with the adapter switched off
        args=config,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows),
        processing_class=tokenizer,
    )
    train_output = trainer.train()
    trained = time.perf_counter() - started
    metrics = trainer.evaluate()
    trainer.save_model(args.output_dir)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    out = {
        "eval_loss": metrics.get("eval_loss"),
        "eval_rewards/accuracies": metrics.get("eval_rewards/accuracies"),
        "eval_rewards/margins": metrics.get("eval_rewards/margins"),
        "eval_rewards/chosen": metrics.get("eval_rewards/chosen"),
        "eval_rewards/rejected": metrics.get("eval_rewards/rejected"),
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
