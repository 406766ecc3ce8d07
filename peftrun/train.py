"""The training loop, on Accelerate, top to bottom: build, train, evaluate, save."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from peftrun.adapted import PeftrunModel, wrap
from peftrun.checkpoint import save_adapter
from peftrun.data import Collator, label_names_for, load_splits, model_inputs, tokenize_split
from peftrun.distributed import gathered, make_accelerator, rank_spread, zero3
from peftrun.errors import PeftrunError
from peftrun.evaluate import evaluate
from peftrun.memory import MemoryTracker
from peftrun.memory import report as memory_report
from peftrun.models import load_model, load_tokenizer


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
    out = Path(recipe.output_dir)
    if out.exists() and any(out.iterdir()) and not (recipe.overwrite or resume or recipe.training.auto_resume):
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
    model = wrap(base, task, recipe.method.name, recipe.method_config)
    return tokenizer, splits, label_names, model


def make_loaders(recipe, tokenizer, splits, label_names):
    task = recipe.model.task_type
    train_ds = tokenize_split(splits.train, recipe.data, tokenizer, task, label_names, for_eval=False)
    eval_ds = tokenize_split(splits.eval, recipe.data, tokenizer, task, label_names, for_eval=True)
    collate = Collator(tokenizer.pad_token_id, task)
    generator = torch.Generator().manual_seed(recipe.training.seed)
    train_loader = DataLoader(
        train_ds, batch_size=recipe.training.batch_size, shuffle=True, collate_fn=collate,
        generator=generator, num_workers=recipe.training.num_workers,
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
    for key in ("accuracy", "f1", "entity_f1"):
        if key in result.metrics:
            accelerator.print(f"{key}={result.metrics[key] * 100:.2f}")
    if result.preds:
        accelerator.print(f"eval_preds[:10]={result.preds[:10]!r}")
        accelerator.print(f"{refs_name}[:10]={result.refs[:10]!r}")


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
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    log = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    step = 0
    last: dict[str, Any] = {}
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.2f} it/s"), TimeElapsedColumn(),
        disable=not (accelerator.is_main_process and cfg.progress_bar), transient=True,
    )
    with progress:
        for epoch in range(cfg.num_epochs):
            bar = progress.add_task("train", total=len(train_loader), epoch=epoch, loss=0.0, rate=0.0)
            model.train()
            total_loss = torch.zeros((), dtype=torch.float64)
            seen = 0
            started = time.perf_counter()
            with MemoryTracker("train") as mem:
                for i, batch in enumerate(train_loader):
                    with accelerator.accumulate(model):
                        loss = model(**model_inputs(batch)).loss
                        if method.extra_loss is not None:
                            loss = loss + method.extra_loss(peft_model, adapter)
                        if not torch.isfinite(loss):
                            raise PeftrunError(
                                f"the loss became {loss.item()} at step {step} (epoch {epoch}, batch {i})",
                                hint="lower training.learning_rate, or use float32 / bf16 instead of fp16",
                            )
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        optimizer.step()
                        if method.after_step is not None and accelerator.sync_gradients:
                            method.after_step(peft_model, adapter, step + 1, total_steps)
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    total_loss += loss.detach().double().cpu()
                    seen += 1
                    if accelerator.sync_gradients:
                        step += 1
                        if step % cfg.logging_steps == 0:
                            log.write({"step": step, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
                    elapsed = time.perf_counter() - started
                    progress.update(bar, advance=1, loss=loss.item(), rate=seen / max(elapsed, 1e-9))
                    if cfg.max_steps and step >= cfg.max_steps:
                        break
            progress.remove_task(bar)
            mem_lines, mem_record = memory_report(mem, accelerator)  # every rank's devices, printed once
            for line in mem_lines:
                accelerator.print(line)
            train_epoch_loss = (total_loss / max(seen, 1)).item()
            train_ppl = math.exp(min(train_epoch_loss, 50.0))
            record: dict[str, Any] = {
                "epoch": epoch, "step": step, "train_epoch_loss": train_epoch_loss, "train_ppl": train_ppl, **mem_record
            }
            line = f"epoch={epoch}: train_ppl={train_ppl:.6f} train_epoch_loss={train_epoch_loss:.6f}"
            if cfg.eval_each_epoch or epoch == cfg.num_epochs - 1 or (cfg.max_steps and step >= cfg.max_steps):
                with MemoryTracker("eval") as emem:
                    result = evaluate(
                        model, eval_loader, task_type=recipe.model.task_type, tokenizer=tokenizer,
                        label_names=label_names, data_cfg=recipe.data, accelerator=accelerator,
                    )
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
            if cfg.max_steps and step >= cfg.max_steps:
                break

    accelerator.wait_for_everyone()
    # under ZeRO-3 each rank holds a slice of every tensor: gather the adapter's whole before writing it
    state = peft_model.adapter_state_dict(adapter)
    with gathered(state.values(), enabled=zero3(accelerator)):
        if accelerator.num_processes > 1:
            spread = rank_spread(accelerator, state.values())
            accelerator.print(f"adapter on {accelerator.num_processes} ranks: max |difference| {spread:.3g}")
            log.write({"step": step, "ranks": accelerator.num_processes, "adapter_rank_max_diff": spread})
        if accelerator.is_main_process:
            save_adapter(
                peft_model, out, base_model=recipe.model.name_or_path,
                tokenizer=tokenizer, recipe=recipe, whole_folder=False,
            )
            accelerator.print(f"adapter saved to {out}")
    accelerator.wait_for_everyone()
    return last
