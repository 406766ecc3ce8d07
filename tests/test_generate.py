"""peftrun generate / chat: the answer equals the merged model's own generate, for causal and seq2seq LMs,
greedy, beams and sampling; prompt templates; --input rows naming their adapter; big-model loading."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_kit import CHAT_TEMPLATE, load_base, logits, save_lm, save_lora
from conftest import run_cli as _run_cli

import peftrun
from peftrun.errors import PeftrunError
from peftrun.generation import GenerationOptions, build_prompt, prompt_style
from peftrun.merge import merge
from peftrun.prompts import ALPACA_PROMPT


def run_cli(*args, **kwargs):
    """The CLI on the CPU, as the references it is compared with (a GPU may decode ties differently)."""
    return _run_cli(*args, env={"CUDA_VISIBLE_DEVICES": ""}, **kwargs)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    base = save_lm(root / "base")
    a = save_lora(base, root / "a", seed=1)
    b = save_lora(base, root / "b", seed=2)
    merged, _ = merge(a, root / "a-merged")
    return {"root": root, "base": base, "a": a, "b": b, "merged": merged}


def reference(model_dir, task_type: str, prompt: str, **kwargs) -> str:
    """transformers' own generate on a plain model (the adapter merged in), the same tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_base(model_dir, task_type)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, pad_token_id=tok.pad_token_id, **kwargs)
    if task_type == "CAUSAL_LM":
        out = out[:, ids["input_ids"].shape[1] :]
    return tok.decode(out[0], skip_special_tokens=True).strip()


def chat_prompt(text: str) -> str:
    return f"<user>{text}\n<assistant>"


def test_cli_generate_equals_the_merged_model_streamed_or_not(lm):
    want = reference(lm["merged"], "CAUSAL_LM", chat_prompt("hello"), max_new_tokens=8, do_sample=False)
    assert len(want) == 8  # printable letters, never eos: a real string to compare
    plain = run_cli("generate", "--adapter", str(lm["a"]), "hello", "--max-new-tokens", "8", "--no-stream")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == want + "\n"
    streamed = run_cli("generate", "--adapter", str(lm["a"]), "--max-new-tokens", "8", input="hello")  # piped
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() == want


def test_api_greedy_beams_and_sampling_equal_transformers(lm):
    model = peftrun.load(adapters=lm["a"], device="cpu")
    prompt = chat_prompt("abc")
    for kwargs in ({"max_new_tokens": 6}, {"max_new_tokens": 6, "num_beams": 3}):
        want = reference(lm["merged"], "CAUSAL_LM", prompt, do_sample=False, **kwargs)
        assert peftrun.generate(model, "abc", **kwargs) == [want]
    sampled = [
        peftrun.generate(model, "abc", max_new_tokens=6, do_sample=True, top_p=0.9, seed=s) for s in (3, 3, 4)
    ]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    torch.manual_seed(3)
    want = reference(lm["merged"], "CAUSAL_LM", prompt, max_new_tokens=6, do_sample=True, top_p=0.9, top_k=50)
    assert sampled[0] == [want]


def test_seq2seq_generate_equals_the_merged_model(tmp_path):
    base = save_lm(tmp_path / "t5", "t5", "SEQ_2_SEQ_LM")
    a = save_lora(base, tmp_path / "a", "SEQ_2_SEQ_LM", seed=1)
    merged, _ = merge(a, tmp_path / "merged")
    model = peftrun.load(adapters=a, device="cpu")
    assert prompt_style(model, "default", model.tokenizer) == "raw"  # no chat template for seq2seq
    for kwargs in ({"max_new_tokens": 5}, {"max_new_tokens": 5, "num_beams": 2}):
        want = reference(merged, "SEQ_2_SEQ_LM", "translate this", do_sample=False, **kwargs)
        assert peftrun.generate(model, "translate this", **kwargs) == [want]
    with model.disable_adapters():
        base_answer = peftrun.generate(model, "translate this", max_new_tokens=5)
    assert base_answer == [
        reference(base, "SEQ_2_SEQ_LM", "translate this", max_new_tokens=5, do_sample=False)
    ]


def test_input_rows_name_their_adapter(lm, tmp_path):
    rows = [
        {"prompt": "hello", "adapter": "a"},
        {"prompt": "hello", "adapter": "b"},
        {"prompt": "hello", "adapter": None},
        {"instruction": "hello"},  # no adapter key: the --use one
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    proc = run_cli(
        "generate",
        "--adapter",
        f"a={lm['a']}",
        "--adapter",
        f"b={lm['b']}",
        "--use",
        "b",
        "--input",
        str(src),
        "--output",
        str(out),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(line) for line in proc.stdout.splitlines()] == answers
    model = peftrun.load(adapters={"a": lm["a"], "b": lm["b"]}, device="cpu")
    alone = [
        peftrun.generate(model, "hello", adapters=[n], max_new_tokens=6)[0] for n in ("a", "b", None, "b")
    ]
    assert [r["output"] for r in answers] == alone
    assert len(set(alone[:3])) == 3  # a, b and the base answer differently
    assert answers[0]["adapter"] == "a" and "adapter" not in answers[3]


def test_chat_two_turns_then_eof(lm):
    proc = run_cli("chat", "--adapter", str(lm["a"]), "--max-new-tokens", "5", input="hello\nand again\n")
    assert proc.returncode == 0, proc.stderr
    turns = proc.stdout.split("[default]> ")
    assert len(turns) == 4  # two questions answered, then the prompt that met EOF
    model = peftrun.load(adapters=lm["a"], device="cpu")
    first = peftrun.generate(model, "hello", max_new_tokens=5)[0]
    history = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and again"},
    ]
    from peftrun.generation import generate_texts

    second = generate_texts(
        model,
        model.tokenizer,
        [build_prompt(model.tokenizer, "chat", messages=history)],
        None,
        GenerationOptions(max_new_tokens=5),
    )[0]
    assert turns[1].strip() == first and turns[2].strip() == second


def test_prompt_templates(lm, tmp_path):
    model = peftrun.load(adapters=lm["a"], device="cpu")
    tok = model.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    assert prompt_style(model, "default", tok) == "chat"
    assert build_prompt(tok, "chat", "hi", system="be brief") == "<system>be brief\n<user>hi\n<assistant>"
    assert build_prompt(tok, "raw", "hi") == "hi"
    alpaca = ALPACA_PROMPT.format(ctx="", instruction="hi", input_block="")
    assert build_prompt(tok, "alpaca", "hi") == alpaca
    # an adapter trained on alpaca rows is prompted the same way, as its saved recipe says
    (lm["a"] / "peftrun_recipe.yaml").write_text("data:\n  format: alpaca\n")
    try:
        assert prompt_style(model, "default", tok) == "alpaca"
        assert prompt_style(model, "default", tok, "raw") == "raw"
    finally:
        (lm["a"] / "peftrun_recipe.yaml").unlink()
    tok_without = type(tok)()
    with pytest.raises(PeftrunError, match="no chat template"):
        prompt_style(model, "default", tok_without, "chat")


def test_option_mistakes_are_one_line_errors(lm):
    with pytest.raises(PeftrunError, match="temperature"):
        GenerationOptions(temperature=0)
    with pytest.raises(PeftrunError, match="top_p"):
        GenerationOptions(top_p=1.5)
    proc = run_cli("generate", "--adapter", str(lm["a"]), "hi", "--do-sample", "--temperature", "0")
    assert proc.returncode == 2 and proc.stderr.startswith("error: generation options: temperature")
    proc = run_cli("generate", "--adapter", str(lm["a"] / "nope"), "hi")
    assert proc.returncode == 2 and "adapter folder not found" in proc.stderr


def test_device_map_reaches_from_pretrained_and_offloaded_layers_get_adapters(lm, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from peftrun.adapted import PeftrunModel

    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    plain = logits(peftrun.load(adapters=lm["a"], device="cpu"), batch)
    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.update(kwargs)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    mapped = peftrun.load(adapters=lm["a"], device_map="auto", offload_folder=str(tmp_path / "off"))
    assert seen["device_map"] == "auto" and seen["offload_folder"] == str(tmp_path / "off")
    assert torch.equal(logits(mapped, batch), plain)
    monkeypatch.undo()
    # every weight offloaded to disk (left on meta): the adapter goes to the layers' execution device
    base = AutoModelForCausalLM.from_pretrained(
        lm["base"], device_map="auto", max_memory={"cpu": 20_000}, offload_folder=str(tmp_path / "disk")
    )
    assert set(base.hf_device_map.values()) == {"disk"}
    model = PeftrunModel(base, "CAUSAL_LM")
    model.load_adapter(lm["a"], "a")
    lora_a = model.model.model.layers[0].self_attn.q_proj.lora_A["a"].weight
    assert lora_a.device.type == "cpu"
    assert (logits(model, batch) - plain).abs().max().item() <= 1e-5


def test_chat_commands_switch_adapters_and_forget(lm, capsys):
    from peftrun.generation import chat_loop

    model = peftrun.load(adapters={"a": lm["a"], "b": lm["b"]}, device="cpu")
    lines = iter(["hello", "/use b", "/reset", "hello", "/base", "/reset", "hello", "/use nope"])

    def read(prompt: str) -> str:  # a terminal: the prompt, then what the user typed
        line = next(lines, None)
        if line is None:
            raise EOFError
        print(prompt + line)
        return line

    capsys.readouterr()
    count = chat_loop(model, model.tokenizer, GenerationOptions(max_new_tokens=5), stream=False, read=read)
    out = capsys.readouterr().out.splitlines()
    assert count == 3
    answered = {line.split("]")[0][1:]: out[i + 1] for i, line in enumerate(out) if line.endswith("> hello")}
    want = [peftrun.generate(model, "hello", adapters=[n], max_new_tokens=5)[0] for n in ("a", "b", None)]
    assert [answered["a"], answered["b"], answered["base"]] == want
    assert "(adapter: b, history: 1 turns)" in out
    assert any(line.startswith("loaded adapters: a, b") for line in out)  # the unknown /use
