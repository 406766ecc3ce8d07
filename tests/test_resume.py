"""Resuming after a crash: SIGKILL mid-epoch, a kill inside a checkpoint save, SIGTERM; pruning and recipe checks.

The kill tests run `peftrun train` in subprocesses on a tiny BERT classifier (30 optimizer steps, a checkpoint
every 2) and compare the resumed run's final adapter and metrics with an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from faults import FaultHooks, fault_env
from safetensors.torch import load_file
from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows

from peftrun.io.peft_format import read_adapter
from peftrun.training.hooks import Hooks
from peftrun.training.resume import (
    Position,
    complete_checkpoints,
    count_lines,
    prune,
    recipe_differences,
    truncate_metrics,
)
from peftrun.training.rng import read_rng, rng_state, set_rng_state, write_rng

STEPS = 30  # 40 rows / batch 4 = 10 steps per epoch, 3 epochs


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = tiny_model_dir(root)
    write_rows(root / "data" / "train.csv", 40)
    write_rows(root / "data" / "validation.csv", 12)
    return root, model


def make_recipe(work, name: str, method: dict | None = None, **training) -> tuple[Path, Path]:
    root, model = work
    out = root / name
    data = tiny_recipe_dict(model, root / "data", out, save_steps=2, **training)
    if method is not None:
        data["method"] = method
    recipe = write_recipe(root / f"{name}.yaml", data)
    return recipe, out


@pytest.fixture(scope="module")
def reference(work):
    recipe, out = make_recipe(work, "reference")
    proc = run_cli("train", str(recipe))
    assert proc.returncode == 0, proc.stderr
    return out


def popen_train(recipe: Path, *extra: str, fault_spec: str) -> subprocess.Popen:
    env = {**os.environ, **fault_env(fault_spec)}
    return subprocess.Popen(
        [sys.executable, "-m", "peftrun", "train", str(recipe), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(int(p.name[5:]) >= step for p in complete_checkpoints(out)):
            return
        if proc.poll() is not None:
            pytest.fail(
                f"training ended (rc {proc.returncode}) before checkpoint {step}: {proc.stderr.read()[-2000:]}"
            )
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no checkpoint {step} within {timeout}s")


def max_adapter_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def metric_records(out: Path) -> list[dict]:
    """metrics.jsonl without the memory figures, which differ between any two runs."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if "mem" not in k.lower()} for row in rows]


def assert_same_as_reference(out: Path, reference: Path) -> None:
    assert max_adapter_diff(out, reference) <= 1e-6
    records, expected = metric_records(out), metric_records(reference)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # no duplicated or missing steps
    assert [r["epoch"] for r in records if "train_epoch_loss" in r] == [0, 1, 2]
    assert len(records) == len(expected) == STEPS + 3
    for got, want in zip(records, expected):
        assert got.keys() == want.keys()
        for key in got:
            assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_reference_run_prunes_to_keep_last_n(reference):
    names = [p.name for p in complete_checkpoints(reference)]
    assert names == ["step-000028", "step-000030"]  # keep_last_n: 2 of 15 saves
    assert not [p for p in (reference / "checkpoints").iterdir() if p.name.startswith(".")]
    state = json.loads((reference / "checkpoints" / "step-000030" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batches"]) == (30, 2, 10)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(work, reference):
    recipe, out = make_recipe(work, "killed")
    proc = popen_train(recipe, fault_spec="after_step:*:sleep0.25")
    wait_for_checkpoint(out, proc, 12)  # epoch 1 runs steps 11-20
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    last = complete_checkpoints(out)[-1]
    assert 12 <= int(last.name[5:]) < STEPS
    assert not (out / "adapter_model.safetensors").exists()  # it never finished

    done = run_cli("train", str(recipe), "--resume")
    assert done.returncode == 0, done.stderr
    assert f"resuming from {last}" in done.stdout
    assert_same_as_reference(out, reference)


def test_kill_inside_a_save_keeps_the_previous_checkpoint_then_sigterm_then_auto_resume(work, reference):
    recipe, out = make_recipe(work, "save_killed")
    # 1. SIGKILL between writing the adapter and the optimizer state of checkpoint 6
    proc = run_cli("train", str(recipe), env=fault_env("checkpoint_write:6:kill"))
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in complete_checkpoints(out)] == ["step-000002", "step-000004"]
    assert not (out / "checkpoints" / "step-000006").exists()
    assert (out / "checkpoints" / ".step-000006.partial").is_dir()  # the half-written one, hidden
    config, state = read_adapter(out / "checkpoints" / "step-000004")  # the previous one loads
    assert config["peft_type"] == "LORA" and len(state) == 8 + 2  # 2 layers x q,v x A,B; classifier w, b
    assert json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())["step"] == 4

    # 2. resume; SIGTERM once it has saved step 8: it saves where it is and says how to continue
    proc = popen_train(recipe, "--resume", fault_spec="after_step:*:sleep0.25")
    wait_for_checkpoint(out, proc, 8)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert f"continue with: peftrun train {recipe} --resume" in stderr
    stopped = complete_checkpoints(out)[-1]
    assert str(stopped) in stderr and 8 <= int(stopped.name[5:]) < STEPS
    assert not (out / "checkpoints" / ".step-000006.partial").exists()  # cleaned on resume

    # 3. training.auto_resume picks it up without --resume
    done = run_cli("train", str(recipe), "--set", "training.auto_resume=true")
    assert done.returncode == 0, done.stderr
    assert f"resuming from {stopped}" in done.stdout
    assert_same_as_reference(out, reference)


def test_resume_refuses_a_changed_recipe(work, reference, tmp_path):
    recipe, _ = make_recipe(work, "reference")
    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    proc = run_cli(
        "train",
        str(recipe),
        "--resume",
        "--set",
        f"output_dir={copy}",
        "--set",
        "training.learning_rate=0.02",
    )
    assert proc.returncode == 2
    assert "training.learning_rate: 0.01 in the checkpoint, 0.02 now" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_without_a_checkpoint_is_refused(work, tmp_path):
    recipe, _ = make_recipe(work, "never_ran")
    proc = run_cli("train", str(recipe), "--resume", "--set", f"output_dir={tmp_path / 'empty'}")
    assert proc.returncode == 2
    assert "--resume: no complete checkpoint under" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the pieces, in-process


def test_rng_states_round_trip_without_pickle(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    saved = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    write_rng(tmp_path, [saved, saved])
    set_rng_state(read_rng(tmp_path, 1))
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_truncate_metrics_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # killed mid-line
    assert count_lines(path) == 3
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_prune_stays_inside_checkpoints(tmp_path):
    out = tmp_path / "out"
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "trainer_state.json").write_text("{}")
    for step in (2, 4, 6):
        folder = out / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
    (out / "checkpoints" / "step-000001").symlink_to(outside, target_is_directory=True)
    (out / "checkpoints" / "step-000008").mkdir()  # incomplete: no trainer state
    removed = prune(out, 1)
    assert [p.name for p in removed] == ["step-000002", "step-000004"]
    assert [p.name for p in complete_checkpoints(out)] == ["step-000006"]
    assert (outside / "trainer_state.json").is_file()  # the symlinked folder is not ours to delete
    assert (out / "checkpoints" / "step-000008").is_dir()


def test_recipe_differences_ignore_what_does_not_change_the_numbers():
    saved = {"training": {"learning_rate": 0.01, "logging_steps": 1, "save_steps": 2}, "output_dir": "a"}
    now = {"training": {"learning_rate": 0.01, "logging_steps": 5, "save_steps": 4}, "output_dir": "b"}
    assert recipe_differences(saved, now) == []
    now["training"]["learning_rate"] = 0.1
    assert recipe_differences(saved, now) == ["training.learning_rate: 0.01 in the checkpoint, 0.1 now"]


def test_fault_hooks_act_only_where_asked():
    loss = torch.tensor(1.5)
    assert Hooks().at("loss", 3, loss) is loss  # a normal run: hooks do nothing
    hooks = FaultHooks("loss:3:nan,after_step:*:sleep0")
    assert torch.isnan(hooks.at("loss", 3, loss))
    assert hooks.at("loss", 4, loss) is loss
    assert hooks.at("after_step", 9) is None


def test_position_next_epoch_resets_the_epoch_counters():
    pos = Position(step=12, epoch=1, batches=2, loss_sum=1.5, seen=2, metrics_lines=14)
    pos.next_epoch(2)
    assert (pos.step, pos.epoch, pos.batches, pos.loss_sum, pos.seen) == (12, 2, 0, 0.0, 0)


# Methods whose peft-format adapter holds less than what trains: AdaLoRA writes only the kept triplets and
# keeps its importance EMAs outside the parameters; p_tuning and prefix_projection write their encoder's
# output, not the encoder. Their resume checkpoints hold all of it (trainable.safetensors).
STATEFUL_METHODS = {
    "adalora": {
        "name": "adalora",
        "init_r": 6,
        "target_r": 2,
        "tinit": 2,
        "tfinal": 6,
        "deltaT": 2,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
    },
    "p_tuning": {"name": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "prefix_projection": {
        "name": "prefix_tuning",
        "num_virtual_tokens": 4,
        "prefix_projection": True,
        "encoder_hidden_size": 16,
    },
}


@pytest.mark.parametrize("label", list(STATEFUL_METHODS))
def test_resume_carries_on_exactly_for_methods_with_state_beyond_the_adapter(work, label):
    method = STATEFUL_METHODS[label]
    recipe, reference = make_recipe(work, f"{label}-reference", method)
    assert run_cli("train", str(recipe)).returncode == 0
    recipe, out = make_recipe(work, f"{label}-killed", method)
    proc = popen_train(recipe, fault_spec="after_step:13:kill")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    last = complete_checkpoints(out)[-1]
    assert last.name == "step-000012"
    if label == "adalora":  # the allocator had already pruned when the run died
        config, _ = read_adapter(last)
        assert any(not all(flags) for flags in config["rank_pattern"].values())
    done = run_cli("train", str(recipe), "--resume")
    assert done.returncode == 0, done.stderr
    assert f"resuming from {last}" in done.stdout
    assert_same_as_reference(out, reference)
    assert read_adapter(out)[0] == read_adapter(reference)[0]  # e.g. AdaLoRA's final rank_pattern
