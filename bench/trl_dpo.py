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

    python -m bench.trl_dpo --recipe R --output-dir D [--max-train-samples N] [--epochs N] [--max-steps N]
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
    cli = parser(__doc__, str(RECIPE), "out/bench_trl_dpo")
    cli.add_argument("--max-eval-samples", type=int, default=None)
    args = cli.parse_args(argv)
    started = time.perf_counter()

    import datasets
    import peft
    import trl

    setup = read_setup(args.recipe, overrides_of(args))
    recipe, tokenizer = setup.recipe, setup.tokenizer
    pref = recipe.preference
    train_rows = pairs_as_text(setup.splits.train, recipe.data, tokenizer)
    eval_rows = pairs_as_text(setup.splits.eval, recipe.data, tokenizer)

    model = peft.get_peft_model(base_model(setup), peft_lora(recipe.method))
    config = trl.DPOConfig(
        **trainer_arguments(args, setup),
        per_device_eval_batch_size=recipe.training.eval_batch_size or recipe.training.batch_size,
        beta=pref.beta,
        loss_type=[pref.loss_type],
        label_smoothing=pref.label_smoothing,
        logging_steps=5,
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
    keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
            "eval_rewards/rejected")
    figures = {k: metrics.get(k) for k in keys}
    report(trainer, train_output, {**figures, "train_rows": len(train_rows), "eval_rows": len(eval_rows)}, trained)


if __name__ == "__main__":
    main()
