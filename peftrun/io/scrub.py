"""Credentials never reach a saved file: credential-like keys are dropped and token-like values redacted.
What counts as a credential is defined once, in peftrun.errors (which masks them in messages too)."""

from __future__ import annotations

from typing import Any

from peftrun.errors import SECRET_ENV, SECRET_KEYS, TOKEN_SHAPE, looks_secret

__all__ = ["SECRET_ENV", "SECRET_KEYS", "TOKEN_SHAPE", "looks_secret", "scrub"]


def scrub(data: Any) -> Any:
    """Drop credential-like keys and token-like values from anything about to be written."""
    if isinstance(data, dict):
        return {k: scrub(v) for k, v in data.items() if str(k).lower() not in SECRET_KEYS}
    if isinstance(data, list):
        return [scrub(v) for v in data]
    if isinstance(data, str) and looks_secret(data):
        return "<redacted>"
    return data
