"""Rows (dicts) written as csv, tsv or JSON lines, atomically: `peftrun predict` and `peftrun generate --output`."""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from peftrun.io.atomic import atomic_file

FORMATS = ("csv", "tsv", "jsonl")


def _cell(value: Any) -> Any:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def row_format(path: str | os.PathLike[str]) -> str:
    """By extension: .csv and .tsv are tables, anything else JSON lines."""
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix in ("csv", "tsv") else "jsonl"


def write_rows(
    rows: Iterable[dict[str, Any]],
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    empty_columns: Sequence[str] = (),
) -> int:
    """Write `rows` as they come into a temporary file that is renamed onto `path` once all are written.

    fmt: one of FORMATS (default: by the extension, see row_format). A table's columns are the first row's
    keys (`empty_columns` when there is no row); list cells are joined with spaces. Returns the row count.
    """
    fmt = fmt or row_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown row format {fmt!r}; one of {FORMATS}")
    count = 0
    with atomic_file(path) as fh:
        if fmt == "jsonl":
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                count += 1
        else:
            rows = iter(rows)
            first = next(rows, None)
            names = list(first) if first is not None else list(empty_columns)
            writer = csv.DictWriter(fh, fieldnames=names, delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            for row in itertools.chain([] if first is None else [first], rows):
                writer.writerow({k: _cell(v) for k, v in row.items()})
                count += 1
    return count
