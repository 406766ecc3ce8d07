"""CoNLL token files for token classification (peftrun/conll.py): parsing, the BIO check, the label set, the
word-level prediction (a word's tag is its first sub-word's), `peftrun predict` to .conll through the CLI,
and full fine-tuning (method: full) as the baseline beside an adapter, on a few sentences and tiny models."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli
from tiny_text import ONE_THREAD_ENV, one_thread, save_tiny_with_tokenizer, word_tokenizer  # noqa: F401

from peftrun.conll import read_conll
from peftrun.data import label_names_for, load_file, load_splits
from peftrun.errors import PeftrunError
from peftrun.metrics import entity_f1
from peftrun.predict import predict_rows
from peftrun.recipe import DataSection, recipe_from_dict
from peftrun.tasks import TOKEN_CLS

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["anna", "marek", "lucia", "tomas"]
SURNAMES = ["novak", "silva"]
PLACES = ["lisbon", "oslo", "kyoto", "accra"]
ORGS = ["acme", "globex"]
CORPUS = [" ".join(NAMES + SURNAMES + PLACES + ORGS + ["lives", "in", "met", "works", "at", "corp", "the"])]


def cfg(**kw) -> DataSection:
    kw.setdefault("train_file", "unused.conll")
    kw.setdefault("format", "conll")
    return DataSection(**kw)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Sentences of three shapes: 'anna novak lives in oslo', 'marek met lucia', 'tomas works at acme corp'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        shape = rng.randrange(3)
        name = rng.choice(NAMES)
        if shape == 0:
            out.append([(name, "B-PER"), (rng.choice(SURNAMES), "I-PER"), ("lives", "O"), ("in", "O"),
                        (rng.choice(PLACES), "B-LOC")])
        elif shape == 1:
            out.append([(name, "B-PER"), ("met", "O"), (rng.choice(NAMES), "B-PER")])
        else:
            out.append([(name, "B-PER"), ("works", "O"), ("at", "O"), (rng.choice(ORGS), "B-ORG"), ("corp", "I-ORG")])
    return out


def conll_text(rows, prefix: str = "en:", labelled: bool = True) -> str:
    return "".join(
        "".join(f"{prefix}{w}\t{t}\n" if labelled else f"{prefix}{w}\n" for w, t in row) + "\n" for row in rows
    )


# ------------------------------------------------------------------ parsing


def test_conll_sentences_tags_docstart_spaces_and_blank_lines(tmp_path):
    text = (
        "-DOCSTART- -X- -X- O\n\n"
        "en:Anna\tB-PER\r\nen:Novak\tI-PER\nen:lives\tO\n\n\n"  # CRLF, several blank lines
        "EU NNP B-NP B-ORG\n"  # CoNLL-2003's space-separated columns: the tag is the last field
        "rejects VBZ B-VP O\n"
        "en:Oslo B-LOC"  # one space, and no blank line at the end of the file
    )
    words, tags = read_conll(write(tmp_path / "a.conll", text))
    assert words == [["en:Anna", "en:Novak", "en:lives"], ["EU", "rejects", "en:Oslo"]]
    assert tags == [["B-PER", "I-PER", "O"], ["B-ORG", "O", "B-LOC"]]
    # through load_file: the recipe's column names, tokens kept as written (the prefix goes at tokenisation)
    ds = load_file(tmp_path / "a.conll", "data.train_file", cfg(tokens_column="words", tags_column="ner"))
    assert ds.column_names == ["words", "ner"] and ds[0]["words"] == ["en:Anna", "en:Novak", "en:lives"]


def test_a_line_without_a_tag_is_an_error_naming_file_and_line(tmp_path):
    path = write(tmp_path / "bad.conll", "en:Anna\tB-PER\nen:lives\tO\n\nen:Oslo\n")
    with pytest.raises(PeftrunError) as err:
        read_conll(path)
    assert err.value.where == f"{path}:4"
    assert "no tag after the token 'en:Oslo'" in err.value.message
    with pytest.raises(PeftrunError, match=r"bad\.conll:2: this line has no tag but line 1 has one"):
        read_conll(write(tmp_path / "bad.conll", "Anna\tB-PER\nlives\n"), labelled=None)


def test_bio_check_repair_and_off(tmp_path):
    path = write(tmp_path / "bio.conll", "Anna\tB-PER\nlives\tO\n\nin\tO\nNew\tI-LOC\nYork\tI-LOC\nmet\tO\nBo\tI-PER\n")
    with pytest.raises(PeftrunError) as err:
        read_conll(path)
    assert err.value.where == f"{path}:5"
    assert err.value.message == "'I-LOC' follows 'O': an I- tag must continue a B-LOC or I-LOC"
    assert "data.bio: repair" in err.value.hint
    # repair: the dangling I-X opens an entity (B-X), the I-X after it continues it
    _, tags = read_conll(path, bio="repair")
    assert tags == [["B-PER", "O"], ["O", "B-LOC", "I-LOC", "O", "B-PER"]]
    _, tags = read_conll(path, bio="off")
    assert tags[1] == ["O", "I-LOC", "I-LOC", "O", "I-PER"]
    # an I- of another type does not continue an entity; a tag outside BIO is refused unless bio: off
    with pytest.raises(PeftrunError, match=r":2: 'I-LOC' follows 'B-PER'"):
        read_conll(write(tmp_path / "t.conll", "Anna\tB-PER\nOslo\tI-LOC\n"))
    with pytest.raises(PeftrunError, match=r":1: 'I-PER' follows the start of the sentence"):
        read_conll(write(tmp_path / "t.conll", "Anna\tI-PER\n"))
    with pytest.raises(PeftrunError, match=r":1: tag 'NNP' is not BIO"):
        read_conll(write(tmp_path / "pos.conll", "Anna\tNNP\n"), bio="repair")
    assert read_conll(tmp_path / "pos.conll", bio="off")[1] == [["NNP"]]


def test_unlabelled_file_is_tokens_only(tmp_path):
    words, tags = read_conll(write(tmp_path / "in.txt", "Anna\nlives\n\n-DOCSTART-\n\nOslo\n"), labelled=None)
    assert words == [["Anna", "lives"], ["Oslo"]] and tags is None
    ds = load_file(tmp_path / "in.txt", "--input", cfg(), strict=False)
    assert ds.column_names == ["tokens"] and len(ds) == 2


def test_label_set_comes_sorted_from_the_training_data_and_folders_are_found(tmp_path):
    folder = tmp_path / "wikiann"
    folder.mkdir()
    # WikiANN's layout: files named train and dev with no extension, read as CoNLL under format: tokens too
    write(folder / "train", conll_text(sentences(30, 0)))
    write(folder / "dev", conll_text(sentences(4, 1)))
    for fmt in ("conll", "tokens"):
        c = DataSection(path=str(folder), format=fmt, token_prefix="en:")
        splits = load_splits(c, seed=0)
        assert len(splits.train) == 30 and len(splits.eval) == 4
        assert label_names_for(splits, c) == ["B-LOC", "B-ORG", "B-PER", "I-ORG", "I-PER", "O"]
    # a .tsv file is CoNLL only when the recipe says format: conll
    write(tmp_path / "train.tsv", "Anna\tB-PER\n")
    assert load_file(tmp_path / "train.tsv", "data.train_file", cfg())[0]["tags"] == ["B-PER"]


# ------------------------------------------------------------------ word-level predictions


class FirstIdTagger(torch.nn.Module):
    """Tags each sub-word token with class (token id mod K): what a word gets shows which sub-word decided."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids % self.k, self.k).float())


def test_a_word_takes_its_first_subwords_tag_and_words_past_max_length_are_o():
    tok = word_tokenizer("bert", CORPUS)
    names = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
    # words out of the vocabulary split into letters (m ##a ##r ##i ##k ##o; q is unknown: one [UNK]);
    # the prefix is stripped before tokenising (else "en", ":" would come first)
    rows = [["en:anna", "en:mariko", "en:lives"], ["en:qwerty", "oslo"], ["en:anna"] * 12]
    import datasets

    ds = datasets.Dataset.from_dict({"tokens": rows})
    recipe = SimpleNamespace(model=SimpleNamespace(task_type=TOKEN_CLS),
                             data=cfg(token_prefix="en:", max_length=10))
    preds = predict_rows(recipe, FirstIdTagger(len(names)), tok, names, ds, batch_size=2)

    def pieces(word: str) -> list[int]:
        return tok(word.removeprefix("en:"), add_special_tokens=False)["input_ids"]

    for row, pred in zip(rows[:2], preds[:2]):
        assert pred == [names[pieces(w)[0] % len(names)] for w in row]
    # the test means something: for some word the last sub-word would have given another tag
    assert any(pieces(w)[0] % 5 != pieces(w)[-1] % 5 for w in rows[0] + rows[1])
    assert len(pieces("en:mariko")) == 6 and len(pieces("en:qwerty")) == 1
    # 10 tokens: [CLS] + 8 words + [SEP]; the 4 words cut off are outside any entity
    assert preds[2] == [names[pieces("anna")[0] % 5]] * 8 + ["O"] * 4


# ------------------------------------------------------------------ train, eval, predict to .conll


def _recipe(model_dir, tmp_path, out, method: dict, **training) -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "task_type": TOKEN_CLS},
        "method": method,
        "data": {"train_file": str(tmp_path / "train.conll"), "eval_file": str(tmp_path / "dev.conll"),
                 "format": "conll", "token_prefix": "en:", "max_length": 16},
        "training": {"num_epochs": 6, "learning_rate": 1e-2, "batch_size": 8, "progress_bar": False, "seed": 0,
                     "eval_each_epoch": False, **training},
        "output_dir": str(out),
    }


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """A tiny BERT trained with LoRA on CoNLL files with WikiANN's `en:` prefix: (folder, recipe file, run)."""
    from tinyrun import write_recipe

    from peftrun.training.loop import train

    tmp_path = tmp_path_factory.mktemp("conll")
    model_dir = tmp_path / "bert"
    save_tiny_with_tokenizer(model_dir, "bert", TOKEN_CLS, CORPUS, num_labels=6)
    write(tmp_path / "train.conll", "-DOCSTART-\tO\n\n" + conll_text(sentences(96, 0)))
    write(tmp_path / "dev.conll", conll_text(sentences(24, 1)))
    out = tmp_path / "lora"
    data = _recipe(model_dir, tmp_path, out, {"name": "lora", "r": 8, "lora_alpha": 16,
                                               "target_modules": "all-linear"})
    train(recipe_from_dict(data))
    return tmp_path, write_recipe(tmp_path / "lora.yaml", data), out


def test_predict_writes_conll_word_by_word_through_the_cli(tagged):
    tmp_path, recipe, out = tagged
    gold = sentences(24, 1)
    write(tmp_path / "in.conll", conll_text(gold, labelled=False))
    res = run_cli("predict", str(recipe), "--adapter", str(out), "--input", str(tmp_path / "dev.conll"),
                  "--output", str(tmp_path / "pred.conll"), env=ONE_THREAD_ENV)
    assert res.returncode == 0, res.stderr
    assert "wrote 24 predictions" in res.stdout
    text = (tmp_path / "pred.conll").read_text()
    # the input's lines come back in order, each with its predicted tag; a blank line ends each sentence
    assert text.count("\n\n") == 24 and text.endswith("\n\n") and not text.endswith("\n\n\n")
    words, predicted = read_conll(tmp_path / "pred.conll")  # the output reads back as CoNLL, BIO-valid
    assert words == [[f"en:{w}" for w, _ in row] for row in gold]
    refs = [[t for _, t in row] for row in gold]
    assert entity_f1(predicted, refs) >= 0.9
    # unlabelled input (a token per line) gives the same predictions
    res = run_cli("predict", str(recipe), "--adapter", str(out), "--input", str(tmp_path / "in.conll"),
                  "--output", str(tmp_path / "pred2.conll"), env=ONE_THREAD_ENV)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "pred2.conll").read_text() == text


def test_malformed_conll_is_one_line_exit_2_through_the_cli(tagged):
    tmp_path, recipe, _ = tagged
    bad = write(tmp_path / "bad.conll", "en:anna\tB-PER\nen:lives\n")
    res = run_cli("eval", str(recipe), "--set", f"data.train_file={bad}", env=ONE_THREAD_ENV)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1
    assert f"{bad}:2: no tag after the token 'en:lives'" in res.stderr
    res = run_cli("predict", str(recipe), "--input", str(bad), "--output", str(tmp_path / "p.csv"), env=ONE_THREAD_ENV)
    assert res.returncode == 2 and f"{bad}:2: this line has no tag but line 1 has one" in res.stderr


def test_full_fine_tuning_trains_every_parameter_and_saves_the_whole_model(tagged, capsys):
    from safetensors.torch import load_file as load_tensors
    from transformers import AutoModelForTokenClassification

    from peftrun.merge import merge
    from peftrun.predict import run_eval
    from peftrun.training.loop import train

    tmp_path, _, _ = tagged
    out = tmp_path / "full"
    data = _recipe(tmp_path / "bert", tmp_path, out, {"name": "full"}, learning_rate=2e-3)
    train(recipe_from_dict(data))
    log = capsys.readouterr().out
    base = AutoModelForTokenClassification.from_pretrained(tmp_path / "bert")
    total = sum(p.numel() for p in base.parameters())
    assert f"trainable params: {total:,d} || all params: {total:,d} || trainable%: 100.0000" in log
    # the run folder holds the whole model (every tensor of its state dict), and peftrun reads it back
    saved = load_tensors(str(out / "adapter_model.safetensors"))
    assert set(saved) == {f"base_model.model.{k}" for k in base.state_dict()}
    again = run_eval(recipe_from_dict(data), out).metrics
    trained = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    assert again["entity_f1"] == pytest.approx(trained["entity_f1"], abs=1e-6)
    assert again["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-5)
    assert trained["entity_f1"] >= 0.9
    # the encoder trained too, not only the head
    emb = "bert.embeddings.word_embeddings.weight"
    assert (saved[f"base_model.model.{emb}"] - base.state_dict()[emb]).abs().max() > 1e-3
    # merge writes it as a plain transformers folder giving the same logits
    folder, diff = merge(out, tmp_path / "full-plain")
    assert diff <= 1e-5
    plain = AutoModelForTokenClassification.from_pretrained(folder)
    assert torch.equal(plain.state_dict()[emb], saved[f"base_model.model.{emb}"])


def test_full_fine_tuning_resumes_exactly(tagged):
    """A full fine-tuning run that fails mid-way resumes from its last checkpoint to the same final model."""
    from faults import FaultHooks
    from safetensors.torch import load_file as load_tensors

    from peftrun.training.loop import train

    tmp_path, _, _ = tagged

    def recipe(name: str):
        return recipe_from_dict(_recipe(tmp_path / "bert", tmp_path, tmp_path / name, {"name": "full"},
                                        learning_rate=2e-3, num_epochs=2, save_steps=4, logging_steps=5))

    train(recipe("full-reference"))  # 96 sentences / 8 = 12 steps an epoch, 24 in all
    with pytest.raises(RuntimeError, match="injected failure"):
        train(recipe("full-failed"), hooks=FaultHooks("after_step:10:fail"))
    train(recipe("full-failed"), resume=True)  # from step-000008
    want = load_tensors(str(tmp_path / "full-reference" / "adapter_model.safetensors"))
    got = load_tensors(str(tmp_path / "full-failed" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    assert max((got[k].float() - want[k].float()).abs().max().item() for k in want) <= 1e-6

    def logged(name: str) -> list[tuple]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], round(r["loss"], 6)) for r in map(json.loads, lines) if "loss" in r]

    assert logged("full-failed") == logged("full-reference")  # steps 5, 10, 15, 20, once each
