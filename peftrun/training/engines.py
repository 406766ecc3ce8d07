"""How a training process holds the model: one engine per strategy, behind one small interface.

    Engine        plain or DDP: every rank holds every tensor whole
    ZeRO3         DeepSpeed ZeRO-3: each rank a slice of every weight; DeepSpeed's engine saves its optimizer
    FSDP1, FSDP2  torch FSDP: flat-parameter shards (version 1) or DTensors (version 2)

What the loop and the checkpoints need from an engine: the adapter's or the trainable parameters' tensors
whole on every rank (`whole`), whole tensors written back and sharded again (`load_whole`), the optimizer
state saved and loaded, and a line describing the sharding. Adding a strategy = one subclass and one line
in `engine_for`.

`make_accelerator` builds the Accelerator a process trains with; on a machine without CUDA it gives FSDP to
CPU ranks, which Accelerate itself only does for GPU ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from peftrun.errors import PeftrunError
from peftrun.methods.layers import gathered
from peftrun.training.launch import launched, wants_launcher

OPTIMIZER_FILE = "optimizer.pt"
ENGINE_DIR = "engine"  # DeepSpeed's own (sharded) optimizer state

TensorsOf = Callable[[], dict[str, torch.Tensor]]


def _trainable(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


class Engine:
    """Plain (one process) or DDP: every rank holds every tensor whole."""

    name = "plain"

    def __init__(self, accelerator):
        self.accelerator = accelerator

    # -- tensors whole -------------------------------------------------------------------------
    @contextlib.contextmanager
    def whole(self, model, tensors_of: TensorsOf) -> Iterator[dict[str, torch.Tensor]]:
        """The tensors `tensors_of()` names, whole, on every rank (a collective: all ranks must enter).
        `model`: the prepared model."""
        yield {k: v.detach() for k, v in tensors_of().items()}

    @contextlib.contextmanager
    def writable(self, model, tensors_of: TensorsOf) -> Iterator[dict[str, torch.Tensor]]:
        """The tensors `tensors_of()` names, to write whole tensors into; sharded again on leaving."""
        yield tensors_of()

    def placed(self, own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole `tensors` in the form `writable` hands out (`own`): sharded where the engine shards them."""
        return tensors

    def unsharded(self, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`writable`'s tensors as whole tensors, to compare shapes with."""
        return own

    # -- what the loop reads and writes whole ----------------------------------------------------
    def whole_adapter(self, model, peft_model, name: str):
        """Adapter `name`'s tensors whole, on every rank, as a context manager."""
        return self.whole(model, lambda: peft_model.adapter_state_dict(name))

    def load_whole_adapter(self, model, peft_model, name: str, state: dict) -> None:
        """Copy whole tensors `state` (as saved) into adapter `name`, sharding them again where training does."""
        with self.writable(model, lambda: peft_model.adapter_state_dict(name)) as own:
            peft_model.load_adapter_state_dict(self.placed(own, state), name)

    def whole_trainable(self, model, peft_model) -> dict[str, torch.Tensor]:
        """Every trainable parameter by name, whole, as CPU copies (a collective: all ranks call it)."""
        with self.whole(model, lambda: _trainable(peft_model)) as whole:
            return {n: t.detach().cpu().clone() for n, t in whole.items()}

    @torch.no_grad()
    def load_whole_trainable(self, model, peft_model, tensors: dict[str, torch.Tensor], check) -> None:
        """Copy whole tensors (as `whole_trainable` gave them) into the trainable parameters.
        `check(params)` sees the parameters first, whole, and raises on a mismatch."""
        with self.writable(model, lambda: _trainable(peft_model)) as own:
            check(self.unsharded(own))
            tensors = self.placed(own, tensors)
            for n, p in own.items():
                p.copy_(tensors[n])

    # -- optimizer -----------------------------------------------------------------------------
    def save_optimizer(self, model, optimizer, folder: Path) -> dict | None:
        """Write this rank's share of the optimizer state into `folder` (every rank calls it); returns the
        whole state for the main process to write as OPTIMIZER_FILE, or None where the ranks wrote it."""
        return optimizer.state_dict()

    def load_optimizer(self, model, optimizer, folder: Path, read: Callable[[Path], dict]) -> None:
        optimizer.load_state_dict(read(folder / OPTIMIZER_FILE))

    # -- the rest ------------------------------------------------------------------------------
    def describe(self, model) -> str | None:
        """A line saying how the model is sharded (a collective where it is)."""
        return None

    def prepare_generation(self, model) -> None:
        """Let `generate` run on the prepared model (FSDP gathers the root's weights for it)."""

    @property
    def reads_head_whole(self) -> bool:
        """Whether the output head can be read whole inside the forward (the chunked loss needs it)."""
        return True


class ZeRO3(Engine):
    """DeepSpeed ZeRO-3: partitioned parameters are gathered in place; DeepSpeed saves its optimizer shards."""

    name = "zero3"

    @contextlib.contextmanager
    def whole(self, model, tensors_of):
        tensors = tensors_of()
        with gathered(tensors.values()):
            yield tensors

    @contextlib.contextmanager
    def writable(self, model, tensors_of):
        own = tensors_of()
        with gathered(own.values(), modifier_rank=0):  # rank 0's writes partitioned to every rank on leaving
            yield own

    def save_optimizer(self, model, optimizer, folder):
        model.save_checkpoint(str(folder / ENGINE_DIR), tag="state", exclude_frozen_parameters=True)
        return None

    def load_optimizer(self, model, optimizer, folder, read):
        model.load_checkpoint(
            str(folder / ENGINE_DIR), tag="state", load_module_strict=False, load_lr_scheduler_states=False
        )


class DeepSpeed(ZeRO3):
    """DeepSpeed stages 1-2: whole parameters, DeepSpeed's own optimizer checkpoint."""

    name = "deepspeed"

    whole = Engine.whole
    writable = Engine.writable


class FSDP1(Engine):
    """FSDP version 1: flat parameters summoned whole; each rank saves its own optimizer shard."""

    name = "fsdp1"

    @contextlib.contextmanager
    def whole(self, model, tensors_of):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=True):
            yield {k: v.detach() for k, v in tensors_of().items()}

    @contextlib.contextmanager
    def writable(self, model, tensors_of):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=True, recurse=True):
            yield tensors_of()

    def _rank_file(self, folder: Path) -> Path:
        return folder / f"optimizer-rank{self.accelerator.process_index}.pt"

    def save_optimizer(self, model, optimizer, folder):
        torch.save(optimizer.state_dict(), self._rank_file(folder))
        return None

    def load_optimizer(self, model, optimizer, folder, read):
        optimizer.load_state_dict(read(self._rank_file(folder)))

    def describe(self, model):
        return _shard_line(self.accelerator, model, 1)

    def prepare_generation(self, model):
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel

        inner = model.module
        plain = inner.generate

        @functools.wraps(plain)
        def generate(*args, **kwargs):  # generate calls the model's parts: gather the root's own weights
            with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=False):
                return plain(*args, **kwargs)

        inner.generate = generate

    @property
    def reads_head_whole(self) -> bool:
        return False


class FSDP2(Engine):
    """FSDP version 2 (`fully_shard`): DTensors, all-gathered into full tensors; the optimizer state saved
    whole by the main process and sent back to every rank's shards."""

    name = "fsdp2"

    @contextlib.contextmanager
    def whole(self, model, tensors_of):
        from torch.distributed.tensor import DTensor

        tensors = tensors_of()
        yield {k: v.detach().full_tensor() if isinstance(v, DTensor) else v.detach() for k, v in tensors.items()}

    def placed(self, own, tensors):
        from torch.distributed.tensor import DTensor, distribute_tensor

        tensors = dict(tensors)
        for key, tensor in own.items():
            if isinstance(tensor, DTensor) and key in tensors and tensors[key].shape == tensor.shape:
                tensors[key] = distribute_tensor(
                    tensors[key].to(dtype=tensor.dtype, device=tensor.device), tensor.device_mesh, tensor.placements
                )
        return tensors

    def unsharded(self, own):
        from torch.distributed.tensor import DTensor

        return {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in own.items()}

    def save_optimizer(self, model, optimizer, folder):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)

    def load_optimizer(self, model, optimizer, folder, read):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = read(folder / OPTIMIZER_FILE) if self.accelerator.is_main_process else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(
            model, getattr(optimizer, "optimizer", optimizer), optim_state_dict=state, options=options
        )

    def describe(self, model):
        return _shard_line(self.accelerator, model, 2)

    def prepare_generation(self, model):
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")  # FSDP's forward hooks around generate too

    @property
    def reads_head_whole(self) -> bool:
        return False


def engine_for(accelerator) -> Engine:
    """The engine of a prepared accelerator's strategy."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return FSDP2(accelerator) if accelerator.is_fsdp2 else FSDP1(accelerator)
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return ZeRO3(accelerator) if plugin.zero_stage == 3 else DeepSpeed(accelerator)
    return Engine(accelerator)


def _shard_line(accelerator, model, version: int) -> str:
    """How many of the model's parameters this process holds (a collective: all ranks call it)."""
    from torch.distributed.tensor import DTensor

    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    total = torch.tensor([held], dtype=torch.int64, device=accelerator.device)  # NCCL sums device tensors
    torch.distributed.all_reduce(total)
    return (
        f"FSDP{version}: {accelerator.num_processes} ranks share {int(total):,d} parameters; "
        f"rank {accelerator.process_index} holds {held:,d}"
    )


def rank_spread(accelerator, tensors) -> float:
    """Largest difference between the ranks' copies of `tensors`: 0.0 when every rank holds the same."""
    if accelerator.num_processes == 1:
        return 0.0
    flat = torch.cat([t.detach().float().reshape(-1).cpu() for t in tensors])
    every = accelerator.gather(flat.to(accelerator.device)[None]).cpu()
    return float((every - every[0]).abs().max()) if every.numel() else 0.0


# ------------------------------------------------------------------ the Accelerator of a training process


def end_process_group() -> None:
    """Leave the launched run's process group once its work is done (every rank calls it after the last barrier).

    A process that exits with the group still up leaves its communication threads (gloo's, DeepSpeed's
    shared-memory ones) to the interpreter's teardown, where a rank can abort ("terminate called without an
    active exception") after a run that succeeded, and the launcher then reports the whole run failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def make_accelerator(recipe):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    if wants_launcher(recipe) and not launched():
        raise PeftrunError(
            "this recipe trains on several processes or on DeepSpeed/FSDP, which a launcher starts",
            where="distributed",
            hint="run `peftrun launch RECIPE` (or accelerate launch --config_file FILE -m peftrun train RECIPE)",
        )
    backend = recipe.distributed.backend
    if backend == "auto" and not torch.cuda.is_available() and launched():
        backend = "gloo"  # CPU ranks talk over gloo; Accelerate would otherwise ask for a backend CPUs lack
    handlers = [_process_group(InitProcessGroupKwargs, backend, recipe.distributed.timeout_seconds)]
    # an explicit training.mixed_precision wins; otherwise accelerate launch's config (or "no") decides
    precision = recipe.training.mixed_precision if "mixed_precision" in recipe.training.model_fields_set else None
    _fsdp1_cpu_env()
    accelerator = Accelerator(
        # FSDP without any accelerator: CPU ranks (ACCELERATE_USE_CPU=1 does the same; a bare launch lacks it)
        cpu=_fsdp_requested() and launched() and not _has_accelerator(),
        gradient_accumulation_steps=recipe.training.gradient_accumulation_steps,
        mixed_precision=precision,
        kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    _fsdp_on_cpu(accelerator)
    _check_deepspeed_accumulation(accelerator, recipe)
    return accelerator


def _process_group(kind, backend: str, seconds: int):
    """Accelerate's process-group options: the backend (unless "auto") and the collectives' timeout.

    The timeout bounds how long a rank waits in a collective for a rank that died or hangs (torch's own
    default: 30 minutes on gloo); the failing collective ends that rank, and the launcher then ends the rest.
    Accelerate passes on only values that differ from its class defaults (600 s, "nccl"): a 600 s timeout
    would be dropped and gloo's 30 minutes used, so the timeout is always passed.
    """
    from datetime import timedelta

    handler = kind(timeout=timedelta(seconds=seconds), **({} if backend == "auto" else {"backend": backend}))
    chosen = {**handler.to_kwargs(), "timeout": handler.timeout}
    handler.to_kwargs = lambda: dict(chosen)
    return handler


def _fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    device = getattr(torch, "accelerator", None)  # XPU, MPS, ... (torch >= 2.6)
    return bool(device is not None and device.is_available())


def _fsdp1_cpu_env() -> None:
    """FSDP version 1 on CPU ranks: every rank loads the whole base model itself.

    torch's FSDP1 broadcasts rank 0's weights (sync_module_states) only from GPU tensors, and Accelerate's
    plugin refuses sync_module_states without a GPU; cpu_ram_efficient_loading needs that broadcast (the other
    ranks load empty weights). Both are switched off in the launcher's environment, which Accelerate and
    transformers read, before they read it.
    """
    if _has_accelerator() or not _fsdp_requested():
        return
    if os.environ.get("FSDP_VERSION", "1") == "1":
        os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def _fsdp_on_cpu(accelerator) -> None:
    """FSDP asked for by the launcher on a machine without CUDA: give it to Accelerate's CPU ranks.

    Accelerate turns its FSDP switch into FSDP only for GPU-like process groups; on CPU ranks (MULTI_CPU) it
    silently trains plain data parallel instead. torch's FSDP (fully_shard, DTensor over gloo) runs on CPU,
    so the state is moved to FSDP with the plugin accelerate builds from the launcher's environment.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not _fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # every later AcceleratorState() copies the process state's type over its own: change both
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if plugin.fsdp_version == 1:  # FSDP1 compares its device_id (Accelerate's "cpu:0") with torch's "cpu"
        state.device = PartialState._shared_state["device"] = torch.device("cpu")


def _check_deepspeed_accumulation(accelerator, recipe) -> None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    value = plugin.deepspeed_config.get("gradient_accumulation_steps")
    if isinstance(value, int) and value != recipe.training.gradient_accumulation_steps:
        raise PeftrunError(
            f"the DeepSpeed config accumulates {value} step(s), the recipe {recipe.training.gradient_accumulation_steps}",
            where="training.gradient_accumulation_steps",
            hint=f"set training.gradient_accumulation_steps={value} or change the DeepSpeed config to match",
        )


