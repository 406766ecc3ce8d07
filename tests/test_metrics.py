"""Metric functions on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import math

import pytest

from peftrun import metrics


def test_accuracy():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert metrics.accuracy(["complaint", "no complaint"], ["complaint", "no complaint"]) == 1.0
    assert metrics.accuracy([], []) == 0.0


def test_binary_f1_of_the_positive_class():
    # tp=2 fp=1 fn=1 -> precision 2/3, recall 2/3, F1 2/3
    preds = [1, 1, 1, 0, 0, 0]
    refs = [1, 1, 0, 1, 0, 0]
    assert metrics.f1(preds, refs) == pytest.approx(2 / 3)
    # no positive predicted and none present: 0 by convention (sklearn's zero_division=0)
    assert metrics.f1([0, 0], [0, 0]) == 0.0


def test_macro_f1_averages_per_class_scores():
    preds = ["a", "a", "b", "c"]
    refs = ["a", "b", "b", "c"]
    # a: tp1 fp1 fn0 -> 2/3; b: tp1 fp0 fn1 -> 2/3; c: 1
    assert metrics.f1(preds, refs, average="macro") == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_entities_from_bio_tags():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "I-ORG", "O", "I-PER"]
    assert metrics.entities(tags) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6), ("ORG", 6, 7), ("PER", 8, 9)}


def test_entity_f1_needs_exact_spans_and_types():
    ref = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    assert metrics.entity_f1(ref, ref) == 1.0
    # span cut short (PER 0-1 vs 0-2) is wrong; LOC right; ORG typed as LOC is wrong
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "O"]]
    # tp=1 (LOC), fp=2, fn=2 -> precision 1/3, recall 1/3
    assert metrics.entity_f1(pred, ref) == pytest.approx(1 / 3)
    assert metrics.entity_f1([["O", "O"]], [["O", "O"]]) == 0.0


def test_perplexity():
    assert metrics.perplexity(0.0) == 1.0
    assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert math.isfinite(metrics.perplexity(1e9))
