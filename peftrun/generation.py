"""Text generation with an adapted model: the prompt as the adapter was trained on it (chat template,
alpaca or raw), decoding options, streaming to the terminal, and batches where each row names its adapter."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from peftrun.errors import PeftrunError
from peftrun.io.rows import write_rows
from peftrun.tasks import CAUSAL_LM, is_lm

STYLES = ("auto", "chat", "alpaca", "raw")
DEFAULT = "<active>"  # a row that names no adapter uses the model's active one; None means the base model


@dataclass
class GenerationOptions:
    """Decoding: greedy by default; do_sample for temperature/top-p/top-k sampling; num_beams for beam search.

    repetition_penalty None and eos_token_id None leave those to the model's generation config.
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    num_beams: int = 1
    repetition_penalty: float | None = 1.0
    seed: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (
                self.temperature > 0,
                "temperature must be above 0 (use greedy decoding for a deterministic answer)",
            ),
            (0 < self.top_p <= 1, "top_p must lie in (0, 1]"),
            (self.top_k >= 0, "top_k must be 0 (off) or more"),
            (self.num_beams >= 1, "num_beams must be at least 1"),
            (self.repetition_penalty is None or self.repetition_penalty > 0, "repetition_penalty must be above 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise PeftrunError(message, where="generation options")

    def generate_kwargs(self, tokenizer) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.eos_token_id is not None:
            kwargs["eos_token_id"] = self.eos_token_id
        if self.do_sample:  # transformers warns when these are set for greedy decoding
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


# ------------------------------------------------------------------ prompts


def prompt_style(model, name: str | None, tokenizer, style: str = "auto") -> str:
    """How to wrap a user's text for adapter `name`: as its recipe's data format was, else the chat
    template for a causal LM whose tokenizer has one, else as written."""
    if style not in STYLES:
        raise PeftrunError(f"unknown prompt template '{style}'", hint=f"choose one of {', '.join(STYLES)}")
    if style != "auto":
        if style == "chat" and not getattr(tokenizer, "chat_template", None):
            raise PeftrunError("this tokenizer has no chat template", hint="use --template raw or alpaca")
        return style
    from peftrun.io.loading import saved_section
    from peftrun.io.peft_format import RECIPE_COPY

    folder = model.adapter_folders.get(name) if name else None
    if folder and (Path(folder) / RECIPE_COPY).is_file():
        data_format = saved_section(folder, "data").get("format", "plain")
        return {"alpaca": "alpaca", "chat": "chat"}.get(data_format, "raw") if isinstance(data_format, str) else "raw"
    if model.task_type == CAUSAL_LM and getattr(tokenizer, "chat_template", None):
        return "chat"
    return "raw"


def build_prompt(
    tokenizer,
    style: str,
    text: str = "",
    *,
    messages: list[dict] | None = None,
    system: str | None = None,
    context: str = "",
) -> str:
    """The prompt string; `messages` (a chat history ending with the user's turn) is used by the chat style."""
    if style == "chat":
        turns = list(messages) if messages else [{"role": "user", "content": text}]
        if system:
            turns = [{"role": "system", "content": system}, *turns]
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    if style == "alpaca":
        from peftrun.data import source_text

        return source_text({"instruction": text, "input": context}, SimpleNamespace(format="alpaca"))
    return text


# ------------------------------------------------------------------ which adapter runs


@contextlib.contextmanager
def adapters_for_rows(model, names: list[str | None]) -> Iterator[None]:
    """One adapter for the whole batch when the rows agree (the base when all are None), else a mixed batch."""
    names = [model.active_adapter if n == DEFAULT else n for n in names]
    if all(n is None for n in names):
        with model.disable_adapters():
            yield
    elif len(set(names)) == 1:
        previous = model.active_adapter
        model.set_adapter(names[0])
        try:
            yield
        finally:
            if previous is not None:
                model.set_adapter(previous)
    else:
        with model.row_adapters(names):
            yield


def input_device(model) -> torch.device:
    """Where the input ids go: the embedding's device, or its hook's when Accelerate offloaded it."""
    embedding = model.get_input_embeddings()
    weight = embedding.weight
    execution = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    if weight.is_meta:
        return torch.device(execution if execution is not None else "cpu")
    return weight.device


# ------------------------------------------------------------------ generating


def _encode(tokenizer, prompts: list[str], causal: bool) -> dict[str, torch.Tensor]:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left" if causal else "right"  # causal rows must end where generation starts
    # special tokens added as peftrun's training data adds them (peftrun.data), so prompts match training
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def _encoded(batch: Mapping[str, torch.Tensor], causal: bool) -> dict[str, torch.Tensor]:
    """The prompt part of a batch peftrun.data tokenised (a causal LM's left-padded prompt_ids)."""
    if causal:
        out = {"input_ids": batch["prompt_ids"], "attention_mask": batch["prompt_attention_mask"]}
    else:
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "task_ids" in batch:  # multitask prompts
        out["task_ids"] = batch["task_ids"]
    return out


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[str] | Mapping[str, torch.Tensor],
    adapters: list[str | None] | None = None,
    options: GenerationOptions | None = None,
    *,
    streamer=None,
    constraint=None,
    task_type: str | None = None,
) -> list[str]:
    """Generate one answer per prompt, decoded and stripped.

    prompts: texts (already templated), or a batch peftrun.data tokenised (eval and predict).
    adapters[i] runs row i (None: the base); no list runs the model as it is set.
    constraint: a `prefix_allowed_tokens_fn` that knows its `max_new_tokens` (evaluate.LabelConstraint).
    task_type: the model's (`model.task_type` unless given, for a bare transformers model).
    """
    options = options or GenerationOptions()
    rows = None if isinstance(prompts, Mapping) else len(prompts)
    if adapters is not None and rows is not None and len(adapters) != rows:
        raise PeftrunError(f"{rows} prompts but {len(adapters)} adapter names")
    task_type = task_type or model.task_type
    if not is_lm(task_type):
        raise PeftrunError(f"generate needs a language model; this adapter is for {task_type}")
    causal = task_type == CAUSAL_LM
    batch = _encode(tokenizer, prompts, causal) if rows is not None else _encoded(prompts, causal)
    device = input_device(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    kwargs = options.generate_kwargs(tokenizer)
    if constraint is not None:
        constraint.start = batch["input_ids"].shape[1] if causal else 1  # seq2seq: after the start token
        kwargs.update(prefix_allowed_tokens_fn=constraint, max_new_tokens=constraint.max_new_tokens)
    if streamer is not None:
        kwargs["streamer"] = streamer
    if options.seed is not None:
        torch.manual_seed(options.seed)
    model.eval()
    with contextlib.nullcontext() if adapters is None else adapters_for_rows(model, adapters):
        out = model.generate(**batch, **kwargs)
    if causal:
        out = out[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def terminal_streamer(tokenizer):
    """Prints tokens as they come (transformers' TextStreamer), the prompt left out."""
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# ------------------------------------------------------------------ input files


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows from a .txt (one prompt a line), .json (a list) or .jsonl file. A row holds `prompt` (or alpaca's
    `instruction` and `input`) and may name its `adapter` (null: the base model)."""
    from peftrun.io.outputs import user_path

    path = user_path(path)
    if not path.is_file():
        raise PeftrunError("input file not found", where=str(path))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [{"prompt": line} for line in text.splitlines() if line.strip()]
    try:
        if path.suffix == ".json":
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise PeftrunError(f"not valid JSON: {exc.msg} (line {exc.lineno})", where=str(path)) from None
    if not isinstance(rows, list):
        raise PeftrunError("a .json input holds a list of rows", where=str(path))
    for i, row in enumerate(rows):
        if isinstance(row, str):
            rows[i] = row = {"prompt": row}
        if not isinstance(row, dict) or not (row.get("prompt") or row.get("instruction")):
            raise PeftrunError(f"row {i + 1} has no 'prompt' (or 'instruction')", where=str(path))
    return rows


def generate_rows(
    model,
    tokenizer,
    rows: list[dict[str, Any]],
    options: GenerationOptions,
    *,
    default: str | None = DEFAULT,
    style: str = "auto",
    system: str | None = None,
    batch_size: int = 8,
) -> Iterator[dict[str, Any]]:
    """Each row with its `output`, in order, `batch_size` rows per generate call; a row without an
    `adapter` key uses `default` (the active adapter, or None for the base)."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        names = [row.get("adapter", default) for row in chunk]
        prompts = []
        for row, name in zip(chunk, names):
            row_style = prompt_style(
                model, model.active_adapter if name == DEFAULT else name, tokenizer, style
            )
            text = row.get("prompt") or row.get("instruction")
            prompts.append(
                build_prompt(tokenizer, row_style, text, system=system, context=row.get("input") or "")
            )
        for row, output in zip(chunk, generate_texts(model, tokenizer, prompts, names, options)):
            yield {**row, "output": output}


def answer_rows(model, rows, options: GenerationOptions, output: str | Path | None = None, **kwargs) -> int:
    """Print each answered row as a JSON line as it comes (and write them all to `output`, as JSON lines,
    atomically); kwargs go to generate_rows. Returns the number of rows answered."""
    if output:
        from peftrun.io.outputs import check_output_file

        output = check_output_file(output, where=f"--output ({output})")
    answered = generate_rows(model, model.tokenizer, rows, options, **kwargs)

    def printed():
        for row in answered:
            print(json.dumps(row, ensure_ascii=False), flush=True)
            yield row

    if output:
        return write_rows(printed(), output, "jsonl")
    return sum(1 for _ in printed())


def answer(
    model,
    prompt: str,
    options: GenerationOptions,
    *,
    adapter: str | None = DEFAULT,
    style: str = "auto",
    system: str | None = None,
    stream: bool = True,
    messages: list[dict] | None = None,
) -> str:
    """One answer, printed as it is generated (or at the end when beams or stream=False)."""
    tokenizer = model.tokenizer
    name = model.active_adapter if adapter == DEFAULT else adapter
    row_style = prompt_style(model, name, tokenizer, style)
    text = build_prompt(
        tokenizer, row_style, prompt, messages=messages if row_style == "chat" else None, system=system
    )
    streamer = terminal_streamer(tokenizer) if stream and options.num_beams == 1 else None
    result = generate_texts(model, tokenizer, [text], [name], options, streamer=streamer)[0]
    if streamer is None:
        print(result, flush=True)
    return result


# ------------------------------------------------------------------ chat

CHAT_HELP = "commands: /use NAME (switch adapter), /base (no adapter), /reset (forget the history), /exit"


def chat_loop(
    model,
    tokenizer,
    options: GenerationOptions,
    *,
    adapter: str | None = DEFAULT,
    style: str = "auto",
    system: str | None = None,
    read: Callable[[str], str] = input,
    stream: bool = True,
) -> int:
    """Read a line, answer it, until EOF or /exit; returns the number of answers given.

    With the chat template the whole conversation is the prompt; other styles answer each line alone.
    """
    history: list[dict[str, str]] = []
    adapter = model.active_adapter if adapter == DEFAULT else adapter
    answers = 0
    print(CHAT_HELP)
    while True:
        try:
            line = read(f"[{adapter or 'base'}]> ").strip()
        except EOFError:
            print()
            return answers
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/exit", "/quit"):
                return answers
            if command == "/reset":
                history.clear()
            elif command == "/base":
                adapter = None
            elif command == "/use" and arg.strip() in model.configs:
                adapter = arg.strip()
            else:
                print(f"loaded adapters: {', '.join(model.configs) or 'none'}; {CHAT_HELP}")
                continue
            print(f"(adapter: {adapter or 'base'}, history: {len(history) // 2} turns)")
            continue
        history.append({"role": "user", "content": line})
        reply = answer(
            model, line, options, adapter=adapter, style=style, system=system, stream=stream, messages=history
        )
        history.append({"role": "assistant", "content": reply})
        if prompt_style(model, adapter, tokenizer, style) != "chat":
            history.clear()
        answers += 1
