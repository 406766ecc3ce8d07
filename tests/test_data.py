"""Loading, column mapping, empty-row filters, eval carving, prompts, tokenisation and collation."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from conftest import run_cli
from tiny_text import ONE_THREAD_ENV, one_thread, word_tokenizer  # noqa: F401

from peftrun.data import (
    Collator,
    causal_example,
    label_names_for,
    load_file,
    load_splits,
    tokenize_split,
)
from peftrun.errors import PeftrunError
from peftrun.prompts import ALPACA_PROMPT, source_text, target_text
from peftrun.recipe import DataSection
from peftrun.tasks import IGNORE_INDEX

WORDS = ["the movie was good", "the film was bad", "tweet text label complaint no", "what is two plus four",
         "answer six instruction input output response below describes task write", "john lives in paris"]

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(**kw) -> DataSection:
    kw.setdefault("train_file", "unused.csv")
    return DataSection(**kw)


def write_csv(path, header: list[str], rows: list[list]) -> str:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def llama_tok():
    return word_tokenizer("llama", WORDS)


# ------------------------------------------------------------------ loading


def test_each_file_format_loads_the_same_rows(tmp_path):
    import datasets

    rows = [{"text": "a b", "label": "x"}, {"text": 'c "d', "label": "y"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    # a bare quote inside a tsv field (as in GLUE) must not swallow the following lines
    (tmp_path / "d.tsv").write_text("text\tlabel\na b\tx\nc \"d\ty\n")
    write_csv(tmp_path / "d.csv", ["text", "label"], [[r["text"], r["label"]] for r in rows])
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for ext in ("jsonl", "json", "tsv", "csv", "parquet"):
        ds = load_file(tmp_path / f"d.{ext}", "data.train_file")
        assert ds.to_list() == rows, ext
    # gzipped text formats (HH-RLHF ships test.jsonl.gz) read as what is inside
    for ext in ("jsonl", "tsv", "csv"):
        (tmp_path / f"d.{ext}.gz").write_bytes(gzip.compress((tmp_path / f"d.{ext}").read_bytes()))
        assert load_file(tmp_path / f"d.{ext}.gz", "data.train_file").to_list() == rows, ext


def test_missing_file_and_unknown_extension_are_user_errors(tmp_path):
    with pytest.raises(PeftrunError, match="data file not found"):
        load_file(tmp_path / "nope.csv", "data.train_file")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(PeftrunError, match="cannot read '.xlsx' files"):
        load_file(tmp_path / "d.xlsx", "data.train_file")
    (tmp_path / "d.xlsx.gz").write_bytes(b"x")
    with pytest.raises(PeftrunError, match="cannot read '.gz' files"):
        load_file(tmp_path / "d.xlsx.gz", "data.train_file")


def test_missing_columns_list_the_columns_there_are(tmp_path):
    f = write_csv(tmp_path / "t.csv", ["sentence", "gold"], [["a", "1"], ["b", "0"]])
    with pytest.raises(PeftrunError) as err:
        load_splits(cfg(train_file=f), seed=0)
    msg = str(err.value)
    assert "['text', 'label']" in msg and "'sentence', 'gold'" in msg


def test_column_mapping_renames_in_llamafactory_direction(tmp_path):
    f = write_csv(tmp_path / "t.csv", ["#1 String", "Quality"], [["a", 1], ["b", 0], ["c", 1], ["d", 0]])
    splits = load_splits(cfg(train_file=f, columns={"text": "#1 String", "label": "Quality"}), seed=0)
    assert sorted(splits.train.column_names) == ["label", "text"]
    assert len(splits.train) + len(splits.eval) == 4
    with pytest.raises(PeftrunError, match=r"\['Nope'\].*columns there are: '#1 String', 'Quality'"):
        load_splits(cfg(train_file=f, columns={"text": "Nope"}), seed=0)


def test_empty_rows_are_dropped(tmp_path):
    f = write_csv(tmp_path / "t.csv", ["text", "label"], [["a", "x"], ["", "y"], ["  ", "x"], ["b", ""], ["c", "y"]])
    e = write_csv(tmp_path / "e.csv", ["text", "label"], [["d", "x"], ["", "x"]])
    splits = load_splits(cfg(train_file=f, eval_file=e), seed=0)
    assert splits.train["text"] == ["a", "c"]
    assert splits.eval["text"] == ["d"]
    kept = load_splits(cfg(train_file=f, eval_file=e, drop_empty=False), seed=0)
    assert len(kept.train) == 5


def test_eval_carving_is_seeded(tmp_path):
    f = write_csv(tmp_path / "t.csv", ["text", "label"], [[f"row {i}", i % 2] for i in range(50)])
    a = load_splits(cfg(train_file=f, eval_fraction=0.2), seed=7)
    b = load_splits(cfg(train_file=f, eval_fraction=0.2), seed=7)
    c = load_splits(cfg(train_file=f, eval_fraction=0.2), seed=8)
    assert len(a.eval) == 10 and len(a.train) == 40
    assert a.eval["text"] == b.eval["text"] and a.train["text"] == b.train["text"]
    assert a.eval["text"] != c.eval["text"]
    assert set(a.eval["text"]).isdisjoint(a.train["text"])


def test_folder_with_split_files_and_sample_caps(tmp_path):
    write_csv(tmp_path / "train.csv", ["text", "label"], [[f"t{i}", 0] for i in range(9)])
    write_csv(tmp_path / "dev.csv", ["text", "label"], [[f"d{i}", 1] for i in range(5)])
    write_csv(tmp_path / "test.csv", ["text"], [["q"]])
    splits = load_splits(DataSection(path=str(tmp_path), max_train_samples=4, max_eval_samples=2), seed=0)
    assert splits.train["text"] == ["t0", "t1", "t2", "t3"]
    assert splits.eval["text"] == ["d0", "d1"]
    assert splits.test["text"] == ["q"]


def test_label_names_order(tmp_path):
    f = write_csv(tmp_path / "t.csv", ["text", "label"], [["a", 2], ["b", 10], ["c", 1]])
    splits = load_splits(cfg(train_file=f, eval_fraction=0.34), seed=0)
    assert label_names_for(splits, cfg(train_file=f)) == sorted({str(v) for v in splits.train["label"]}, key=int)
    assert label_names_for(splits, cfg(verbalizer={1: "one", 2: "two", 10: "ten"})) == ["one", "two", "ten"]
    assert label_names_for(splits, cfg(label_names=["z", "y"])) == ["z", "y"]


# ------------------------------------------------------------------ prompts


def test_template_and_verbaliser():
    c = cfg(template="Tweet text : {Tweet text} Label : ", label_column="Label", verbalizer={1: "complaint", 2: "no complaint"})
    row = {"Tweet text": "my order is late", "Label": 1}
    assert source_text(row, c) == "Tweet text : my order is late Label : "
    assert target_text(row, c) == "complaint"
    assert target_text({**row, "Label": 2}, c) == "no complaint"
    # train.csv of RAFT holds the label text itself: it passes through unchanged
    assert target_text({**row, "Label": "no complaint"}, c) == "no complaint"


def test_alpaca_prompt_with_and_without_input():
    c = cfg(format="alpaca")
    with_input = source_text({"instruction": "Add.", "input": "2 and 4", "output": "6"}, c)
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
        "### Input:\n2 and 4\n\n### Response:\n"
    )
    bare = source_text({"instruction": "Add.", "input": "", "output": "6"}, c)
    assert bare == ALPACA_PROMPT.format(ctx="", instruction="Add.", input_block="")
    assert "### Input" not in bare and target_text({"instruction": "Add.", "output": "6"}, c) == "6"


def _trained(example, tok) -> str:
    return tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX])


def test_alpaca_row_through_the_chat_template(llama_tok):
    c = cfg(format="chat", system_prompt="be brief")
    row = {"instruction": "what is two plus four", "input": "", "output": "six"}
    prompt = "system : be brief </s> user : what is two plus four </s> assistant : "
    assert source_text(row, c, llama_tok) == prompt
    example = causal_example(row, c, llama_tok)
    assert example.input_ids[: example.prompt_len] == llama_tok(prompt, add_special_tokens=False)["input_ids"]
    assert _trained(example, llama_tok) == "six </s>"
    assert target_text(row, c) == "six"


def test_sharegpt_conversation_trains_every_assistant_turn_or_the_last(llama_tok):
    row = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                             {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}
    c = cfg(format="chat")  # data.messages_column left at `messages`: ShareGPT's `conversations` is found
    assert source_text(row, c, llama_tok) == "user : a </s> assistant : b </s> user : c </s> assistant : "
    assert _trained(causal_example(row, c, llama_tok), llama_tok) == "b </s> d </s>"
    assert _trained(causal_example(row, cfg(format="chat", train_on="last_assistant"), llama_tok), llama_tok) == (
        "d </s>"
    )
    assert target_text(row, c) == "d"
    with pytest.raises(PeftrunError, match="end with an assistant turn"):
        causal_example({"conversations": [{"from": "human", "value": "a"}]}, c, llama_tok)


def test_chat_format_needs_a_chat_template():
    tok = word_tokenizer("bert", WORDS)
    with pytest.raises(PeftrunError, match="chat template"):
        source_text({"text": "hi"}, cfg(format="chat"), tok)


# ------------------------------------------------------------------ tokenisation


def _ds(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def test_causal_labels_mask_the_prompt(llama_tok):
    c = cfg(template="{text} label : ", max_length=64)
    ds = _ds([{"text": "the movie was good", "label": "good"}])
    row = tokenize_split(ds, c, llama_tok, "CAUSAL_LM", None, for_eval=True)[0]
    prompt = llama_tok("the movie was good label : ")["input_ids"]
    answer = llama_tok("good", add_special_tokens=False)["input_ids"] + [llama_tok.eos_token_id]
    assert row["input_ids"] == prompt + answer
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert row["prompt_ids"] == prompt and row["reference"] == "good"
    full = tokenize_split(ds, cfg(template="{text} label : ", train_on_inputs=True), llama_tok, "CAUSAL_LM", None,
                          for_eval=False)[0]
    assert full["labels"] == full["input_ids"] and "reference" not in full


def test_causal_truncation_keeps_bos_and_the_answer(llama_tok):
    long_text = " ".join(["the movie was good"] * 10)
    c = cfg(template="{text} label : ", max_length=12)
    row = tokenize_split(_ds([{"text": long_text, "label": "bad"}]), c, llama_tok, "CAUSAL_LM", None, for_eval=False)[0]
    answer = llama_tok("bad", add_special_tokens=False)["input_ids"] + [llama_tok.eos_token_id]
    assert len(row["input_ids"]) == 12
    assert row["input_ids"][0] == llama_tok.bos_token_id
    assert row["input_ids"][-len(answer) :] == answer
    assert row["labels"][-len(answer) :] == answer
    assert row["labels"][: 12 - len(answer)] == [IGNORE_INDEX] * (12 - len(answer))
    # the end of the prompt, which the answer follows, survives the cut
    tail = llama_tok("label :", add_special_tokens=False)["input_ids"]
    assert row["input_ids"][-len(answer) - len(tail) : -len(answer)] == tail


def test_chat_completion_ends_with_the_templates_end_of_turn(llama_tok):
    ds = _ds([{"instruction": "what is two plus four", "input": "", "output": "six"}])
    row = tokenize_split(ds, cfg(format="chat"), llama_tok, "CAUSAL_LM", None, for_eval=False)[0]
    answer = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
    assert llama_tok.decode(answer) == "six </s>"
    assert answer[-1] == llama_tok.eos_token_id and answer.count(llama_tok.eos_token_id) == 1


def test_seq2seq_labels_are_the_target_tokens():
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    c = cfg(template="Tweet : {text}", verbalizer={"1": "complaint"}, target_max_length=5)
    row = tokenize_split(_ds([{"text": "late", "label": 1}]), c, tok, "SEQ_2_SEQ_LM", None, for_eval=True)[0]
    assert row["input_ids"] == tok("Tweet : late")["input_ids"]
    assert row["labels"] == tok(text_target="compl", add_special_tokens=False)["input_ids"][:4] + [tok.eos_token_id]
    assert row["reference"] == "complaint"


def test_token_classification_tags_the_first_subword_only():
    tok = word_tokenizer("bert", WORDS + ["pari ##s"])
    c = cfg(format="tokens")
    ds = _ds([{"tokens": ["John", "lives", "in", "Parisxyz"], "tags": ["B-PER", "O", "O", "B-LOC"]}])
    names = ["O", "B-PER", "B-LOC"]
    row = tokenize_split(ds, c, tok, "TOKEN_CLS", names, for_eval=False)[0]
    enc = tok(["John", "lives", "in", "Parisxyz"], is_split_into_words=True)
    words = enc.word_ids()
    expect, seen = [], set()
    for w in words:
        if w is None or w in seen:
            expect.append(IGNORE_INDEX)
        else:
            seen.add(w)
            expect.append(names.index(["B-PER", "O", "O", "B-LOC"][w]))
    assert row["labels"] == expect
    assert sum(lab != IGNORE_INDEX for lab in row["labels"]) == 4
    with pytest.raises(PeftrunError, match="does not fit"):
        tokenize_split(ds, cfg(), tok, "TOKEN_CLS", names, for_eval=False)


def test_unknown_class_is_a_user_error():
    tok = word_tokenizer("bert", WORDS)
    with pytest.raises(PeftrunError, match="label 'maybe' is not one of"):
        tokenize_split(_ds([{"text": "good", "label": "maybe"}]), cfg(), tok, "SEQ_CLS", ["bad", "good"],
                       for_eval=False)


def test_text_pair_classification(tmp_path):
    tok = word_tokenizer("bert", WORDS)
    ds = _ds([{"a": "the movie", "b": "was good", "label": 1}])
    row = tokenize_split(ds, cfg(text_column="a", text_pair_column="b"), tok, "SEQ_CLS", ["0", "1"], for_eval=False)[0]
    assert row["input_ids"] == tok("the movie", "was good")["input_ids"]
    assert row["labels"] == 1


# ------------------------------------------------------------------ collator


def test_collator_pads_each_batch_to_its_longest_row():
    rows = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7], "prompt_ids": [5],
         "reference": "a"},
        {"input_ids": [8], "attention_mask": [1], "labels": [8], "prompt_ids": [8, 9], "reference": "b"},
    ]
    batch = Collator(pad_token_id=0, task_type="CAUSAL_LM")(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["prompt_ids"].tolist() == [[0, 5], [8, 9]]  # left padding for generation
    assert batch["prompt_attention_mask"].tolist() == [[0, 1], [1, 1]]
    assert batch["reference"] == ["a", "b"]
    cls = Collator(pad_token_id=1, task_type="SEQ_CLS")(
        [{"input_ids": [2, 3], "attention_mask": [1, 1], "labels": 0}, {"input_ids": [4], "attention_mask": [1],
                                                                          "labels": 1}]
    )
    assert cls["labels"].dtype == torch.long and cls["labels"].tolist() == [0, 1]
    assert cls["input_ids"].tolist() == [[2, 3], [4, 1]]


# ------------------------------------------------------------------ CLI errors


def test_cli_reports_missing_file_and_missing_columns(tmp_path, minilm_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{name_or_path: {minilm_path}, task_type: SEQ_CLS}}\n"
        f"data: {{train_file: {tmp_path / 'none.csv'}}}\noutput_dir: {tmp_path / 'out'}\n"
    )
    res = run_cli("train", str(recipe), env=ONE_THREAD_ENV)
    assert res.returncode == 2, res.stderr
    assert "data file not found" in res.stderr and "none.csv" in res.stderr
    write_csv(tmp_path / "t.csv", ["sentence", "gold"], [["a", 1], ["b", 0]])
    res = run_cli("train", str(recipe), "--set", f"data.train_file={tmp_path / 't.csv'}", env=ONE_THREAD_ENV)
    assert res.returncode == 2, res.stderr
    assert "column(s) ['text', 'label'] not in the train data" in res.stderr
    assert "'sentence', 'gold'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_text_format_trains_on_every_token(llama_tok):
    ds = _ds([{"quote": "the movie was good"}, {"quote": " ".join(["the film was bad"] * 10)}])
    c = cfg(format="text", text_column="quote", max_length=10)
    rows = tokenize_split(ds, c, llama_tok, "CAUSAL_LM", None, for_eval=False)
    short, long = rows[0], rows[1]
    assert short["input_ids"] == llama_tok("the movie was good")["input_ids"] + [llama_tok.eos_token_id]
    assert short["labels"] == short["input_ids"]
    assert len(long["input_ids"]) == 10 and long["input_ids"][-1] == llama_tok.eos_token_id
    with pytest.raises(PeftrunError, match="is for CAUSAL_LM"):
        tokenize_split(ds, c, llama_tok, "SEQ_2_SEQ_LM", None, for_eval=False)


def test_prediction_inputs_need_no_label(llama_tok):
    c = cfg(template="{text} label : ", verbalizer={"1": "good"})
    rows = tokenize_split(_ds([{"text": "the movie was good"}]), c, llama_tok, "CAUSAL_LM", None, for_eval=True,
                          with_labels=False)
    assert rows[0]["prompt_ids"] == llama_tok("the movie was good label : ")["input_ids"]
    assert "labels" not in rows.column_names


def test_unlabelled_files_skip_the_label_mapping(tmp_path):
    f = write_csv(tmp_path / "test.csv", ["index", "#1 String"], [[0, "a"], [1, "b"]])
    c = cfg(columns={"text": "#1 String", "label": "Quality"})
    ds = load_file(f, "--input", c, strict=False)
    assert ds.column_names == ["index", "text"]
    with pytest.raises(PeftrunError, match=r"\['Quality'\]"):
        load_file(f, "data.train_file", c)
