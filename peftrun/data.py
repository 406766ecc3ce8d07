"""Datasets for the four task types: loading (local files or the hub), column mapping, empty-row
filters, seeded eval carving, tokenisation per task type, and collators that pad each batch to its own
longest row. What each row's text says (templates, verbalisers, chat) lives in prompts.py."""

from __future__ import annotations

import atexit
import contextlib
import csv
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftrun.chat import conversation_tokens
from peftrun.conll import CONLL_SUFFIXES, conll_dataset, is_conll
from peftrun.errors import PeftrunError
from peftrun.prompts import (
    TOKEN_FORMATS,
    chat_messages,
    source_columns,
    source_text,
    target_columns,
    target_text,
    verbalize,
)
from peftrun.tasks import CAUSAL_LM, IGNORE_INDEX, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS

SPLIT_NAMES = {"train": ("train",), "eval": ("validation", "dev", "eval", "valid", "val"), "test": ("test",)}
EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSED = (".gz",)  # csv/tsv/json/jsonl may be gzipped (e.g. HH-RLHF's test.jsonl.gz); datasets unpacks them


def file_suffix(path: Path) -> str:
    """The suffix that says how a file is read: 'x.jsonl.gz' reads as '.jsonl'."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSED and suffixes[-2] != ".parquet":
        return suffixes[-2]
    return path.suffix.lower()


@dataclass
class Splits:
    """The rows a run reads. With data.datasets (peftrun/datamix.py) each dataset keeps its own rows and data
    section in `parts`, and train/eval/test are None: read them through `pieces`."""

    train: Any
    eval: Any | None
    test: Any | None
    label_names: list[str] | None
    parts: list[Any] | None = None  # datamix.Part per dataset entry
    mix: list[dict[str, Any]] | None = None  # what each dataset gave (datamix.mix_record), for the run's record

    def pieces(self, split: str, data_cfg) -> list[tuple[Any, Any]]:
        """(rows, the data section to read them with) of `split` ("train", "eval", "test"), one per dataset."""
        if self.parts is None:
            rows = getattr(self, split)
            return [(rows, data_cfg)] if rows is not None else []
        return [(getattr(p, split), p.cfg) for p in self.parts if getattr(p, split) is not None]


# ------------------------------------------------------------------ loading

# Where the datasets library writes the Arrow files of the local files peftrun reads (never the home folder):
# a train's <output_dir>/.peftrun-cache/datasets while it runs (datasets_cache, from the loop), else a private
# temporary folder removed when the process exits (eval, predict, scripts).
_CACHE_DIRS: list[Path] = []
_TEMP_CACHE: list[Path] = []


def datasets_cache_dir() -> Path:
    if _CACHE_DIRS:
        return _CACHE_DIRS[-1]
    if not _TEMP_CACHE:
        _TEMP_CACHE.append(Path(tempfile.mkdtemp(prefix="peftrun-datasets-")))
        atexit.register(shutil.rmtree, _TEMP_CACHE[0], True)
    return _TEMP_CACHE[0]


@contextlib.contextmanager
def datasets_cache(folder: Path) -> Iterator[Path]:
    """Local data loaded inside the body caches its Arrow files under `folder`."""
    _CACHE_DIRS.append(Path(folder))
    try:
        yield Path(folder)
    finally:
        _CACHE_DIRS.pop()


def load_file(path: str | Path, where: str, data_cfg=None, *, strict: bool = True):
    """One local file as a `datasets.Dataset`, with the recipe's column mapping applied
    (strict=False: mapped columns the file lacks, such as the label of an unlabelled split, are skipped).
    A CoNLL token file (peftrun.conll) gives the recipe's tokens and tags columns; strict=False: tags optional."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(path)
    if not path.is_file():
        raise PeftrunError("data file not found", where=f"{where} ({path})")
    if data_cfg is not None and is_conll(path, data_cfg):
        return conll_dataset(path, data_cfg, labelled=True if strict else None)
    suffix = file_suffix(path)
    kind = EXTENSIONS.get(suffix)
    if kind is None:
        raise PeftrunError(
            f"cannot read '{path.suffix}' files", where=where, hint=f"use one of {', '.join(EXTENSIONS)} (csv, tsv, json and jsonl also gzipped: .gz)"
        )
    if path.stat().st_size == 0:
        raise PeftrunError(f"{path.name} is empty (0 bytes): no rows to read", where=f"{where} ({path})")
    kwargs: dict[str, Any] = {}
    if suffix == ".tsv":
        # GLUE's tsv files hold bare quote characters inside sentences
        kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)  # it logs a line of its own before raising
    try:
        ds = datasets.load_dataset(
            kind, data_files={"split": str(path)}, split="split", cache_dir=str(datasets_cache_dir()), **kwargs
        )
    except Exception as exc:  # datasets raises many types for unreadable files
        if "corresponds to no data" in str(exc):  # a header without rows, an empty JSON list
            raise PeftrunError(f"{path.name} has no rows", where=f"{where} ({path})") from None
        raise PeftrunError(f"cannot read {path.name}: {_first_line(exc)}", where=f"{where} ({path})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if len(ds) == 0:
        raise PeftrunError(f"{path.name} has no rows", where=f"{where} ({path})")
    if data_cfg is None:
        return ds
    ds = map_columns(ds, data_cfg, f"{where} ({path.name})", strict=strict)
    check_value_shapes(ds, data_cfg, f"{where} ({path})")
    return ds


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line of message (its type's name where it has none), cut to `limit` characters;
    where datasets wrapped the cause in "An error occurred while generating the dataset", the cause's."""
    seen = 0
    while "error occurred while generating" in str(exc) and (exc.__cause__ or exc.__context__) and seen < 5:
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def _scalar(feature) -> bool:
    import datasets

    return isinstance(feature, (datasets.Value, datasets.ClassLabel))


def _list_of_scalars(feature) -> bool:
    import datasets

    inner = getattr(feature, "feature", None)
    list_types = tuple(t for t in (getattr(datasets, n, None) for n in ("Sequence", "List", "LargeList")) if t)
    return (isinstance(feature, list) and len(feature) == 1 and _scalar(feature[0])) or (
        isinstance(feature, list_types) and _scalar(inner)
    )


def check_value_shapes(ds, data_cfg, where: str) -> None:
    """Columns read as one value per row (a text, a label, an answer) hold scalars, and token classification's
    words and tags are lists of scalars: a list or mapping there would be turned into its repr, or fail later.
    Columns the data lacks are left to check_columns; chat, preference and prompt rows are checked where read."""
    if data_cfg.format in ("chat", "preference", "prompts"):
        return
    features = ds.features
    wanted = source_columns(data_cfg, ds) + target_columns(data_cfg, ds)
    for column in dict.fromkeys(wanted):
        if column not in features:
            continue
        feature = features[column]
        if data_cfg.format == "tokens":
            if not _list_of_scalars(feature):
                raise PeftrunError(
                    f"column '{column}' must hold a list of words or tags in each row, not {_describe(feature)}",
                    where=where,
                )
        elif not _scalar(feature):
            raise PeftrunError(
                f"column '{column}' must hold one value per row (a text or a label), not {_describe(feature)}",
                where=where,
                hint=f"e.g. row 0 holds {_short_value(ds[0][column])}",
            )


def _describe(feature) -> str:
    import datasets

    if isinstance(feature, dict):
        return "a mapping"
    if isinstance(feature, (list, tuple)) or type(feature).__name__ in ("Sequence", "List", "LargeList"):
        return "a list"
    if isinstance(feature, (datasets.Value, datasets.ClassLabel)):
        return "single values"
    return type(feature).__name__


def _short_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def map_columns(ds, data_cfg, where: str, *, strict: bool = True):
    """`columns: {name the recipe uses: column in the data}` (LLaMA-Factory's direction)."""
    if ds is None or not data_cfg.columns:
        return ds
    mapping = {dst: src for dst, src in data_cfg.columns.items() if strict or src in ds.column_names}
    missing = [src for src in mapping.values() if src not in ds.column_names]
    if missing:
        raise PeftrunError(
            f"data.columns names column(s) {missing} that the data does not have",
            where=where,
            hint=columns_there_are(ds),
        )
    renames = {src: dst for dst, src in mapping.items() if src != dst}
    clashes = [dst for dst in renames.values() if dst in ds.column_names and dst not in renames]
    if clashes:
        ds = ds.remove_columns(clashes)
    return ds.rename_columns(renames) if renames else ds


def _find_split_file(folder: Path, split: str, data_cfg=None) -> Path | None:
    fmt = getattr(data_cfg, "format", None)
    suffixes = CONLL_SUFFIXES if fmt == "conll" else (*EXTENSIONS, *CONLL_SUFFIXES) if fmt == "tokens" else EXTENSIONS
    for stem in SPLIT_NAMES[split]:
        for ext in suffixes:
            candidate = folder / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _load_sources(data_cfg):
    train = eval_ = test = None
    if data_cfg.train_file:
        train = load_file(data_cfg.train_file, "data.train_file", data_cfg)
    if data_cfg.eval_file:
        eval_ = load_file(data_cfg.eval_file, "data.eval_file", data_cfg)
    if data_cfg.test_file:
        test = load_file(data_cfg.test_file, "data.test_file", data_cfg)
    if data_cfg.path and train is None:
        local = Path(data_cfg.path)
        if local.is_file():
            train = load_file(local, "data.path", data_cfg)
        elif local.is_dir():
            files = {s: _find_split_file(local, s, data_cfg) for s in SPLIT_NAMES}
            if files["train"] is None:
                conll = " or a CoNLL train/train.conll/train.txt" if data_cfg.format in TOKEN_FORMATS else ""
                raise PeftrunError(
                    f"no train file (train.csv/.tsv/.json/.jsonl/.parquet{conll}) in this folder",
                    where=f"data.path ({local})",
                    hint="or name the files with data.train_file / data.eval_file",
                )
            train = load_file(files["train"], "data.path", data_cfg)
            if eval_ is None and files["eval"]:
                eval_ = load_file(files["eval"], "data.path", data_cfg)
            if test is None and files["test"]:
                test = load_file(files["test"], "data.path", data_cfg)
        elif _looks_like_path(data_cfg.path):
            raise PeftrunError("data folder or file not found", where=f"data.path ({local})")
        else:
            train, hub_eval, hub_test = _load_hub(data_cfg)
            eval_ = eval_ if eval_ is not None else hub_eval
            test = test if test is not None else hub_test
    return train, eval_, test


def _looks_like_path(name: str) -> bool:
    suffix = file_suffix(Path(name))
    return name.startswith((".", "/", "~")) or suffix in EXTENSIONS or suffix == ".conll" or name.count("/") > 1


def load_splits(data_cfg, seed: int, *, carve: bool = True) -> Splits:
    """Train, eval and test splits from the recipe's data section; eval is carved from train if absent
    (carve=False: left None). data.datasets: each dataset so, then mixed (peftrun/datamix.py).

    Carving is seeded, so training and a later `peftrun eval` see the same eval rows.
    """
    if data_cfg.datasets is not None:
        from peftrun.datamix import load_mixed

        return load_mixed(data_cfg, seed)
    train, eval_, test = _load_sources(data_cfg)
    check_columns(train, data_cfg, "train")
    if eval_ is not None:
        check_columns(eval_, data_cfg, "eval")
    if data_cfg.drop_empty:
        train = drop_empty(train, data_cfg)
        eval_ = drop_empty(eval_, data_cfg) if eval_ is not None else None
    if len(train) == 0:
        raise PeftrunError("the training set is empty (after dropping empty rows)", where="data")
    if eval_ is not None and len(eval_) == 0:
        raise PeftrunError("the eval set is empty (after dropping empty rows)", where="data")
    if eval_ is None and carve:
        if len(train) < 2:
            raise PeftrunError("too few rows to carve an eval split", where="data")
        parts = train.train_test_split(test_size=data_cfg.eval_fraction, seed=seed)
        train, eval_ = parts["train"], parts["test"]
    if data_cfg.max_train_samples:
        train = train.select(range(min(len(train), data_cfg.max_train_samples)))
    if data_cfg.max_eval_samples and eval_ is not None:
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
        raise PeftrunError(
            f"no split '{data_cfg.train_split}'; there are {list(ds)}", where="data.train_split"
        )
    for key in ("eval_split", "test_split"):
        name = getattr(data_cfg, key)
        if name and name not in ds:
            raise PeftrunError(f"no split '{name}'; there are {list(ds)}", where=f"data.{key}")
    eval_name = data_cfg.eval_split or next((s for s in SPLIT_NAMES["eval"] if s in ds), None)
    test_name = data_cfg.test_split or ("test" if "test" in ds else None)
    pick = {}
    for key, split in (("train", data_cfg.train_split), ("eval", eval_name), ("test", test_name)):
        where = f"data.path ({data_cfg.path}[{split}])"
        pick[key] = map_columns(ds[split], data_cfg, where) if split else None
        if pick[key] is not None:
            check_value_shapes(pick[key], data_cfg, where)
    return pick["train"], pick["eval"], pick["test"]


# ------------------------------------------------------------------ columns


def columns_there_are(ds) -> str:
    """The hint every missing-column error ends with: the data's own column names, quoted."""
    return "columns there are: " + ", ".join(map(repr, ds.column_names))


def check_columns(ds, data_cfg, split: str, with_label: bool = True) -> None:
    """Every column the recipe reads is in the data; else one error listing the columns there are."""
    needed = source_columns(data_cfg, ds) + (target_columns(data_cfg, ds) if with_label else [])
    missing = [c for c in dict.fromkeys(needed) if c not in ds.column_names]
    if missing and data_cfg.format == "chat":
        raise PeftrunError(
            f"the {split} data has no conversations for format: chat",
            where="data",
            hint=f"{columns_there_are(ds)}; format: chat reads turns from data.messages_column (`messages`, "
            "role/content) or `conversations` (ShareGPT, from/value), alpaca rows (instruction/output), or "
            "data.template/text_column as the user turn with label_column as the answer",
        )
    if missing:
        raise PeftrunError(
            f"column(s) {missing} not in the {split} data",
            where="data",
            hint=f"{columns_there_are(ds)}; point data.text_column / "
            "data.label_column (or data.template) at them, or rename with data.columns: {name: column}",
        )


def _empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, tuple)):
        return len(value) == 0
    return str(value).strip() == ""


def drop_empty(ds, data_cfg, with_label: bool = True):
    """Rows whose input (or label) is missing or blank teach nothing; drop them."""
    cols = list(
        dict.fromkeys(source_columns(data_cfg, ds) + (target_columns(data_cfg, ds) if with_label else []))
    )
    return ds.filter(lambda row: not any(_empty(row[c]) for c in cols))


# ------------------------------------------------------------------ prompts and labels


def label_names_for(splits: Splits, data_cfg) -> list[str]:
    """Class names in a stable order: the recipe's, the verbaliser's, else the sorted values in training."""
    if data_cfg.label_names:
        return list(data_cfg.label_names)
    if data_cfg.verbalizer:
        return list(dict.fromkeys(data_cfg.verbalizer.values()))
    seen = set()
    for rows, cfg in splits.pieces("train", data_cfg):  # every dataset of data.datasets, each by its columns
        if cfg.format in TOKEN_FORMATS:
            seen |= {t for tags in rows[cfg.tags_column] for t in tags}
        else:
            seen |= set(rows[cfg.label_column])
    return [str(v) for v in sorted(seen, key=lambda v: (isinstance(v, str), v))]


# ------------------------------------------------------------------ tokenisation


@dataclass
class CausalExample:
    """One causal-LM row as tokens: `labels` holds -100 where nothing is learned; the first `prompt_len` ids
    are the prompt of the row's last answer (where generation starts in evaluation); `truncated`: the row was
    longer than data.max_length and was cut."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool


def causal_example(row: dict, data_cfg, tokenizer) -> CausalExample:
    """A row of a causal LM's data (plain, alpaca, chat, text) as one training example: its tokens, which of
    them are trained, cut to data.max_length. The one place where such a row becomes tokens (training, evaluation
    and `peftrun preview` all read it); a dataset's own format or template is whatever `data_cfg` says."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if data_cfg.format == "text":
        # language modelling on the whole text (pretraining-style): every token is a target
        ids = tokenizer(str(row[data_cfg.text_column]), add_special_tokens=True)["input_ids"]
        kept = ids[: data_cfg.max_length - len(eos)] + eos
        return CausalExample(kept, list(kept), 0, len(ids) + len(eos) > data_cfg.max_length)
    if data_cfg.format == "chat":
        messages = chat_messages(row, data_cfg, with_answer=True)
        ids, trained, prompt_len = conversation_tokens(messages, tokenizer, data_cfg)
    else:
        prompt_ids = tokenizer(source_text(row, data_cfg, tokenizer), add_special_tokens=True)["input_ids"]
        target_ids = tokenizer(target_text(row, data_cfg), add_special_tokens=False)["input_ids"] + eos
        ids, prompt_len = prompt_ids + target_ids, len(prompt_ids)
        trained = [False] * prompt_len + [True] * len(target_ids)
    if data_cfg.train_on_inputs:
        trained = [True] * len(ids)
    keep_bos = prompt_len > 0 and ids[0] == tokenizer.bos_token_id
    keep = _fit(len(ids), prompt_len, data_cfg.max_length, keep_bos)
    return CausalExample(
        input_ids=[ids[i] for i in keep],
        labels=[ids[i] if trained[i] else IGNORE_INDEX for i in keep],
        prompt_len=sum(1 for i in keep if i < prompt_len),
        truncated=len(keep) < len(ids),
    )


def _fit(length: int, answer_start: int, max_len: int, keep_bos: bool) -> list[int]:
    """Which positions of a row stay within max_len: the last answer is kept whole where it fits, what precedes
    it is cut from the left (its start is usually boilerplate or early turns; its end is what the answer
    follows), a leading BOS is kept."""
    if length <= max_len:
        return list(range(length))
    answer = list(range(answer_start, min(length, answer_start + max_len - 1 - int(keep_bos))))
    room = max_len - len(answer)
    head = [0] if keep_bos else []
    prompt = list(range(max(len(head), answer_start - room + len(head)), answer_start))
    return head + prompt + answer


def tokenize_split(
    ds,
    data_cfg,
    tokenizer,
    task_type: str,
    label_names: list[str] | None,
    *,
    for_eval: bool,
    with_labels: bool = True,
):
    """Token ids per row; padding is left to the collator. with_labels=False: inputs only (predict)."""
    import datasets

    datasets.disable_progress_bars()
    max_len = data_cfg.max_length
    index = {name: i for i, name in enumerate(label_names or [])}

    def class_index(value: Any, where: str) -> int:
        label = verbalize(value, data_cfg)
        if label not in index:
            raise PeftrunError(
                f"label '{label}' is not one of {label_names}",
                where=where,
                hint="list every class in data.label_names (or data.verbalizer)",
            )
        return index[label]

    def seq_cls(row: dict) -> dict:
        pair = str(row[data_cfg.text_pair_column]) if data_cfg.text_pair_column else None
        text = source_text(row, data_cfg, tokenizer)
        enc = tokenizer(text, pair, truncation=True, max_length=max_len)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if with_labels:
            out["labels"] = class_index(row[data_cfg.label_column], "data.label_names")
        return out

    prefix = data_cfg.token_prefix or ""

    def token_cls(row: dict) -> dict:
        words = [str(w).removeprefix(prefix) if prefix else str(w) for w in row[data_cfg.tokens_column]]
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_len)
        # the first sub-token of each word carries its tag; the rest and special tokens are ignored
        first, previous = [], None
        for word in enc.word_ids():
            first.append(word is not None and word != previous)
            previous = word
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if with_labels:
            tags = row[data_cfg.tags_column]
            if len(tags) != len(words):
                raise PeftrunError(
                    f"a row has {len(words)} tokens but {len(tags)} tags", where="data.tags_column"
                )
            out["labels"] = [
                class_index(tags[w], "data.label_names") if f else IGNORE_INDEX
                for w, f in zip(enc.word_ids(), first)
            ]
        else:
            out["word_ids"] = [w if f else -1 for w, f in zip(enc.word_ids(), first)]
        return out

    def seq2seq(row: dict) -> dict:
        enc = tokenizer(source_text(row, data_cfg, tokenizer), truncation=True, max_length=max_len)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if with_labels:
            target = target_text(row, data_cfg)
            out["labels"] = tokenizer(
                text_target=target, truncation=True, max_length=data_cfg.target_max_length
            )["input_ids"]
            if for_eval:
                out["reference"] = target
        return out

    def causal(row: dict) -> dict:
        if not with_labels:
            prompt = source_text(row, data_cfg, tokenizer)
            ids = tokenizer(prompt, add_special_tokens=data_cfg.format != "chat")["input_ids"][-max_len:]
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "prompt_ids": ids}
        example = causal_example(row, data_cfg, tokenizer)
        ids = example.input_ids
        out = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": example.labels}
        if for_eval and data_cfg.format != "text":
            out["prompt_ids"] = ids[: example.prompt_len]
            out["reference"] = target_text(row, data_cfg)
        return out

    if data_cfg.format == "text" and task_type != CAUSAL_LM:
        raise PeftrunError(
            f"data.format 'text' (language modelling on whole texts) is for {CAUSAL_LM}, not {task_type}",
            where="data.format",
        )
    if (task_type == TOKEN_CLS) != (data_cfg.format in TOKEN_FORMATS):
        raise PeftrunError(
            f"task_type {task_type} with data.format '{data_cfg.format}' does not fit",
            where="data.format",
            hint="token classification reads pre-split words and their tags: data.format: tokens (or conll) "
            f"with task_type: {TOKEN_CLS}, and only then",
        )
    fn = {SEQ_CLS: seq_cls, TOKEN_CLS: token_cls, SEQ_2_SEQ_LM: seq2seq, CAUSAL_LM: causal}[task_type]
    fn = with_task_ids(fn, ds, data_cfg)
    return ds.map(fn, remove_columns=ds.column_names, desc=None)


# ------------------------------------------------------------------ batches


def pad_rows(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    fill = [[value] * (width - len(r)) for r in rows]
    return torch.tensor([f + list(r) if left else list(r) + f for r, f in zip(rows, fill)], dtype=torch.long)


class Collator:
    """Pads each batch to its longest row: input_ids with pad id, attention 0, labels -100.
    Prompts for generation are padded on the left so every row's answer starts at the same column."""

    def __init__(self, pad_token_id: int, task_type: str):
        if pad_token_id is None:
            raise PeftrunError("the tokenizer has no pad token (and no eos or unk to stand in for it)")
        self.pad = pad_token_id
        self.task_type = task_type

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "input_ids": pad_rows([r["input_ids"] for r in rows], self.pad),
            "attention_mask": pad_rows([r["attention_mask"] for r in rows], 0),
        }
        if "labels" in rows[0]:
            labels = [r["labels"] for r in rows]
            if isinstance(labels[0], int):
                batch["labels"] = torch.tensor(labels, dtype=torch.long)
            else:
                batch["labels"] = pad_rows(labels, IGNORE_INDEX)
        if "prompt_ids" in rows[0]:
            prompts = [r["prompt_ids"] for r in rows]
            batch["prompt_ids"] = pad_rows(prompts, self.pad, left=True)
            batch["prompt_attention_mask"] = pad_rows([[1] * len(p) for p in prompts], 0, left=True)
        if "word_ids" in rows[0]:
            batch["word_ids"] = pad_rows([r["word_ids"] for r in rows], -1)
        if "task_ids" in rows[0]:
            batch["task_ids"] = torch.tensor([r["task_ids"] for r in rows], dtype=torch.long)
        if "reference" in rows[0]:
            batch["reference"] = [r["reference"] for r in rows]
        return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "task_ids", "position_ids")


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
            hint=columns_there_are(ds),
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
