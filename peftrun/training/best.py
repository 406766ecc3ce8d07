"""The best evaluation so far: early stopping (`training.early_stopping`) and the best checkpoint kept as the
final adapter (`training.load_best_at_end`).

After every evaluation (each training.eval_steps steps and at epoch ends) the chosen metric is compared with the
best so far: an improvement is a finite value below best - min_delta (mode min) or above best + min_delta (max);
any other evaluation is a bad one. `patience` bad evaluations in a row stop the run. The state (best value, its
step, the bad count, the step of the last evaluation counted, whether to stop) is part of the loop's position,
so it is saved in every checkpoint and a resumed run carries on with it. An evaluation at a step already counted
(a run resumed at an epoch's end evaluates that epoch again) does not count twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from peftrun.errors import PeftrunError

LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "error")


@dataclass
class BestState:
    metric: str | None = None  # the metric's key in the evaluation's record (eval_loss)
    value: float | None = None  # the best value of the metric so far
    step: int | None = None  # the optimizer step it was reached at
    bad: int = 0  # evaluations in a row without improvement since
    last_step: int = -1  # the step of the last evaluation counted
    stopped: bool = False  # patience ran out: the loop stops

    @classmethod
    def from_json(cls, data: Any, where: str) -> BestState:
        """A saved state (trainer_state.json's "best"); a PeftrunError naming the file when it is unusable."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise PeftrunError(f"'best' must be a JSON object, got {type(data).__name__}", where=where)
        state = cls()
        for key, kinds in (("value", (int, float)), ("step", (int,)), ("bad", (int,)), ("last_step", (int,))):
            value = data.get(key, getattr(state, key))
            if value is None and key in ("value", "step"):
                continue
            if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
                raise PeftrunError(f"'best.{key}' must be a finite number, got {value!r}", where=where)
            setattr(state, key, value)
        metric = data.get("metric")
        if metric is not None and not isinstance(metric, str):
            raise PeftrunError(f"'best.metric' must be a string, got {metric!r}", where=where)
        state.metric = metric
        stopped = data.get("stopped", False)
        if not isinstance(stopped, bool):
            raise PeftrunError(f"'best.stopped' must be true or false, got {stopped!r}", where=where)
        state.stopped = stopped
        return state


@dataclass
class Criterion:
    """What "best" means: the metric, its direction, and when to stop (patience None: never)."""

    metric: str
    mode: str  # min, max or auto
    patience: int | None
    min_delta: float


def criterion(training) -> Criterion | None:
    """The recipe's criterion: early_stopping's, else eval_loss (lower is better, never stopping) when only
    load_best_at_end asks for the best; None when neither is set."""
    es = training.early_stopping
    if es is not None:
        return Criterion(es.metric, es.mode, es.patience, es.min_delta)
    if training.load_best_at_end:
        return Criterion("eval_loss", "min", None, 0.0)
    return None


def metric_key(name: str, metrics: dict[str, Any]) -> str:
    """The key of `metrics` that the recipe's metric names (with or without eval_)."""
    for key in (name, f"eval_{name}"):
        if key in metrics:
            return key
    reported = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))) or "none"
    raise PeftrunError(
        f"the metric '{name}' is not reported by this run's evaluation (it reports: {reported})",
        where="training.early_stopping.metric",
        hint="name one of the reported metrics; the run stopped at its first evaluation",
    )


def lower_is_better(key: str, mode: str) -> bool:
    if mode != "auto":
        return mode == "min"
    return any(word in key.lower() for word in LOWER_IS_BETTER)


def improves(value: float, state: BestState, lower: bool, min_delta: float) -> bool:
    if not math.isfinite(value):
        return False
    if state.value is None:
        return True
    return value < state.value - min_delta if lower else value > state.value + min_delta


def track(state: BestState, crit: Criterion, step: int, metrics: dict[str, Any]) -> str | None:
    """Count the evaluation at `step` in `state`; returns a line to print when it improved the best or stopped
    the run, else None. An evaluation at a step already counted changes nothing."""
    if step <= state.last_step:
        return None
    key = metric_key(crit.metric, metrics)
    value = float(metrics[key])
    state.last_step, state.metric = step, key
    if improves(value, state, lower_is_better(key, crit.mode), crit.min_delta):
        state.value, state.step, state.bad = value, step, 0
        return f"best {key}={value:.6f} at step {step}"
    state.bad += 1
    if crit.patience is not None and state.bad >= crit.patience:
        state.stopped = True
        return (
            f"early stopping at step {step}: {key} has not improved on {state.value:.6f} (step {state.step}) "
            f"for {state.bad} evaluation(s)"
        )
    return None
