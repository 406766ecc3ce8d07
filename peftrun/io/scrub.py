"""Credentials never reach a saved file: credential-like keys are dropped and token-like values redacted."""

from __future__ import annotations

import os
import re
from typing import Any

# keys that never reach a saved file: credentials a user may have put in the environment or a recipe.
SECRET_KEYS = (
    "token",
    "hf_token",
    "hub_token",
    "use_auth_token",
    "auth_token",
    "access_token",
    "api_key",
    "password",
    "secret",
)
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_API_TOKEN")
TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")


def _env_secrets() -> set[str]:
    return {v for k in SECRET_ENV if (v := os.environ.get(k)) and len(v) >= 8}


def looks_secret(value: str) -> bool:
    """A hub token by its shape, or the value of a credential in the environment."""
    return bool(TOKEN_SHAPE.search(value)) or any(s in value for s in _env_secrets())


def scrub(data: Any) -> Any:
    """Drop credential-like keys and token-like values from anything about to be written."""
    if isinstance(data, dict):
        return {k: scrub(v) for k, v in data.items() if str(k).lower() not in SECRET_KEYS}
    if isinstance(data, list):
        return [scrub(v) for v in data]
    if isinstance(data, str) and looks_secret(data):
        return "<redacted>"
    return data
