"""Several processes for real, on CPU: data parallel over gloo, DeepSpeed ZeRO-3 with CPU offload, and FSDP
(versions 2 and 1) over gloo.

Both train a tiny BERT classifier (LoRA r=4 on query/value, the head trained whole) for 6 optimizer steps
with a global batch of 8, and must end where the single-process run with batch 8 ends.

Tolerance: 5e-5 absolute on every adapter tensor (entries up to ~0.2). The ranks average two half-batch
mean gradients where the single process takes one mean over 8 rows: the same sum in another order, so
each step differs in the last float32 bits, and Adam's division by sqrt(v) carries that through 6 steps
(measured: 9e-6 for DDP and 1e-5 for ZeRO-3, whose DeepSpeedCPUAdam is a different AdamW kernel; 9.4e-7
for FSDP2 and FSDP1, whose reduce-scatter averages the ranks' gradients as DDP's all-reduce does).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_cli
from faults import fault_env
from safetensors.torch import load_file

ATOL = 5e-5
DS_SEED_CONFIG = REPO / "configs" / "ds_zero3_cpu.yaml"


def write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT (byte vocabulary, no dropout so that ranks draw no random numbers), data and a recipe."""
    from tiny import save_tiny

    root = tmp_path_factory.mktemp("dist")
    save_tiny(
        root / "bert",
        "bert",
        "SEQ_CLS",
        vocab_size=384,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    rng = random.Random(0)
    rows = []
    for i in range(64):
        good = i % 2
        word = rng.choice(["great", "good", "fine", "nice"] if good else ["bad", "awful", "poor", "sad"])
        rows.append({"text": f"this was {word} {rng.randint(0, 99)}", "label": ["neg", "pos"][good]})
    (root / "data").mkdir()
    write_rows(root / "data" / "train.csv", rows[:48])
    write_rows(root / "data" / "validation.csv", rows[48:])
    recipe = {
        "model": {"name_or_path": str(root / "bert"), "task_type": "SEQ_CLS", "tokenizer": "byt5"},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "data": {"path": str(root / "data"), "max_length": 32},
        "training": {
            "num_epochs": 1,
            "batch_size": 8,
            "learning_rate": 0.01,
            "progress_bar": False,
            "seed": 1,
        },
        "output_dir": str(root / "single"),
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("train", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return root, path


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict, atol: float = ATOL) -> float:
    assert sorted(a) == sorted(b)
    worst = 0.0
    for key in a:
        assert a[key].shape == b[key].shape, key
        worst = max(worst, (a[key] - b[key]).abs().max().item())
    assert worst <= atol, f"adapters differ by {worst:.3g}"
    return worst


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launch_env(**extra: str) -> dict[str, str]:
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))}
    env.update(extra)
    return env


def sets(*settings: str) -> list[str]:
    """`--set KEY=VALUE` for each setting."""
    return [arg for setting in settings for arg in ("--set", setting)]


def peftrun_launch(path: Path, *settings: str, env: dict[str, str], timeout: int = 600):
    """`peftrun launch RECIPE --set ... -- --main_process_port PORT` on a free port."""
    return run_cli(
        "launch",
        str(path),
        *sets(*settings),
        "--",
        "--main_process_port",
        free_port(),
        env=env,
        timeout=timeout,
    )


def accelerate_launch(
    config: Path, launcher: list[str], path: Path, *settings: str, env: dict[str, str], timeout: int
):
    """`accelerate launch --config_file CONFIG LAUNCHER... -m peftrun train RECIPE --set ...` on a free port;
    `env` is the whole environment of the launch."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        *launcher,
        "--main_process_port",
        free_port(),
        "-m",
        "peftrun",
        "train",
        str(path),
        *sets(*settings),
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ configs and refusals (no processes)


def test_recipe_deepspeed_section_gives_the_seed_config(setup):
    from peftrun.recipe import load_recipe
    from peftrun.training.launch import accelerate_config

    root, path = setup
    recipe = load_recipe(
        path,
        [
            "distributed.strategy=deepspeed",
            "distributed.deepspeed.offload_optimizer_device=cpu",
            "distributed.deepspeed.offload_param_device=cpu",
        ],
    )
    ours = accelerate_config(recipe)
    seed = yaml.safe_load(DS_SEED_CONFIG.read_text())
    assert ours["distributed_type"] == seed["distributed_type"] == "DEEPSPEED"
    assert ours["deepspeed_config"] == seed["deepspeed_config"]
    assert ours["mixed_precision"] == seed["mixed_precision"] == "no"


def test_deepspeed_own_keys_inline_become_a_deepspeed_json(setup):
    from peftrun.recipe import load_recipe
    from peftrun.training.launch import accelerate_config

    root, path = setup
    recipe = load_recipe(path, ["distributed.deepspeed.zero_optimization.stage=2"])
    assert recipe.distributed.strategy == "deepspeed"  # a deepspeed section alone picks the engine
    block = accelerate_config(recipe, root)["deepspeed_config"]
    written = json.loads(Path(block["deepspeed_config_file"]).read_text())
    assert written == {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 2},
    }


def test_launch_dry_run_names_processes_and_machines(setup):
    root, path = setup
    result = run_cli(
        "launch",
        str(path),
        "--set",
        "distributed.num_processes=4",
        "--set",
        "distributed.num_machines=2",
        "--set",
        "distributed.machine_rank=1",
        "--set",
        "distributed.main_process_ip=10.0.0.1",
        "--set",
        "distributed.main_process_port=29501",
        "--dry-run",
        "--",
        "--max_restarts",
        "0",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    config = yaml.safe_load(out[out.index("compute_environment") :])
    # 4 processes on each of 2 machines: accelerate's config counts 8
    assert (config["num_processes"], config["num_machines"], config["machine_rank"]) == (8, 2, 1)
    assert (config["main_process_ip"], config["main_process_port"]) == ("10.0.0.1", 29501)
    assert "--max_restarts 0 -m peftrun train" in out


def test_launch_resume_reaches_every_rank_and_two_machines_are_multi_process(setup):
    root, path = setup
    result = run_cli(
        "launch", str(path), *sets("distributed.num_machines=2", "distributed.main_process_ip=127.0.0.1"),
        "--resume", "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    running = next(line for line in result.stdout.splitlines() if line.startswith("running: "))
    assert running.endswith("-m peftrun train " + f"{path} --set distributed.num_machines=2 "
                            "--set distributed.main_process_ip=127.0.0.1 --resume")
    config = yaml.safe_load(result.stdout[result.stdout.index("compute_environment") :])
    # one process on each of 2 machines is a multi-process run, not accelerate's "NO"
    assert (config["distributed_type"], config["num_processes"]) == ("MULTI_GPU", 2)
    refused = run_cli("launch", str(path), "--set", f"output_dir={root / 'nothing-yet'}", "--resume")
    assert refused.returncode == 2 and "no complete checkpoint" in refused.stderr
    assert "running:" not in refused.stdout  # refused before anything starts


def test_a_fault_rule_can_name_one_rank(monkeypatch):
    from faults import FaultHooks

    monkeypatch.setenv("RANK", "0")
    assert FaultHooks("after_step:3:kill@1").rules == []  # rank 0 of the launch: not for it
    assert FaultHooks("after_step:3:kill@1,loss:2:nan").rules == [("loss", "2", "nan")]
    monkeypatch.setenv("RANK", "1")
    assert FaultHooks("after_step:3:kill@1").rules == [("after_step", "3", "kill")]


SUMMARY = """
Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_23:32:52
  host      : node-b
  rank      : 3 (local_rank: 1)
  exitcode  : {code} (pid: 16)
"""


@pytest.mark.parametrize(
    ("code", "start"),
    [(-9, "rank 3 died (SIGKILL) on node-b;"), (1, "rank 3 failed (exit code 1) on node-b;"),
     (3, "rank 3 lost the other ranks (a collective failed, or waited distributed.timeout_seconds=600)"),
     (2, None), (143, None)],
)
def test_the_failed_rank_line(setup, code, start):
    """From torchrun's summary: one line for a rank that died, crashed or lost its peers; none where the rank
    said it all (a recipe mistake, exit 2; an interrupted run, 128 + signal)."""
    from peftrun.recipe import load_recipe
    from peftrun.training.launch import failure_line

    root, path = setup
    recipe = load_recipe(path, ["distributed.num_machines=2", f"output_dir={root / 'no-run'}"])
    line = failure_line(recipe, str(path), ["distributed.num_machines=2"], ["--max_restarts", "0"],
                        "noise\n" + SUMMARY.format(code=code))
    if start is None:
        assert line is None
        return
    assert line.startswith(start)
    assert line.endswith(f"start again with: peftrun launch {path} --set distributed.num_machines=2 "
                         "--set overwrite=true -- --max_restarts 0")
    assert failure_line(recipe, str(path), [], [], "a launcher without a summary") is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distributed.strategy=fsdp", "distributed.deepspeed.zero_stage=2"], "needs strategy: deepspeed"),
        (["distributed.deepspeed.zero_stag=2"], "did you mean 'zero_stage'"),
        (["distributed.deepspeed.zero_stage=2", "distributed.deepspeed.bf16.enabled=true"], "not both"),
        (["distributed.machine_rank=1"], "must be below num_machines"),
        (
            [
                "distributed.strategy=deepspeed",
                "distributed.deepspeed.zero_stage=2",
                "distributed.deepspeed.offload_param_device=cpu",
            ],
            "needs zero_stage 3",
        ),
        (
            ["distributed.accelerate_config=configs/ds_zero3_cpu.yaml", "distributed.num_processes=2"],
            "would be ignored",
        ),
    ],
)
def test_inconsistent_distributed_sections_exit_2(setup, overrides, message):
    root, path = setup
    args = [a for o in overrides for a in ("--set", o)]
    result = run_cli("validate", str(path), *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_several_machines_need_the_address_of_machine_0(setup):
    root, path = setup
    result = run_cli("launch", str(path), "--set", "distributed.num_machines=2", "--dry-run")
    assert result.returncode == 2
    assert "distributed.main_process_ip" in result.stderr


def test_train_without_a_launcher_says_how_to_launch(setup):
    root, path = setup
    result = run_cli(
        "train", str(path), "--set", "distributed.num_processes=2", "--set", f"output_dir={root / 'refused'}"
    )
    assert result.returncode == 2
    assert "peftrun launch" in result.stderr


# ------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def ddp_run(setup):
    """peftrun launch, 2 CPU ranks over gloo, 4 rows each, never interrupted: (output_dir, the run)."""
    root, path = setup
    out = root / "ddp"
    result = peftrun_launch(
        path,
        "distributed.num_processes=2",
        "training.batch_size=4",
        f"output_dir={out}",
        env=launch_env(),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result


def test_two_process_ddp_equals_single_process(setup, ddp_run):
    """peftrun launch, 2 CPU ranks over gloo, 4 rows each: the adapter of one process with 8 rows."""
    root, path = setup
    out, result = ddp_run
    assert_same_adapter(adapter(root / "single"), adapter(out))
    spread = [r for r in metrics(out) if "adapter_rank_max_diff" in r]
    assert spread == [{"step": 6, "ranks": 2, "adapter_rank_max_diff": 0.0}]  # both ranks end bit-identical
    assert "CPU Total Peak Memory consumed during the train (max):" in result.stdout
    # the main process reports, once
    assert result.stdout.count("CPU Total Peak Memory consumed during the train") == 1
    single = [r for r in metrics(root / "single") if "accuracy" in r][-1]
    ddp = [r for r in metrics(out) if "accuracy" in r][-1]
    assert ddp["accuracy"] == single["accuracy"]
    assert abs(ddp["eval_loss"] - single["eval_loss"]) < 1e-4


def seconds_since_first_failure(stderr: str) -> float:
    """Seconds from the failure torchrun's summary names first (its `time`, to the second) until now."""
    import datetime

    block = stderr[stderr.rindex("Root Cause") :]
    stamp = block.split("time      : ", 1)[1].split()[0]
    return time.time() - datetime.datetime.strptime(stamp, "%Y-%m-%d_%H:%M:%S").timestamp()


def test_ddp_rank_killed_ends_the_run_and_resume_matches(setup, ddp_run):
    """Rank 1 SIGKILLed after step 3 (checkpoints every 2 steps): the launcher stops rank 0 and the whole
    launch ends within seconds, with one line naming rank 1, the last checkpoint and the command that
    continues; that command ends where the uninterrupted 2-process run ends."""
    root, path = setup
    out = root / "ddp-killed"
    settings = [
        "distributed.num_processes=2",
        "training.batch_size=4",
        "training.save_steps=2",
        f"output_dir={out}",
    ]
    started = time.monotonic()
    killed = peftrun_launch(
        path, *settings, env=fault_env("after_step:3:kill@1", {"OMP_NUM_THREADS": "1"}), timeout=300
    )
    after_kill = seconds_since_first_failure(killed.stderr)
    wall = time.monotonic() - started
    assert killed.returncode != 0
    # measured: 3 s on an idle 2-core machine, 10 s at a load average of 18 (start-up is most of `wall`)
    assert after_kill < 60, f"the launch took {after_kill:.0f} s to end after rank 1 died"
    assert wall < 240
    assert "Traceback" not in killed.stderr, killed.stderr[-3000:]
    lines = [line for line in killed.stderr.splitlines() if line.startswith("rank 1 died (SIGKILL)")]
    assert len(lines) == 1, killed.stderr[-3000:]
    assert f"the last complete checkpoint is {out / 'checkpoints' / 'step-000002'};" in lines[0]
    command = lines[0].split("continue with: ", 1)[1]
    assert command.startswith(f"peftrun launch {path} --set distributed.num_processes=2")
    assert " --resume -- --main_process_port " in command
    # rank 0 says why it stopped, in one line of its own
    assert "rank 0 lost the other ranks after step 3" in killed.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]

    args = shlex.split(command)[2:]  # what follows `peftrun launch`, as the user would paste it
    args[args.index("--main_process_port") + 1] = free_port()
    resumed = run_cli("launch", *args, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert f"resuming from {out / 'checkpoints' / 'step-000002'} (step 2" in resumed.stdout
    assert_same_adapter(adapter(ddp_run[0]), adapter(out), atol=1e-6)
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == sorted(set(steps))  # no step logged twice


def test_a_hung_rank_ends_the_run_after_the_timeout(setup):
    """Rank 1 stops answering after step 3 (it sleeps): rank 0's next collective fails after
    distributed.timeout_seconds, the launcher stops rank 1, and the launch names what happened."""
    root, path = setup
    out = root / "ddp-hung"
    started = time.monotonic()
    hung = peftrun_launch(
        path,
        "distributed.num_processes=2",
        "distributed.timeout_seconds=5",
        "training.batch_size=4",
        "training.save_steps=2",
        f"output_dir={out}",
        env=fault_env("after_step:3:sleep600@1", {"OMP_NUM_THREADS": "1"}),
        timeout=300,
    )
    after_timeout = seconds_since_first_failure(hung.stderr)  # rank 0's failure, 5 s into the hang
    wall = time.monotonic() - started
    assert hung.returncode != 0
    # then torchrun's 30 s grace before it SIGKILLs rank 1, which sleeps through SIGTERM
    assert after_timeout < 90, f"the launch took {after_timeout:.0f} s to end after rank 0 timed out"
    assert wall < 240
    assert "Timed out" in hung.stderr and "rank 0 lost the other ranks after step 3" in hung.stderr
    line = hung.stderr.strip().splitlines()[-1]
    assert line.startswith("rank 0 lost the other ranks (a collective failed, or waited distributed.timeout_seconds=5)")
    assert "continue with: peftrun launch" in line and "--resume" in line


def test_two_machines_on_one_host(setup, ddp_run):
    """accelerate's multi-node launch: two `peftrun launch` processes, machine_rank 0 and 1, one process
    each, meeting at 127.0.0.1. Both train; machine 0 saves the adapter of the 2-process run."""
    root, path = setup
    out = root / "two-machines"
    settings = [
        "distributed.num_machines=2",
        "distributed.main_process_ip=127.0.0.1",
        f"distributed.main_process_port={free_port()}",
        "training.batch_size=4",
        f"output_dir={out}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    machines = [
        subprocess.Popen(
            [sys.executable, "-m", "peftrun", "launch", str(path), *sets(*settings, f"distributed.machine_rank={rank}")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    try:
        results = [machine.communicate(timeout=300) for machine in machines]
    finally:
        for machine in machines:
            machine.kill()
    for machine, (stdout, stderr) in zip(machines, results):
        assert machine.returncode == 0, stdout[-2000:] + stderr[-3000:]
        assert "adapter on 2 ranks: max |difference| 0" in stdout  # each machine's process took part
    assert f"adapter saved to {out}" in results[0][0] and "adapter saved to" not in results[1][0]
    assert [r for r in metrics(out) if "adapter_rank_max_diff" in r] == [
        {"step": 6, "ranks": 2, "adapter_rank_max_diff": 0.0}
    ]
    assert_same_adapter(adapter(ddp_run[0]), adapter(out), atol=1e-6)
    assert_same_adapter(adapter(root / "single"), adapter(out))


def _zero3_run(root: Path, path: Path, out: Path, env: dict[str, str], processes: int):
    return accelerate_launch(
        DS_SEED_CONFIG,
        ["--num_processes", str(processes)],
        path,
        f"training.batch_size={8 // processes}",
        f"output_dir={out}",
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        timeout=1500,
    )


def _check_zero3_adapter(root: Path, out: Path) -> None:
    from peftrun.io.loading import load_adapted
    from peftrun.merge import probe_logits

    ours, single = adapter(out), adapter(root / "single")
    assert ours["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (4, 32)
    assert ours["base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"].shape == (32, 4)
    assert ours["base_model.model.classifier.weight"].shape == (2, 32)
    assert all(t.numel() > 0 for t in ours.values())  # not the empty tensors of peft issue #1710
    assert_same_adapter(single, ours)
    logits = probe_logits(load_adapted(out)[0], "SEQ_CLS")
    reference = probe_logits(load_adapted(root / "single")[0], "SEQ_CLS")
    assert (logits - reference).abs().max().item() < 1e-4
    assert [r for r in metrics(out) if "accuracy" in r][-1]["accuracy"] == [
        r for r in metrics(root / "single") if "accuracy" in r
    ][-1]["accuracy"]
    merged = run_cli("merge", "--adapter", str(out), "--output", str(out.parent / f"{out.name}-merged"))
    assert merged.returncode == 0, merged.stderr
    assert (out.parent / f"{out.name}-merged" / "model.safetensors").is_file()


def test_deepspeed_zero3_cpu_offload_two_ranks(setup):
    """The seed's command on CPU: accelerate launch --config_file configs/ds_zero3_cpu.yaml -m peftrun train.

    DeepSpeedCPUAdam compiles on first use (~110 s; cached under TORCH_EXTENSIONS_DIR afterwards)."""
    pytest.importorskip("deepspeed")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("DeepSpeed's CPU Adam and CPU communication ops need a C++ compiler")
    root, path = setup
    out = root / "zero3"
    result = _zero3_run(root, path, out, launch_env(DS_ACCELERATOR="cpu"), processes=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # the count sees the partitioned weights whole
    assert "trainable params: 1,090 || all params: 35,812" in result.stdout
    assert [r for r in metrics(out) if "adapter_rank_max_diff" in r][0]["adapter_rank_max_diff"] == 0.0
    _check_zero3_adapter(root, out)
    # the resumable checkpoint written at the epoch's end holds the whole tensors too
    from peftrun.training.resume import latest_checkpoint

    assert_same_adapter(adapter(out), adapter(latest_checkpoint(out)), atol=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: ZeRO-3 offload from GPUs to CPU")
def test_deepspeed_zero3_cpu_offload_on_gpus(setup):
    root, path = setup
    processes = min(2, torch.cuda.device_count())
    out = root / "zero3-gpu"
    result = _zero3_run(root, path, out, launch_env(), processes=processes)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "GPU Total Peak Memory consumed during the train (max):" in result.stdout
    _check_zero3_adapter(root, out)


# ------------------------------------------------------------------ FSDP on CPU ranks

FSDP_CONFIG = REPO / "configs" / "fsdp.yaml"
LORA_A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"  # in the adapter file
LORA_A_PARAM = "model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"  # in the optimizer's


def _needs_fsdp() -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed (FSDP's process groups)")
    if not torch.cuda.is_available() and not dist.is_gloo_available():
        pytest.skip("FSDP on CPU ranks talks over gloo, which this torch build lacks")


def test_fsdp2_two_cpu_ranks_save_a_whole_adapter(setup):
    """The documented command on CPU: accelerate launch --config_file configs/fsdp.yaml -m peftrun train.

    FSDP version 2 (fully_shard, DTensor) over gloo, frozen base and trainable LoRA weights in the same
    sharded blocks; precision `no` so that the run can be compared with the fp32 single-process one."""
    _needs_fsdp()
    root, path = setup
    out = root / "fsdp2"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # a bare launch: peftrun finds the CPU ranks itself
    result = accelerate_launch(
        FSDP_CONFIG,
        ["--mixed_precision", "no"],
        path,
        "training.batch_size=4",
        "training.save_steps=3",
        f"output_dir={out}",
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # really sharded (not data parallel): each rank holds half of the weights
    assert "FSDP2: 2 ranks share 35,812 parameters; rank 0 holds 17,906" in result.stdout
    assert [r for r in metrics(out) if "adapter_rank_max_diff" in r][0]["adapter_rank_max_diff"] == 0.0
    _check_zero3_adapter(root, out)  # full shapes, equal to one process, loads, evaluates and merges alike
    from peftrun.training.resume import latest_checkpoint

    last = latest_checkpoint(out)
    assert last.name == "step-000006" and (last.parent / "step-000003").is_dir()
    assert_same_adapter(adapter(out), adapter(last), atol=0.0)
    optimizer = torch.load(last / "optimizer.pt", weights_only=True)  # whole AdamW moments, not one shard
    assert optimizer["state"][LORA_A_PARAM]["exp_avg"].shape == (4, 32)


def test_fsdp1_two_cpu_ranks_resume_after_a_crash(setup):
    """FSDP version 1 (use_orig_params) through peftrun launch: killed after step 3, resumed from the step-2
    checkpoint (each rank's optimizer shard), it ends where one process with the whole batch ends."""
    _needs_fsdp()
    root, path = setup
    out = root / "fsdp1"
    settings = [
        "distributed.strategy=fsdp",
        "distributed.fsdp.version=1",
        "distributed.num_processes=2",
        "training.batch_size=4",
        "training.save_steps=2",
        "training.auto_resume=true",
        f"output_dir={out}",
    ]
    killed = peftrun_launch(
        path, *settings, env=fault_env("after_step:3:kill", {"OMP_NUM_THREADS": "1"})
    )
    assert killed.returncode != 0
    assert "FSDP1: 2 ranks share 35,812 parameters; rank 0 holds 17,907" in killed.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert (out / "checkpoints" / "step-000002" / "optimizer-rank1.pt").is_file()
    assert adapter(out / "checkpoints" / "step-000002")[LORA_A].shape == (4, 32)
    resumed = peftrun_launch(path, *settings, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert "resuming from" in resumed.stdout and "step 2" in resumed.stdout
    ours = adapter(out)
    assert ours["base_model.model.classifier.weight"].shape == (2, 32)
    assert_same_adapter(adapter(root / "single"), ours)


def test_fsdp1_seq2seq_generates_while_sharded(setup):
    """A tiny T5 under FSDP1: evaluation calls generate(), which bypasses FSDP's forward; the root's sharded
    weights (the shared embedding) are gathered for it. Ends where one process ends."""
    _needs_fsdp()
    from tiny import save_tiny

    root, _ = setup
    save_tiny(root / "t5", "t5", "SEQ_2_SEQ_LM", dropout_rate=0.0)
    recipe = yaml.safe_load((root / "recipe.yaml").read_text())
    recipe["model"] = {"name_or_path": str(root / "t5"), "task_type": "SEQ_2_SEQ_LM", "tokenizer": "byt5"}
    recipe["method"] = {"name": "lora", "r": 4, "lora_alpha": 8}
    recipe["data"].update(template="Text : {text} Label : ", label_column="label", target_max_length=3)
    recipe["output_dir"] = str(root / "t5-single")
    path = root / "t5.yaml"
    path.write_text(yaml.safe_dump(recipe))
    single = run_cli("train", str(path), env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    out = root / "t5-fsdp1"
    result = peftrun_launch(
        path,
        "distributed.fsdp.version=1",
        "distributed.num_processes=2",
        "training.batch_size=4",
        f"output_dir={out}",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "FSDP1: 2 ranks share" in result.stdout and "eval_preds[:10]=" in result.stdout
    assert_same_adapter(adapter(root / "t5-single"), adapter(out))
    ours, theirs = ([r for r in metrics(d) if "eval_loss" in r][-1] for d in (out, root / "t5-single"))
    assert abs(ours["eval_loss"] - theirs["eval_loss"]) < 1e-4
    assert ours["accuracy"] == theirs["accuracy"]
