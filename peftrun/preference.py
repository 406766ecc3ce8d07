"""Preference pairs and prompts as people have them, turned into token ids for the reward, DPO, ORPO and GRPO
objectives.

A pair row is one of:
  - trl's   {"prompt", "chosen", "rejected"}: strings, or role/content message lists;
  - Anthropic HH's {"chosen", "rejected"}: two whole dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ...") that differ
    only in the last assistant turn (or two message lists that do);
  - LLaMA-Factory's {"conversations": [...], "chosen": {...}, "rejected": {...}} in ShareGPT (from/value) turns.
A prompts row (GRPO) is {"prompt"} (a string or messages), or a conversation / instruction column.

Each pair becomes (prompt turns, chosen answer, rejected answer), rendered through the tokenizer's chat template
where it has one, else in HH's plain "Human:/Assistant:" form. A causal LM scores the answer tokens after the
prompt (labels -100 on the prompt); a reward model (sequence classification) reads prompt + answer whole,
truncated from the left so that the answer is always seen. Rows that cannot teach anything (identical answers,
a prompt that leaves no room for an answer, an empty answer) are dropped and counted, or refused, as
`data.bad_rows` says.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from peftrun.data import pad_rows
from peftrun.errors import PeftrunError
from peftrun.prompts import ASSISTANT, HUMAN, parse_hh, read_turn
from peftrun.tasks import IGNORE_INDEX

MIN_ANSWER_TOKENS = 1  # a prompt must leave at least this much room for the answer


# ------------------------------------------------------------------ rows -> turns


def _turns(value: Any, where: str) -> list[dict[str, str]]:
    """A string (one user turn), or OpenAI (role/content) / ShareGPT (from/value) turns."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise PeftrunError(f"expected text or a list of turns, got {type(value).__name__}", where=where)
    return [read_turn(turn, where) for turn in value]


def _answer(value: Any, where: str) -> str:
    """An answer: a string, one assistant turn, or a list whose last turn is the assistant's."""
    if isinstance(value, str):
        return value
    turns = _turns(value, where)
    if not turns or turns[-1]["role"] != "assistant":
        raise PeftrunError("an answer must be text or end with an assistant turn", where=where)
    return turns[-1]["content"]


def pair_turns(row: dict, data_cfg) -> tuple[list[dict[str, str]], str, str]:
    """(prompt turns, chosen answer, rejected answer) from any of the pair shapes."""
    conv = next((c for c in (data_cfg.messages_column, "conversations") if row.get(c) is not None), None)
    if "chosen" not in row or "rejected" not in row:
        raise PeftrunError("a preference row needs 'chosen' and 'rejected'", where="data")
    chosen, rejected = row["chosen"], row["rejected"]
    if row.get("prompt") is not None or conv:
        prompt = _turns(row["prompt"] if row.get("prompt") is not None else row[conv], "data.prompt")
        return prompt, _answer(chosen, "data.chosen"), _answer(rejected, "data.rejected")
    # whole dialogues: the prompt is what they share up to the last assistant turn
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = chosen.rfind(ASSISTANT)
        if cut < 0:
            raise PeftrunError(
                "a dialogue pair without a prompt column must be HH text with 'Assistant:' turns",
                where="data.chosen",
            )
        head = chosen[: cut + len(ASSISTANT)]
        if not rejected.startswith(head):
            cut = rejected.rfind(ASSISTANT)
            head = rejected[: cut + len(ASSISTANT)] if cut >= 0 else ""
        if not head or not chosen.startswith(head):
            return [], "", ""  # dialogues that differ before their last answer: a bad row
        prompt = [t for t in parse_hh(head) if t["content"] or t["role"] == "user"]  # the empty answer slot goes
        return prompt, chosen[len(head) :].strip(), rejected[len(head) :].strip()
    c, r = _turns(chosen, "data.chosen"), _turns(rejected, "data.rejected")
    shared = 0
    while shared < min(len(c), len(r)) - 1 and c[shared] == r[shared]:
        shared += 1
    return c[:shared], _answer(c[shared:], "data.chosen"), _answer(r[shared:], "data.rejected")


def prompt_turns(row: dict, data_cfg) -> list[dict[str, str]]:
    """The prompt of a prompts-only row (GRPO)."""
    conv = next((c for c in (data_cfg.messages_column, "conversations") if row.get(c) is not None), None)
    if row.get("prompt") is not None:
        turns = _turns(row["prompt"], "data.prompt")
    elif conv:
        turns = _turns(row[conv], f"data.{conv}")
    elif row.get("instruction") is not None:
        turns = _turns(str(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else ""), "data")
    else:
        raise PeftrunError("a prompts row needs 'prompt' (or a conversation, or 'instruction')", where="data")
    if turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    return turns


# ------------------------------------------------------------------ turns -> text


def render(tokenizer, turns: list[dict[str, str]], answer: str | None, data_cfg) -> tuple[str, str]:
    """(prompt text, answer text) through the chat template, or HH's plain form for tokenizers without one."""
    if data_cfg.system_prompt and (not turns or turns[0]["role"] != "system"):
        turns = [{"role": "system", "content": data_cfg.system_prompt}, *turns]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        if answer is None:
            return prompt, ""
        full = tokenizer.apply_chat_template(
            [*turns, {"role": "assistant", "content": answer}], tokenize=False, add_generation_prompt=False
        )
        if not full.startswith(prompt):
            raise PeftrunError(
                "the chat template renders the prompt differently with and without the answer", where="data"
            )
        return prompt, full[len(prompt) :]
    names = {"user": HUMAN, "assistant": ASSISTANT, "system": "\n\nSystem:"}
    prompt = "".join(f"{names[t['role']]} {t['content']}" for t in turns) + ASSISTANT
    return prompt, "" if answer is None else f" {answer}"


# ------------------------------------------------------------------ text -> token ids


class BadRows:
    """Rows left out, counted by reason (or refused at once, with data.bad_rows: error)."""

    def __init__(self, policy: str):
        self.policy = policy
        self.counts: Counter[str] = Counter()

    def reject(self, reason: str, index: int) -> None:
        if self.policy == "error":
            raise PeftrunError(f"row {index}: {reason}", where="data", hint="fix the row, or set data.bad_rows: drop")
        self.counts[reason] += 1

    def line(self, split: str) -> str | None:
        if not self.counts:
            return None
        parts = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return f"{split}: dropped {sum(self.counts.values())} row(s): {parts}"


def _lm_ids(tokenizer, prompt: str, answer: str, max_len: int, chat: bool):
    """Prompt and answer ids for a causal LM: the answer ends with EOS; a long answer loses its end. None when
    the prompt leaves no room for an answer (the row is then dropped or refused, as data.bad_rows says)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not answer_ids or answer_ids[-1] != eos):
        answer_ids = answer_ids + [eos]
    if len(prompt_ids) + MIN_ANSWER_TOKENS > max_len:
        return None
    room = max_len - len(prompt_ids)
    return prompt_ids, answer_ids[:room]


def tokenize_pairs(ds, data_cfg, tokenizer, *, causal: bool, bad: BadRows):
    """Each pair as chosen/rejected ids (and, for a causal LM, labels on the answer only)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    max_len = data_cfg.max_length
    out: list[dict[str, Any]] = []
    for index, row in enumerate(ds):
        prompt_t, chosen, rejected = pair_turns(row, data_cfg)
        if not chosen.strip() or not rejected.strip():
            bad.reject("with an empty answer (or dialogues that differ before the last turn)", index)
            continue
        if chosen.strip() == rejected.strip():
            bad.reject("with identical chosen and rejected answers", index)
            continue
        prompt, chosen_text = render(tokenizer, prompt_t, chosen, data_cfg)
        _, rejected_text = render(tokenizer, prompt_t, rejected, data_cfg)
        item: dict[str, Any] = {}
        if causal:
            c = _lm_ids(tokenizer, prompt, chosen_text, max_len, chat)
            r = _lm_ids(tokenizer, prompt, rejected_text, max_len, chat)
            if c is None or r is None:
                bad.reject(f"with a prompt longer than data.max_length ({max_len} tokens)", index)
                continue
            for name, (p, a) in (("chosen", c), ("rejected", r)):
                item[f"{name}_input_ids"] = p + a
                item[f"{name}_labels"] = [IGNORE_INDEX] * len(p) + a
        else:
            side = tokenizer.truncation_side
            tokenizer.truncation_side = "left"  # the answer is at the end: keep it
            try:
                for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
                    item[f"{name}_input_ids"] = tokenizer(prompt + text, truncation=True, max_length=max_len)["input_ids"]
            finally:
                tokenizer.truncation_side = side
        if row.get("margin") is not None:
            item["margin"] = float(row["margin"])
        out.append(item)
    return out


def tokenize_prompts(ds, data_cfg, tokenizer, *, bad: BadRows):
    """Prompt ids for generation (GRPO); a prompt longer than max_length loses its start."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for index, row in enumerate(ds):
        prompt, _ = render(tokenizer, prompt_turns(row, data_cfg), None, data_cfg)
        ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        if not ids:
            bad.reject("with an empty prompt", index)
            continue
        item = {"prompt_ids": ids[-data_cfg.max_length :], "prompt_text": prompt}
        out.append(item)
    return out


class PairCollator:
    """[chosen rows..., rejected rows...] as one padded batch, so that one forward scores both halves."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise PeftrunError("the tokenizer has no pad token (and no eos or unk to stand in for it)")
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        ids = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        batch: dict[str, Any] = {
            "input_ids": pad_rows(ids, self.pad),
            "attention_mask": pad_rows([[1] * len(i) for i in ids], 0),
        }
        if "chosen_labels" in rows[0]:
            batch["labels"] = pad_rows([r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows], IGNORE_INDEX)
        if "margin" in rows[0]:
            batch["margin"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float32)
        return batch


class PromptCollator:
    """Prompts padded on the left, so that every row's completion starts at the same column."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        prompts = [r["prompt_ids"] for r in rows]
        return {
            "prompt_ids": pad_rows(prompts, self.pad, left=True),
            "prompt_attention_mask": pad_rows([[1] * len(p) for p in prompts], 0, left=True),
            "prompt_text": [r["prompt_text"] for r in rows],
        }
