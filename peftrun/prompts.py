"""What a row says to the model: the input text (template, alpaca, chat turns), the answer
(verbalised label, output column, last assistant turn), and which columns each of those reads.
Chat turns become text and trained tokens in chat.py."""

from __future__ import annotations

import string
from typing import Any

from peftrun.chat import render
from peftrun.errors import PeftrunError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
# ShareGPT-style speaker names, as LLaMA-Factory and axolotl read them, and OpenAI's roles: a tool's result
# (OpenAI's tool/function, ShareGPT's observation) is a tool turn; ShareGPT's function_call is the assistant's
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
# what an OpenAI-style turn carries besides role and content, passed through to the template as it is
TURN_EXTRAS = ("name", "tool_calls", "tool_call_id")
# Anthropic HH's dialogue markers: "\n\nHuman: a\n\nAssistant: b..."
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
# where format: chat finds conversations: data.messages_column, else ShareGPT's `conversations`
SHAREGPT_COLUMN = "conversations"

# pre-split words and their tags (token classification): rows of a json/csv/parquet file, or a CoNLL file
TOKEN_FORMATS = ("tokens", "conll")


# ------------------------------------------------------------------ columns


def _template_fields(template: str | None) -> list[str]:
    if not template:
        return []
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def source_columns(data_cfg, ds=None) -> list[str]:
    """Columns a row needs for its input text."""
    if data_cfg.format in ("preference", "prompts"):
        return []  # every shape of pair or prompt row is checked where it is read (peftrun/preference.py)
    if data_cfg.format == "alpaca":
        return ["instruction"]
    if data_cfg.format in TOKEN_FORMATS:
        return [data_cfg.tokens_column]
    if data_cfg.format == "text":
        return [data_cfg.text_column]
    if data_cfg.format == "chat" and _is_conversation(ds, data_cfg):
        return [conversation_column(ds.column_names, data_cfg)]
    if data_cfg.format == "chat" and _is_alpaca_shaped(ds, data_cfg):
        return ["instruction"]
    if data_cfg.template:
        cols = _template_fields(data_cfg.template)
    else:
        cols = [data_cfg.text_column]
    if data_cfg.text_pair_column:
        cols.append(data_cfg.text_pair_column)
    return cols


def target_columns(data_cfg, ds=None) -> list[str]:
    """Columns a row needs for its label or answer."""
    if data_cfg.format in ("preference", "prompts"):
        return []
    if data_cfg.format == "alpaca" or (data_cfg.format == "chat" and _is_alpaca_shaped(ds, data_cfg)):
        return ["output"]
    if data_cfg.format in TOKEN_FORMATS:
        return [data_cfg.tags_column]
    if data_cfg.format == "text" or (data_cfg.format == "chat" and _is_conversation(ds, data_cfg)):
        return []
    if data_cfg.target_template:
        return _template_fields(data_cfg.target_template)
    return [data_cfg.label_column]


def conversation_column(columns, data_cfg) -> str | None:
    """The column holding a row's turns: data.messages_column, else `conversations` (ShareGPT) when
    messages_column is left at its default; None when the row has neither."""
    if data_cfg.messages_column in columns:
        return data_cfg.messages_column
    if data_cfg.messages_column == "messages" and SHAREGPT_COLUMN in columns:
        return SHAREGPT_COLUMN
    return None


def _is_conversation(ds, data_cfg) -> bool:
    return ds is not None and conversation_column(ds.column_names, data_cfg) is not None


def _is_alpaca_shaped(ds, data_cfg) -> bool:
    if ds is None or _is_conversation(ds, data_cfg):
        return False
    return "instruction" in ds.column_names and not data_cfg.template


# ------------------------------------------------------------------ text


def verbalize(value: Any, data_cfg) -> str:
    """A raw label as text: `1` -> `complaint` through the verbaliser; text labels pass through."""
    text = str(value)
    if data_cfg.verbalizer:
        return data_cfg.verbalizer.get(text, text)
    return text


def label_strings(data_cfg) -> list[str] | None:
    """The label texts a generating model may answer with (the verbaliser's values, else label_names)."""
    if data_cfg.verbalizer:
        return list(dict.fromkeys(data_cfg.verbalizer.values()))
    if data_cfg.label_names and data_cfg.format in ("plain", "chat") and not data_cfg.target_template:
        return list(data_cfg.label_names)
    return None


def _fill(template: str, row: dict) -> str:
    try:
        return template.format_map(row)
    except KeyError as exc:
        raise PeftrunError(
            f"the template names column {exc} that the data does not have", where="data"
        ) from None


def user_text(row: dict, data_cfg) -> str:
    """The input as one text: the template filled in, or the text column."""
    if data_cfg.template:
        return _fill(data_cfg.template, row)
    return str(row[data_cfg.text_column])


def _alpaca_user(row: dict) -> str:
    inp = str(row.get("input") or "").strip()
    return str(row["instruction"]).strip() + (f"\n\n{inp}" if inp else "")


def target_text(row: dict, data_cfg) -> str:
    """The answer a generating model should produce (also the reference in evaluation)."""
    column = conversation_column(row, data_cfg) if data_cfg.format == "chat" else None
    if data_cfg.format == "alpaca" or (
        data_cfg.format == "chat" and "instruction" in row and not data_cfg.template and column is None
    ):
        return str(row["output"])
    if column is not None:
        return str(_conversation(row, data_cfg)[-1]["content"])
    if data_cfg.target_template:
        return _fill(data_cfg.target_template, row)
    return verbalize(row[data_cfg.label_column], data_cfg)


def _conversation(row: dict, data_cfg, need_answer: bool = True) -> list[dict[str, Any]]:
    """OpenAI-style (role/content, with tool calls) or ShareGPT-style (from/value) turns, or an HH dialogue text
    ("\\n\\nHuman: ...\\n\\nAssistant: ..."), as role/content dicts."""
    column = conversation_column(row, data_cfg) or data_cfg.messages_column
    where = f"data.{column}"
    value = row.get(column) or []
    if isinstance(value, str):  # a whole HH dialogue in one text
        value = parse_hh(value)
        if not value:
            raise PeftrunError("a conversation given as text must be an HH dialogue (Human:/Assistant: turns)",
                               where=where)
    turns = [read_turn(turn, where) for turn in value]
    if need_answer and (not turns or turns[-1]["role"] != "assistant"):
        raise PeftrunError("a conversation must end with an assistant turn (the answer to learn)", where=where)
    return turns


def read_turn(turn: Any, where: str) -> dict[str, Any]:
    """One OpenAI (role/content, tool calls passed through) or ShareGPT (from/value) turn as a role/content dict."""
    if not isinstance(turn, dict):
        raise PeftrunError(f"a conversation turn must be a mapping with role/content, not {turn!r:.60}", where=where)
    role = turn.get("role") or turn.get("from")
    content = turn.get("content") if turn.get("content") is not None else turn.get("value")
    if role not in ROLES:
        raise PeftrunError(
            f"unknown speaker '{role}' in a conversation" if role else "a conversation turn has no role (or from)",
            where=where,
            hint=f"use one of {', '.join(ROLES)}",
        )
    extras = {k: turn[k] for k in TURN_EXTRAS if turn.get(k) is not None}
    if content is None and not extras:
        raise PeftrunError(f"a '{role}' turn has no content (or value)", where=where)
    return {"role": ROLES[role], "content": "" if content is None else str(content), **extras}


def parse_hh(text: str) -> list[dict[str, str]]:
    """HH's "\\n\\nHuman: a\\n\\nAssistant: b..." as turns."""
    turns: list[dict[str, str]] = []
    rest = text
    while rest:
        h, a = rest.find(HUMAN), rest.find(ASSISTANT)
        starts = [(i, m) for i, m in ((h, HUMAN), (a, ASSISTANT)) if i >= 0]
        if not starts:
            break
        i, marker = min(starts)
        if turns and i > 0:
            turns[-1]["content"] += rest[:i]
        rest = rest[i + len(marker) :]
        turns.append({"role": "user" if marker == HUMAN else "assistant", "content": ""})
        nxt = [j for j in (rest.find(HUMAN), rest.find(ASSISTANT)) if j >= 0]
        end = min(nxt) if nxt else len(rest)
        turns[-1]["content"] = rest[:end]
        rest = rest[end:]
    for turn in turns:
        turn["content"] = turn["content"].strip()
    return turns


def chat_messages(row: dict, data_cfg, with_answer: bool) -> list[dict[str, Any]]:
    """The row as chat turns: a conversation column, an alpaca row, or the template as the user turn; the
    recipe's system prompt first where the row has none."""
    if conversation_column(row, data_cfg) is not None:
        turns = _conversation(row, data_cfg, need_answer=with_answer)
        if not with_answer and turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
    else:
        text = (
            _alpaca_user(row) if "instruction" in row and not data_cfg.template else user_text(row, data_cfg)
        )
        turns = [{"role": "user", "content": text}]
        if with_answer:
            turns.append({"role": "assistant", "content": target_text(row, data_cfg)})
    if data_cfg.system_prompt and (not turns or turns[0]["role"] != "system"):
        turns.insert(0, {"role": "system", "content": data_cfg.system_prompt})
    return turns


def source_text(row: dict, data_cfg, tokenizer=None) -> str:
    """The model's input text for one row."""
    if data_cfg.format == "alpaca":
        inp = str(row.get("input") or "").strip()
        return ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if inp else "",
            instruction=str(row["instruction"]).strip(),
            input_block=f"### Input:\n{inp}\n\n" if inp else "",
        )
    if data_cfg.format == "chat":
        return render(tokenizer, data_cfg, chat_messages(row, data_cfg, with_answer=False), True)
    return user_text(row, data_cfg)
