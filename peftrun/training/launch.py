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

When a rank dies the run ends: torchrun's agent (inside accelerate launch) stops the other ranks of its
machine; a rank whose collective fails because its peer is gone, or waited distributed.timeout_seconds for
a hung one, ends with `lost_peers`'s line (exit 3). `peftrun launch` reads the agent's summary of the first
failed rank and prints one line: which rank, how it ended, the last complete checkpoint, the command that
continues (`peftrun launch RECIPE ... --resume`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
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
    kind = {"ddp": "MULTI_GPU" if d.num_processes * d.num_machines > 1 else "NO", "deepspeed": "DEEPSPEED", "fsdp": "FSDP"}[
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
    config_file: Path, recipe_path: str, overrides: list[str], accelerate_args: list[str], resume: bool = False
) -> list[str]:
    cmd = [sys.executable, "-m", "peftrun.training.accelerate_launch", "--config_file", str(config_file)]
    config = read_yaml(config_file, what="accelerate config")
    kind = str(config.get("distributed_type", "NO")).upper()
    if not torch.cuda.is_available() and kind == "MULTI_GPU" and "--multi_gpu" not in accelerate_args:
        cmd.append("--multi_gpu")  # with ACCELERATE_USE_CPU=1: N CPU processes over gloo
    cmd += list(accelerate_args)
    cmd += ["-m", "peftrun", "train", str(recipe_path)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def launch(
    recipe,
    recipe_path: str,
    overrides: list[str],
    accelerate_args: list[str],
    *,
    dry_run: bool = False,
    resume: bool = False,
) -> int:
    """Run `accelerate launch` on `peftrun train` (with --resume: continuing from the newest checkpoint);
    returns its exit code. When a rank died or crashed, says which and how to continue, in one line."""
    d = recipe.distributed
    if d.num_machines > 1 and not d.main_process_ip and not d.accelerate_config:
        raise PeftrunError(
            "several machines need the address of machine_rank 0",
            where="distributed.main_process_ip",
            hint="set distributed.main_process_ip (and main_process_port) to machine 0's address",
        )
    if resume and not dry_run:
        from peftrun.training.build import check_output_dir

        check_output_dir(recipe, resume)  # no checkpoint: one line here rather than one per rank
    config_file = config_file_for(recipe)
    config = read_yaml(config_file, what="accelerate config")
    cmd = launch_command(config_file, recipe_path, overrides, accelerate_args, resume)
    env = cpu_only_env(config)
    shown = " ".join(shlex.quote(c) for c in cmd)
    print(f"accelerate config: {config_file}", flush=True)
    print(f"running: {shown}", flush=True)
    if dry_run:
        print(yaml.safe_dump(config, sort_keys=True), end="", flush=True)
        return 0
    code, tail = _run_teeing_stderr(cmd, env)
    if code:
        line = failure_line(recipe, recipe_path, overrides, accelerate_args, tail)
        if line:
            print(line, file=sys.stderr, flush=True)
    return code


# ------------------------------------------------------------------ when a rank fails

TAIL_BYTES = 64 * 1024


def _run_teeing_stderr(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd`, its stderr passed through as it comes; returns the exit code and stderr's last bytes
    (where torchrun's agent writes its summary of the failed ranks)."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    tail = bytearray()

    def pump() -> None:
        out = getattr(sys.stderr, "buffer", None)
        while chunk := os.read(proc.stderr.fileno(), 65536):
            if out is not None:
                out.write(chunk)
                out.flush()
            else:
                sys.stderr.write(chunk.decode(errors="replace"))
            tail.extend(chunk)
            del tail[:-TAIL_BYTES]

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    thread.join(timeout=10)
    return code, tail.decode(errors="replace")


def root_cause(summary: str) -> tuple[int, int, str] | None:
    """(rank, exit code, host) of the first rank that failed, from torchrun's failure summary: a negative
    exit code is the signal that killed it. None when `summary` holds no such summary."""
    start = summary.rfind("Root Cause")
    if start < 0:
        return None
    block = summary[start:]
    rank = re.search(r"^\s*rank\s*:\s*(\d+)", block, re.M)
    code = re.search(r"^\s*exitcode\s*:\s*(-?\d+)", block, re.M)
    host = re.search(r"^\s*host\s*:\s*(\S+)", block, re.M)
    if not (rank and code):
        return None
    return int(rank.group(1)), int(code.group(1)), host.group(1) if host else "?"


def failure_line(recipe, recipe_path: str, overrides: list[str], accelerate_args: list[str], summary: str):
    """One line saying which rank died or crashed, the last complete checkpoint and the command that
    continues the run; None when the failed rank has said it all itself (a mistake in the recipe, exit 2;
    an interrupted run, 128 + signal, which prints its own line)."""
    from peftrun.training.resume import latest_checkpoint

    cause = root_cause(summary)
    if cause is None:
        return None
    rank, code, host = cause
    if code == LOST_PEERS_EXIT:
        what = (
            f"rank {rank} lost the other ranks (a collective failed, or waited distributed.timeout_seconds="
            f"{recipe.distributed.timeout_seconds}): another rank died or hangs"
        )
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        what = f"rank {rank} died ({name})"
    elif code == 1:
        what = f"rank {rank} failed (exit code 1)"
    else:
        return None
    if recipe.distributed.num_machines > 1:
        what += f" on {host}"
    command = " ".join(["peftrun", "launch", shlex.quote(recipe_path), *(f"--set {shlex.quote(o)}" for o in overrides)])
    after = f" -- {' '.join(shlex.quote(a) for a in accelerate_args)}" if accelerate_args else ""
    last = latest_checkpoint(recipe.output_dir)
    if last is None:
        return f"{what}; the run stopped before its first checkpoint; start again with: {command} --set overwrite=true{after}"
    return (
        f"{what}; the run stopped; the last complete checkpoint is {last}; "
        f"continue with: {command} --resume{after}"
    )


class RankLostPeers(PeftrunError):
    """A collective failed on this rank because another rank died or hangs."""

    exit_code = 3

    def render(self) -> str:
        return self.message


LOST_PEERS_EXIT = RankLostPeers.exit_code
TRANSPORT_WORDS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout", "broken pipe")


def lost_peers(exc: BaseException, where: str) -> RankLostPeers | None:
    """The error to raise instead of `exc` when `exc` is a collective of a launched run failing (the other
    end died, or did not answer within distributed.timeout_seconds); None for any other error."""
    import torch.distributed as dist

    if isinstance(exc, PeftrunError) or not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(exc).strip()
    if not (isinstance(exc, dist.DistError) or any(w in text.lower() for w in TRANSPORT_WORDS)):
        return None
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    return RankLostPeers(
        f"rank {dist.get_rank()} lost the other ranks {where} ({first}); another rank died or hangs, and the "
        "launcher stops this run: its summary names the rank that failed first"
    )
