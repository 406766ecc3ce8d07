"""Chat templates and what a conversation trains: the one place where turns become text and token ids.

A template is the tokenizer's own (data.chat_template unset), one of TEMPLATES for base models that have none,
or a Jinja file. Which tokens are trained is derived by rendering the conversation prefix by prefix: an
assistant turn runs from where the conversation rendered up to it with the generation prompt ends, to where the
conversation rendered through it ends, less the whitespace a template writes between turns; these character
spans of the whole text become tokens through the tokenizer's offsets (a token overlapping a span is trained),
or, for a tokenizer without offsets, by comparing the token ids of each prefix with the whole. So each
trained turn is its content and its end-of-turn token, whatever the template's markup, and nothing of system,
user or tool turns. `train_on` chooses the turns:

- all_assistant (default): every assistant turn;
- last_assistant: the last one only (earlier answers are context);
- completion: the row as a prompt and a completion, as trl's completion-only loss: everything the template
  writes after the prompt (the conversation before the last answer, with the generation prompt) is trained,
  the whitespace after the end-of-turn included.

Where the template writes no end-of-sequence token in the last trained turn, the tokenizer's EOS is appended
to it and trained: a model that never sees one never learns to stop.
"""

from __future__ import annotations

import bisect
import functools
from pathlib import Path

from peftrun.errors import PeftrunError, did_you_mean

TRAIN_ON = ("all_assistant", "last_assistant", "completion")

# Named templates for models without one. Each renders any role its format has a place for and refuses others;
# `eos_token`/`bos_token` are the tokenizer's (apply_chat_template passes them in).
TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token or '' }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + (eos_token or '') + '\n\n' }}"
        "{% else %}{{ raise_exception('the alpaca template has no place for a ' + m['role'] + ' turn') }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "plain": (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}"
        "{{ '\n' }}{% endfor %}"
    ),
}


# ------------------------------------------------------------------ templates


def template_text(tokenizer, data_cfg) -> str:
    """The Jinja text of the recipe's chat template (data.chat_template: unset, a name, or a file)."""
    choice = getattr(data_cfg, "chat_template", None)
    if not choice:
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise PeftrunError(
                "format: chat needs a chat template, and this tokenizer has none",
                where="data.chat_template",
                hint=f"name one for a base model ({', '.join(TEMPLATES)}) or a Jinja file; or use format: alpaca",
            )
        return own if isinstance(own, str) else own.get("default", next(iter(own.values())))
    if choice in TEMPLATES:
        return TEMPLATES[choice]
    if not is_template_file(choice):
        close = did_you_mean(choice, TEMPLATES)
        raise PeftrunError(
            f"unknown chat template '{choice}'",
            where="data.chat_template",
            hint=(f"{close} " if close else "")
            + f"use one of {', '.join(TEMPLATES)}, a .jinja file, or leave it unset for the tokenizer's own",
        )
    return _read_template(str(Path(choice).resolve()))


@functools.lru_cache(maxsize=8)
def _read_template(path: str) -> str:
    """A template file, read once per process (every row renders it several times)."""
    if not Path(path).is_file():
        raise PeftrunError(f"chat template file {path} does not exist", where="data.chat_template")
    return Path(path).read_text(encoding="utf-8")


def is_template_file(choice: str) -> bool:
    """A chat_template value names a file when it has a path separator or a Jinja suffix."""
    return "/" in choice or "\\" in choice or choice.endswith((".jinja", ".jinja2", ".j2"))


def render(tokenizer, data_cfg, messages: list[dict], generation_prompt: bool) -> str:
    """The conversation as text through the recipe's template; a template that fails says so in one line."""
    from jinja2 import TemplateError

    template = template_text(tokenizer, data_cfg)
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except (TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
        roles = "/".join(dict.fromkeys(m["role"] for m in messages))
        raise PeftrunError(
            f"the chat template cannot render a conversation of {roles} turns: {exc}",
            where="data.chat_template",
            hint="check the template (a Jinja file renders with `messages`, `add_generation_prompt`, `eos_token`), "
            "or pick another one",
        ) from None


def adopt_template(tokenizer, data_cfg) -> None:
    """Make the recipe's chat template the tokenizer's own, so the tokenizer saved beside an adapter carries the
    template it was trained with (generate, chat and other tools then prompt as training did)."""
    if getattr(data_cfg, "format", None) == "chat" and getattr(data_cfg, "chat_template", None):
        tokenizer.chat_template = template_text(tokenizer, data_cfg)


# ------------------------------------------------------------------ which tokens are trained


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # a chat template writes its own specials


def _shared(a: list[int], b: list[int]) -> int:
    """How many leading ids a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokens(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """The text's ids and each character span as token indices [first, stop): the tokens that overlap it, through
    the tokenizer's offsets (a token the template's markup shares with the content is trained), or, for a
    tokenizer without offsets, by counting the ids that the text up to each end shares with the whole."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts, ends = zip(*enc["offset_mapping"]) if enc["input_ids"] else ((), ())
    except (NotImplementedError, TypeError, KeyError, ValueError):
        ids = _encode(tokenizer, text)
        return ids, [tuple(_shared(_encode(tokenizer, text[:pos]), ids) for pos in span) for span in spans]
    return enc["input_ids"], [(bisect.bisect_right(ends, a), bisect.bisect_left(starts, b)) for a, b in spans]


def conversation_tokens(messages: list[dict], tokenizer, data_cfg) -> tuple[list[int], list[bool], int]:
    """(ids, trained, answer_start) for a conversation ending with an assistant turn: `trained[i]` says whether
    ids[i] is learned (see the module docstring), `answer_start` is where the last answer's tokens begin (what
    precedes it is the prompt a generating model is given in evaluation)."""
    train_on = getattr(data_cfg, "train_on", "all_assistant")
    full = render(tokenizer, data_cfg, messages, False)
    _check_placed(messages, full)
    last = len(messages) - 1
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on != "all_assistant":
        turns = turns[-1:]
    if not turns:
        raise PeftrunError("a conversation has no assistant turn to learn", where="data")
    chars = []  # each trained turn as a character span of the full text
    for i in turns:
        before = render(tokenizer, data_cfg, messages[:i], True)
        through = full if i == last else render(tokenizer, data_cfg, messages[: i + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise PeftrunError(
                "the chat template renders earlier turns differently as the conversation grows, so which tokens "
                "are an assistant turn cannot be told",
                where="data.chat_template",
                hint="train_on: last_assistant (or completion) needs only the last turn to render as a prefix",
            )
        # the turn ends at its end-of-turn token, not the newline a template writes after it
        chars.append((len(before), len(through if train_on == "completion" else through.rstrip())))
    ids, spans = _tokens(tokenizer, full, chars)
    trained = [False] * len(ids)
    start, end = spans[-1]
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in ids[start:end] and turns[-1] == last:
        ids, trained = ids[:end] + [eos], trained[:end] + [False]  # no EOS in the answer: add it, drop what followed
        spans[-1] = (start, end + 1)
    for a, b in spans:
        trained[a:b] = [True] * (b - a)
    return ids, trained, spans[-1][0]


def _check_placed(messages: list[dict], full: str) -> None:
    """A template that silently drops a turn (a role it does not know) would train on a different conversation.
    Assistant turns are left to the prefix check: a template may rewrite earlier answers (strip reasoning)."""
    for m in messages:
        content = m.get("content")
        if m["role"] != "assistant" and isinstance(content, str) and content.strip() and content.strip() not in full:
            raise PeftrunError(
                f"the chat template leaves out a '{m['role']}' turn (its text is not in the rendered conversation)",
                where="data.chat_template",
                hint="use a template that has a place for that role (chatml and llama-3 take any role), "
                "or leave such turns out of the data",
            )
