"""A self-contained package: the wheel carries the architecture configs, example recipes, their data and the
schema; installed from the wheel alone (no source tree), `peftrun params` counts a seed recipe offline."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

from peftrun import bundled

MT0 = "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed (--no-deps) into a folder of its own; its dependencies are
    the ones of the environment running the tests."""
    root = tmp_path_factory.mktemp("wheel")
    # the build backend already here when there is one (no download); else pip's isolated build
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", *isolation, "-w", str(root / "dist")],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (root / "dist").glob("peftrun-*.whl")
    target = root / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    return wheel, target, root


def run_installed(target, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "peftrun", *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env,
    )


def test_the_wheel_holds_configs_recipes_data_and_schema(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in [*bundled.MODELS.glob("*.json"), *bundled.RECIPES.rglob("*.yaml"), bundled.SCHEMA,
                 *(p for p in bundled.DATA.rglob("*") if p.suffix in (".csv", ".jsonl"))]:
        inside = "peftrun/bundled/" + path.relative_to(bundled.ROOT).as_posix()
        assert inside in names, inside


def test_installed_wheel_counts_a_seed_recipe_from_another_folder(installed, tmp_path):
    _, target, _ = installed
    probe = subprocess.run(
        [sys.executable, "-c", "import peftrun.bundled as b; print(b.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert probe.stdout.startswith(str(target)), probe.stdout  # the installed copy, not this checkout
    recipe = target / "peftrun" / "bundled" / "recipes" / "mt0_large_lora.yaml"
    result = run_installed(target, "params", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == MT0
    # a pip user copies an example out and uses it where they are
    copied = run_installed(target, "recipes", "copy", "mt0_large_lora", cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "mt0_large_lora.yaml").is_file()
    first = (tmp_path / "mt0_large_lora.yaml").read_text().splitlines()[0]
    assert first == f"# yaml-language-server: $schema={(target / 'peftrun/bundled/schema/recipe.schema.json').as_uri()}"


def test_recipes_lists_and_copies_with_data(tmp_path):
    from conftest import run_cli

    listed = run_cli("recipes", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == [r.name for r in bundled.recipes()] and "quickstart" in names and "offline/minilm_mrpc_lora" in names
    out = tmp_path / "mine"
    out.mkdir()
    copied = run_cli("recipes", "copy", "quickstart", str(out), cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert (out / "quickstart.yaml").read_text().splitlines()[1:] == (
        (REPO / "recipes" / "quickstart.yaml").read_text().splitlines()[1:]
    )
    assert (out / "data" / "quickstart" / "train.csv").read_bytes() == (REPO / "data/quickstart/train.csv").read_bytes()
    valid = run_cli("validate", "quickstart.yaml", cwd=out)
    assert valid.returncode == 0, valid.stderr
    again = run_cli("recipes", "copy", "quickstart", str(out), cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    unknown = run_cli("recipes", "copy", "quikstart", cwd=tmp_path)
    assert unknown.returncode == 2 and "did you mean 'quickstart'" in unknown.stderr
