"""`peftrun eval` and `peftrun predict`: a saved adapter (or the bare base model) on the recipe's eval
split, or on an unlabelled file whose predictions are written as csv, tsv or jsonl (or, for token
classification, as a CoNLL file: each word and its predicted tag), atomically."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from peftrun.conll import is_conll, write_conll
from peftrun.data import (
    EXTENSIONS,
    Collator,
    check_columns,
    label_names_for,
    load_file,
    load_splits,
    tokenize_split,
)
from peftrun.datamix import tokenize_pieces
from peftrun.errors import PeftrunError
from peftrun.evaluate import EvalResult, evaluate, label_options, make_constraint
from peftrun.generation import generate_texts
from peftrun.io.loading import load_adapted, saved_section
from peftrun.io.outputs import check_output_file, user_path
from peftrun.io.rows import write_rows
from peftrun.models import load_model, load_tokenizer
from peftrun.tasks import SEQ_CLS, TOKEN_CLS, has_label_names, is_lm

OUTPUT_FORMATS = (".csv", ".jsonl", ".tsv", ".conll")
PREDICTION_COLUMN = "prediction"


def _label_names(recipe, adapter: Path | None, splits=None) -> list[str] | None:
    """Class names as training saw them: the recipe's, the adapter's saved recipe, else the train data."""
    if not has_label_names(recipe.model.task_type) or recipe.training.objective != "supervised":
        return None  # a reward model's head has one output and no class names
    if recipe.data.label_names:
        return list(recipe.data.label_names)
    names = saved_section(adapter, "data").get("label_names") if adapter else None
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    if splits is None:
        splits = load_splits(recipe.data, recipe.training.seed)
    return label_names_for(splits, recipe.data)


def load_for_inference(recipe, adapter: str | Path | None, *, allow_pickle: bool = False, splits=None):
    """(model, tokenizer, label_names): the base with the saved adapter on it, or the bare base."""
    from accelerate.utils import set_seed

    adapter = Path(adapter) if adapter is not None else None
    label_names = _label_names(recipe, adapter, splits)
    if recipe.training.objective == "reward":
        recipe.model.num_labels = 1  # a reward model: one output
    if label_names:
        recipe.model.num_labels = recipe.model.num_labels or len(label_names)
        recipe.data.label_names = label_names
    set_seed(recipe.training.seed)  # a random_init base is rebuilt exactly as training built it
    if adapter is not None:
        model, tokenizer = load_adapted(adapter, allow_pickle=allow_pickle, model_section=recipe.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    else:
        tokenizer = load_tokenizer(recipe.model)
        model = load_model(recipe.model, num_labels=len(label_names) if label_names else None)
    inner = getattr(model, "model", model)
    if label_names:
        inner.config.id2label = dict(enumerate(label_names))
        inner.config.label2id = {n: i for i, n in enumerate(label_names)}
    if getattr(inner.config, "pad_token_id", None) is None:
        inner.config.pad_token_id = tokenizer.pad_token_id
    if torch.cuda.is_available() and not (recipe.model.load_in_8bit or recipe.model.load_in_4bit):
        model.to("cuda")
    model.eval()
    return model, tokenizer, label_names


def autocast(recipe):
    """The training run's mixed precision, so eval and predict compute as training's eval did."""
    precision = recipe.training.mixed_precision
    if precision == "no":
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def run_eval(recipe, adapter: str | Path | None, *, allow_pickle: bool = False) -> EvalResult:
    """The recipe's eval split (carved with the recipe's seed, as in training) through the model, evaluated as
    the recipe's objective evaluates it (the task's metrics, pairwise accuracy, DPO's rewards...)."""
    splits = load_splits(recipe.data, recipe.training.seed)
    model, tokenizer, label_names = load_for_inference(
        recipe, adapter, allow_pickle=allow_pickle, splits=splits
    )
    task = recipe.model.task_type
    size = recipe.training.eval_batch_size or recipe.training.batch_size
    if recipe.training.objective != "supervised":
        from peftrun.adapted import PeftrunModel
        from peftrun.training.objectives import make_objective

        if not isinstance(model, PeftrunModel):
            model = PeftrunModel(model, task)  # the base alone: no adapter to switch off
        objective = make_objective(recipe)
        data = objective.data(tokenizer, splits, None)
        objective.bind(model, tokenizer, None)
        loader = DataLoader(data.eval, batch_size=size, shuffle=False, collate_fn=data.eval_collate)
        with autocast(recipe):
            return finite_metrics(objective.evaluate(model, loader, None), recipe, adapter)
    eval_ds = tokenize_pieces(splits, "eval", recipe.data, tokenizer, task, label_names, for_eval=True)
    loader = DataLoader(eval_ds, batch_size=size, shuffle=False, collate_fn=Collator(tokenizer.pad_token_id, task))
    with autocast(recipe):
        result = evaluate(
            model, loader, task_type=task, tokenizer=tokenizer, label_names=label_names, data_cfg=recipe.data
        )
    return finite_metrics(result, recipe, adapter)


def finite_metrics(result: EvalResult, recipe, adapter: str | Path | None) -> EvalResult:
    """`result` when every metric is a finite number; else one PeftrunError naming the adapter (or the base
    model) and the metric: a NaN loss is no result, and `metrics=` must stay valid JSON."""
    for key, value in result.metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            what = f"the adapter {adapter}" if adapter is not None else f"the base model {recipe.model.name_or_path}"
            raise PeftrunError(
                f"{key} is {value} on the eval split: {what} computes non-finite outputs",
                where=str(adapter) if adapter is not None else "model.name_or_path",
                hint="its weights (or the base model's) hold NaN/inf or overflow in this precision; try "
                "training.mixed_precision: no, or an earlier checkpoint",
            )
    return result


# ------------------------------------------------------------------ predict


def _check_output(path: Path, task: str) -> None:
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise PeftrunError(
            f"cannot write '{path.suffix}' files",
            where=f"--output ({path})",
            hint=f"name the output with one of {', '.join(OUTPUT_FORMATS)}",
        )
    if path.suffix.lower() == ".conll" and task != TOKEN_CLS:
        raise PeftrunError(
            f"a .conll output holds one tag per word: token classification only, not {task}",
            where=f"--output ({path})",
            hint="name the output .csv, .tsv or .jsonl",
        )
    if path.is_dir():
        raise PeftrunError("the output is a folder; give a file name", where=f"--output ({path})")


def _predict_batch(model, batch, tokenizer, task: str, label_names, data_cfg, constraint) -> list[Any]:
    device = next(model.parameters()).device
    if is_lm(task):
        options = label_options(tokenizer, data_cfg)
        return generate_texts(model, tokenizer, batch, options=options, constraint=constraint, task_type=task)
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits
    best = logits.argmax(-1).cpu()
    if task == SEQ_CLS:
        return [label_names[i] for i in best.tolist()]
    rows = []
    for ids, words in zip(best.tolist(), batch["word_ids"].tolist()):
        tags = {w: label_names[i] for i, w in zip(ids, words) if w >= 0}
        rows.append(tags)
    return rows


@torch.no_grad()
def predict_rows(recipe, model, tokenizer, label_names, ds, batch_size: int) -> list[Any]:
    """One prediction per row of `ds`, in its order. Rows are batched shortest first to spare padding."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    task = recipe.model.task_type
    tokens = tokenize_split(ds, recipe.data, tokenizer, task, label_names, for_eval=True, with_labels=False)
    lengths = [len(ids) for ids in tokens["input_ids"]]
    order = sorted(range(len(tokens)), key=lambda i: lengths[i])
    collate = Collator(tokenizer.pad_token_id, task)
    constraint = make_constraint(tokenizer, recipe.data, task)
    out: list[Any] = [None] * len(tokens)
    progress = Progress(
        TextColumn("predict"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        transient=True,
    )
    with progress:
        bar = progress.add_task("predict", total=len(order))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([tokens[i] for i in chunk])
            for i, pred in zip(
                chunk, _predict_batch(model, batch, tokenizer, task, label_names, recipe.data, constraint)
            ):
                out[i] = pred
            progress.update(bar, advance=len(chunk))
    if task == TOKEN_CLS:
        # words past max_length got no tag from the model: call them outside any entity
        filler = "O" if "O" in (label_names or []) else None
        words = ds[recipe.data.tokens_column]
        out = [[tags.get(w, filler) for w in range(len(row))] for tags, row in zip(out, words)]
    return out


def run_predict(
    recipe,
    adapter: str | Path | None,
    input_path: str | Path,
    output_path: str | Path,
    *,
    allow_pickle: bool = False,
    batch_size: int | None = None,
) -> int:
    """Predict every row of `input_path`; write its columns plus `prediction` to `output_path` (io.outputs'
    policy: replaced atomically when it exists; never the input, a folder, or a protected folder; a .conll
    output: each word as the input has it, TAB, its predicted tag; a blank line after each sentence)."""
    input_path = user_path(input_path)
    adapter = user_path(adapter) if adapter is not None else None
    output_path = user_path(output_path)
    _check_output(output_path, recipe.model.task_type)
    check_output_file(output_path, where=f"--output ({output_path})", inputs=[(input_path, "the --input file")])
    if Path(input_path).suffix.lower() not in EXTENSIONS and not is_conll(input_path, recipe.data):
        token_hint = ", or CoNLL (.conll, .txt, none)" if recipe.model.task_type == TOKEN_CLS else ""
        raise PeftrunError(
            f"cannot read '{Path(input_path).suffix}' files",
            where=f"--input ({input_path})",
            hint=f"use one of {', '.join(EXTENSIONS)}{token_hint}",
        )
    ds = load_file(input_path, "--input", recipe.data, strict=False)
    check_columns(ds, recipe.data, f"--input ({Path(input_path).name})", with_label=False)
    model, tokenizer, label_names = load_for_inference(recipe, adapter, allow_pickle=allow_pickle)
    size = batch_size or recipe.training.eval_batch_size or recipe.training.batch_size
    if recipe.training.objective == "reward":
        with autocast(recipe):
            rows = score_rows(recipe, model, tokenizer, ds, size)
        write_rows(rows, output_path)
        return len(rows)
    with autocast(recipe):
        preds = predict_rows(recipe, model, tokenizer, label_names, ds, size)
    if output_path.suffix.lower() == ".conll":
        write_conll(ds[recipe.data.tokens_column], preds, output_path)
        return len(preds)
    rows = [{**row, PREDICTION_COLUMN: pred} for row, pred in zip(ds, preds)]
    write_rows(rows, output_path, empty_columns=[PREDICTION_COLUMN])
    return len(rows)


@torch.no_grad()
def score_rows(recipe, model, tokenizer, ds, batch_size: int) -> list[dict[str, Any]]:
    """A reward model's scores: `score_chosen` and `score_rejected` for pair rows, else `score` for a row's
    prompt + answer (`prompt` with `completion`/`response`/`answer`) or its text column."""
    from peftrun.preference import pair_turns, render

    def text_of(row: dict) -> list[tuple[str, str]]:
        if row.get("chosen") is not None and row.get("rejected") is not None:
            turns, chosen, rejected = pair_turns(row, recipe.data)
            return [("score_chosen", "".join(render(tokenizer, turns, chosen, recipe.data))),
                    ("score_rejected", "".join(render(tokenizer, turns, rejected, recipe.data)))]
        answer = next((row[k] for k in ("completion", "response", "answer") if row.get(k) is not None), None)
        if row.get("prompt") is not None and answer is not None:
            turns = [{"role": "user", "content": str(row["prompt"])}]
            return [("score", "".join(render(tokenizer, turns, str(answer), recipe.data)))]
        if row.get(recipe.data.text_column) is None:
            raise PeftrunError(
                "a row to score needs chosen/rejected, prompt and completion, or the text column",
                where=f"--input (data.text_column: {recipe.data.text_column})",
            )
        return [("score", str(row[recipe.data.text_column]))]

    device = next(model.parameters()).device
    rows = [dict(row) for row in ds]
    items = [(i, key, text) for i, row in enumerate(rows) for key, text in text_of(row)]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # the answer is at the end: keep it
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            enc = tokenizer([t for _, _, t in chunk], padding=True, truncation=True,
                            max_length=recipe.data.max_length, return_tensors="pt").to(device)
            scores = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0]
            for (i, key, _), score in zip(chunk, scores.float().tolist()):
                rows[i][key] = score
    finally:
        tokenizer.truncation_side = side
    return rows
