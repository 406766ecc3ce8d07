"""The training loop, on Accelerate, top to bottom: build, train, evaluate, save."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader

from peftrun.adapted import PeftrunModel, wrap
from peftrun.data import Collator, label_names_for, load_splits, model_inputs, tokenize_split
from peftrun.distributed import fsdp_generation, make_accelerator, rank_spread, shard_line, whole_adapter
from peftrun.errors import PeftrunError
from peftrun.evaluate import evaluate, report_lines
from peftrun.io.peft_format import save_adapter
from peftrun.memory import MemoryTracker
from peftrun.memory import report as memory_report
from peftrun.models import load_model, load_tokenizer
from peftrun.resume import Checkpointer, RunInterrupted, StopRequest, fault, latest_checkpoint, resume_command


class MetricsLog:
    """Appends one JSON object per line to output_dir/metrics.jsonl (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")


def check_output_dir(recipe, resume: bool) -> Path:
    """Refuse to mix a new run with an old one; --resume needs a checkpoint to resume from."""
    out = Path(recipe.output_dir)
    has_checkpoint = latest_checkpoint(out) is not None
    if resume and not has_checkpoint:
        raise PeftrunError(
            f"--resume: no complete checkpoint under {out / 'checkpoints'}",
            where=f"output_dir ({out})",
            hint="start a new run without --resume (with overwrite: true to replace what is there)",
        )
    resuming = has_checkpoint and (resume or recipe.training.auto_resume)
    if out.exists() and not out.is_dir():
        raise PeftrunError("output_dir is a file, not a folder", where=f"output_dir ({out})")
    if out.exists() and any(out.iterdir()) and not (recipe.overwrite or resuming):
        raise PeftrunError(
            "output_dir is not empty; a new run would mix with what is there",
            where=f"output_dir ({out})",
            hint="set overwrite: true (or --set overwrite=true), choose another output_dir, or --resume",
        )
    return out


def build(recipe, accelerator=None):
    """Tokenizer, data splits, label names and the adapted model, as the recipe describes them."""
    tokenizer = load_tokenizer(recipe.model)
    splits = load_splits(recipe.data, recipe.training.seed)
    task = recipe.model.task_type
    label_names = label_names_for(splits, recipe.data) if task in ("SEQ_CLS", "TOKEN_CLS") else None
    base = load_model(recipe.model, num_labels=len(label_names) if label_names else None)
    if label_names:
        # the saved recipe copy then rebuilds the same head without the data
        recipe.model.num_labels = len(label_names)
        recipe.data.label_names = label_names
        base.config.id2label = dict(enumerate(label_names))
        base.config.label2id = {n: i for i, n in enumerate(label_names)}
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if recipe.data.packing:
        base.config.use_cache = False  # transformers reads packed segments from position_ids only without a cache
    model = wrap(base, task, recipe.method.name, recipe.method_config)
    if recipe.training.compile:
        # in place, so parameter names (and so checkpoints) stay those of the plain model
        backend = "inductor" if recipe.training.compile is True else recipe.training.compile
        model.model.compile(backend=backend)
    return tokenizer, splits, label_names, model


def make_loaders(recipe, tokenizer, splits, label_names):
    task = recipe.model.task_type
    train_ds = tokenize_split(splits.train, recipe.data, tokenizer, task, label_names, for_eval=False)
    eval_ds = tokenize_split(splits.eval, recipe.data, tokenizer, task, label_names, for_eval=True)
    collate = Collator(tokenizer.pad_token_id, task)
    generator = torch.Generator().manual_seed(recipe.training.seed)
    sampler = None
    if recipe.data.group_by_length:  # batches of similar lengths: dynamic padding then pads little
        from peftrun.batching import LengthGroupedSampler

        lengths = [len(ids) for ids in train_ds["input_ids"]]
        sampler = LengthGroupedSampler(lengths, recipe.training.batch_size, recipe.training.seed)
    train_collate = collate
    if recipe.data.packing:  # whole examples side by side, positions restarting per example
        from peftrun.batching import PackedCollator, check_packing, pack_rows
        from peftrun.methods import get_method

        check_packing(task, get_method(recipe.method.name))
        train_ds, sampler = pack_rows(list(train_ds), recipe.data.max_length), None
        train_collate = PackedCollator(tokenizer.pad_token_id)
    train_loader = DataLoader(
        train_ds, batch_size=recipe.training.batch_size, shuffle=sampler is None, sampler=sampler,
        collate_fn=train_collate, generator=generator, num_workers=recipe.training.num_workers,
    )
    eval_loader = DataLoader(
        eval_ds, batch_size=recipe.training.eval_batch_size or recipe.training.batch_size,
        shuffle=False, collate_fn=collate,
    )
    return train_loader, eval_loader


def make_optimizer(recipe, model: PeftrunModel, steps: int, processes: int = 1):
    """AdamW and the schedule. `processes`: Accelerate steps a prepared scheduler once per process per step."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=recipe.training.learning_rate, weight_decay=recipe.training.weight_decay, **adamw_kernel(params)
    )
    warmup = recipe.training.warmup_steps or int(recipe.training.warmup_ratio * steps)
    scheduler = get_scheduler(
        recipe.training.lr_scheduler, optimizer, num_warmup_steps=warmup * processes,
        num_training_steps=steps * processes,
    )
    return optimizer, scheduler


def adamw_kernel(params) -> dict[str, bool]:
    """The fused AdamW kernel where it runs: it needs no temporaries, where foreach allocates one more copy
    of every trainable parameter per step (4 bytes each: 11 GB for a 3B model trained whole)."""
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if params and fusable else {"foreach": True}


def print_eval(accelerator, result, refs_name: str = "references") -> None:
    for line in report_lines(result, refs_name):
        accelerator.print(line)


def train(recipe, *, resume: bool = False) -> dict[str, Any]:
    """Train the recipe's adapter; returns the last epoch's metrics."""
    out = check_output_dir(recipe, resume)
    accelerator = make_accelerator(recipe)
    from accelerate.utils import set_seed

    set_seed(recipe.training.seed)
    tokenizer, splits, label_names, model = build(recipe, accelerator)
    accelerator.print(model.trainable_report())
    train_loader, eval_loader = make_loaders(recipe, tokenizer, splits, label_names)

    cfg = recipe.training
    steps_per_epoch = math.ceil(len(train_loader) / (cfg.gradient_accumulation_steps * accelerator.num_processes))
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_epochs
    optimizer, scheduler = make_optimizer(recipe, model, total_steps, processes=accelerator.num_processes)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    peft_model = accelerator.unwrap_model(model)
    adapter, method = peft_model.active_adapter, peft_model.method
    # the chunked loss reads the output head whole: not under FSDP, which shards it (lm_loss sees ZeRO-3's)
    peft_model.chunked_loss = cfg.chunked_loss and accelerator.distributed_type != DistributedType.FSDP
    sharding = shard_line(accelerator, model)
    if sharding:
        accelerator.print(sharding)
        fsdp_generation(accelerator, model)
    checkpoints = Checkpointer(recipe, out, accelerator, model, optimizer, scheduler)
    pos = checkpoints.begin(resume, total_steps)
    log = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    last: dict[str, Any] = {}
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.2f} it/s"), TimeElapsedColumn(),
        disable=not (accelerator.is_main_process and cfg.progress_bar), transient=True,
    )
    stop = StopRequest()

    def done() -> bool:
        return bool(cfg.max_steps) and pos.step >= cfg.max_steps

    def stop_if_asked() -> None:
        signum = stop.requested(accelerator)
        if signum:
            folder = checkpoints.save(pos)
            raise RunInterrupted(
                f"interrupted at step {pos.step}: checkpoint saved to {folder}; "
                f"continue with: {resume_command(recipe)}", signum,
            )

    with progress, stop:
        for epoch in range(pos.epoch, cfg.num_epochs):
            if epoch != pos.epoch:
                pos.next_epoch(epoch)
            # the order of batches is a function of (seed, epoch); a resumed epoch skips what it had consumed
            train_loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(train_loader, pos.batches) if pos.batches else train_loader
            if pos.batches == 0:
                checkpoints.restore_rng()
            bar = progress.add_task(
                "train", total=len(train_loader), completed=pos.batches, epoch=epoch, loss=0.0, rate=0.0
            )
            model.train()
            started, trained = time.perf_counter(), 0
            with MemoryTracker("train") as mem:
                for batch in batches:
                    checkpoints.restore_rng()  # a resumed run: exactly where the checkpoint was taken
                    if done():
                        break
                    with accelerator.accumulate(model):
                        loss = model(**model_inputs(batch)).loss
                        if method.extra_loss is not None:
                            loss = loss + method.extra_loss(peft_model, adapter)
                        if fault("loss", pos.step + 1) == "nan":
                            loss = loss * float("nan")
                        if not torch.isfinite(loss):
                            raise PeftrunError(
                                f"the loss became {loss.item()} at step {pos.step + 1} (epoch {epoch}, batch "
                                f"{pos.batches}); training stopped and nothing after it was saved; "
                                f"{checkpoints.describe_last()}",
                                hint="lower training.learning_rate, or use float32 / bf16 instead of fp16",
                            )
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        optimizer.step()
                        if method.after_step is not None and accelerator.sync_gradients:
                            method.after_step(peft_model, adapter, pos.step + 1, total_steps)
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    pos.loss_sum += loss.detach().double().cpu().item()
                    pos.seen += 1
                    pos.batches += 1
                    trained += 1
                    progress.update(bar, advance=1, loss=loss.item(), rate=trained / max(time.perf_counter() - started, 1e-9))
                    if accelerator.sync_gradients:
                        pos.step += 1
                        if pos.step % cfg.logging_steps == 0:
                            log.write({"step": pos.step, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
                        fault("after_step", pos.step)
                        stop_if_asked()
                        if cfg.save_steps and pos.step % cfg.save_steps == 0:
                            checkpoints.save(pos)
            checkpoints.restore_rng()  # a run resumed at an epoch's end trains no batch of it
            progress.remove_task(bar)
            mem_lines, mem_record = memory_report(mem, accelerator)  # every rank's devices, printed once
            for line in mem_lines:
                accelerator.print(line)
            if cfg.save_each_epoch or epoch == cfg.num_epochs - 1 or done():
                checkpoints.save(pos)  # before evaluating: a failed eval loses no training
            train_epoch_loss = pos.loss_sum / max(pos.seen, 1)
            train_ppl = math.exp(min(train_epoch_loss, 50.0))
            record: dict[str, Any] = {
                "epoch": epoch, "step": pos.step, "train_epoch_loss": train_epoch_loss, "train_ppl": train_ppl,
                **mem_record,
            }
            line = f"epoch={epoch}: train_ppl={train_ppl:.6f} train_epoch_loss={train_epoch_loss:.6f}"
            if cfg.eval_each_epoch or epoch == cfg.num_epochs - 1 or done():
                try:
                    if fault("eval", pos.step) == "fail":
                        raise RuntimeError("injected evaluation failure")
                    with MemoryTracker("eval") as emem:
                        result = evaluate(
                            model, eval_loader, task_type=recipe.model.task_type, tokenizer=tokenizer,
                            label_names=label_names, data_cfg=recipe.data, accelerator=accelerator,
                        )
                except Exception:
                    accelerator.print(
                        f"evaluation failed after epoch {epoch}; {checkpoints.describe_last()} "
                        f"(to retry from there: {resume_command(recipe)})", file=sys.stderr,
                    )
                    raise
                emem_lines, emem_record = memory_report(emem, accelerator)
                for mline in emem_lines:
                    accelerator.print(mline)
                record.update(result.metrics)
                record.update(emem_record)
                line += f" eval_loss={result.metrics['eval_loss']:.6f}"
                if "eval_ppl" in result.metrics:
                    line += f" eval_ppl={result.metrics['eval_ppl']:.6f}"
                accelerator.print(line)
                print_eval(accelerator, result)
            else:
                accelerator.print(line)
            log.write(record)
            last = record
            stop_if_asked()
            if done():
                break

    accelerator.wait_for_everyone()
    # under ZeRO-3 and FSDP each rank holds a slice of every tensor: gather the adapter's whole before writing it
    with whole_adapter(accelerator, model, peft_model, adapter) as state:
        if accelerator.num_processes > 1:
            spread = rank_spread(accelerator, state.values())
            accelerator.print(f"adapter on {accelerator.num_processes} ranks: max |difference| {spread:.3g}")
            log.write({"step": pos.step, "ranks": accelerator.num_processes, "adapter_rank_max_diff": spread})
        if accelerator.is_main_process:
            save_adapter(
                peft_model, out, base_model=recipe.model.name_or_path,
                tokenizer=tokenizer, recipe=recipe, whole_folder=False, state=state,
            )
            accelerator.print(f"adapter saved to {out}")
    accelerator.wait_for_everyone()
    return last
