"""Datasets for the four task types: loading (local files or the hub), prompts and verbalisers,
tokenisation, and collators that pad each batch to its own longest row."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftrun.errors import PeftrunError

IGNORE_INDEX = -100
SPLIT_NAMES = {"train": ("train",), "eval": ("validation", "dev", "eval", "valid", "val"), "test": ("test",)}
EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass
class Splits:
    train: Any
    eval: Any | None
    test: Any | None
    label_names: list[str] | None


# ------------------------------------------------------------------ loading


def _load_file(path: Path, where: str):
    import datasets

    datasets.disable_progress_bars()
    if not path.is_file():
        raise PeftrunError("data file not found", where=f"{where} ({path})")
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise PeftrunError(
            f"cannot read '{path.suffix}' files", where=where, hint=f"use one of {', '.join(EXTENSIONS)}"
        )
    kwargs: dict[str, Any] = {}
    if path.suffix.lower() == ".tsv":
        kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        ds = datasets.load_dataset(kind, data_files={"split": str(path)}, split="split", **kwargs)
    except Exception as exc:  # datasets raises many types for unreadable files
        raise PeftrunError(f"cannot read {path.name}: {str(exc).splitlines()[0][:200]}", where=where) from None
    return ds


def _find_split_file(folder: Path, split: str) -> Path | None:
    for stem in SPLIT_NAMES[split]:
        for ext in EXTENSIONS:
            candidate = folder / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    return None


def load_splits(data_cfg, seed: int) -> Splits:
    """Train, eval and test splits from the recipe's data section; eval is carved from train if absent."""
    train = eval_ = test = None
    if data_cfg.train_file:
        train = _load_file(Path(data_cfg.train_file), "data.train_file")
    if data_cfg.eval_file:
        eval_ = _load_file(Path(data_cfg.eval_file), "data.eval_file")
    if data_cfg.test_file:
        test = _load_file(Path(data_cfg.test_file), "data.test_file")
    if data_cfg.path and train is None:
        local = Path(data_cfg.path)
        if local.is_file():
            train = _load_file(local, "data.path")
        elif local.is_dir():
            files = {s: _find_split_file(local, s) for s in SPLIT_NAMES}
            if files["train"] is None:
                raise PeftrunError(
                    "no train file (train.csv/.tsv/.json/.jsonl/.parquet) in this folder",
                    where=f"data.path ({local})",
                    hint="or name the files with data.train_file / data.eval_file",
                )
            train = _load_file(files["train"], "data.path")
            if eval_ is None and files["eval"]:
                eval_ = _load_file(files["eval"], "data.path")
            if test is None and files["test"]:
                test = _load_file(files["test"], "data.path")
        else:
            train, eval_, test = _load_hub(data_cfg)
    if data_cfg.drop_empty:
        train = _drop_empty(train, data_cfg)
        eval_ = _drop_empty(eval_, data_cfg) if eval_ is not None else None
    if len(train) == 0:
        raise PeftrunError("the training set is empty (after dropping empty rows)", where="data")
    if eval_ is None:
        if len(train) < 2:
            raise PeftrunError("too few rows to carve an eval split", where="data")
        parts = train.train_test_split(test_size=data_cfg.eval_fraction, seed=seed)
        train, eval_ = parts["train"], parts["test"]
    if data_cfg.max_train_samples:
        train = train.select(range(min(len(train), data_cfg.max_train_samples)))
    if data_cfg.max_eval_samples:
        eval_ = eval_.select(range(min(len(eval_), data_cfg.max_eval_samples)))
    return Splits(train, eval_, test, data_cfg.label_names)


def _load_hub(data_cfg):
    import datasets

    try:
        ds = datasets.load_dataset(data_cfg.path, data_cfg.name)
    except Exception as exc:
        raise PeftrunError(
            f"dataset '{data_cfg.path}' cannot be loaded: {str(exc).splitlines()[0][:200]}",
            where="data.path",
            hint="offline, point data.path at a local folder or file (csv, tsv, json, jsonl, parquet)",
        ) from None
    if data_cfg.train_split not in ds:
        raise PeftrunError(f"no split '{data_cfg.train_split}'; there are {list(ds)}", where="data.train_split")
    eval_name = data_cfg.eval_split or next((s for s in SPLIT_NAMES["eval"] if s in ds), None)
    test_name = data_cfg.test_split or ("test" if "test" in ds else None)
    return ds[data_cfg.train_split], ds[eval_name] if eval_name else None, ds[test_name] if test_name else None


def _needed_columns(data_cfg, with_label: bool = True) -> list[str]:
    if data_cfg.format == "alpaca":
        return ["instruction", "output"] if with_label else ["instruction"]
    if data_cfg.format == "tokens":
        return [data_cfg.tokens_column] + ([data_cfg.tags_column] if with_label else [])
    if data_cfg.template:
        import string

        cols = [f for _, f, _, _ in string.Formatter().parse(data_cfg.template) if f]
    else:
        cols = [data_cfg.text_column] + ([data_cfg.text_pair_column] if data_cfg.text_pair_column else [])
    if with_label and not data_cfg.target_template:
        cols.append(data_cfg.label_column)
    return cols


def check_columns(ds, data_cfg, split: str, with_label: bool = True) -> None:
    missing = [c for c in _needed_columns(data_cfg, with_label) if c not in ds.column_names]
    if missing:
        raise PeftrunError(
            f"column(s) {missing} not in the {split} data",
            where="data",
            hint=f"columns there are: {', '.join(ds.column_names)}; map them with data.text_column / data.label_column",
        )


def _drop_empty(ds, data_cfg):
    check_columns(ds, data_cfg, "training" if ds is not None else "", with_label=False)
    cols = _needed_columns(data_cfg, with_label=False)

    def keep(row: dict) -> bool:
        return all(row[c] is not None and str(row[c]).strip() != "" for c in cols)

    return ds.filter(keep)


# ------------------------------------------------------------------ prompts and labels


def label_names_for(splits: Splits, data_cfg) -> list[str]:
    """Class names in a stable order: the recipe's, else the sorted values seen in training."""
    if data_cfg.label_names:
        return list(data_cfg.label_names)
    if data_cfg.format == "tokens":
        seen = {t for tags in splits.train[data_cfg.tags_column] for t in tags}
    else:
        seen = set(splits.train[data_cfg.label_column])
    return [str(v) for v in sorted(seen, key=lambda v: (isinstance(v, str), v))]


def source_text(row: dict, data_cfg, tokenizer=None) -> str:
    if data_cfg.format == "alpaca":
        inp = (row.get("input") or "").strip()
        return ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if inp else "",
            instruction=row["instruction"].strip(),
            input_block=f"### Input:\n{inp}\n\n" if inp else "",
        )
    if data_cfg.format == "chat":
        content = row[data_cfg.text_column] if not data_cfg.template else data_cfg.template.format_map(row)
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if data_cfg.template:
        return data_cfg.template.format_map(row)
    return str(row[data_cfg.text_column])


def target_text(row: dict, data_cfg) -> str:
    if data_cfg.format == "alpaca":
        return str(row["output"])
    if data_cfg.target_template:
        return data_cfg.target_template.format_map(row)
    value = row[data_cfg.label_column]
    if data_cfg.verbalizer:
        return data_cfg.verbalizer.get(str(value), str(value))
    return str(value)


# ------------------------------------------------------------------ tokenisation


def tokenize_split(ds, data_cfg, tokenizer, task_type: str, label_names: list[str] | None, *, for_eval: bool):
    """Token ids per row; padding is left to the collator."""
    import datasets

    datasets.disable_progress_bars()
    max_len = data_cfg.max_length
    index = {name: i for i, name in enumerate(label_names or [])}

    def seq_cls(row: dict) -> dict:
        pair = row[data_cfg.text_pair_column] if data_cfg.text_pair_column else None
        text = source_text(row, data_cfg, tokenizer)
        enc = tokenizer(text, pair, truncation=True, max_length=max_len)
        label = str(row[data_cfg.label_column])
        if label not in index:
            raise PeftrunError(f"label '{label}' is not one of {label_names}", where="data.label_names")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": index[label]}

    def token_cls(row: dict) -> dict:
        enc = tokenizer(row[data_cfg.tokens_column], is_split_into_words=True, truncation=True, max_length=max_len)
        tags = row[data_cfg.tags_column]
        labels, previous = [], None
        for word in enc.word_ids():
            labels.append(IGNORE_INDEX if word is None or word == previous else index[str(tags[word])])
            previous = word
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    def seq2seq(row: dict) -> dict:
        enc = tokenizer(source_text(row, data_cfg, tokenizer), truncation=True, max_length=max_len)
        target = target_text(row, data_cfg)
        labels = tokenizer(text_target=target, truncation=True, max_length=data_cfg.target_max_length)["input_ids"]
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
        if for_eval:
            out["reference"] = target
        return out

    def causal(row: dict) -> dict:
        prompt_ids = tokenizer(source_text(row, data_cfg, tokenizer), add_special_tokens=True)["input_ids"]
        target = target_text(row, data_cfg)
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        # keep the answer: trim the prompt from the left when the row is too long
        room = max_len - len(target_ids) - len(eos)
        if room < 1:
            target_ids = target_ids[: max(max_len - len(eos) - 1, 1)]
            room = max_len - len(target_ids) - len(eos)
        prompt_ids = prompt_ids[-room:]
        ids = prompt_ids + target_ids + eos
        if data_cfg.train_on_inputs:
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids + eos
        out = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
        if for_eval:
            out["prompt_ids"] = prompt_ids
            out["reference"] = target
        return out

    fn = {"SEQ_CLS": seq_cls, "TOKEN_CLS": token_cls, "SEQ_2_SEQ_LM": seq2seq, "CAUSAL_LM": causal}[task_type]
    fn = with_task_ids(fn, ds, data_cfg)
    return ds.map(fn, remove_columns=ds.column_names, desc=None)


# ------------------------------------------------------------------ batches


class Collator:
    """Pads each batch to its longest row: input_ids with pad id, attention 0, labels -100."""

    def __init__(self, pad_token_id: int, task_type: str):
        self.pad = pad_token_id
        self.task_type = task_type

    @staticmethod
    def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        width = max(len(r) for r in rows)
        padded = [([value] * (width - len(r)) + list(r)) if left else (list(r) + [value] * (width - len(r))) for r in rows]
        return torch.tensor(padded, dtype=torch.long)

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "input_ids": self._pad([r["input_ids"] for r in rows], self.pad),
            "attention_mask": self._pad([r["attention_mask"] for r in rows], 0),
        }
        labels = [r["labels"] for r in rows]
        if isinstance(labels[0], int):
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        else:
            batch["labels"] = self._pad(labels, IGNORE_INDEX)
        if "prompt_ids" in rows[0]:
            prompts = [r["prompt_ids"] for r in rows]
            batch["prompt_ids"] = self._pad(prompts, self.pad, left=True)
            batch["prompt_attention_mask"] = self._pad([[1] * len(p) for p in prompts], 0, left=True)
        if "task_ids" in rows[0]:
            batch["task_ids"] = torch.tensor([r["task_ids"] for r in rows], dtype=torch.long)
        if "reference" in rows[0]:
            batch["reference"] = [r["reference"] for r in rows]
        return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "task_ids")


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def with_task_ids(fn, ds, data_cfg):
    """Add each row's task id (data.task_column: an int, or a name listed in data.task_names) to `fn`'s output."""
    column = getattr(data_cfg, "task_column", None)
    if not column:
        return fn
    if column not in ds.column_names:
        raise PeftrunError(
            f"task column '{column}' is not in the data", where="data.task_column",
            hint=f"columns there are: {', '.join(ds.column_names)}",
        )
    names = {str(n): i for i, n in enumerate(data_cfg.task_names or [])}

    def task_id(value) -> int:
        text = str(value).strip()
        if text in names:
            return names[text]
        if text.lstrip("-").isdigit() and not names:
            return int(text)
        raise PeftrunError(
            f"task '{text}' is not {'one of ' + str(list(names)) if names else 'an integer id'}",
            where="data.task_column", hint="list the task names in order with data.task_names",
        )

    def add(row: dict) -> dict:
        return {**fn(row), "task_ids": task_id(row[column])}

    return add
