"""Every process's python, numpy and torch RNG states, saved without pickle (JSON and safetensors), so a
resumed run draws the same dropout masks and shuffles as one that never stopped."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from peftrun.io.peft_format import save_tensors

RNG_FILE = "rng_state.json"
RNG_TENSORS = "rng_state.safetensors"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rng(folder: Path, states: list[dict[str, Any]]) -> None:
    """Per-process RNG states as JSON (python, numpy) and safetensors (torch): no pickle."""
    meta, tensors = [], {}
    for rank, state in enumerate(states):
        version, internal, gauss = state["python"]
        kind, keys, pos, has_gauss, cached = state["numpy"]
        meta.append(
            {
                "python": [version, list(internal), gauss],
                "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                "cuda_devices": len(state.get("cuda", [])),
            }
        )
        tensors[f"rank{rank}.torch"] = state["torch"].clone()
        for i, cuda in enumerate(state.get("cuda", [])):
            tensors[f"rank{rank}.cuda{i}"] = cuda.clone()
    (folder / RNG_FILE).write_text(json.dumps(meta))
    save_tensors(tensors, folder / RNG_TENSORS)


def read_rng(folder: Path, rank: int) -> dict[str, Any]:
    meta = json.loads((folder / RNG_FILE).read_text())[rank]
    tensors = load_file(str(folder / RNG_TENSORS))
    version, internal, gauss = meta["python"]
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    state = {
        "python": (version, tuple(internal), gauss),
        "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
        "torch": tensors[f"rank{rank}.torch"],
    }
    if meta["cuda_devices"]:
        state["cuda"] = [tensors[f"rank{rank}.cuda{i}"] for i in range(meta["cuda_devices"])]
    return state
