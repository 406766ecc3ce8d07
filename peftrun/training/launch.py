"""Several processes, one recipe: the accelerate config a recipe describes, the launch wrapper, the Accelerator.

`peftrun launch RECIPE` writes the accelerate config of the recipe's `distributed` section (or takes the
file named by `distributed.accelerate_config`) and runs `accelerate launch ... -m peftrun train RECIPE`.
`accelerate launch --config_file FILE -m peftrun train RECIPE` works as well: inside a launched process the
environment accelerate sets decides (DeepSpeed, FSDP, processes, precision), not the recipe.

On a machine without CUDA the same commands run on CPU: ranks talk over gloo, DeepSpeed uses its CPU
accelerator (DS_ACCELERATOR=cpu), and accelerate's CPU switch is set so that `--multi_gpu` starts the
processes instead of silently starting one. FSDP, which Accelerate gives only to GPU ranks, is given to the
CPU ranks here (torch's FSDP runs over gloo).

Sharded engines (ZeRO-3, FSDP) leave each rank a slice of every weight: `whole_adapter` gathers the
adapter's tensors on every rank before the main process writes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from peftrun.errors import PeftrunError

LAUNCHER_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "LOCAL_RANK", "WORLD_SIZE")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """True inside a process started by accelerate launch, torchrun or deepspeed."""
    return any(os.environ.get(k) for k in LAUNCHER_ENV) and (
        world_size_from_env() > 1
        or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
        or os.environ.get("ACCELERATE_USE_FSDP") == "true"
    )


def wants_launcher(recipe) -> bool:
    d = recipe.distributed
    return d.accelerate_config is not None or d.num_processes > 1 or d.num_machines > 1 or d.strategy != "ddp"


# ------------------------------------------------------------------ accelerate config from a recipe


def _deepspeed_block(recipe, folder: Path | None = None) -> dict[str, Any]:
    ds = recipe.distributed.deepspeed
    gas = recipe.training.gradient_accumulation_steps
    if (
        ds.json_config
    ):  # DeepSpeed's own keys inline: a JSON beside the accelerate config; "auto" = the recipe's
        config = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            **ds.json_config,
        }
        if ds.gradient_clipping is not None:
            config["gradient_clipping"] = ds.gradient_clipping
        path = (folder or Path(tempfile.mkdtemp(prefix="peftrun-launch-"))) / "deepspeed_config.json"
        path.write_text(json.dumps(config, indent=2) + "\n")
        return {"deepspeed_config_file": str(path), "zero3_init_flag": ds.zero3_init_flag}
    if ds.config_file:
        return {
            "deepspeed_config_file": str(Path(ds.config_file).resolve()),
            "zero3_init_flag": ds.zero3_init_flag,
        }
    clip = ds.gradient_clipping if ds.gradient_clipping is not None else recipe.training.max_grad_norm
    block: dict[str, Any] = {
        "gradient_accumulation_steps": gas,
        "offload_optimizer_device": ds.offload_optimizer_device,
        "offload_param_device": ds.offload_param_device,
        "zero3_init_flag": ds.zero3_init_flag and ds.zero_stage == 3,
        "zero3_save_16bit_model": ds.zero3_save_16bit_model,
        "zero_stage": ds.zero_stage,
    }
    if clip:
        block["gradient_clipping"] = float(clip)
    if ds.offload_optimizer_nvme_path:
        block["offload_optimizer_nvme_path"] = ds.offload_optimizer_nvme_path
    if ds.offload_param_nvme_path:
        block["offload_param_nvme_path"] = ds.offload_param_nvme_path
    return block


def _fsdp_block(recipe) -> dict[str, Any]:
    f = recipe.distributed.fsdp
    block: dict[str, Any] = {
        "fsdp_version": f.version,
        "fsdp_auto_wrap_policy": f.auto_wrap_policy,
        "fsdp_offload_params": f.offload_params,
        "fsdp_state_dict_type": f.state_dict_type,
        "fsdp_cpu_ram_efficient_loading": f.cpu_ram_efficient_loading,
        "fsdp_activation_checkpointing": f.activation_checkpointing,
    }
    if f.version == 1:
        block["fsdp_sharding_strategy"] = f.sharding_strategy
        block["fsdp_backward_prefetch"] = "BACKWARD_PRE"
        block["fsdp_use_orig_params"] = True  # frozen and trainable weights share flat parameters
        block["fsdp_sync_module_states"] = True
    else:
        block["fsdp_reshard_after_forward"] = f.sharding_strategy != "SHARD_GRAD_OP"
    if f.auto_wrap_policy == "TRANSFORMER_BASED_WRAP" and f.transformer_layer_cls_to_wrap:
        block["fsdp_transformer_layer_cls_to_wrap"] = f.transformer_layer_cls_to_wrap
    if f.auto_wrap_policy == "SIZE_BASED_WRAP":
        block["fsdp_min_num_params"] = f.min_num_params
    return block


def accelerate_config(recipe, folder: Path | None = None) -> dict[str, Any]:
    """The accelerate config (the YAML `accelerate config` writes) that the recipe's distributed section means.

    `folder`: where a DeepSpeed JSON goes when the section gives DeepSpeed's own keys."""
    d = recipe.distributed
    kind = {"ddp": "MULTI_GPU" if d.num_processes > 1 else "NO", "deepspeed": "DEEPSPEED", "fsdp": "FSDP"}[
        d.strategy
    ]
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": kind,
        "downcast_bf16": "no",
        "dynamo_backend": "NO",
        "machine_rank": d.machine_rank,
        "main_training_function": "main",
        "mixed_precision": recipe.training.mixed_precision,
        "num_machines": d.num_machines,
        "num_processes": d.num_processes * d.num_machines,  # accelerate counts all machines together
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if d.main_process_ip:
        cfg["main_process_ip"] = d.main_process_ip
    if d.main_process_port:
        cfg["main_process_port"] = d.main_process_port
    if d.strategy == "deepspeed":
        cfg["deepspeed_config"] = _deepspeed_block(recipe, folder)
    if d.strategy == "fsdp":
        cfg["fsdp_config"] = _fsdp_block(recipe)
    return cfg


def config_file_for(recipe, folder: str | os.PathLike[str] | None = None) -> Path:
    """The recipe's accelerate config file: its own `accelerate_config`, or one written from the recipe."""
    if recipe.distributed.accelerate_config:
        path = Path(recipe.distributed.accelerate_config)
        if not path.is_file():
            raise PeftrunError(
                "accelerate config file not found", where=f"distributed.accelerate_config ({path})"
            )
        return path
    folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="peftrun-launch-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "accelerate_config.yaml"
    path.write_text(yaml.safe_dump(accelerate_config(recipe, folder), sort_keys=True))
    return path


def cpu_only_env(config: dict[str, Any], base: dict[str, str] | None = None) -> dict[str, str]:
    """What accelerate and DeepSpeed need to run several processes on a machine without CUDA."""
    env = dict(base if base is not None else os.environ)
    if torch.cuda.is_available():
        return env
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        env.setdefault("DS_ACCELERATOR", "cpu")
    else:
        env.setdefault("ACCELERATE_USE_CPU", "1")
    return env


def launch_command(
    config_file: Path, recipe_path: str, overrides: list[str], accelerate_args: list[str]
) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    config = yaml.safe_load(Path(config_file).read_text()) or {}
    kind = str(config.get("distributed_type", "NO")).upper()
    if not torch.cuda.is_available() and kind == "MULTI_GPU" and "--multi_gpu" not in accelerate_args:
        cmd.append("--multi_gpu")  # with ACCELERATE_USE_CPU=1: N CPU processes over gloo
    cmd += list(accelerate_args)
    cmd += ["-m", "peftrun", "train", str(recipe_path)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def launch(
    recipe, recipe_path: str, overrides: list[str], accelerate_args: list[str], *, dry_run: bool = False
) -> int:
    """Run `accelerate launch` on `peftrun train`; returns its exit code."""
    d = recipe.distributed
    if d.num_machines > 1 and not d.main_process_ip and not d.accelerate_config:
        raise PeftrunError(
            "several machines need the address of machine_rank 0",
            where="distributed.main_process_ip",
            hint="set distributed.main_process_ip (and main_process_port) to machine 0's address",
        )
    config_file = config_file_for(recipe)
    config = yaml.safe_load(config_file.read_text()) or {}
    cmd = launch_command(config_file, recipe_path, overrides, accelerate_args)
    env = cpu_only_env(config)
    shown = " ".join(shlex.quote(c) for c in cmd)
    print(f"accelerate config: {config_file}", flush=True)
    print(f"running: {shown}", flush=True)
    if dry_run:
        print(yaml.safe_dump(config, sort_keys=True), end="", flush=True)
        return 0
    return subprocess.call(cmd, env=env)


# ------------------------------------------------------------------ inside a training process


def make_accelerator(recipe):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    if wants_launcher(recipe) and not launched():
        raise PeftrunError(
            "this recipe trains on several processes or on DeepSpeed/FSDP, which a launcher starts",
            where="distributed",
            hint="run `peftrun launch RECIPE` (or accelerate launch --config_file FILE -m peftrun train RECIPE)",
        )
    handlers = []
    backend = recipe.distributed.backend
    if backend == "auto" and not torch.cuda.is_available() and launched():
        backend = "gloo"  # CPU ranks talk over gloo; Accelerate would otherwise ask for a backend CPUs lack
    if backend != "auto":
        handlers.append(InitProcessGroupKwargs(backend=backend))
    # an explicit training.mixed_precision wins; otherwise accelerate launch's config (or "no") decides
    precision = (
        recipe.training.mixed_precision if "mixed_precision" in recipe.training.model_fields_set else None
    )
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
    ranks load empty weights). Both are switched off before Accelerate and transformers read them.
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


def zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def gathered(params, enabled: bool = True, modifier_rank: int | None = None):
    """Whole ZeRO-3 parameters inside the block, on every rank (a collective: all ranks must enter).

    ZeRO-3 leaves each rank a slice of every weight (an empty tensor where the rank holds none);
    anything that reads weights whole, such as saving an adapter, runs inside this block. With
    `modifier_rank`, what that rank writes into them is partitioned back to every rank on leaving.
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not enabled or not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def fsdp_version(accelerator) -> int:
    """1 or 2 when the model is sharded by FSDP, else 0."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return 0
    return 2 if accelerator.is_fsdp2 else 1


@contextlib.contextmanager
def whole_tensors(accelerator, model, tensors_of):
    """The tensors `tensors_of()` names, whole, on every rank (a collective: all ranks must enter).

    ZeRO-3 and FSDP leave each rank a slice of every weight: DeepSpeed's partitioned parameters are
    gathered in place; FSDP2's DTensors are all-gathered into full tensors (`full_tensor`); FSDP1's
    flat parameters are summoned whole (`summon_full_params`, no write-back), and `tensors_of` is called
    inside, where its views are whole. `model`: the prepared model.
    """
    version = fsdp_version(accelerator)
    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=True):
            yield {k: v.detach() for k, v in tensors_of().items()}
        return
    tensors = tensors_of()
    if version == 2:
        from torch.distributed.tensor import DTensor

        yield {
            k: v.detach().full_tensor() if isinstance(v, DTensor) else v.detach() for k, v in tensors.items()
        }
        return
    with gathered(tensors.values(), enabled=zero3(accelerator)):
        yield tensors


@contextlib.contextmanager
def _writable_whole(accelerator, model, tensors_of):
    """The tensors `tensors_of()` names, to write into whole; on leaving, what was written is sharded again.

    FSDP1 summons its flat parameters whole with write-back; ZeRO-3 gathers its partitioned parameters
    and partitions rank 0's writes to every rank. FSDP2's DTensors come as they are: a writer copies
    DTensors into them (`_sharded_like`).
    """
    if fsdp_version(accelerator) == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=True, recurse=True):
            yield tensors_of()
        return
    own = tensors_of()
    with gathered(own.values(), modifier_rank=0):
        yield own


def _sharded_like(own: dict, tensors: dict) -> dict:
    """Whole `tensors` as DTensors placed like `own`'s FSDP2 shards, where names and shapes match."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    tensors = dict(tensors)
    for key, tensor in own.items():
        if isinstance(tensor, DTensor) and key in tensors and tensors[key].shape == tensor.shape:
            tensors[key] = distribute_tensor(
                tensors[key].to(dtype=tensor.dtype, device=tensor.device),
                tensor.device_mesh,
                tensor.placements,
            )
    return tensors


def whole_adapter(accelerator, model, peft_model, name: str):
    """Adapter `name`'s tensors whole, on every rank, as a context manager (see `whole_tensors`)."""
    return whole_tensors(accelerator, model, lambda: peft_model.adapter_state_dict(name))


def load_whole_adapter(accelerator, model, peft_model, name: str, state: dict) -> None:
    """Copy whole tensors `state` (as saved) into adapter `name`, sharding them again where training does."""
    with _writable_whole(accelerator, model, lambda: peft_model.adapter_state_dict(name)) as own:
        if fsdp_version(accelerator) == 2:
            state = _sharded_like(own, state)
        peft_model.load_adapter_state_dict(state, name)


def _trainable(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def whole_trainable(accelerator, model, peft_model) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name, whole, as CPU copies (a collective: all ranks call it)."""
    with whole_tensors(accelerator, model, lambda: _trainable(peft_model)) as whole:
        return {n: t.detach().cpu().clone() for n, t in whole.items()}


@torch.no_grad()
def load_whole_trainable(accelerator, model, peft_model, tensors: dict[str, torch.Tensor], check) -> None:
    """Copy whole tensors (as `whole_trainable` gave them) into the trainable parameters, sharding them again
    where training does. `check(params)` sees the parameters first, whole, and raises on a mismatch."""
    with _writable_whole(accelerator, model, lambda: _trainable(peft_model)) as own:
        if fsdp_version(accelerator) == 2:
            from torch.distributed.tensor import DTensor

            check({n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in own.items()})
            tensors = _sharded_like(own, tensors)
        else:
            check(own)
        for n, p in own.items():
            p.copy_(tensors[n])


def optimizer_state(accelerator, model, optimizer) -> dict | None:
    """The optimizer's state with whole tensors, on the main process, for FSDP2 (None elsewhere: the optimizer's
    own state_dict holds whole tensors there, or each FSDP1 rank saves its own shard). A collective under FSDP2:
    every rank calls it."""
    if fsdp_version(accelerator) != 2:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)


def load_optimizer_state(accelerator, model, optimizer, state: dict) -> None:
    """Put back what `optimizer_state` saved (read on the main process, sent to the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(
        model, getattr(optimizer, "optimizer", optimizer), optim_state_dict=state, options=options
    )


def fsdp_generation(accelerator, model) -> None:
    """Let `generate` run on an FSDP model: it calls the model's parts, not its forward, so FSDP would not
    gather the weights held by the root (embeddings, heads) for it. FSDP2 runs its forward hooks around it
    (register_fsdp_forward_method); FSDP1 gathers the root's own weights during the call."""
    version = fsdp_version(accelerator)
    if version == 2:
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")
    elif version == 1:
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel

        inner = model.module
        plain = inner.generate

        @functools.wraps(plain)
        def generate(*args, **kwargs):
            with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=False):
                return plain(*args, **kwargs)

        inner.generate = generate


def shard_line(accelerator, model) -> str | None:
    """Under FSDP: how many of the model's parameters this process holds (a collective: all ranks call it)."""
    version = fsdp_version(accelerator)
    if not version:
        return None
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
