"""Failure injection for the reliability tests, through the loop's hooks (peftrun.training.hooks).

A spec is "point:step:action[,...]": point is a hook point (loss, after_step, eval, checkpoint_write), step
a number or '*', action one of kill (SIGKILL this process), sleepSECONDS, nan (the loss becomes NaN) or
fail (raise, as a failed evaluation would). An action may end in "@RANK": then only the process whose RANK
environment variable (set by the launcher) is RANK acts, e.g. "after_step:3:kill@1" kills rank 1 alone.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from peftrun.training.hooks import Hooks

ENV = "PEFTRUN_TEST_FAULT"  # read by tests/faultsite/sitecustomize.py only, never by peftrun
SITE = Path(__file__).resolve().parent / "faultsite"


class FaultHooks(Hooks):
    def __init__(self, spec: str):
        self.rules = []
        for item in spec.split(","):
            point, step, action = item.strip().split(":")
            action, _, rank = action.partition("@")
            if rank and rank != os.environ.get("RANK", "0"):
                continue  # a rule for another rank of a launch
            self.rules.append((point, step, action))

    def at(self, point: str, step: int, value: Any = None) -> Any:
        for rule_point, rule_step, action in self.rules:
            if rule_point != point or rule_step not in ("*", str(step)):
                continue
            if action == "kill":
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if action.startswith("sleep"):
                time.sleep(float(action[5:]))
            elif action == "nan":
                return value * float("nan")
            elif action == "fail":
                raise RuntimeError(f"injected failure at {point} (step {step})")
        return value


def fault_env(spec: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a subprocess whose `peftrun train` (every rank of it) runs with FaultHooks(spec)."""
    from conftest import REPO

    return {**(env or {}), ENV: spec, "PYTHONPATH": os.pathsep.join([str(REPO), str(SITE)])}
