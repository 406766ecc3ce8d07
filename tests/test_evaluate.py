"""Evaluation: token-weighted LM loss, classification metrics, label-constrained generation, log lines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model
from tiny_text import ONE_THREAD_ENV, one_thread, word_tokenizer  # noqa: F401
from torch.utils.data import DataLoader

from peftrun.data import Collator, tokenize_split
from peftrun.evaluate import EvalResult, LabelConstraint, evaluate, report_lines
from peftrun.recipe import DataSection

WORDS = ["tweet my order is late again", "thanks for the great help", "label complaint no", "the film was good bad"]
TWEETS = ["my order is late again", "thanks for the great help", "late late late", "great help thanks",
          "the film was good", "order is late"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _ds(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def _loader(ds, cfg, tok, task, names=None, batch_size=2):
    rows = tokenize_split(ds, cfg, tok, task, names, for_eval=True)
    return DataLoader(rows, batch_size=batch_size, collate_fn=Collator(tok.pad_token_id, task))


@pytest.fixture(scope="module")
def llama_tok():
    return word_tokenizer("llama", WORDS)


def test_causal_eval_loss_is_the_mean_over_answer_tokens(llama_tok):
    model = tiny_model("llama", "CAUSAL_LM", seed=3)
    # answers of different lengths, so a per-batch mean would weigh tokens unequally
    rows = [{"text": t, "out": o} for t, o in zip(TWEETS[:3], ["no complaint", "complaint", "the film was good"])]
    cfg = DataSection(train_file="x", template="tweet {text} label", target_template="{out}")
    result = evaluate(model, _loader(_ds(rows), cfg, llama_tok, "CAUSAL_LM"), task_type="CAUSAL_LM",
                      tokenizer=llama_tok, label_names=None, data_cfg=cfg, generate=False)
    total, count = 0.0, 0
    for row in tokenize_split(_ds(rows), cfg, llama_tok, "CAUSAL_LM", None, for_eval=False):
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"][1:])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    assert result.metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result.metrics["eval_ppl"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_constrained_generation_only_answers_with_labels(llama_tok):
    # a random model left free would babble; constrained, every answer is one of the labels
    model = tiny_model("llama", "CAUSAL_LM", seed=5)
    labels = ["complaint", "no complaint"]
    cfg = DataSection(train_file="x", template="tweet {text} label", label_column="y",
                      verbalizer={"1": "complaint", "2": "no complaint"})
    rows = [{"text": t, "y": 1 + i % 2} for i, t in enumerate(TWEETS)]
    result = evaluate(model, _loader(_ds(rows), cfg, llama_tok, "CAUSAL_LM", batch_size=4), task_type="CAUSAL_LM",
                      tokenizer=llama_tok, label_names=None, data_cfg=cfg)
    assert len(result.preds) == 6 and set(result.preds) <= set(labels)
    assert result.metrics["valid_label_rate"] == 1.0
    assert result.refs == ["complaint", "no complaint"] * 3
    assert result.metrics["accuracy"] == sum(p == r for p, r in zip(result.preds, result.refs)) / 6
    free = evaluate(model, _loader(_ds(rows), cfg.model_copy(update={"constrain_labels": False}), llama_tok,
                                   "CAUSAL_LM", batch_size=4),
                    task_type="CAUSAL_LM", tokenizer=llama_tok, label_names=None,
                    data_cfg=cfg.model_copy(update={"constrain_labels": False}))
    assert free.metrics["valid_label_rate"] < 1.0


def test_constraint_follows_the_label_tokens(llama_tok):
    c = LabelConstraint(llama_tok, ["complaint", "no complaint"], "CAUSAL_LM")
    comp = llama_tok("complaint", add_special_tokens=False)["input_ids"]
    no = llama_tok("no complaint", add_special_tokens=False)["input_ids"]
    eos = llama_tok.eos_token_id
    c.start = 3
    prompt = [7, 8, 9]
    assert c(0, torch.tensor(prompt)) == sorted({comp[0], no[0]})
    assert c(0, torch.tensor(prompt + no[:1])) == [no[1]]
    assert c(0, torch.tensor(prompt + comp)) == [eos]
    assert c.max_new_tokens == len(no) + 1


def test_seq2seq_constrained_generation_with_byte_tokenizer():
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    model = tiny_model("t5", "SEQ_2_SEQ_LM", seed=1)
    cfg = DataSection(train_file="x", template="Tweet : {text} Label : ", label_column="y",
                      verbalizer={"1": "complaint", "2": "no complaint"}, target_max_length=16)
    rows = [{"text": t, "y": 1 + i % 2} for i, t in enumerate(TWEETS[:4])]
    result = evaluate(model, _loader(_ds(rows), cfg, tok, "SEQ_2_SEQ_LM"), task_type="SEQ_2_SEQ_LM",
                      tokenizer=tok, label_names=None, data_cfg=cfg)
    assert set(result.preds) <= {"complaint", "no complaint"} and len(result.preds) == 4
    assert result.metrics["valid_label_rate"] == 1.0


def test_sequence_classification_metrics_match_argmax():
    tok = word_tokenizer("bert", WORDS)
    model = tiny_model("bert", "SEQ_CLS", seed=2, num_labels=2)
    cfg = DataSection(train_file="x")
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(TWEETS)]
    result = evaluate(model, _loader(_ds(rows), cfg, tok, "SEQ_CLS", ["0", "1"], batch_size=4), task_type="SEQ_CLS",
                      tokenizer=tok, label_names=["0", "1"], data_cfg=cfg)
    with torch.no_grad():
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).tolist()
    refs = [r["label"] for r in rows]
    assert result.preds == [str(p) for p in pred] and result.refs == [str(r) for r in refs]
    assert result.metrics["accuracy"] == sum(p == r for p, r in zip(pred, refs)) / 6
    tp = sum(p == 1 and r == 1 for p, r in zip(pred, refs))
    fp = sum(p == 1 and r == 0 for p, r in zip(pred, refs))
    fn = sum(p == 0 and r == 1 for p, r in zip(pred, refs))
    expected_f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    assert result.metrics["f1"] == pytest.approx(expected_f1)


def test_token_classification_reports_entity_f1():
    tok = word_tokenizer("bert", ["john lives in paris", "anna works at acme"])
    model = tiny_model("bert", "TOKEN_CLS", seed=4, num_labels=3)
    names = ["O", "B-PER", "B-LOC"]
    cfg = DataSection(train_file="x", format="tokens")
    rows = [{"tokens": ["john", "lives", "in", "paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}]
    result = evaluate(model, _loader(_ds(rows), cfg, tok, "TOKEN_CLS", names), task_type="TOKEN_CLS", tokenizer=tok,
                      label_names=names, data_cfg=cfg)
    assert result.refs == [["B-PER", "O", "O", "B-LOC"]]
    assert len(result.preds[0]) == 4
    from peftrun.metrics import entity_f1

    assert result.metrics["entity_f1"] == entity_f1(result.preds, result.refs)


def test_report_lines_follow_the_seeds_log():
    result = EvalResult({"eval_loss": 0.5, "accuracy": 0.75}, ["complaint"] * 12, ["no complaint"] * 12)
    lines = report_lines(result)
    assert lines[0] == "accuracy=75.00"
    assert lines[1] == f"eval_preds[:10]={['complaint'] * 10!r}"
    assert lines[2] == f"references[:10]={['no complaint'] * 10!r}"
