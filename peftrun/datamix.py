"""Several datasets in one recipe (`data.datasets`): each read as a recipe with that one dataset would read it,
with its own format, columns and template keys, then combined.

    data:
      datasets:
        - {path: a.jsonl, format: alpaca, weight: 3}
        - {path: b.jsonl, format: chat, weight: 1}
      mix: weights        # or concat (every row of every dataset); default: weights when an entry has one
      mix_size: 1000      # training rows drawn when mixing by weights (default: all the datasets' rows)
      held_out: per_dataset   # or global

Each entry is read with data's keys under its own (recipe.entry_data): loading, empty rows, max_train_samples
and its held-out rows as for a single dataset. `concat` keeps every training row. `weights` gives dataset i
round(mix_size * w_i / sum w) rows by the largest remainder (the counts add up to mix_size and depend on the
weights alone); which rows is seeded by (training.seed, i): whole seeded permutations of the dataset while the
count exceeds its size (rows then repeat evenly), then the first rows of one more. Held-out rows are never
drawn for training: per_dataset, each dataset's eval file/split or eval_fraction of its rows; global,
data.eval_file or eval_fraction of all the datasets' training rows together (seeded), before mixing.

Rows stay with their dataset (Splits.parts) until they are turned into examples: each dataset's rows with its
own data section (Splits.pieces, tokenize_pieces), and the examples of all of them joined.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftrun.errors import PeftrunError


@dataclass
class Part:
    """One dataset of data.datasets: what it is called in messages, its data section and its rows."""

    label: str  # "data.datasets[1] (b.jsonl)"
    cfg: Any  # the DataSection it is read with
    weight: float | None
    available: int  # training rows it had before mixing
    train: Any
    eval: Any | None
    test: Any | None


def entry_label(data_cfg, index: int) -> str:
    entry = data_cfg.datasets[index]
    source = entry.path or entry.train_file
    return f"data.datasets[{index}] ({source})"


@contextlib.contextmanager
def naming_entry(index: int) -> Iterator[None]:
    """A PeftrunError raised while reading entry `index` names it: "data.path (x)" -> "data.datasets[1].path (x)"."""
    try:
        yield
    except PeftrunError as exc:
        prefix = f"data.datasets[{index}]"
        where = exc.where or prefix
        if where == "data" or where.startswith(("data.", "data ")):
            where = prefix + where[len("data"):]
        elif not where.startswith(prefix):
            where = f"{prefix}: {where}"
        raise PeftrunError(exc.message, where=where, hint=exc.hint) from None


def load_mixed(data_cfg, seed: int):
    """Splits of data.datasets: every dataset read with its own data section, its held-out rows apart, its
    training rows mixed (module docstring)."""
    from peftrun.data import Splits, load_splits
    from peftrun.recipe import entry_data, held_out, mix_mode

    scope = held_out(data_cfg)
    parts = []
    for i, entry in enumerate(data_cfg.datasets):
        cfg = entry_data(data_cfg, i)
        with naming_entry(i):
            splits = load_splits(cfg, seed, carve=scope == "per_dataset")
        parts.append(Part(entry_label(data_cfg, i), cfg, entry.weight, len(splits.train), splits.train,
                          splits.eval, splits.test))
    if scope == "global":
        global_held_out(parts, data_cfg, seed)
    mode = mix_mode(data_cfg)
    counts = mix_counts(parts, mode, data_cfg.mix_size)
    for i, (part, count) in enumerate(zip(parts, counts)):
        if mode == "weights" and part.train is not None:
            part.train = part.train.select(draw_rows(part.available, count, seed, i))
    mix = [mix_record(part, count) for part, count in zip(parts, counts)]
    return Splits(None, None, None, data_cfg.label_names, parts=parts, mix=mix)


def global_held_out(parts: list[Part], data_cfg, seed: int) -> None:
    """One eval set for all the datasets: data.eval_file (read with data's own keys), else eval_fraction of all
    their training rows together, chosen by a seeded permutation and taken out of each dataset's rows."""
    from peftrun.data import check_columns, drop_empty, load_file

    for part in parts:
        part.eval = None
    if data_cfg.eval_file:
        own = data_cfg.model_copy(update={"datasets": None, "path": None, "train_file": data_cfg.eval_file})
        rows = load_file(data_cfg.eval_file, "data.eval_file", own)
        check_columns(rows, own, "eval")
        rows = drop_empty(rows, own) if own.drop_empty else rows
        if len(rows) == 0:
            raise PeftrunError("the eval set is empty (after dropping empty rows)", where="data.eval_file")
        if data_cfg.max_eval_samples:
            rows = rows.select(range(min(len(rows), data_cfg.max_eval_samples)))
        parts.append(Part("data.eval_file", own, None, 0, None, rows, None))
        return
    total = sum(p.available for p in parts)
    n_eval = int(np.ceil(total * data_cfg.eval_fraction))
    if total < 2 or n_eval >= total:
        raise PeftrunError("too few rows to carve an eval split", where="data")
    chosen = np.random.default_rng(seed).permutation(total)[:n_eval]
    if data_cfg.max_eval_samples:
        chosen = chosen[: data_cfg.max_eval_samples]
    held = np.zeros(total, dtype=bool)
    held[chosen] = True
    start = 0
    for part in parts:
        mine = held[start : start + part.available]
        start += part.available
        if mine.any():
            part.eval = part.train.select(np.flatnonzero(mine).tolist())
        part.train = part.train.select(np.flatnonzero(~mine).tolist())
        part.available = len(part.train)
        if part.available == 0:
            raise PeftrunError(
                "every training row of this dataset went to the global eval set", where=part.label,
                hint="lower data.eval_fraction, or set data.held_out: per_dataset",
            )


def mix_counts(parts: list[Part], mode: str, size: int | None) -> list[int]:
    """Training rows per dataset: all of them (concat), or `size` (default: all the rows) shared by weight,
    by the largest remainder with ties to the earlier dataset, so that the counts add up to `size` exactly."""
    if mode == "concat":
        return [p.available if p.train is not None else 0 for p in parts]
    total = size or sum(p.available for p in parts)
    weights = np.array([p.weight or 0.0 for p in parts], dtype=np.float64)
    shares = total * weights / weights.sum()
    counts = np.floor(shares).astype(np.int64)
    order = sorted(range(len(parts)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def draw_rows(available: int, count: int, seed: int, index: int) -> list[int]:
    """`count` row indices of a dataset of `available` rows, seeded by (seed, index): whole permutations while
    the count exceeds the rows (each row then appears count // available or one more times), then the start
    of one more permutation."""
    rng = np.random.default_rng([seed, index])
    rows: list[int] = []
    while available and len(rows) < count:
        rows.extend(rng.permutation(available)[: count - len(rows)].tolist())
    return rows


def mix_record(part: Part, count: int) -> dict[str, Any]:
    """What one dataset gave the run: printed at its start and written to metrics.jsonl."""
    return {
        "dataset": part.label,
        "format": part.cfg.format,
        "weight": part.weight,
        "available": part.available,
        "train": count,
        "eval": len(part.eval) if part.eval is not None else 0,
    }


def mix_lines(splits, data_cfg, seed: int) -> list[str]:
    """The lines printed at the start of a run with data.datasets: how they are mixed and what each gave."""
    if getattr(splits, "mix", None) is None:  # one dataset (or a diffusion pipeline's images)
        return []
    from peftrun.recipe import held_out, mix_mode

    mode = mix_mode(data_cfg)
    train = sum(r["train"] for r in splits.mix)
    how = f"mixed by weights (seed {seed})" if mode == "weights" else "concatenated"
    lines = [f"data: {len(data_cfg.datasets)} datasets {how}: {train} training rows; held-out rows "
             f"{held_out(data_cfg).replace('_', ' ')}"]
    for record in splits.mix:
        weight = f" weight {record['weight']:g}" if record["weight"] is not None else ""
        share = f" ({record['train'] / train:.1%})" if train else ""
        lines.append(
            f"  {record['dataset']} [{record['format']}]{weight}: {record['train']} of {record['available']} "
            f"training rows{share}, {record['eval']} eval"
        )
    return lines


def tokenize_pieces(splits, split: str, data_cfg, tokenizer, task_type: str, label_names, *, for_eval: bool):
    """The examples of `split`: each dataset's rows turned into examples with its own data section
    (data.tokenize_split), then joined in dataset order (the train loader shuffles them)."""
    from peftrun.data import tokenize_split

    if splits.parts is None:
        return tokenize_split(getattr(splits, split), data_cfg, tokenizer, task_type, label_names, for_eval=for_eval)
    done, labels = [], []
    for index, part in enumerate(splits.parts):
        rows = getattr(part, split)
        if rows is None:
            continue
        with naming_entry(index) if index < len(data_cfg.datasets) else contextlib.nullcontext():
            done.append(tokenize_split(rows, part.cfg, tokenizer, task_type, label_names, for_eval=for_eval))
        labels.append(part.label)
    return join_examples(done, labels, split)


def join_examples(done: list, labels: list[str], split: str):
    """One datasets.Dataset of the examples of every dataset; an error naming two datasets whose examples
    cannot be joined (different fields, as a format without prompts beside one with)."""
    if len(done) == 1:
        return done[0]
    import datasets

    first = done[0]
    for n, other in enumerate(done[1:], 1):
        if set(other.column_names) != set(first.column_names):
            raise PeftrunError(
                f"the {split} examples of {labels[n]} have fields {sorted(other.column_names)}, those of "
                f"{labels[0]} {sorted(first.column_names)}: they cannot be batched together",
                where=labels[n],
                hint="give the datasets formats that make the same kind of example (e.g. not text beside alpaca)",
            )
    try:
        return datasets.concatenate_datasets([d.cast(first.features) for d in done])
    except Exception as exc:
        raise PeftrunError(f"the {split} examples of the datasets cannot be joined: {exc}", where="data.datasets") from None
