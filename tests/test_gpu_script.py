"""bench/gpu.sh (GPU figures for a lent device) on a machine without CUDA: every part skips with a one-line reason
and it exits 0; what a CPU can check is checked: the recipes and settings it would measure, and the estimate
figures it prints beside the seed's (the README's table)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO))
from bench import gpu  # noqa: E402


def run_script(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    return subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_without_cuda_each_part_skips_with_a_reason(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the parts run")
    proc = run_script("--parts", "bench,memory,bnb", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    skips = [ln for ln in proc.stdout.splitlines() if ln.startswith("SKIP ")]
    assert [ln.split(":")[0] for ln in skips] == ["SKIP bench", "SKIP memory", "SKIP bnb"]
    assert all(ln.endswith(f"no CUDA device (torch {torch.__version__})") for ln in skips), skips
    assert (tmp_path / "gpu.log").is_file() and (tmp_path / "gpu.json").is_file()


def test_dry_run_prints_plans_and_the_estimate_figures(tmp_path):
    proc = run_script("--dry-run", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for part in gpu.PARTS:
        assert f"SKIP {part}: --dry-run" in out
    # the seed's tables beside `peftrun estimate`'s figures (the README's rows)
    t0 = out.split("T0_3B (seed")[1].split("[t0")[0]
    sd = out.split("SD v1-4 DreamBooth (seed")[1]
    assert "  full fine-tuning                    47.14G    49.54G" in t0
    assert "  lora                                14.40G    14.78G" in t0
    assert "  lora + ZeRO-3 CPU offload            9.80G     9.31G" in t0
    assert "  full fine-tuning                    27.50G    25.78G" in sd
    assert "  lora                                15.50G    13.24G" in sd
    assert "  lora + gradient checkpointing        8.12G     7.12G" in sd
    # the commands the CUDA parts would run
    assert "would run: -m peftrun train recipes/quickstart.yaml --set model.name_or_path=roberta-large" in out
    assert f"--configs {gpu.BENCH_CONFIGS} --no-e2e" in out


def test_plans_are_the_seed_settings():
    t0 = dict(gpu.t0_plan())
    assert list(t0) == list(gpu.T0_SEED)
    lora, zero3 = t0["lora"], t0["lora + ZeRO-3 CPU offload"]
    assert t0["full fine-tuning"] is lora
    for recipe in (lora, zero3):
        assert recipe.model.name_or_path == "bigscience/T0_3B" and recipe.model.random_init
        assert recipe.model.dtype == "float32" and recipe.method.name == "lora"
        assert (recipe.method_config.r, recipe.method_config.lora_alpha) == (8, 32)
        assert (recipe.training.batch_size, recipe.data.max_length) == (8, 64)
    ds = zero3.distributed.deepspeed
    assert zero3.distributed.strategy == "deepspeed" and ds.zero_stage == 3
    assert (ds.offload_optimizer_device, ds.offload_param_device) == ("cpu", "cpu")

    sd = gpu.sd_plan()
    assert [s for s, _ in sd] == list(gpu.SD_SEED)
    for setting, recipe in sd:
        assert recipe.model.name_or_path == "CompVis/stable-diffusion-v1-4" and recipe.model.random_init
        assert recipe.dreambooth.resolution == 512 and recipe.training.batch_size == 1
        assert recipe.dreambooth.with_prior_preservation and recipe.dreambooth.train_text_encoder
        assert recipe.model.gradient_checkpointing == (setting == "lora + gradient checkpointing")
        assert recipe.method_config.r == 16 and recipe.method_config.target_modules == ["to_q", "to_v"]


def test_cpu_check_runs_the_t0_rows_code(tmp_path):
    """The measuring code itself (T0_3B's config shrunk, random weights, the seed's batch, the loop's memory
    tracker), on the CPU: each row runs its steps and prints the seed's memory lines."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--cpu-check", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("CPU Total Peak Memory consumed during the train (max): ") == 2
    for setting in ("full fine-tuning", "lora"):
        assert re.search(rf"^  {setting}: [\d.]+G \([\d.]+ s/step\)$", out, re.M), out
    assert "lora + ZeRO-3 CPU offload: skipped: ZeRO-3 offload runs on CUDA only here" in out


def test_parts_not_begun_within_the_budget_skip(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu.py"),
            "--cpu-check",
            "--budget",
            "0",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SKIP t0: over the time budget (--budget)" in proc.stdout
