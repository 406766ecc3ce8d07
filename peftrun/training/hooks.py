"""Points of the loop where a caller may look in or step in: the tests use them to inject faults (a kill,
a NaN loss, a failed evaluation) at an exact step. A normal run passes no hooks and nothing happens.

Points: "loss" (value: the step's loss; return the loss to use), "after_step", "eval" (before evaluating),
"eval_metrics" (value: an evaluation's metrics; return the metrics to use), "checkpoint_write" (inside a
checkpoint's write, before it is complete).
"""

from __future__ import annotations

from typing import Any


class Hooks:
    """Does nothing; subclass and override `at` to act at a point of the loop."""

    def at(self, point: str, step: int, value: Any = None) -> Any:
        """Called at `point` after optimizer step `step`; returns `value` (or a replacement for it)."""
        return value


_installed = Hooks()


def install(hooks: Hooks) -> None:
    """The hooks every later `train()` of this process uses when it is given none: for a harness that starts
    `peftrun train` itself (a test running the command in a subprocess, or each rank of a launch)."""
    global _installed
    _installed = hooks


def installed() -> Hooks:
    return _installed
