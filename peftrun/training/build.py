"""Setting up a run, apart from the loop: the output folder, the adapted model, the batches, the optimizer,
and the accelerator, engine, objective and checkpointer that carry them (`prepare`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from peftrun.adapted import PeftrunModel, wrap
from peftrun.chat import adopt_template
from peftrun.data import load_splits
from peftrun.datamix import mix_lines
from peftrun.errors import PeftrunError
from peftrun.io.outputs import is_empty_for_a_run, refuse_protected, user_path
from peftrun.models import load_model, load_tokenizer
from peftrun.tasks import is_diffusion
from peftrun.training.engines import Engine, engine_for, make_accelerator
from peftrun.training.hooks import Hooks
from peftrun.training.objectives import Objective, make_objective
from peftrun.training.resume import Checkpointer, Position, latest_checkpoint


def check_output_dir(recipe, resume: bool) -> Path:
    """Refuse to mix a new run with an old one; --resume needs a checkpoint to resume from. peftrun's own
    bookkeeping (the marker, the lock of this run, its cache) does not count as content."""
    out = output_path(recipe)
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
    if out.is_dir() and not is_empty_for_a_run(out) and not (recipe.overwrite or resuming):
        raise PeftrunError(
            "output_dir is not empty; a new run would mix with what is there",
            where=f"output_dir ({out})",
            hint="set overwrite: true (or --set overwrite=true), choose another output_dir, or --resume",
        )
    return out


def output_path(recipe) -> Path:
    """The run's output_dir, `~` expanded, checked against io.outputs' protected folders."""
    refuse_protected(recipe.output_dir, where="output_dir", name="output_dir")
    return user_path(recipe.output_dir)


def build(recipe, objective: Objective | None = None):
    """Tokenizer, data splits, label names and the adapted model, as the recipe and its objective describe them."""
    objective = objective or make_objective(recipe)
    if is_diffusion(recipe.model.task_type):  # a pipeline's components, not one transformers model
        from peftrun.training.objectives.diffusion import build_pipeline

        return build_pipeline(recipe)
    tokenizer = load_tokenizer(recipe.model)
    adopt_template(tokenizer, recipe.data)  # saved beside the adapter: generation prompts as training did
    splits = load_splits(recipe.data, recipe.training.seed)
    label_names = objective.find_label_names(splits)
    base = load_model(recipe.model, num_labels=objective.num_labels(label_names))
    if label_names:
        base.config.id2label = dict(enumerate(label_names))
        base.config.label2id = {n: i for i, n in enumerate(label_names)}
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if recipe.data.packing:
        base.config.use_cache = False  # transformers reads packed segments from position_ids only without a cache
    task = recipe.model.task_type
    model = wrap(base, task, recipe.method.name, recipe.method_config, fused_lora=recipe.training.fused_lora)
    if recipe.training.compile:
        # in place, so parameter names (and so checkpoints) stay those of the plain model
        backend = "inductor" if recipe.training.compile is True else recipe.training.compile
        model.model.compile(backend=backend)
    return tokenizer, splits, label_names, model


def with_label_names(recipe, label_names: list[str] | None, num_labels: int | None = None):
    """A copy of the recipe that names the classes the data gave (and the head's size), so that the recipe saved
    beside an adapter rebuilds the same head without the data. The caller's recipe is left as it was."""
    num_labels = num_labels if num_labels is not None else (len(label_names) if label_names else None)
    if num_labels is None:
        return recipe
    model = recipe.model.model_copy(update={"num_labels": num_labels})
    data = recipe.data.model_copy(update={"label_names": list(label_names)}) if label_names else recipe.data
    return recipe.model_copy(update={"model": model, "data": data})


def make_loaders(recipe, tokenizer, splits, label_names, objective: Objective | None = None, say=print):
    """The train and eval loaders of the objective's data; `say`s what the objective noted (rows dropped)."""
    data = (objective or make_objective(recipe)).data(tokenizer, splits, label_names)
    for note in data.notes:
        say(note)
    task = recipe.model.task_type
    train_ds, eval_ds, collate = data.train, data.eval, data.collate
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
        shuffle=False, collate_fn=data.eval_collate,
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


@dataclass
class Run:
    """Everything the loop works with, prepared by the accelerator."""

    recipe: object
    out: Path
    accelerator: object
    engine: Engine
    model: torch.nn.Module  # as prepared (DDP, DeepSpeed or FSDP around the adapted model)
    peft_model: PeftrunModel  # the adapted model inside it
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: DataLoader
    eval_loader: DataLoader
    objective: Objective
    checkpoints: Checkpointer
    position: Position
    total_steps: int
    data_mix: list[dict] | None = None  # data.datasets: what each dataset gave (datamix.mix_record)
    evaluated: tuple[int, object] | None = None  # (step, EvalResult) of the last evaluation


def prepare(recipe, out: Path, resume: bool, hooks: Hooks) -> Run:
    """Build the run the recipe describes and put it where a resumed run left off."""
    accelerator = make_accelerator(recipe)
    from accelerate.utils import set_seed

    set_seed(recipe.training.seed)
    objective = make_objective(recipe)
    tokenizer, splits, label_names, model = build(recipe, objective)
    for line in mix_lines(splits, recipe.data, recipe.training.seed):  # data.datasets: the mix and its counts
        accelerator.print(line)
    recipe = with_label_names(recipe, label_names, objective.num_labels(label_names))
    accelerator.print(model.trainable_report())
    train_loader, eval_loader = make_loaders(recipe, tokenizer, splits, label_names, objective, accelerator.print)

    cfg = recipe.training
    steps_per_epoch = math.ceil(len(train_loader) / (cfg.gradient_accumulation_steps * accelerator.num_processes))
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_epochs
    optimizer, scheduler = make_optimizer(recipe, model, total_steps, processes=accelerator.num_processes)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    engine = engine_for(accelerator)
    peft_model = accelerator.unwrap_model(model)
    # the chunked loss reads the output head whole: not where the engine shards it inside the forward
    peft_model.chunked_loss = cfg.chunked_loss and engine.reads_head_whole
    sharding = engine.describe(model)
    if sharding:
        accelerator.print(sharding)
    engine.prepare_generation(model)
    checkpoints = Checkpointer(recipe, out, accelerator, engine, model, optimizer, scheduler, hooks)
    position = checkpoints.begin(resume, total_steps)
    objective.bind(peft_model, tokenizer, label_names)
    return Run(
        recipe, out, accelerator, engine, model, peft_model, tokenizer, optimizer, scheduler,
        train_loader, eval_loader, objective, checkpoints, position, total_steps, getattr(splits, "mix", None),
    )
