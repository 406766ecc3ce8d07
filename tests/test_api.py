"""The Python API: the documented example runs as written; several adapters on one base never mix;
`import peftrun` stays light."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from adapter_kit import load_base, logits, save_lm, save_lora
from conftest import REPO

import peftrun
from peftrun.api import name_adapters, parse_adapter_spec
from peftrun.errors import PeftrunError

DOC = REPO / "docs" / "using_adapters.md"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    base = save_lm(root / "base")
    return {
        "root": root,
        "base": base,
        "a": save_lora(base, root / "a", seed=1),
        "b": save_lora(
            base, root / "b", seed=2, r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        ),
    }


def batch():
    ids = torch.randint(3, 384, (2, 9), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_the_documented_example_runs(lm, tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    folders = re.findall(r'"(out/[\w./-]+)"', code)
    assert "out/smollm2_alpaca_lora_demo" in folders
    monkeypatch.chdir(tmp_path)
    for i, folder in enumerate(sorted(set(folders) - {"out/blend"})):  # stand-ins: tiny adapters, same names
        save_lora(lm["base"], tmp_path / folder, seed=10 + i)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    model, answers, prompt = namespace["model"], namespace["answers"], namespace["prompt"]
    assert list(model.configs) == ["alpaca", "blend"]  # "code" was deleted at the end
    # the mixed batch gave each row what its adapter alone gives
    alone = [
        peftrun.generate(model, prompt, adapters=[n], max_new_tokens=16)[0] for n in ("alpaca", "blend", None)
    ]
    assert answers == alone and len(set(answers)) == 3
    assert (tmp_path / "out" / "blend" / "adapter_config.json").is_file()


def test_switching_back_and_forth_is_bit_identical_and_equals_each_alone(lm):
    both = peftrun.load(adapters={"a": lm["a"], "b": lm["b"]}, device="cpu")
    assert both.active_adapter == "a"
    first_a = logits(both, batch())
    both.set_adapter("b")
    first_b = logits(both, batch())
    for _ in range(2):
        both.set_adapter("a")
        assert torch.equal(logits(both, batch()), first_a)
        both.set_adapter("b")
        assert torch.equal(logits(both, batch()), first_b)
    assert (first_a - first_b).abs().max() > 1e-3
    only_a = peftrun.load(adapters=lm["a"], device="cpu")
    only_b = peftrun.load(adapters=lm["b"], device="cpu")
    assert torch.equal(logits(only_a, batch()), first_a) and torch.equal(logits(only_b, batch()), first_b)
    # disabled: the base model itself, and the active adapter is back afterwards
    with both.disable_adapters():
        assert torch.equal(logits(both, batch()), logits(load_base(lm["base"], "CAUSAL_LM"), batch()))
    assert torch.equal(logits(both, batch()), first_b)
    # deleting one leaves the other as it was
    both.delete_adapter("b")
    assert both.active_adapter == "a" and list(both.configs) == ["a"]
    assert torch.equal(logits(both, batch()), first_a)
    with pytest.raises(PeftrunError, match="no adapter named 'b'"):
        both.set_adapter("b")
    assert not any("lora_A.b" in n for n, _ in both.named_parameters())


def test_load_refusals_leave_the_model_as_it_was(lm, tmp_path):
    model = peftrun.load(adapters={"a": lm["a"]}, device="cpu")
    before = logits(model, batch())
    other = save_lm(tmp_path / "wide", hidden_size=48, intermediate_size=96)
    wrong = save_lora(other, tmp_path / "wrong", seed=3)
    with pytest.raises(PeftrunError, match="does not fit this base model"):
        model.load_adapter(wrong, "wrong")
    assert list(model.configs) == ["a"] and model.active_adapter == "a"
    assert torch.equal(logits(model, batch()), before)
    with pytest.raises(PeftrunError, match="already loaded"):
        model.load_adapter(lm["b"], "a")
    with pytest.raises(PeftrunError, match="was trained on"):
        peftrun.load(adapters={"a": lm["a"], "wrong": wrong})
    t5 = save_lora(save_lm(tmp_path / "t5", "t5", "SEQ_2_SEQ_LM"), tmp_path / "t5a", "SEQ_2_SEQ_LM", seed=1)
    with pytest.raises(PeftrunError, match="trained for SEQ_2_SEQ_LM"):
        model.load_adapter(t5, "t5")


def test_base_alone_then_adapters_added(lm):
    model = peftrun.load(str(lm["base"]), device="cpu")
    assert model.active_adapter is None and model.tokenizer is not None
    base_out = logits(model, batch())
    model.load_adapter(lm["a"], "a")
    assert torch.equal(logits(model, batch()), logits(peftrun.load(adapters=lm["a"], device="cpu"), batch()))
    with model.disable_adapters():
        assert torch.equal(logits(model, batch()), base_out)


def test_adapter_specs():
    assert parse_adapter_spec("out/a") == (None, "out/a", None)
    assert parse_adapter_spec("a=out/a") == ("a", "out/a", None)
    assert parse_adapter_spec("a=out/a:0.7", with_weight=True) == ("a", "out/a", 0.7)
    assert parse_adapter_spec("out/x=y:-1", with_weight=True) == (None, "out/x=y", -1.0)
    assert name_adapters(["out/a"]) == {"default": peftrun_path("out/a")}
    assert list(name_adapters(["out/a", "b=out/c"])) == ["a", "b"]
    with pytest.raises(PeftrunError, match="two adapters are named 'a'"):
        name_adapters(["a=x", "a=y"])


def peftrun_path(p):
    from pathlib import Path

    return Path(p)


def test_import_peftrun_stays_light_and_the_api_resolves():
    code = (
        "import sys, peftrun\n"
        "assert 'torch' not in sys.modules, 'torch imported by import peftrun'\n"
        "import peftrun.combination, peftrun.generation\n"
        "assert callable(peftrun.combine) and callable(peftrun.generate) and callable(peftrun.load)\n"
        "print(peftrun.combine.__module__, peftrun.generate.__module__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["peftrun.api", "peftrun.api"]
