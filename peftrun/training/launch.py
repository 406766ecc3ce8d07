"""Several processes, one recipe: the accelerate config a recipe describes and the launch wrapper.

`peftrun launch RECIPE` writes the accelerate config of the recipe's `distributed` section (or takes the
file named by `distributed.accelerate_config`) and runs `accelerate launch ... -m peftrun train RECIPE`.
`accelerate launch --config_file FILE -m peftrun train RECIPE` works as well: inside a launched process the
environment accelerate sets decides (DeepSpeed, FSDP, processes, precision), not the recipe.

On a machine without CUDA the same commands run on CPU: ranks talk over gloo, DeepSpeed uses its CPU
accelerator (DS_ACCELERATOR=cpu), and accelerate's CPU switch is set so that `--multi_gpu` starts the
processes instead of silently starting one. FSDP, which Accelerate gives only to GPU ranks, is given to the
CPU ranks here (torch's FSDP runs over gloo).

Inside a launched process, `engines.make_accelerator` builds the Accelerator and `engines.engine_for` the
engine that strategy needs.
"""

from __future__ import annotations

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
from peftrun.yaml_safe import read_yaml

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
    config = read_yaml(config_file, what="accelerate config")
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
    config = read_yaml(config_file, what="accelerate config")
    cmd = launch_command(config_file, recipe_path, overrides, accelerate_args)
    env = cpu_only_env(config)
    shown = " ".join(shlex.quote(c) for c in cmd)
    print(f"accelerate config: {config_file}", flush=True)
    print(f"running: {shown}", flush=True)
    if dry_run:
        print(yaml.safe_dump(config, sort_keys=True), end="", flush=True)
        return 0
    return subprocess.call(cmd, env=env)
