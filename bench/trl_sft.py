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

    python -m bench.trl_sft --recipe R --output-dir D [--max-train-samples N] [--epochs N] [--max-steps N] [--packing]
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.trl_common import (
    base_model,
    overrides_of,
    parser,
    peft_lora,
    read_setup,
    report,
    trainer_arguments,
)

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "offline" / "smollm2_alpaca_chat_lora.yaml"


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
    cli = parser(__doc__, str(RECIPE), "out/bench_trl_sft")
    cli.add_argument("--packing", action="store_true", help="trl's packing (bfd: padding-free batches)")
    cli.add_argument("--train-file", default=None, help="override the recipe's data.train_file")
    args = cli.parse_args(argv)
    started = time.perf_counter()

    import datasets
    import trl

    from peftrun.data import tokenize_split

    setup = read_setup(args.recipe, overrides_of(args))
    data_cfg, training, tokenizer = setup.recipe.data, setup.recipe.training, setup.tokenizer

    def rows_of(ds, for_eval: bool) -> list[dict]:
        tok = tokenize_split(ds, data_cfg, tokenizer, "CAUSAL_LM", None, for_eval=for_eval)
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in tok]

    train_rows, eval_rows = rows_of(setup.splits.train, False), rows_of(setup.splits.eval, True)
    train_ds = datasets.Dataset.from_list(
        [
            {"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]}
            for r in train_rows
        ]
    )

    model = base_model(setup)
    config = trl.SFTConfig(
        **trainer_arguments(args, setup), packing=args.packing, completion_only_loss=True, logging_steps=10
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=peft_lora(setup.recipe.method),
    )
    train_output = trainer.train()
    trained = time.perf_counter() - started
    loss = held_out_loss(
        trainer.model,
        eval_rows,
        tokenizer.pad_token_id,
        training.eval_batch_size or training.batch_size,
        training.mixed_precision == "bf16",
    )
    trainer.save_model(args.output_dir)
    figures = {"eval_loss": loss, "train_rows": len(train_rows), "eval_rows": len(eval_rows)}
    report(trainer, train_output, figures, trained)


if __name__ == "__main__":
    main()
