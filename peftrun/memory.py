"""Memory around a phase, printed in exactly the lines of Hugging Face's PEFT example logs.

GPU figures come from torch.cuda's allocator (per device), CPU figures from the process RSS,
sampled by a background thread for the peak. All in MiB integers, as the seed's logs print them.
The main process prints the seed's lines for its own GPU and its RSS, then the same GPU lines for every
other device of every rank ("GPU 1 Memory before entering the train : ..."); metrics.jsonl gets them all.
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
        self.devices = [torch.cuda.current_device()] if self.cuda else []
        self._stop = threading.Event()

    def __enter__(self) -> MemoryTracker:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            # this process's own device, and any other it holds memory on (a model split over GPUs)
            self.devices += [i for i in range(torch.cuda.device_count()) if i not in self.devices
                             and torch.cuda.memory_allocated(i) > 0]
            for i in self.devices:
                torch.cuda.reset_peak_memory_stats(i)
            self.begins = {i: torch.cuda.memory_allocated(i) for i in self.devices}
            self.begin = self.begins[self.devices[0]]
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
            self.gpus = {
                i: {"begin": b2mb(self.begins[i]),
                    "used": b2mb(torch.cuda.memory_allocated(i) - self.begins[i]),
                    "peaked": b2mb(torch.cuda.max_memory_allocated(i) - self.begins[i])}
                for i in self.devices
            }
            self.end = torch.cuda.memory_allocated(self.devices[0])
            self.peak = torch.cuda.max_memory_allocated(self.devices[0])
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
            out += gpu_lines(p, "GPU", b2mb(self.begin), self.used, self.peaked)
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


def gpu_lines(phase: str, label: str, begin: int, used: int, peaked: int) -> list[str]:
    return [
        f"{label} Memory before entering the {phase} : {begin}",
        f"{label} Memory consumed at the end of the {phase} (end-begin): {used}",
        f"{label} Peak Memory consumed during the {phase} (max-begin): {peaked}",
        f"{label} Total Peak Memory consumed during the {phase} (max): {peaked + begin}",
    ]


def report(tracker: MemoryTracker, accelerator=None) -> tuple[list[str], dict[str, Any]]:
    """Lines for the main process to print and the record for metrics.jsonl, with every rank's devices.

    A collective when several processes run: every rank calls it.
    """
    own = {
        "rank": accelerator.process_index if accelerator is not None else 0,
        "gpus": getattr(tracker, "gpus", {}),
        "cpu_peak_total": tracker.cpu_peaked + b2mb(tracker.cpu_begin),
    }
    every = [own]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        every = gather_object([own])
    lines, record = tracker.lines(), tracker.record()
    main_device = tracker.devices[0] if tracker.devices else None
    p = tracker.phase
    for entry in every:
        for device, fig in sorted(entry["gpus"].items()):
            record[f"{p}_gpu{device}_mem_peak_total_mb"] = fig["peaked"] + fig["begin"]
            if entry["rank"] == own["rank"] and device == main_device:
                continue
            lines += gpu_lines(p, f"GPU {device}", fig["begin"], fig["used"], fig["peaked"])
    if len(every) > 1:
        record[f"{p}_cpu_mem_peak_total_mb_per_rank"] = [e["cpu_peak_total"] for e in every]
    return lines, record
