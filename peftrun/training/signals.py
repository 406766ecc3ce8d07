"""Stopping a run on request: SIGINT/SIGTERM save a checkpoint at the next step, then the run exits with
128 + the signal's number and the command that continues it."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import torch

from peftrun.errors import PeftrunError


class RunInterrupted(PeftrunError):
    """SIGINT/SIGTERM stopped the run after a checkpoint was saved; exit 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum

    def render(self) -> str:
        return self.message


class StopRequest:
    """SIGINT/SIGTERM while training: note it, let the loop save at the next step, then exit.

    A second signal of the same kind acts at once (the default handler is back after the first).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, accelerator) -> int | None:
        """The signal number when any process got one; every process gets the same answer."""
        if accelerator.num_processes > 1:
            flag = torch.tensor([self.signum or 0], device=accelerator.device)
            flag = accelerator.reduce(flag, reduction="max")
            return int(flag.item()) or None
        return self.signum
