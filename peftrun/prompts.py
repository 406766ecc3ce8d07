"""What a row says to the model: the input text (template, alpaca, chat template), the answer
(verbalised label, output column, last assistant turn), and which columns each of those reads."""

from __future__ import annotations

import string
from typing import Any

from peftrun.errors import PeftrunError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
# ShareGPT-style speaker names, as LLaMA-Factory and axolotl read them
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}

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
        return [data_cfg.messages_column]
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


def _is_conversation(ds, data_cfg) -> bool:
    return ds is not None and data_cfg.messages_column in ds.column_names


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
    if data_cfg.format == "alpaca" or (
        data_cfg.format == "chat"
        and "instruction" in row
        and not data_cfg.template
        and data_cfg.messages_column not in row
    ):
        return str(row["output"])
    if data_cfg.format == "chat" and data_cfg.messages_column in row:
        return str(_conversation(row, data_cfg)[-1]["content"])
    if data_cfg.target_template:
        return _fill(data_cfg.target_template, row)
    return verbalize(row[data_cfg.label_column], data_cfg)


def _conversation(row: dict, data_cfg, need_answer: bool = True) -> list[dict[str, str]]:
    """OpenAI-style (role/content) or ShareGPT-style (from/value) turns as role/content dicts."""
    turns = []
    for turn in row[data_cfg.messages_column] or []:
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            raise PeftrunError(
                f"unknown speaker '{role}' in a conversation",
                where=f"data.{data_cfg.messages_column}",
                hint=f"use one of {', '.join(ROLES)}",
            )
        turns.append({"role": ROLES[role], "content": str(content)})
    if need_answer and (not turns or turns[-1]["role"] != "assistant"):
        raise PeftrunError(
            "a conversation must end with an assistant turn (the answer to learn)",
            where=f"data.{data_cfg.messages_column}",
        )
    return turns


def chat_messages(row: dict, data_cfg, with_answer: bool) -> list[dict[str, str]]:
    """The row as chat turns: a conversation column, an alpaca row, or the template as the user turn."""
    if data_cfg.messages_column in row:
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
    if data_cfg.system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": data_cfg.system_prompt})
    return turns


def _chat_template(tokenizer, messages, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise PeftrunError(
            "format: chat needs a tokenizer with a chat template, and this one has none",
            where="data.format",
            hint="use format: alpaca (or a template) for base models, or set model.tokenizer to an instruct model's",
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_texts(row: dict, data_cfg, tokenizer) -> tuple[str, str]:
    """(prompt, completion) through the tokenizer's chat template: the completion carries the
    template's end-of-turn markup, so the model learns to stop where the template says."""
    prompt = _chat_template(tokenizer, chat_messages(row, data_cfg, with_answer=False), True)
    full = _chat_template(tokenizer, chat_messages(row, data_cfg, with_answer=True), False)
    if not full.startswith(prompt):
        raise PeftrunError(
            "the chat template renders the prompt differently with and without the answer",
            where="data.format",
            hint="use format: alpaca or a template for this tokenizer",
        )
    return prompt, full[len(prompt) :]


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
        return _chat_template(tokenizer, chat_messages(row, data_cfg, with_answer=False), True)
    return user_text(row, data_cfg)
