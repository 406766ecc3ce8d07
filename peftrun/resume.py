"""Continuing a run that stopped: checkpoints holding everything the loop needs to carry on exactly.

A checkpoint is output_dir/checkpoints/step-NNNNNN/ with the adapter (peft's format), every trainable
parameter by name with the method's own loop state (trainable.safetensors: peft's layout may hold only a
function of what trains, such as p_tuning's encoder output or AdaLoRA's kept triplets), the optimizer and
scheduler states, every process's python/numpy/torch RNG state, the data position (epoch, batches of it
consumed; the order itself is a function of (seed, epoch)) and the resolved recipe. It is written into a
hidden folder and renamed into place, so a folder named step-* is always complete. Resuming restores the
RNG states at the same point of the loop where they were saved, so a resumed run computes the same numbers
as one that never stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from peftrun.distributed import (
    fsdp_version,
    load_optimizer_state,
    load_whole_adapter,
    load_whole_trainable,
    optimizer_state,
    whole_adapter,
    whole_trainable,
)
from peftrun.errors import PeftrunError
from peftrun.io.atomic import atomic_dir
from peftrun.io.peft_format import read_adapter, read_recipe_copy, safe_torch_load, write_adapter

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.json"
RNG_TENSORS = "rng_state.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
ENGINE_DIR = "engine"  # DeepSpeed's own (sharded) optimizer state
METRICS = "metrics.jsonl"
STEP_DIR = re.compile(r"step-(\d{6,})")
# Recipe keys that may change between a run and its resumption: they do not change what is computed.
RESUME_MAY_CHANGE = (
    "training.logging_steps",
    "training.save_steps",
    "training.save_each_epoch",
    "training.keep_last_n",
    "training.auto_resume",
    "training.progress_bar",
    "training.num_workers",
    "training.eval_each_epoch",
    "training.eval_batch_size",
    "overwrite",
    "output_dir",
)
FAULT_ENV = "PEFTRUN_TEST_FAULT"


class RunInterrupted(PeftrunError):
    """SIGINT/SIGTERM stopped the run after a checkpoint was saved; exit 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum

    def render(self) -> str:
        return self.message


@dataclass
class Position:
    """Where the loop stands: counted in optimizer steps and in batches of the current epoch."""

    step: int = 0
    epoch: int = 0
    batches: int = 0  # batches of `epoch` already trained on (per process)
    loss_sum: float = 0.0  # this epoch's summed batch losses, for train_epoch_loss
    seen: int = 0
    metrics_lines: int = 0  # lines of metrics.jsonl written up to here
    world_size: int = 1
    total_steps: int = 0

    def next_epoch(self, epoch: int) -> None:
        self.epoch, self.batches, self.loss_sum, self.seen = epoch, 0, 0.0, 0


# ------------------------------------------------------------------ test hook


def fault(point: str, step: int) -> str | None:
    """Failure injection for the reliability tests: PEFTRUN_TEST_FAULT="point:step:action[,...]".

    step is a number or '*'; action is kill (SIGKILL this process), sleepSECONDS, or a word returned to the
    caller (e.g. nan). Unset in normal use, where this returns None at once.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[0] != point or parts[1] not in ("*", str(step)):
            continue
        action = parts[2]
        if action == "kill":
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if action.startswith("sleep"):
            time.sleep(float(action[5:]))
            return None
        return action
    return None


# ------------------------------------------------------------------ RNG states


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
    save_file(tensors, str(folder / RNG_TENSORS))


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


# ------------------------------------------------------------------ finding and pruning


def checkpoint_root(output_dir: str | os.PathLike[str]) -> Path:
    return Path(output_dir) / CHECKPOINTS


def complete_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """step-* folders holding a trainer state (written last), oldest first. Symlinks are not ours."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return path.resolve() != root.resolve()


def remove_inside(path: Path, root: Path) -> None:
    """rmtree that refuses anything not strictly inside `root` (and symlinks, which may point anywhere)."""
    if path.is_symlink():
        path.unlink()
        return
    if not _inside(path, root):
        raise PeftrunError(f"refusing to delete '{path}': it is not inside '{root}'")
    shutil.rmtree(path, ignore_errors=True)


def prune(output_dir: str | os.PathLike[str], keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; touches output_dir/checkpoints only."""
    if not keep:
        return []
    root = checkpoint_root(output_dir)
    old = complete_checkpoints(output_dir)[:-keep]
    for path in old:
        remove_inside(path, root)
    return old


def clean_partial(output_dir: str | os.PathLike[str]) -> None:
    """Hidden leftovers of saves that a kill interrupted."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(".step-"):
                remove_inside(entry, root)


# ------------------------------------------------------------------ metrics


def count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.endswith(b"\n"))


def truncate_metrics(path: Path, lines: int) -> None:
    """Keep the first `lines` complete records: what the checkpoint had seen. Later ones are replayed."""
    if not path.is_file():
        return
    with open(path, "rb") as fh:
        kept = [line for line in fh if line.endswith(b"\n")][:lines]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(b"".join(kept))
    os.replace(tmp, path)


# ------------------------------------------------------------------ recipe agreement


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: data}


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Key paths whose values differ in ways that change what training computes."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_MAY_CHANGE or any(key.startswith(k + ".") for k in RESUME_MAY_CHANGE):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} in the checkpoint, {b.get(key)!r} now")
    return diffs


# ------------------------------------------------------------------ the checkpointer


def _rank_optimizer_file(rank: int) -> str:
    return f"optimizer-rank{rank}.pt"


def _is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


# ------------------------------------------------------------------ what trains


def trainable_state(accelerator, model, peft_model) -> dict[str, torch.Tensor]:
    """Every trainable parameter ("param.NAME", whole) and the method's loop state ("method.KEY"), on the CPU.
    A collective under ZeRO-3 and FSDP: every rank calls it."""
    state = {f"param.{n}": t for n, t in whole_trainable(accelerator, model, peft_model).items()}
    hook = peft_model.method.resume_state
    if hook is not None:
        extra = hook(peft_model, peft_model.active_adapter)
        state.update({f"method.{k}": v.detach().cpu().contiguous() for k, v in extra.items()})
    return state


def load_trainable_state(
    accelerator, model, peft_model, tensors: dict[str, torch.Tensor], folder: Path
) -> None:
    saved = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}

    def check(params: dict[str, torch.Tensor]) -> None:
        missing, extra = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
        wrong = [
            f"{n} {tuple(saved[n].shape)} vs {tuple(p.shape)}"
            for n, p in params.items()
            if n in saved and saved[n].shape != p.shape
        ]
        if missing or extra or wrong:
            detail = (
                (missing and f"missing {missing[:3]}") or (extra and f"unexpected {extra[:3]}") or wrong[:3]
            )
            raise PeftrunError(
                f"the checkpoint's trainable parameters do not fit this model: {detail}",
                where=str(folder / TRAINABLE_FILE),
                hint="resume with the recipe and model the run started with",
            )

    load_whole_trainable(accelerator, model, peft_model, saved, check)
    hook = peft_model.method.load_resume_state
    if hook is not None:
        extra_state = {k.removeprefix("method."): v for k, v in tensors.items() if k.startswith("method.")}
        hook(peft_model, peft_model.active_adapter, extra_state)


class Checkpointer:
    """Saves and restores the loop's full state; one per run."""

    def __init__(self, recipe, out: Path, accelerator, model, optimizer, scheduler):
        self.recipe = recipe
        self.out = Path(out)
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.last: Path | None = None  # newest complete checkpoint of this run
        self._pending_rng: dict[str, Any] | None = None

    @property
    def metrics_path(self) -> Path:
        return self.out / METRICS

    # -- starting ------------------------------------------------------------------------------
    def begin(self, resume: bool, total_steps: int) -> Position:
        """A fresh position (clearing the last run's checkpoints and metrics), or the newest checkpoint's."""
        acc = self.accelerator
        folder = latest_checkpoint(self.out) if (resume or self.recipe.training.auto_resume) else None
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            clean_partial(self.out)
            if folder is None:
                self.metrics_path.unlink(missing_ok=True)
                root = checkpoint_root(self.out)
                if root.exists() or root.is_symlink():
                    remove_inside(root, self.out)  # a symlink: only the link goes
        acc.wait_for_everyone()
        if folder is None:
            return Position(world_size=acc.num_processes, total_steps=total_steps)
        position = self.load(folder)
        if acc.is_main_process:
            truncate_metrics(self.metrics_path, position.metrics_lines)
        acc.print(
            f"resuming from {folder} (step {position.step}, epoch {position.epoch}, batch {position.batches})"
        )
        return position

    def load(self, folder: Path) -> Position:
        acc = self.accelerator
        state = json.loads((folder / STATE_FILE).read_text())
        position = Position(**{k: v for k, v in state.items() if k in Position.__dataclass_fields__})
        if position.world_size != acc.num_processes:
            raise PeftrunError(
                f"this checkpoint was written by {position.world_size} process(es); {acc.num_processes} run now",
                where=str(folder),
                hint="resume with the same number of processes, or start a new run",
            )
        saved = read_recipe_copy(folder) or {}
        diffs = recipe_differences(saved, _resolved(self.recipe))
        if diffs:
            raise PeftrunError(
                "the recipe differs from the one this run started with: " + "; ".join(diffs[:5]),
                where=str(folder),
                hint="restore those values to resume, or start a new run in another output_dir",
            )
        peft_model = acc.unwrap_model(self.model)
        if (folder / TRAINABLE_FILE).is_file():
            tensors = load_file(str(folder / TRAINABLE_FILE))
            load_trainable_state(acc, self.model, peft_model, tensors, folder)
        else:  # a checkpoint from before trainable.safetensors: the adapter holds what trains
            _, adapter_state = read_adapter(folder)
            # ZeRO-3 and FSDP: load whole tensors, shard them again after
            load_whole_adapter(acc, self.model, peft_model, peft_model.active_adapter, adapter_state)
        if fsdp_version(acc) == 2:  # whole tensors saved by the main process, sent to every rank's shards
            full = safe_torch_load(folder / OPTIMIZER_FILE) if acc.is_main_process else {}
            load_optimizer_state(acc, self.model, self.optimizer, full)
        elif fsdp_version(acc) == 1:  # each rank's own shard of the flat parameters' state
            self.optimizer.load_state_dict(safe_torch_load(folder / _rank_optimizer_file(acc.process_index)))
        elif _is_deepspeed(acc):
            self.model.load_checkpoint(
                str(folder / ENGINE_DIR),
                tag="state",
                load_module_strict=False,
                load_lr_scheduler_states=False,
            )
        else:
            self.optimizer.load_state_dict(safe_torch_load(folder / OPTIMIZER_FILE))
        self.scheduler.load_state_dict(safe_torch_load(folder / SCHEDULER_FILE))
        self._pending_rng = read_rng(folder, acc.process_index)
        self.last = folder
        return position

    def restore_rng(self) -> None:
        """Put back the RNG states at the point of the loop where they were saved (once)."""
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    # -- saving --------------------------------------------------------------------------------
    def save(self, position: Position) -> Path:
        """Write a checkpoint of `position`; the same step twice (save_steps at an epoch's end) once."""
        acc = self.accelerator
        if self.last is not None and self.last.name == f"step-{position.step:06d}" and self.last.is_dir():
            return self.last
        from accelerate.utils import gather_object

        states = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        name = f"step-{position.step:06d}"
        root = checkpoint_root(self.out)
        tmp = root / f".{name}.partial"
        if acc.is_main_process:
            if tmp.exists():
                remove_inside(tmp, root)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if _is_deepspeed(acc):  # every rank writes its shard of the optimizer state
            self.model.save_checkpoint(str(tmp / ENGINE_DIR), tag="state", exclude_frozen_parameters=True)
        if fsdp_version(acc) == 1:  # likewise for FSDP1's flat-parameter shards
            torch.save(self.optimizer.state_dict(), tmp / _rank_optimizer_file(acc.process_index))
        acc.wait_for_everyone()
        peft_model = acc.unwrap_model(self.model)
        optimizer_whole = optimizer_state(acc, self.model, self.optimizer)  # FSDP: gathered on every rank
        training_state = trainable_state(acc, self.model, peft_model)  # whole tensors, on every rank
        # ZeRO-3 and FSDP leave each rank a slice: write whole tensors, not torch.Size([0]) or one shard
        with whole_adapter(acc, self.model, peft_model, peft_model.active_adapter) as own:
            if acc.is_main_process:
                position.metrics_lines = count_lines(self.metrics_path)
                with atomic_dir(root / name, tmp=tmp) as folder:
                    write_adapter(
                        folder,
                        peft_model,
                        peft_model.active_adapter,
                        self.recipe.model.name_or_path,
                        recipe=self.recipe,
                        state=own,
                    )
                    save_file(training_state, str(folder / TRAINABLE_FILE))
                    fault("checkpoint_write", position.step)
                    if optimizer_whole is not None:
                        torch.save(optimizer_whole, folder / OPTIMIZER_FILE)
                    elif not _is_deepspeed(acc) and fsdp_version(acc) != 1:
                        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
                    torch.save(self.scheduler.state_dict(), folder / SCHEDULER_FILE)
                    write_rng(folder, states)
                    (folder / STATE_FILE).write_text(json.dumps(asdict(position), indent=1) + "\n")
                prune(self.out, self.recipe.training.keep_last_n)
        acc.wait_for_everyone()
        self.last = root / name
        return self.last

    def describe_last(self) -> str:
        if self.last is None:
            return "no checkpoint was saved before this"
        return f"the last good checkpoint is {self.last}"


def _resolved(recipe) -> dict[str, Any]:
    from peftrun.io.scrub import scrub

    return json.loads(json.dumps(scrub(recipe.to_dict())))


def resume_command(recipe) -> str:
    source = getattr(recipe, "_source", None) or "RECIPE"
    extra = "".join(f" --set {item}" for item in getattr(recipe, "_overrides", None) or [])
    return f"peftrun train {source}{extra} --resume"


# ------------------------------------------------------------------ signals


class StopRequest:
    """SIGINT/SIGTERM while training: note it, let the loop save at the next step, then exit.

    A second signal of the same kind acts at once (the default handler is back after the first).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        import threading

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
