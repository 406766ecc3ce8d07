"""Metrics: accuracy, F1 (binary, macro), entity-level F1 for BIO tags, perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(preds: Sequence, refs: Sequence) -> float:
    if not refs:
        return 0.0
    return sum(p == r for p, r in zip(preds, refs)) / len(refs)


def _f1(tp: int, fp: int, fn: int) -> float:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def f1(preds: Sequence, refs: Sequence, *, positive=1, average: str = "binary") -> float:
    """Binary F1 of the positive class, or the macro average over classes."""
    classes = [positive] if average == "binary" else sorted(set(refs) | set(preds), key=str)
    scores = []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(preds, refs))
        fp = sum(p == c and r != c for p, r in zip(preds, refs))
        fn = sum(p != c and r == c for p, r in zip(preds, refs))
        scores.append(_f1(tp, fp, fn))
    return sum(scores) / len(scores) if scores else 0.0


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO (or IOB2) tag sequence; an I- without a B- opens a span."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = str(tag).partition("-")
        if start is not None and (prefix in ("O", "B") or label != kind):
            spans.add((kind, start, i))
            start = kind = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, label
    return spans


def entity_f1(pred_seqs: Sequence[Sequence[str]], ref_seqs: Sequence[Sequence[str]]) -> float:
    """seqeval-style micro F1 over exact entity spans."""
    tp = fp = fn = 0
    for pred, ref in zip(pred_seqs, ref_seqs):
        p, r = entities(pred), entities(ref)
        tp += len(p & r)
        fp += len(p - r)
        fn += len(r - p)
    return _f1(tp, fp, fn)


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 50.0))
