"""Continuing a run that stopped: checkpoints holding everything the loop needs to carry on exactly.

A checkpoint is output_dir/checkpoints/step-NNNNNN/ with the adapter (peft's format), every trainable
parameter by name with the method's own loop state (trainable.safetensors: peft's layout may hold only a
function of what trains, such as p_tuning's encoder output or AdaLoRA's kept triplets), the optimizer and
scheduler states, every process's python/numpy/torch RNG state, the data position (epoch, batches of it
consumed; the order itself is a function of (seed, epoch)) and the resolved recipe. It is written into a
hidden folder and renamed into place, so a folder named step-* is always complete. Resuming restores the
RNG states at the same point of the loop where they were saved, so a resumed run computes the same numbers
as one that never stopped.

A checkpoint is only written with finite trainable tensors (checked after the optimizer step, on every process,
before anything is written), so "the last good checkpoint" is finite. On --resume, the newest checkpoint whose
files all read back is used: a corrupt newer one is skipped with a line saying why; when none reads back, the
error names the bad file of the newest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from peftrun.errors import PeftrunError, one_line
from peftrun.io.atomic import atomic_dir, naming_files
from peftrun.io.outputs import remove_inside
from peftrun.io.peft_format import (
    RECIPE_COPY,
    first_non_finite,
    one_line_of,
    read_adapter,
    read_recipe_copy,
    safe_torch_load,
    save_tensors,
    save_torch,
    write_adapter,
)
from peftrun.training.best import BestState
from peftrun.training.engines import OPTIMIZER_FILE, Engine
from peftrun.training.hooks import Hooks
from peftrun.training.launch import launched
from peftrun.training.rng import RNG_FILE, read_rng, rng_state, set_rng_state, write_rng

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
    best: BestState = field(default_factory=BestState)  # early stopping and the best evaluation (best.py)

    def next_epoch(self, epoch: int) -> None:
        self.epoch, self.batches, self.loss_sum, self.seen = epoch, 0, 0.0, 0


# ------------------------------------------------------------------ finding and pruning


def step_name(step: int) -> str:
    return f"step-{step:06d}"


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


# Position fields a trainer state must hold (later fields have defaults for checkpoints written before them).
POSITION_REQUIRED = ("step", "epoch", "batches")


def read_position(folder: Path) -> Position:
    """The loop position in `folder`'s trainer_state.json; a PeftrunError naming the file when it is unusable."""
    file = folder / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise PeftrunError(f"not valid JSON ({one_line_of(exc, 120)})", where=str(file)) from None
    if not isinstance(state, dict):
        raise PeftrunError(f"holds {type(state).__name__}, not a JSON object", where=str(file))
    missing = [k for k in POSITION_REQUIRED if k not in state]
    if missing:
        raise PeftrunError(f"'{missing[0]}' is missing", where=str(file))
    values: dict[str, Any] = {"best": BestState.from_json(state.get("best"), str(file))}
    for name, spec in Position.__dataclass_fields__.items():
        if name not in state or name == "best":
            continue
        value = state[name]
        kinds = (int, float) if spec.type in ("float", float) else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value < 0:
            raise PeftrunError(f"'{name}' must be a number at least 0, got {value!r}", where=str(file))
        values[name] = value
    return Position(**values)


def checkpoint_fault(folder: Path, rank: int = 0) -> tuple[str, str] | None:
    """(file name, reason) of the first file of `folder` that a resume could not read back, else None.

    Engine-agnostic: every file of the folder is read as its kind says (.json parsed, .safetensors loaded
    and finite, .pt through the safe loader, the recipe copy within the YAML limits), the trainer state checked
    field by field, and this process's RNG state read. Nothing is applied to the run.
    """
    try:
        position = read_position(folder)
    except PeftrunError as exc:
        return STATE_FILE, exc.message
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".safetensors":
                bad = first_non_finite(load_file(str(file)))
                if bad is not None:
                    return file.name, f"tensor '{bad}' holds NaN or infinite values"
            elif file.suffix == ".pt":
                safe_torch_load(file)
            elif file.name == RECIPE_COPY:
                read_recipe_copy(folder)
        except PeftrunError as exc:
            return file.name, exc.message
        except Exception as exc:  # whatever a library raises for a file it cannot read: the file is at fault
            return file.name, one_line_of(exc, 120)
    if rank < position.world_size:  # more processes than wrote it: load() says so, naming both counts
        try:
            read_rng(folder, rank)
        except Exception as exc:
            return RNG_FILE, f"the RNG state of process {rank} cannot be read ({one_line_of(exc, 100)})"
    return None


def prune(output_dir: str | os.PathLike[str], keep: int | None, *, keep_step: int | None = None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (and the one of `keep_step`: the best, for
    load_best_at_end); touches output_dir/checkpoints only, and never through a symbolic link: a checkpoints/
    that links elsewhere is not pruned (io.outputs.remove_inside)."""
    if not keep or checkpoint_root(output_dir).is_symlink():
        return []
    old = [p for p in complete_checkpoints(output_dir)[:-keep] if keep_step is None or p.name != step_name(keep_step)]
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
    with naming_files(path):
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
        folder = self.usable_checkpoint() if (resume or self.recipe.training.auto_resume) else None
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

    def usable_checkpoint(self) -> Path | None:
        """The newest complete checkpoint whose files every process reads back (checkpoint_fault); the corrupt
        ones skipped are named in one line. None without checkpoints; a PeftrunError when none is usable."""
        acc = self.accelerator
        skipped: list[tuple[Path, tuple[str, str]]] = []
        for folder in reversed(complete_checkpoints(self.out)):
            fault = checkpoint_fault(folder, acc.process_index)
            if acc.num_processes > 1:  # a shard one process cannot read rules the folder out for all
                from accelerate.utils import gather_object

                fault = next((f for f in gather_object([fault]) if f), None)
            if fault is None:
                if len(skipped) == 1:
                    bad, (name, reason) = skipped[0]
                    acc.print(one_line(f"checkpoint {bad.name} is corrupt ({name}: {reason}); resuming from {folder.name}"))
                elif skipped:
                    what = ", ".join(f"{bad.name} ({name}: {reason})" for bad, (name, reason) in skipped)
                    acc.print(one_line(f"checkpoints {what} are corrupt; resuming from {folder.name}"))
                return folder
            skipped.append((folder, fault))
        if not skipped:
            return None
        newest, (name, reason) = skipped[0]
        older = f"; the {len(skipped) - 1} before it are corrupt too" if len(skipped) > 1 else ""
        raise PeftrunError(
            f"checkpoint {newest.name} is corrupt ({reason}) and no earlier checkpoint is usable{older}",
            where=str(newest / name),
            hint="start a new run without --resume (overwrite: true), or restore that file",
        )

    def load(self, folder: Path) -> Position:
        acc = self.accelerator
        position = read_position(folder)
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

    def load_weights(self, step: int) -> Path:
        """Put the trainable weights (and the method's loop state) of this run's checkpoint at `step` back into
        the model (load_best_at_end); the optimizer, scheduler and position stay as they are. A collective."""
        folder = checkpoint_root(self.out) / step_name(step)
        if not (folder / STATE_FILE).is_file():
            raise PeftrunError(
                f"the checkpoint of step {step} is missing", where=str(folder),
                hint="it is kept for load_best_at_end: was it deleted by hand?",
            )
        peft_model = self.accelerator.unwrap_model(self.model)
        if (folder / TRAINABLE_FILE).is_file():
            load_trainable_state(self.engine, self.model, peft_model, load_file(str(folder / TRAINABLE_FILE)), folder)
        else:
            _, adapter_state = read_adapter(folder)
            self.engine.load_whole_adapter(self.model, peft_model, peft_model.active_adapter, adapter_state)
        return folder

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
        bad = first_non_finite(training_state)  # every rank holds the same whole tensors: all stop alike
        if bad is not None:
            if acc.is_main_process:
                remove_inside(tmp, root)
            raise PeftrunError(
                f"the trainable weight '{bad.removeprefix('param.')}' is not finite (NaN or inf) after optimizer "
                f"step {position.step}; training stopped and no checkpoint of it was written; {self.describe_last()}",
                hint="lower training.learning_rate, or use float32 / bf16 instead of fp16",
            )
        # ZeRO-3 and FSDP leave each rank a slice: write whole tensors, not torch.Size([0]) or one shard
        with self.engine.whole_adapter(self.model, peft_model, peft_model.active_adapter) as own:
            if acc.is_main_process:
                position.metrics_lines = count_lines(self.metrics_path)
                with atomic_dir(root / name, tmp=tmp) as folder:
                    write_adapter(
                        folder, peft_model, peft_model.active_adapter, self.recipe.model.name_or_path,
                        recipe=self.recipe, state=own,
                    )
                    save_tensors(training_state, folder / TRAINABLE_FILE)
                    self.hooks.at("checkpoint_write", position.step)
                    if optimizer_whole is not None:
                        save_torch(optimizer_whole, folder / OPTIMIZER_FILE)
                    save_torch(self.scheduler.state_dict(), folder / SCHEDULER_FILE)
                    write_rng(folder, states)
                    (folder / STATE_FILE).write_text(json.dumps(asdict(position), indent=1) + "\n")
                keep_step = position.best.step if self.recipe.training.load_best_at_end else None
                prune(self.out, self.recipe.training.keep_last_n, keep_step=keep_step)
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


