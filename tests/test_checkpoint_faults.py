"""Checkpoints under faults (issue #13): a checkpoint is never written with non-finite trainable tensors, and
--resume falls back from a corrupt newest checkpoint to the previous complete one, saying so in one line, or
names the bad file when none is usable. Training runs in-process on the tiny BERT classifier (6 steps)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows

from peftrun.errors import PeftrunError
from peftrun.training.hooks import Hooks
from peftrun.training.resume import (
    checkpoint_fault,
    complete_checkpoints,
    read_position,
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_faults")
    model = tiny_model_dir(root)
    write_rows(root / "data" / "train.csv", 24)  # 6 steps of 4 rows in one epoch
    write_rows(root / "data" / "validation.csv", 8)
    return root, model


def recipe_for(work, out: Path, **training):
    from peftrun.recipe import load_recipe

    root, model = work
    data = tiny_recipe_dict(model, root / "data", out, num_epochs=1, save_steps=2, **training)
    return load_recipe(write_recipe(out.parent / f"{out.name}.yaml", data))


def train(recipe, **kwargs):
    from peftrun.training.loop import train as run

    return run(recipe, **kwargs)


@pytest.fixture(scope="module")
def finished(work, tmp_path_factory):
    """A complete run: checkpoints step-000004 and step-000006 kept (keep_last_n 2)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    train(recipe_for(work, out))
    assert [p.name for p in complete_checkpoints(out)] == ["step-000004", "step-000006"]
    return out


class PoisonWeights(Hooks):
    """After optimizer step `step`, one trainable weight of the model becomes NaN (the loss stays finite
    until the next forward: exactly the case a loss check cannot see before the checkpoint)."""

    def __init__(self, step: int):
        self.step = step
        self.model = None

    def at(self, point, step, value=None):
        if point == "after_step" and step == self.step:
            param = next(p for n, p in self.model.named_parameters() if p.requires_grad and "lora_B" in n)
            with torch.no_grad():
                param.view(-1)[0] = float("nan")
        return value


def test_no_checkpoint_with_non_finite_weights(work, tmp_path, monkeypatch):
    import peftrun.training.loop as loop

    hooks = PoisonWeights(step=4)
    real_prepare = loop.prepare

    def prepare(*args, **kwargs):
        run = real_prepare(*args, **kwargs)
        hooks.model = run.model
        return run

    monkeypatch.setattr(loop, "prepare", prepare)
    out = tmp_path / "out"
    with pytest.raises(PeftrunError) as info:
        train(recipe_for(work, out), hooks=hooks)
    message = info.value.render()
    assert "is not finite (NaN or inf) after optimizer step 4; training stopped and no checkpoint" in message
    assert "lora_B" in message
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # no partial folder left
    assert checkpoint_fault(out / "checkpoints" / "step-000002") is None  # and the one kept is finite
    assert not (out / "adapter_model.safetensors").exists()


def test_checkpoint_fault_names_the_file(finished, tmp_path):
    good = finished / "checkpoints" / "step-000006"
    assert checkpoint_fault(good) is None
    cases = {
        "trainer_state.json": (b"{\"step\": ", "not valid JSON"),
        "trainable.safetensors": (None, "trainable.safetensors"),
        "scheduler.pt": (b"not a pickle", "cannot be read safely as tensors"),
        "rng_state.json": (b"[]", "RNG state of process 0"),
    }
    for name, (content, needle) in cases.items():
        broken = tmp_path / name
        shutil.copytree(good, broken)
        file = broken / name
        file.write_bytes(content if content is not None else file.read_bytes()[:-40])
        fault = checkpoint_fault(broken)
        assert fault is not None and fault[0] in (name, "rng_state.json") and needle in " ".join(fault), (name, fault)


def test_trainer_state_is_checked_field_by_field(finished, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(finished / "checkpoints" / "step-000006", folder)
    for text, needle in [
        ("[1]", "holds list, not a JSON object"),
        ('{"epoch": 0, "batches": 0}', "'step' is missing"),
        ('{"step": "six", "epoch": 0, "batches": 0}', "'step' must be a number at least 0, got 'six'"),
        ('{"step": -1, "epoch": 0, "batches": 0}', "'step' must be a number at least 0"),
    ]:
        (folder / "trainer_state.json").write_text(text)
        with pytest.raises(PeftrunError, match=needle):
            read_position(folder)
    (folder / "trainer_state.json").write_text('{"step": 6, "epoch": 0, "batches": 6, "loss_sum": 1.5}')
    assert read_position(folder).step == 6


def test_resume_falls_back_from_a_corrupt_newest_checkpoint(work, finished, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "checkpoints" / "step-000006" / "trainer_state.json").write_text('{"step": 6, "epo')
    train(recipe_for(work, out), resume=True)
    lines = capsys.readouterr().out.splitlines()
    warning = [line for line in lines if "corrupt" in line]
    assert warning == [
        "checkpoint step-000006 is corrupt (trainer_state.json: not valid JSON (Unterminated string starting at: "
        "line 1 column 13 (char 12))); resuming from step-000004"
    ], lines
    assert any(line.startswith(f"resuming from {out / 'checkpoints' / 'step-000004'} (step 4") for line in lines)
    assert (out / "adapter_model.safetensors").is_file()  # the run finished from step 4
    assert checkpoint_fault(out / "checkpoints" / "step-000006") is None  # rewritten whole by the resumed run


def test_resume_with_no_usable_checkpoint_names_the_bad_file(work, finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    for step in ("step-000004", "step-000006"):
        weights = out / "checkpoints" / step / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(PeftrunError) as info:
        train(recipe_for(work, out), resume=True)
    message = info.value.render()
    bad = out / "checkpoints" / "step-000006" / "trainable.safetensors"
    assert message.startswith(f"{bad}: checkpoint step-000006 is corrupt (")
    assert "no earlier checkpoint is usable; the 1 before it are corrupt too" in message
