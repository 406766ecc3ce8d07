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

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from peftrun.errors import PeftrunError
from peftrun.io.atomic import atomic_dir
from peftrun.io.outputs import remove_inside
from peftrun.io.peft_format import read_adapter, read_recipe_copy, safe_torch_load, write_adapter
from peftrun.training.engines import OPTIMIZER_FILE, Engine
from peftrun.training.hooks import Hooks
from peftrun.training.launch import launched
from peftrun.training.rng import read_rng, rng_state, set_rng_state, write_rng

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
TRAINABLE_FILE = "trainable.safetensors"
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
    "distributed.timeout_seconds",
    "distributed.machine_rank",  # each machine's recipe names its own
    "distributed.main_process_ip",
    "distributed.main_process_port",
)


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


def prune(output_dir: str | os.PathLike[str], keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; touches output_dir/checkpoints only, and never
    through a symbolic link: a checkpoints/ that links elsewhere is not pruned (io.outputs.remove_inside)."""
    if not keep or checkpoint_root(output_dir).is_symlink():
        return []
    old = complete_checkpoints(output_dir)[:-keep]
    for path in old:
        remove_inside(path, Path(output_dir))
    return old


def clean_partial(output_dir: str | os.PathLike[str]) -> None:
    """Hidden leftovers of saves that a kill interrupted (not through a symlinked checkpoints/)."""
    root = checkpoint_root(output_dir)
    if root.is_dir() and not root.is_symlink():
        for entry in root.iterdir():
            if entry.name.startswith(".step-"):
                remove_inside(entry, Path(output_dir))


def clear_checkpoints(output_dir: str | os.PathLike[str]) -> None:
    """A new run in output_dir: its checkpoints/ goes, but only what peftrun writes there (step-* and their
    partial saves); a symlinked checkpoints/ loses only the link, and a file someone else put there stays."""
    out = Path(output_dir)
    root = checkpoint_root(out)
    if root.is_symlink():
        remove_inside(root, out)
        return
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if STEP_DIR.fullmatch(entry.name) or entry.name.startswith(".step-"):
            remove_inside(entry, out)
    with contextlib.suppress(OSError):
        root.rmdir()  # only when nothing else is left in it


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


# ------------------------------------------------------------------ what trains


def trainable_state(engine: Engine, model, peft_model) -> dict[str, torch.Tensor]:
    """Every trainable parameter ("param.NAME", whole) and the method's loop state ("method.KEY"), on the CPU.
    A collective under ZeRO-3 and FSDP: every rank calls it."""
    state = {f"param.{n}": t for n, t in engine.whole_trainable(model, peft_model).items()}
    hook = peft_model.method.resume_state
    if hook is not None:
        extra = hook(peft_model, peft_model.active_adapter)
        state.update({f"method.{k}": v.detach().cpu().contiguous() for k, v in extra.items()})
    return state


def load_trainable_state(engine: Engine, model, peft_model, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    saved = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}

    def check(params: dict[str, torch.Tensor]) -> None:
        missing, extra = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
        wrong = [
            f"{n} {tuple(saved[n].shape)} vs {tuple(p.shape)}"
            for n, p in params.items()
            if n in saved and saved[n].shape != p.shape
        ]
        if missing or extra or wrong:
            detail = (missing and f"missing {missing[:3]}") or (extra and f"unexpected {extra[:3]}") or wrong[:3]
            raise PeftrunError(
                f"the checkpoint's trainable parameters do not fit this model: {detail}",
                where=str(folder / TRAINABLE_FILE),
                hint="resume with the recipe and model the run started with",
            )

    engine.load_whole_trainable(model, peft_model, saved, check)
    hook = peft_model.method.load_resume_state
    if hook is not None:
        extra_state = {k.removeprefix("method."): v for k, v in tensors.items() if k.startswith("method.")}
        hook(peft_model, peft_model.active_adapter, extra_state)


# ------------------------------------------------------------------ the checkpointer


class Checkpointer:
    """Saves and restores the loop's full state; one per run. What differs between engines (sharded
    tensors, optimizer shards) is the engine's business."""

    def __init__(self, recipe, out: Path, accelerator, engine: Engine, model, optimizer, scheduler, hooks: Hooks):
        self.recipe = recipe
        self.out = Path(out)
        self.accelerator = accelerator
        self.engine = engine
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.hooks = hooks
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
                clear_checkpoints(self.out)
        acc.wait_for_everyone()
        if folder is None:
            return Position(world_size=acc.num_processes, total_steps=total_steps)
        position = self.load(folder)
        if acc.is_main_process:
            truncate_metrics(self.metrics_path, position.metrics_lines)
        acc.print(f"resuming from {folder} (step {position.step}, epoch {position.epoch}, batch {position.batches})")
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
            load_trainable_state(self.engine, self.model, peft_model, tensors, folder)
        else:  # a checkpoint from before trainable.safetensors: the adapter holds what trains
            _, adapter_state = read_adapter(folder)
            self.engine.load_whole_adapter(self.model, peft_model, peft_model.active_adapter, adapter_state)
        self.engine.load_optimizer(self.model, self.optimizer, folder, safe_torch_load)
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
            if tmp.exists() or tmp.is_symlink():
                remove_inside(tmp, self.out)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        optimizer_whole = self.engine.save_optimizer(self.model, self.optimizer, tmp)  # shards: every rank
        acc.wait_for_everyone()
        peft_model = acc.unwrap_model(self.model)
        training_state = trainable_state(self.engine, self.model, peft_model)  # whole tensors, on every rank
        # ZeRO-3 and FSDP leave each rank a slice: write whole tensors, not torch.Size([0]) or one shard
        with self.engine.whole_adapter(self.model, peft_model, peft_model.active_adapter) as own:
            if acc.is_main_process:
                position.metrics_lines = count_lines(self.metrics_path)
                with atomic_dir(root / name, tmp=tmp) as folder:
                    write_adapter(
                        folder, peft_model, peft_model.active_adapter, self.recipe.model.name_or_path,
                        recipe=self.recipe, state=own,
                    )
                    save_file(training_state, str(folder / TRAINABLE_FILE))
                    self.hooks.at("checkpoint_write", position.step)
                    if optimizer_whole is not None:
                        torch.save(optimizer_whole, folder / OPTIMIZER_FILE)
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
    """The command that continues this run: `peftrun launch ... --resume` inside a launched process."""
    source = getattr(recipe, "_source", None) or "RECIPE"
    extra = "".join(f" --set {item}" for item in getattr(recipe, "_overrides", None) or [])
    return f"peftrun {'launch' if launched() else 'train'} {source}{extra} --resume"


