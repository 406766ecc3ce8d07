"""The one error type a user sees: what is wrong, where, and what to do about it.

Every message leaves through `mask_secrets`: a credential (a hub token by its shape, or the value of a
credential variable in the environment) is never printed back, whatever position it had in the input.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable

# Keys under which a credential hides; a recipe is refused when it has one, a saved file never keeps one.
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
# Environment variables whose values are credentials: those values are masked wherever they appear.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_API_TOKEN")
# A Hugging Face token by its shape (hf_ and 30+ letters and digits; the older api_org_ ones too), also
# glued to other text (a folder name, a key with a suffix): no word boundaries asked.
TOKEN_SHAPE = re.compile(r"(?:hf_|api_org_)[A-Za-z0-9]{30,}")
REDACTED = "<redacted>"


def _env_secrets() -> list[str]:
    values = {v for k in SECRET_ENV if (v := os.environ.get(k)) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)  # the longer first, so a value inside another goes with it


def looks_secret(value: str) -> bool:
    """A hub token by its shape, or the value of a credential in the environment."""
    return bool(TOKEN_SHAPE.search(value)) or any(s in value for s in _env_secrets())


_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def mask_secrets(text: str) -> str:
    """`text` with every credential replaced by <redacted>.

    A token-shaped match takes the whole word around it (letters, digits, _ and -), so that no part
    of a token glued to other text, or to another token, is left behind.
    """
    for secret in _env_secrets():
        text = text.replace(secret, REDACTED)
    spans: list[list[int]] = []
    for match in TOKEN_SHAPE.finditer(text):
        start, end = match.span()
        while start > 0 and text[start - 1] in _WORD:
            start -= 1
        while end < len(text) and text[end] in _WORD:
            end += 1
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    for start, end in reversed(spans):
        text = text[:start] + REDACTED + text[end:]
    return text


def one_line(text: str) -> str:
    """A message as one line: line breaks a library put in become ' / '."""
    return " / ".join(part.strip() for part in str(text).splitlines() if part.strip())


class PeftrunError(Exception):
    """A user mistake or an unusable input. The CLI prints it in one line and exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        """The printed form: one line, credentials masked (the only way a message reaches a user)."""
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return mask_secrets(one_line(text))


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest choice to a misspelt word, phrased as a hint, or None."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
