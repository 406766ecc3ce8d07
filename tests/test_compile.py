"""training.compile: torch.compile of the base model's forward gives the plain run's numbers.

Dropout is off so that both runs draw the same (no) masks: the compiled run traces the plain LoRA modules,
the eager run takes the fused path of lora_kernels.py. The fast test compiles with AOT autograd's eager
backend (dynamo and the joint graph, no code generation); the slow one with inductor.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from safetensors.torch import load_file
from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows


def _run(root, name: str, compile_: bool | str) -> tuple[list[float], dict]:
    out = root / name
    data = tiny_recipe_dict(root / "tiny-bert-cls", root / "data", out, num_epochs=1, compile=compile_)
    data["method"]["lora_dropout"] = 0.0
    proc = run_cli("train", str(write_recipe(root / f"{name}.yaml", data)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [
        r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    return losses, load_file(str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    tiny_model_dir(root)
    write_rows(root / "data" / "train.csv", 40)
    write_rows(root / "data" / "validation.csv", 12)
    return root


def _compare(root, backend):
    plain_losses, plain = _run(root, "plain", False)
    losses, adapter = _run(root, f"compiled-{backend}", backend)
    assert len(losses) == len(plain_losses) == 10
    assert losses == pytest.approx(plain_losses, abs=1e-5)
    assert adapter.keys() == plain.keys()  # compiled in place: no _orig_mod in the names
    assert max((adapter[k] - plain[k]).abs().max().item() for k in plain) <= 1e-5


def test_compiled_training_equals_the_plain_run(root):
    _compare(root, "aot_eager")


@pytest.mark.slow
def test_inductor_training_equals_the_plain_run(root):
    _compare(root, True)


def test_unknown_backend_is_a_recipe_error(root, tmp_path):
    data = tiny_recipe_dict(root / "tiny-bert-cls", root / "data", tmp_path / "o", compile="tensorrt")
    proc = run_cli("validate", str(write_recipe(tmp_path / "r.yaml", data)))
    assert proc.returncode == 2 and "training.compile" in proc.stderr, proc.stderr
