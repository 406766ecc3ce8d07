"""README's figures that a command prints are what that command prints today."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, run_cli
from typer.testing import CliRunner

from peftrun.cli import app

README = (REPO / "README.md").read_text()


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def estimate_rows(recipe: str) -> dict[str, dict[str, str]]:
    """`peftrun estimate RECIPE --gpu-gb 80` as {setting: {column: cell}}, from a fresh process as a user runs it
    (its CPU row counts the estimating process's own memory, which a test process would inflate)."""
    proc = run_cli("estimate", f"recipes/{recipe}", "--gpu-gb", "80", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if "setting" in line)
    columns = [c.strip() for c in header.strip("┃ ").split("┃")]
    rows = {}
    for line in lines:
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│ ").split("│")]
            rows[cells[0]] = dict(zip(columns, cells))
    return rows


def readme_table() -> dict[tuple[str, str], str]:
    """The estimate table in README: {(model, setting): the `peftrun estimate` cell}."""
    start = README.index("| model | setting | seed | `peftrun estimate` | error |")
    table = {}
    for line in README[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        model, setting, _, ours, _ = [c.strip() for c in line.strip("|").split("|")]
        table[(model, setting)] = ours
    return table


def test_readme_estimate_table_is_what_estimate_prints():
    t0, mt0, bloomz = (estimate_rows(r) for r in ("t0_3b_lora_twitter.yaml", "mt0_xxl_lora.yaml", "bloomz_7b1_lora.yaml"))
    zero3 = "lora + ZeRO-3 CPU offload"
    expected = {
        ("T0_3B", "full fine-tuning, GPU"): t0["full fine-tuning"]["GPU"],
        ("T0_3B", "LoRA, GPU"): t0["lora"]["GPU"],
        ("T0_3B", "LoRA + ZeRO-3 offload, GPU"): t0[zero3]["GPU"],
        ("T0_3B", "LoRA + ZeRO-3 offload, CPU"): t0[zero3]["CPU"],
        ("mt0-xxl", "LoRA, GPU"): mt0["lora"]["GPU"],
        ("bloomz-7b1", "LoRA, GPU"): bloomz["lora"]["GPU"],
        ("mt0-xxl, bloomz-7b1", "full fine-tuning on 80 GB"): (
            f"{mt0['full fine-tuning']['GPU']}, {bloomz['full fine-tuning']['GPU']}: "
            f"{mt0['full fine-tuning']['on 80 GB']}"
        ),
    }
    assert bloomz["full fine-tuning"]["on 80 GB"] == "OOM"
    shown = readme_table()
    # the ZeRO-3 CPU figure holds the estimating process's own memory, which moves by a few MB between runs
    cpu = ("T0_3B", "LoRA + ZeRO-3 offload, CPU")
    assert abs(float(shown.pop(cpu).split()[0]) - float(expected.pop(cpu).split()[0])) <= 0.1
    assert shown == expected


def test_readme_params_lines_are_what_params_prints(minilm_path):
    shown = re.search(r"`peftrun params recipes/mt0_large_lora.yaml` prints.*?```\n(.*?)\n```", README, re.S)
    assert shown.group(1) == run("params", "recipes/mt0_large_lora.yaml").strip()
    quickstart = re.search(r"## The quickstart.*?```\n(trainable params: [^\n]*)", README, re.S).group(1)
    assert quickstart == run("params", "recipes/quickstart.yaml").strip()


@pytest.mark.parametrize("line", re.findall(r"^peftrun params +(\S+)", README, re.M))
def test_every_params_command_in_the_readme_runs(line):
    assert run("params", line).startswith("trainable params: ")
