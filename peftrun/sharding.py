"""ZeRO-3's partitioned parameters, whole for the length of a block: the one DeepSpeed primitive that both
the adapter core (copying a head to train) and the training engines (saving, loading) need."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def gathered(params, enabled: bool = True, modifier_rank: int | None = None):
    """Whole ZeRO-3 parameters inside the block, on every rank (a collective: all ranks must enter).

    ZeRO-3 leaves each rank a slice of every weight (an empty tensor where the rank holds none);
    anything that reads weights whole, such as saving an adapter, runs inside this block. With
    `modifier_rank`, what that rank writes into them is partitioned back to every rank on leaving.
    Parameters DeepSpeed does not manage pass through untouched.
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not enabled or not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield
