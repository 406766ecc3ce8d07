"""What every weight-wrapping method shares: a frozen base layer holding named adapters.

A method subclasses `AdapterLayer`, registers its per-adapter tensors in ModuleDict/ParameterDict
attributes listed in `adapter_attrs`, and writes `add_adapter`, `adapter_output` and (where the maths
allows) `delta_weight`. Merge, unmerge, switching, deleting and state I/O live here, once.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftrun.errors import PeftrunError


def base_weight_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear, a GPT-2 Conv1D, a Conv2d (channels) or an Embedding (num, dim)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise PeftrunError(f"cannot adapt a grouped Conv2d (groups={layer.groups}): only groups=1 is supported")
        return layer.out_channels, layer.in_channels
    if isinstance(layer, Conv1D):
        in_features, out_features = layer.weight.shape
        return out_features, in_features
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    raise PeftrunError(f"cannot adapt a {type(layer).__name__}: only Linear and Conv1D layers are supported")


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of new adapter tensors beside `weight`: fp32 unless the base is wider (adapters train in fp32)."""
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor], enabled: bool = True, modifier_rank: int | None = None):
    """Whole ZeRO-3 parameters inside the block, on every rank (a collective: all ranks must enter).

    ZeRO-3 leaves each rank a slice of every weight; anything that reads weights whole (copying a head,
    embedding a prompt's tokens) runs inside this block. With `modifier_rank`, what that rank writes into
    them is partitioned back to every rank on leaving.
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not enabled or not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def rows_for_batch(rows: list[str | None], batch_size: int) -> list[str | None]:
    """The adapter of each row. generate() repeats each input k times in place (beams), so a batch k times
    longer than the names given repeats each name k times, the same way."""
    if not rows or batch_size == len(rows):
        return rows
    if batch_size % len(rows):
        raise PeftrunError(f"a batch of {batch_size} rows was given adapter names for {len(rows)} rows")
    k = batch_size // len(rows)
    return [name for name in rows for _ in range(k)]


def row_groups(
    rows: list[str | None], batch_size: int, names: Iterable[str], device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """(adapter, indices of its rows) for each adapter of `names` that rows of the batch ask for."""
    rows = rows_for_batch(rows, batch_size)
    own = set(names)
    for name in dict.fromkeys(rows):
        if name is not None and name in own:
            yield name, torch.tensor([i for i, r in enumerate(rows) if r == name], device=device)


class AdapterLayer(nn.Module):
    """A frozen `base_layer` plus adapters keyed by name; subclasses add the maths."""

    adapter_attrs: tuple[str, ...] = ()
    # Whether the method can wrap an nn.Conv2d (LoRA, LoHa, LoKr); inject() refuses Conv2d targets otherwise.
    supports_conv2d: bool = False

    def __init__(self, base_layer: nn.Module, shape: tuple[int, int] | None = None):
        """shape: (out, in) where the base is no single Linear/Conv1D (an attention block); else its weight's."""
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = shape or base_weight_shape(base_layer)
        # GPT-2's Conv1D stores its weight as (in, out): a "fan_in_fan_out" layer.
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        # A Conv2d's weight is (out, in, kh, kw); the methods that adapt one (supports_conv2d) say how.
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Set by PeftrunModel for mixed-adapter batches: the adapter (or None) of each row.
        self.row_adapters: list[str | None] | None = None

    # -- the method's part -------------------------------------------------------------------
    def add_adapter(self, name: str, config) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """The adapted output given the input and the base output so far (additive by default)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def delta_weight(self, name: str) -> torch.Tensor:
        """The (out, in) weight update of adapter `name` (a Conv2d's: the weight's own shape, (out, in, kh, kw));
        methods that cannot merge keep this error."""
        raise PeftrunError(f"{type(self).__name__} cannot be merged into the base weights")

    # -- shared plumbing ---------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def adapter_tensor_kwargs(self) -> dict:
        """Device (see adapter_device) and dtype for new adapter tensors: fp32 unless the base is wider."""
        return {"device": self.adapter_device(), "dtype": adapter_dtype(self.base_layer.weight)}

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), whatever the layer stores."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def adapter_device(self) -> torch.device:
        """Where new adapter tensors go: beside the base weight, or, when Accelerate's big-model inference
        has offloaded that weight (left on meta), on the device its hook computes on."""
        weight = self.base_layer.weight
        execution = getattr(getattr(self.base_layer, "_hf_hook", None), "execution_device", None)
        if weight.is_meta and execution is not None:
            return torch.device(execution)
        return weight.device

    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_attrs:
            for key in getattr(self, attr).keys():
                if key not in names:
                    names.append(key)
        return names

    def set_active(self, names: Iterable[str]) -> None:
        own = set(self.adapter_names())
        self.active_adapters = [n for n in names if n in own]

    def merged_tensors(self) -> list[torch.Tensor]:
        """The base tensors merging writes (the weight; (IA)³ scales the bias too)."""
        return [self.base_layer.weight]

    def fold(self, name: str, *, undo: bool = False) -> None:
        """Fold adapter `name` into the base tensors (W <- W + ΔW), or with `undo` take it out again where
        no original was kept (exact up to rounding)."""
        weight = self.base_layer.weight
        delta = self.delta_weight(name).to(weight.dtype)
        delta = delta.T if self.fan_in_fan_out else delta
        weight.sub_(delta) if undo else weight.add_(delta)

    def merge(self, names: Iterable[str] | None = None, *, keep_original: bool = True) -> None:
        """Fold adapters into the base weight. With keep_original, unmerge restores it bit for bit."""
        todo = [n for n in (list(names) if names is not None else self.active_adapters) if n not in self.merged_adapters]
        if not todo:
            return
        if keep_original and not self.merged_adapters:
            self._originals = [t.detach().clone() for t in self.merged_tensors()]
        with torch.no_grad():
            for name in todo:
                self.fold(name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        originals = getattr(self, "_originals", None)
        with torch.no_grad():
            if originals is not None:
                for tensor, original in zip(self.merged_tensors(), originals):
                    tensor.copy_(original)
                self.merged_adapters.clear()
                del self._originals
                return
            while self.merged_adapters:
                self.fold(self.merged_adapters.pop(), undo=True)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise PeftrunError(f"adapter '{name}' is merged; unmerge before deleting it")
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors keyed by their peft suffix (`lora_A.weight`, `ia3_l`, ...)."""
        state: dict[str, torch.Tensor] = {}
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name not in container:
                continue
            item = container[name]
            if isinstance(item, nn.Parameter):
                state[attr] = item
            else:
                for key, value in item.state_dict(keep_vars=True).items():
                    state[f"{attr}.{key}"] = value
        return state

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged_adapters:
            return result
        if self.row_adapters is not None:
            return self._mixed_batch_forward(x, result)
        for name in self.active_adapters:
            result = self.adapter_output(x, result, name)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each row of the batch goes through its own adapter (None: the base alone)."""
        out = result.clone()
        for name, idx in row_groups(self.row_adapters or [], x.shape[0], self.adapter_names(), x.device):
            out[idx] = self.adapter_output(x[idx], result[idx], name)
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active_adapters}"


class ModulesToSave(nn.Module):
    """A module trained whole (e.g. a new classifier head): a frozen original and a trainable copy per adapter.

    peft saves the copy under the original module's own path, so `adapter_state` gives plain names.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: list[str | None] | None = None
        for p in original.parameters():
            p.requires_grad_(False)

    def add_adapter(self, name: str, config=None) -> None:
        with gathered(list(self.original_module.parameters())):  # ZeRO-3 leaves slices; a copy needs them whole
            copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.modules_to_save]

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[name].state_dict(keep_vars=True))

    def forward(self, *args, **kwargs):
        if self.disabled or not self.active_adapters:
            return self.original_module(*args, **kwargs)
        if self.row_adapters is not None:
            outs = []
            batch = next(a for a in args if torch.is_tensor(a)).shape[0]
            for i, name in enumerate(rows_for_batch(self.row_adapters, batch)):
                module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
                row_args = [a[i : i + 1] if torch.is_tensor(a) else a for a in args]
                outs.append(module(*row_args, **kwargs))
            return torch.cat(outs, dim=0)
        return self.modules_to_save[self.active_adapters[-1]](*args, **kwargs)
