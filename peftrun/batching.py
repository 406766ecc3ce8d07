"""Batch order for training: length-grouped batches, so dynamic padding pads little.

A plain shuffle puts a 60-token row beside 5-token rows, and the collator pads all of them to 60.
Grouping by length keeps the randomness of the shuffle at the scale of mega-batches: the shuffled rows
are cut into mega-batches of `mega` batches, each sorted by length, cut into batches, and the batches
are shuffled again. The order is a function of (seed, epoch) alone, so a resumed run sees the same one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from peftrun.tasks import CAUSAL_LM, IGNORE_INDEX


class LengthGroupedSampler(Sampler[int]):
    """Row indices whose consecutive runs of `batch_size` have similar lengths (full batches first, shuffled)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega: int = 50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega = mega
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.mega
        full: list[list[int]] = []
        rest: list[int] = []
        for start in range(0, len(perm), size):
            group = sorted(perm[start : start + size], key=lambda i: -self.lengths[i])
            for b in range(0, len(group), self.batch_size):
                batch = group[b : b + self.batch_size]
                (full.append(batch) if len(batch) == self.batch_size else rest.extend(batch))
        order = torch.randperm(len(full), generator=g).tolist()
        # the one short batch goes last, so the DataLoader cuts the stream where these batches end
        return [full[i] for i in order] + ([rest] if rest else [])

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch


# ------------------------------------------------------------------ packing (causal LM)


def pack_rows(rows: Sequence[dict], max_length: int) -> list[dict]:
    """Causal-LM rows packed first-fit-decreasing into rows of at most `max_length` tokens.

    Each packed row holds whole examples side by side with `position_ids` restarting at 0 for each, which
    transformers turns into a block-diagonal causal mask (attention_mask left out). An example's first label
    becomes -100: in the shifted loss it would be the target of the previous example's last token, and
    unpacked its first label is never a target either, so the loss terms are exactly the unpacked ones.
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        slot = next((b for b, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([i])
            room.append(max_length - n)
        else:
            bins[slot].append(i)
            room[slot] -= n
    packed = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in sorted(members):  # the rows' own order inside a packed row
            row_ids, row_labels = list(rows[i]["input_ids"]), list(rows[i]["labels"])
            ids += row_ids
            labels += [IGNORE_INDEX] + row_labels[1:]
            positions += list(range(len(row_ids)))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


class PackedCollator:
    """Pads packed rows to the batch's longest: pad id, label -100, positions counting on (a segment of its own)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            extra = width - len(r["input_ids"])
            out["input_ids"].append(list(r["input_ids"]) + [self.pad] * extra)
            out["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * extra)
            out["position_ids"].append(list(r["position_ids"]) + list(range(extra)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def check_packing(task_type: str, method) -> None:
    """Packing needs a causal LM whose positions come from the batch; soft prompts prepend their own tokens."""
    from peftrun.errors import PeftrunError

    if task_type != CAUSAL_LM:
        raise PeftrunError(
            f"data.packing packs causal-LM rows; this recipe's task type is {task_type}",
            where="data.packing",
            hint="set data.packing: false (data.group_by_length also cuts padding)",
        )
    if method.is_prompt_learning:
        raise PeftrunError(
            f"data.packing cannot be combined with {method.name}: its virtual tokens would break the segments",
            where="data.packing",
            hint="set data.packing: false",
        )
