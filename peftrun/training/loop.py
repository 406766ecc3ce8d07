"""The training loop, top to bottom: epochs of steps, an objective's loss, evaluation, checkpoints, the adapter.

Set-up lives in build.py (`prepare`), what is learned in objectives.py, how the model is sharded in
engines.py, checkpoints and the data position in resume.py. A checkpoint restores the RNG states at the
point of this loop where it was taken, so a resumed run computes what an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from peftrun.data import datasets_cache
from peftrun.errors import PeftrunError
from peftrun.io.lock import output_dir_lock
from peftrun.io.outputs import RUN_CACHE, remove_inside, write_marker
from peftrun.io.peft_format import save_adapter
from peftrun.memory import MemoryTracker
from peftrun.memory import report as memory_report
from peftrun.training.best import criterion, track
from peftrun.training.build import Run, check_output_dir, output_path, prepare
from peftrun.training.engines import rank_spread
from peftrun.training.hooks import Hooks, installed
from peftrun.training.launch import lost_peers
from peftrun.training.resume import resume_command
from peftrun.training.signals import RunInterrupted, StopRequest
from peftrun.training.tracking import MetricsLog, check_installed, open_log


def train(recipe, *, resume: bool = False, hooks: Hooks | None = None) -> dict[str, Any]:
    """Train the recipe's adapter; returns the last epoch's record (metrics.jsonl's last line).

    For the life of the run output_dir is locked (io.lock: a second run on it is refused, naming this one)
    and the datasets library caches its Arrow files under output_dir/.peftrun-cache, removed at the end.
    A rank whose collective fails because another rank died or hangs ends with one line saying so (exit 3)."""
    check_installed(recipe.training.report_to)  # a missing tracker package stops before any model loads
    out = output_path(recipe)
    cache = out / RUN_CACHE
    with run_lock(out), datasets_cache(cache / "datasets"):
        try:
            return _train(recipe, resume, hooks or installed())
        finally:
            if owns_output_dir():
                with contextlib.suppress(PeftrunError):
                    remove_inside(cache, out)


def owns_output_dir() -> bool:
    """Whether this process keeps output_dir's lock: a lone run, or global rank 0 of a launched one (the
    process that writes the adapter and checkpoints; the others only read what it wrote)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def run_lock(out: Path):
    if not owns_output_dir():
        yield
        return
    with output_dir_lock(out, command="train"):
        yield


def _train(recipe, resume: bool, hooks: Hooks) -> dict[str, Any]:
    out = check_output_dir(recipe, resume)
    if owns_output_dir():
        write_marker(out, "train", list_files=False)  # what wrote here; never leave to replace it whole
    run = None
    try:
        run = prepare(recipe, out, resume, hooks)
        return train_prepared(run, hooks)
    except Exception as exc:
        where = f"after step {run.position.step}" if run is not None else "while setting up"
        lost = lost_peers(exc, where)
        if lost is None:
            raise
        raise lost from exc


def train_prepared(run: Run, hooks: Hooks) -> dict[str, Any]:
    """The loop itself, on what `prepare` built."""
    acc, model, pos, cfg, out = run.accelerator, run.model, run.position, run.recipe.training, run.out
    log = open_log(run.recipe, out, acc)  # metrics.jsonl and the recipe's trackers (training.report_to)
    bar = ProgressBar(acc.is_main_process and cfg.progress_bar)
    last: dict[str, Any] = {}
    record_data_mix(run, log)  # data.datasets: what each dataset gave, at the start of a new run

    with bar, StopRequest() as stop:
        for epoch in range(pos.epoch, cfg.num_epochs):
            if epoch != pos.epoch:
                pos.next_epoch(epoch)
            # the order of batches is a function of (seed, epoch); a resumed epoch skips what it had consumed
            run.train_loader.set_epoch(epoch)
            batches = acc.skip_first_batches(run.train_loader, pos.batches) if pos.batches else run.train_loader
            if pos.batches == 0:
                run.checkpoints.restore_rng()
            bar.start(epoch, len(run.train_loader), pos.batches)
            model.train()
            with MemoryTracker("train") as mem:
                for batch in batches:
                    run.checkpoints.restore_rng()  # a resumed run: exactly where the checkpoint was taken
                    if done(run):
                        break
                    with acc.accumulate(model):
                        step = run.objective(model, batch)
                        loss = hooks.at("loss", pos.step + 1, step.loss)
                        check_finite(run, loss, epoch)
                        acc.backward(loss)
                        if acc.sync_gradients and cfg.max_grad_norm:
                            acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        run.optimizer.step()
                        if acc.sync_gradients:
                            method_after_step(run, pos.step + 1)
                        run.scheduler.step()
                        run.optimizer.zero_grad(set_to_none=True)
                    pos.loss_sum += loss.detach().double().cpu().item()
                    pos.seen += 1
                    pos.batches += 1
                    bar.advance(loss.item())
                    if acc.sync_gradients:
                        pos.step += 1
                        if pos.step % cfg.logging_steps == 0:
                            lr = run.scheduler.get_last_lr()[0]
                            log.write({"step": pos.step, "epoch": epoch, "loss": loss.item(), "lr": lr, **step.metrics})
                        hooks.at("after_step", pos.step)
                        improved = evaluate_at_step(run, log, hooks, epoch)  # training.eval_steps
                        if cfg.save_steps and pos.step % cfg.save_steps == 0:
                            run.checkpoints.save(pos)
                        keep_best(run, improved)
                        stop_if_asked(run, stop)  # after this step's evaluation: a resumed run does not repeat it
            run.checkpoints.restore_rng()  # a run resumed at an epoch's end trains no batch of it
            bar.stop()
            record = {"epoch": epoch, "step": pos.step, **print_memory(acc, mem)}
            if cfg.save_each_epoch or epoch == cfg.num_epochs - 1 or done(run):
                run.checkpoints.save(pos)  # before evaluating: a failed eval loses no training
            record.update(end_of_epoch(run, epoch, hooks))
            log.write(record)
            keep_best(run, track_best(run, record, log))
            last = record
            stop_if_asked(run, stop)
            if done(run):
                break

    load_best_adapter(run, log)  # training.load_best_at_end
    save_final_adapter(run, log)
    log.close()  # trackers finished; loss.png drawn from metrics.jsonl
    return last


# ------------------------------------------------------------------ the loop's steps, by name


def done(run: Run) -> bool:
    """max_steps reached, or early stopping says so (best.py)."""
    cfg, pos = run.recipe.training, run.position
    return (bool(cfg.max_steps) and pos.step >= cfg.max_steps) or pos.best.stopped


def check_finite(run: Run, loss: torch.Tensor, epoch: int) -> None:
    if not torch.isfinite(loss):
        pos = run.position
        raise PeftrunError(
            f"the loss became {loss.item()} at step {pos.step + 1} (epoch {epoch}, batch {pos.batches}); "
            f"training stopped and nothing after it was saved; {run.checkpoints.describe_last()}",
            hint="lower training.learning_rate, or use float32 / bf16 instead of fp16",
        )


def method_after_step(run: Run, step: int) -> None:
    """A method whose update depends on the loop (AdaLoRA's rank allocator) acts after each optimizer step."""
    after = run.peft_model.method.after_step
    if after is not None:
        after(run.peft_model, run.peft_model.active_adapter, step, run.total_steps)


def stop_if_asked(run: Run, stop: StopRequest) -> None:
    signum = stop.requested(run.accelerator)
    if signum:
        folder = run.checkpoints.save(run.position)
        raise RunInterrupted(
            f"interrupted at step {run.position.step}: checkpoint saved to {folder}; "
            f"continue with: {resume_command(run.recipe)}", signum,
        )


def end_of_epoch(run: Run, epoch: int, hooks: Hooks) -> dict[str, Any]:
    """The epoch's training figures and, when it is evaluated, the objective's held-out metrics; printed in
    the seed's lines."""
    acc, pos, cfg = run.accelerator, run.position, run.recipe.training
    train_epoch_loss = pos.loss_sum / max(pos.seen, 1)
    train_ppl = math.exp(min(train_epoch_loss, 50.0))
    record: dict[str, Any] = {"train_epoch_loss": train_epoch_loss, "train_ppl": train_ppl}
    line = f"epoch={epoch}: train_ppl={train_ppl:.6f} train_epoch_loss={train_epoch_loss:.6f}"
    if not (cfg.eval_each_epoch or epoch == cfg.num_epochs - 1 or done(run)):
        acc.print(line)
        return record
    if run.evaluated is not None and run.evaluated[0] == pos.step:  # eval_steps evaluated this very step
        record.update(run.evaluated[1].metrics)
        acc.print(line + eval_line(run.evaluated[1].metrics))
        return record
    with MemoryTracker("eval") as mem:
        result = evaluate_now(run, hooks, f"after epoch {epoch}")
    eval_memory = print_memory(acc, mem)
    record.update(result.metrics)
    record.update(eval_memory)
    acc.print(line + eval_line(result.metrics))
    for report in run.objective.report(result):
        acc.print(report)
    return record


def eval_line(metrics: dict[str, Any]) -> str:
    return "".join(f" {key}={metrics[key]:.6f}" for key in ("eval_loss", "eval_ppl") if key in metrics)


def evaluate_now(run: Run, hooks: Hooks, when: str):
    """The objective's held-out metrics now (remembered with their step in run.evaluated); a failed evaluation
    says where training can be resumed from."""
    acc, pos = run.accelerator, run.position
    try:
        hooks.at("eval", pos.step)
        result = run.objective.evaluate(run.model, run.eval_loader, acc)
    except Exception:
        acc.print(
            f"evaluation failed {when}; {run.checkpoints.describe_last()} "
            f"(to retry from there: {resume_command(run.recipe)})", file=sys.stderr,
        )
        raise
    result.metrics = hooks.at("eval_metrics", pos.step, result.metrics)
    run.evaluated = (pos.step, result)
    return result


def evaluate_at_step(run: Run, log: MetricsLog, hooks: Hooks, epoch: int) -> bool:
    """Every training.eval_steps optimizer steps: evaluate, write the metrics at this step, count it for early
    stopping and the best adapter. Returns whether it is the best evaluation so far."""
    cfg, pos, acc = run.recipe.training, run.position, run.accelerator
    if not cfg.eval_steps or pos.step % cfg.eval_steps:
        return False
    result = evaluate_now(run, hooks, f"at step {pos.step}")
    acc.print(f"step={pos.step}:" + eval_line(result.metrics))
    for report in run.objective.report(result):
        acc.print(report)
    log.write({"step": pos.step, "epoch": epoch, **result.metrics})
    return track_best(run, result.metrics, log)


def track_best(run: Run, metrics: dict[str, Any], log: MetricsLog) -> bool:
    """Count an evaluation for early stopping and the best adapter (best.py); says when it stops the run.
    Returns whether the evaluation at this step is the best so far."""
    crit, pos = criterion(run.recipe.training), run.position
    if crit is None or not any(k.startswith("eval_") for k in metrics):
        return False
    line = track(pos.best, crit, pos.step, metrics)
    if line:
        run.accelerator.print(line)
    if pos.best.stopped and line and line.startswith("early stopping"):
        log.write({
            "step": pos.step, "early_stopped": True, "best_step": pos.best.step, "best_value": pos.best.value,
            "bad_evaluations": pos.best.bad,
        })
    return pos.best.step == pos.step


def keep_best(run: Run, improved: bool) -> None:
    """load_best_at_end: the best evaluation's step has a checkpoint (kept through pruning) to load at the end."""
    if improved and run.recipe.training.load_best_at_end:
        run.checkpoints.save(run.position)  # once per step: a checkpoint of this step is reused


def load_best_adapter(run: Run, log: MetricsLog) -> None:
    """load_best_at_end: the weights of the best evaluation's checkpoint become the final adapter; printed and
    written to metrics.jsonl with the step they come from."""
    cfg, pos, acc = run.recipe.training, run.position, run.accelerator
    if not cfg.load_best_at_end:
        return
    best = pos.best
    if best.step is None:
        acc.print("load_best_at_end: no evaluation was counted; the final adapter is the last step's")
        return
    if best.step != pos.step:
        run.checkpoints.load_weights(best.step)
    acc.print(f"load_best_at_end: the final adapter is the one of step {best.step} ({best.metric}={best.value:.6f})")
    log.write({"step": pos.step, "final_adapter_step": best.step, "best_metric": best.metric, "best_value": best.value})


def record_data_mix(run: Run, log: MetricsLog) -> None:
    """data.datasets: how many rows each dataset gave, written once at the start of a new run (a resumed run
    keeps the record of its start)."""
    pos = run.position
    if run.data_mix and (pos.step, pos.epoch, pos.batches) == (0, 0, 0):
        log.write({"step": 0, "data_mix": run.data_mix})


def print_memory(acc, tracker: MemoryTracker) -> dict[str, Any]:
    """The seed's memory lines for every rank's devices, printed once; returns them for metrics.jsonl."""
    lines, record = memory_report(tracker, acc)  # a collective: every rank calls it
    for line in lines:
        acc.print(line)
    return record


def save_final_adapter(run: Run, log: MetricsLog) -> None:
    """The adapter in peft's format in output_dir; under ZeRO-3 and FSDP gathered whole first."""
    acc, peft_model = run.accelerator, run.peft_model
    acc.wait_for_everyone()
    with run.engine.whole_adapter(run.model, peft_model, peft_model.active_adapter) as state:
        if acc.num_processes > 1:
            spread = rank_spread(acc, state.values())
            acc.print(f"adapter on {acc.num_processes} ranks: max |difference| {spread:.3g}")
            log.write({"step": run.position.step, "ranks": acc.num_processes, "adapter_rank_max_diff": spread})
        if acc.is_main_process:
            save_adapter(
                peft_model, run.out, base_model=run.recipe.model.name_or_path,
                tokenizer=run.tokenizer, recipe=run.recipe, whole_folder=False, state=state,
            )
            acc.print(f"adapter saved to {run.out}")
    acc.wait_for_everyone()


# ------------------------------------------------------------------ what the loop writes and shows


class ProgressBar:
    """One rich bar per epoch: batches done, the last loss, batches per second."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.2f} it/s"),
            TimeElapsedColumn(), disable=not enabled, transient=True,
        )
        self.task = None

    def __enter__(self) -> ProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start(self, epoch: int, total: int, completed: int) -> None:
        self.task = self.progress.add_task("train", total=total, completed=completed, epoch=epoch, loss=0.0, rate=0.0)
        self.started, self.trained = time.perf_counter(), 0

    def advance(self, loss: float) -> None:
        self.trained += 1
        rate = self.trained / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=1, loss=loss, rate=rate)

    def stop(self) -> None:
        self.progress.remove_task(self.task)
