"""Several datasets in one recipe (data.datasets, peftrun/datamix.py): exact mixed counts from the weights and the
seed, each dataset read with its own format and columns, held-out rows per dataset or global, the mix printed and
recorded at the start of a run, and one-line errors (exit 2) that name the dataset entry."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_cli
from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows

from peftrun.data import load_splits
from peftrun.datamix import draw_rows, mix_counts, tokenize_pieces
from peftrun.errors import PeftrunError
from peftrun.recipe import DataSection, entry_data


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def two_files(tmp_path):
    """a.jsonl: 30 alpaca rows under other column names (q, a); b.jsonl: 10 plain rows (question, answer)."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"q": f"say alpha {i}", "a": f"alpha {i}", "id": f"a{i}"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": f"say beta {i}", "answer": f"beta {i}", "id": f"b{i}"} for i in range(10)])
    return a, b


def mixed(a: Path, b: Path, **data) -> DataSection:
    return DataSection.model_validate({
        "datasets": [
            {"path": str(a), "format": "alpaca", "columns": {"instruction": "q", "output": "a"}, "weight": 3},
            {"path": str(b), "text_column": "question", "label_column": "answer", "weight": 1},
        ],
        **data,
    })


def test_weighted_mix_gives_exact_counts_from_the_weights_and_rows_from_the_seed(two_files):
    a, b = two_files
    splits = load_splits(mixed(a, b, mix_size=50), seed=7)
    # per dataset held-out rows first (eval_fraction 0.1): a keeps 27 training rows, b 9
    assert [p.available for p in splits.parts] == [27, 9]
    assert [len(p.eval) for p in splits.parts] == [3, 1]
    # 50 * 3/4 = 37.5 and 50 * 1/4 = 12.5: the tied remainder goes to the earlier dataset
    assert [len(p.train) for p in splits.parts] == [38, 12]
    assert [r["train"] for r in splits.mix] == [38, 12]
    # b is drawn 12 times from 9 rows: every row once, three of them twice; a: 38 from 27, 11 twice
    for part, twice in ((splits.parts[1], 3), (splits.parts[0], 11)):
        counts = Counter(part.train["id"])
        assert set(counts.values()) <= {1, 2} and len(counts) == part.available
        assert sum(v == 2 for v in counts.values()) == twice
    # no held-out row is drawn for training
    for part in splits.parts:
        assert not set(part.train["id"]) & set(part.eval["id"])
    # the same seed draws the same rows; another seed other rows, in the same counts
    again = load_splits(mixed(a, b, mix_size=50), seed=7)
    assert [p.train["id"] for p in again.parts] == [p.train["id"] for p in splits.parts]
    other = load_splits(mixed(a, b, mix_size=50), seed=8)
    assert [len(p.train) for p in other.parts] == [38, 12]
    assert [p.train["id"] for p in other.parts] != [p.train["id"] for p in splits.parts]


def test_mix_counts_add_up_and_draws_repeat_rows_evenly():
    from peftrun.datamix import Part

    parts = [Part(f"d{i}", None, w, n, object(), None, None) for i, (w, n) in enumerate([(1, 5), (1, 5), (1, 5)])]
    assert mix_counts(parts, "weights", 10) == [4, 3, 3]  # 3.33 each: the first remainder to the first
    assert mix_counts(parts, "weights", None) == [5, 5, 5]  # default size: all the rows
    assert mix_counts(parts, "concat", None) == [5, 5, 5]
    rows = draw_rows(4, 10, seed=1, index=0)
    assert sorted(Counter(rows).values()) == [2, 2, 3, 3]
    assert rows == draw_rows(4, 10, seed=1, index=0) != draw_rows(4, 10, seed=1, index=1)


def test_concat_keeps_every_row_and_global_held_out_carves_from_all(two_files):
    a, b = two_files
    data = DataSection.model_validate({
        "datasets": [
            {"path": str(a), "format": "alpaca", "columns": {"instruction": "q", "output": "a"}},
            {"path": str(b), "text_column": "question", "label_column": "answer"},
        ],
        "held_out": "global", "eval_fraction": 0.25,
    })
    splits = load_splits(data, seed=3)
    train = [i for p in splits.parts for i in p.train["id"]]
    held = [i for p in splits.parts if p.eval is not None for i in p.eval["id"]]
    assert len(held) == 10 and len(train) == 30  # 25% of the 40 rows, across both datasets
    assert set(held) | set(train) == {f"a{i}" for i in range(30)} | {f"b{i}" for i in range(10)}
    assert not set(held) & set(train)
    assert splits.mix[0]["train"] + splits.mix[1]["train"] == 30


def test_each_dataset_is_read_with_its_own_format_and_columns(two_files):
    from tiny_text import word_tokenizer

    a, b = two_files
    tok = word_tokenizer("llama", [f"say alpha beta {i} instruction response" for i in range(30)])
    data = mixed(a, b)
    splits = load_splits(data, seed=7)
    got = tokenize_pieces(splits, "train", data, tok, "CAUSAL_LM", None, for_eval=False)
    # each part alone, as a single-dataset recipe with the entry's keys reads it
    want = []
    for i, part in enumerate(splits.parts):
        alone = DataSection.model_validate({**entry_data(data, i).model_dump(), "path": str((a, b)[i])})
        from peftrun.data import tokenize_split

        want += list(tokenize_split(part.train, alone, tok, "CAUSAL_LM", None, for_eval=False))
    assert [r["input_ids"] for r in got] == [r["input_ids"] for r in want]
    assert [r["labels"] for r in got] == [r["labels"] for r in want]
    # and the two formats did differ: alpaca's prompt holds its instruction header, plain's the question alone
    first_a = tok.decode(got[0]["input_ids"])
    first_b = tok.decode(got[len(splits.parts[0].train)]["input_ids"])
    assert "instruction" in first_a.lower() and "instruction" not in first_b.lower()


def test_a_single_dataset_recipe_reads_as_before(two_files):
    a, _ = two_files
    data = DataSection.model_validate({"path": str(a), "format": "alpaca", "columns": {"instruction": "q", "output": "a"}})
    splits = load_splits(data, seed=7)
    assert splits.parts is None and splits.mix is None and len(splits.train) == 27
    assert splits.pieces("train", data) == [(splits.train, data)]


# ------------------------------------------------------------------ a run, and errors that name the entry


@pytest.fixture(scope="module")
def cls_work(tmp_path_factory):
    root = tmp_path_factory.mktemp("datamix")
    model = tiny_model_dir(root)
    write_rows(root / "one" / "train.csv", 24)
    rows = list(csv.DictReader(open(write_rows(root / "tmp.csv", 16), encoding="utf-8")))
    with open(root / "two.csv", "w", newline="", encoding="utf-8") as fh:  # other column names
        writer = csv.writer(fh)
        writer.writerow(["sentence", "sentiment"])
        writer.writerows([r["text"], r["label"]] for r in rows)
    return root, model


def cls_recipe(cls_work, name: str, datasets: list[dict], **data) -> tuple[Path, Path]:
    root, model = cls_work
    recipe = tiny_recipe_dict(model, root / "one", root / name, num_epochs=1)
    recipe["data"] = {"datasets": datasets, "max_length": 32, **data}
    return write_recipe(root / f"{name}.yaml", recipe), root / name


def test_a_run_prints_the_mix_and_records_it_in_metrics(cls_work):
    root, _ = cls_work
    recipe, out = cls_recipe(cls_work, "run", [
        {"path": str(root / "one"), "weight": 2},
        {"train_file": str(root / "two.csv"), "text_column": "sentence", "label_column": "sentiment", "weight": 1},
    ], mix_size=30)
    proc = run_cli("train", str(recipe))
    assert proc.returncode == 0, proc.stderr
    assert "data: 2 datasets mixed by weights (seed 7): 30 training rows; held-out rows per dataset" in proc.stdout
    assert f"data.datasets[0] ({root / 'one'}) [plain] weight 2: 20 of 21 training rows (66.7%), 3 eval" in proc.stdout
    assert f"data.datasets[1] ({root / 'two.csv'}) [plain] weight 1: 10 of 14 training rows (33.3%), 2 eval" in proc.stdout
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0
    assert [(r["train"], r["eval"], r["available"]) for r in first["data_mix"]] == [(20, 3, 21), (10, 2, 14)]
    # 30 rows / batch 4 = 8 steps; 5 eval rows from both datasets
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 8 and "eval_loss" in last
    # `peftrun eval` reads the same held-out rows of both datasets, each with its own columns
    evaluated = run_cli("eval", str(recipe), "--adapter", str(out))
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(next(x for x in evaluated.stdout.splitlines() if x.startswith("metrics="))[8:])
    assert metrics["eval_loss"] == pytest.approx(last["eval_loss"], abs=1e-5)
    assert metrics["accuracy"] == pytest.approx(last["accuracy"])


@pytest.mark.parametrize(
    ("datasets", "data", "where"),
    [
        ([{"path": "ONE"}, {"path": "ONE", "format": "alpacca"}], {}, "data.datasets.1.format"),
        ([{"path": "ONE"}, {"path": "ONE", "pth": "x"}], {}, "data.datasets.1.pth"),
        ([{"path": "ONE"}, {"format": "plain"}], {}, "data.datasets.1"),
        ([{"path": "ONE", "weight": 1}, {"path": "ONE"}], {}, "data.datasets.1"),
        ([{"path": "ONE", "weight": 1}], {"mix": "concat"}, "data.datasets.0.weight"),
        ([{"path": "ONE"}], {"mix_size": 10}, "data.mix_size"),
        ([{"path": "ONE", "eval_file": "TWO"}], {"held_out": "global"}, "data.datasets.0.eval_file"),
        ([{"path": "ONE", "template": "{0}"}], {}, "data.datasets.0.template"),
        ([{"path": "ONE"}, {"path": "MISSING.csv"}], {}, "data.datasets[1].path"),
        ([{"path": "ONE"}, {"train_file": "TWO", "text_column": "nope"}], {}, "data.datasets[1]"),
    ],
)
def test_a_bad_entry_is_one_line_naming_it(cls_work, datasets, data, where):
    root, _ = cls_work
    swap = {"ONE": str(root / "one"), "TWO": str(root / "two.csv"), "MISSING.csv": str(root / "missing.csv")}
    datasets = [{k: swap.get(v, v) if isinstance(v, str) else v for k, v in e.items()} for e in datasets]
    recipe, _ = cls_recipe(cls_work, "bad", datasets, **data)
    proc = run_cli("train", str(recipe))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert where in lines[0], lines[0]


def test_datasets_beside_a_single_path_is_refused():
    with pytest.raises(ValueError, match="not both"):
        DataSection.model_validate({"path": "x.csv", "datasets": [{"path": "y.csv"}]})
    with pytest.raises(ValueError, match="mixes the entries"):
        DataSection.model_validate({"path": "x.csv", "mix": "weights"})


def test_hub_ids_offline_give_the_existing_clear_error(cls_work, monkeypatch):
    root, _ = cls_work
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = DataSection.model_validate({"datasets": [{"path": str(root / "one")}, {"path": "nobody/no-such-dataset"}]})
    with pytest.raises(PeftrunError) as err:
        load_splits(data, seed=1)
    assert err.value.where.startswith("data.datasets[1].path")
    assert "cannot be loaded" in err.value.message


def test_a_global_eval_file_is_the_eval_set_of_all_the_datasets(two_files, tmp_path):
    a, b = two_files
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": f"held {i}", "label": f"h{i}", "id": f"h{i}"} for i in range(4)])
    data = DataSection.model_validate({
        "datasets": [
            {"path": str(a), "format": "alpaca", "columns": {"instruction": "q", "output": "a"}},
            {"path": str(b), "text_column": "question", "label_column": "answer"},
        ],
        "eval_file": str(held),
    })
    splits = load_splits(data, seed=3)  # held_out defaults to global with data.eval_file
    assert [len(p.train) for p in splits.parts if p.train is not None] == [30, 10]  # nothing carved
    evals = splits.pieces("eval", data)
    assert len(evals) == 1 and evals[0][0]["id"] == [f"h{i}" for i in range(4)]
    assert evals[0][1].format == "plain" and evals[0][1].text_column == "text"


def test_preference_pairs_of_several_datasets_each_with_its_own_columns(tmp_path, tiny_dir):
    from tiny_text import word_tokenizer

    from peftrun.recipe import recipe_from_dict
    from peftrun.training.objectives import make_objective

    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"pick {i}", "chosen": "yes", "rejected": "no"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": f"pick {i}", "good": "yes", "bad": "no no"} for i in range(6)])
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(tiny_dir("llama", "CAUSAL_LM")), "task_type": "CAUSAL_LM"},
        "data": {"format": "preference", "max_length": 16, "datasets": [
            {"path": str(a)},
            {"path": str(b), "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}},
        ]},
        "training": {"objective": "dpo"},
    }, machine=False)
    splits = load_splits(recipe.data, seed=1)
    tok = word_tokenizer("llama", ["pick yes no"] + [str(i) for i in range(10)])
    data = make_objective(recipe).data(tok, splits, None)
    assert (len(data.train), len(data.eval)) == (9 + 5, 1 + 1)
    assert data.notes[0] == "preference pairs: 14 train, 2 eval"


def test_set_reaches_into_a_dataset_entry_by_its_index():
    from peftrun.recipe import apply_overrides

    data = {"data": {"datasets": [{"path": "a"}, {"path": "b"}]}}
    got = apply_overrides(data, ["data.datasets.1.weight=2", "data.datasets.0.format=alpaca"])
    assert got["data"]["datasets"] == [{"path": "a", "format": "alpaca"}, {"path": "b", "weight": 2}]
    for bad in ("data.datasets.2.weight=1", "data.datasets.x.weight=1"):
        with pytest.raises(PeftrunError, match="is not an index of that list"):
            apply_overrides(data, [bad])
