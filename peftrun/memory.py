"""Memory around a phase, printed in exactly the lines of Hugging Face's PEFT example logs.

GPU figures come from torch.cuda's allocator (per device), CPU figures from the process RSS,
sampled by a background thread for the peak. All in MiB integers, as the seed's logs print them.
"""

from __future__ import annotations

import gc
import os
import threading
from typing import Any

import psutil
import torch

MIB = 2**20


def b2mb(x: int) -> int:
    return int(x / MIB)


class MemoryTracker:
    """`with MemoryTracker("train") as mem: ...`, then `mem.lines()` and `mem.record()`."""

    def __init__(self, phase: str, poll_seconds: float = 0.005):
        self.phase = phase
        self.poll_seconds = poll_seconds
        self.process = psutil.Process(os.getpid())
        self.cuda = torch.cuda.is_available()
        self._stop = threading.Event()

    def __enter__(self) -> MemoryTracker:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.begin = torch.cuda.memory_allocated()
        self.cpu_begin = self.process.memory_info().rss
        self.cpu_peak = self.cpu_begin
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.cpu_peak = max(self.cpu_peak, self.process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            self.end = torch.cuda.memory_allocated()
            self.peak = torch.cuda.max_memory_allocated()
            self.used = b2mb(self.end - self.begin)
            self.peaked = b2mb(self.peak - self.begin)
        self.cpu_end = self.process.memory_info().rss
        self.cpu_peak = max(self.cpu_peak, self.cpu_end)
        self.cpu_used = b2mb(self.cpu_end - self.cpu_begin)
        self.cpu_peaked = b2mb(self.cpu_peak - self.cpu_begin)

    def lines(self) -> list[str]:
        p = self.phase
        out = []
        if self.cuda:
            out += [
                f"GPU Memory before entering the {p} : {b2mb(self.begin)}",
                f"GPU Memory consumed at the end of the {p} (end-begin): {self.used}",
                f"GPU Peak Memory consumed during the {p} (max-begin): {self.peaked}",
                f"GPU Total Peak Memory consumed during the {p} (max): {self.peaked + b2mb(self.begin)}",
            ]
        out += [
            f"CPU Memory before entering the {p} : {b2mb(self.cpu_begin)}",
            f"CPU Memory consumed at the end of the {p} (end-begin): {self.cpu_used}",
            f"CPU Peak Memory consumed during the {p} (max-begin): {self.cpu_peaked}",
            f"CPU Total Peak Memory consumed during the {p} (max): {self.cpu_peaked + b2mb(self.cpu_begin)}",
        ]
        return out

    def record(self) -> dict[str, int]:
        """The same figures for the metrics file."""
        rec = {
            f"{self.phase}_cpu_mem_begin_mb": b2mb(self.cpu_begin),
            f"{self.phase}_cpu_mem_used_mb": self.cpu_used,
            f"{self.phase}_cpu_mem_peaked_mb": self.cpu_peaked,
            f"{self.phase}_cpu_mem_peak_total_mb": self.cpu_peaked + b2mb(self.cpu_begin),
        }
        if self.cuda:
            rec.update(
                {
                    f"{self.phase}_gpu_mem_begin_mb": b2mb(self.begin),
                    f"{self.phase}_gpu_mem_used_mb": self.used,
                    f"{self.phase}_gpu_mem_peaked_mb": self.peaked,
                    f"{self.phase}_gpu_mem_peak_total_mb": self.peaked + b2mb(self.begin),
                }
            )
        return rec
