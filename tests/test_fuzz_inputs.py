"""Fuzzing the inputs that are not recipes (issue #13): mutated adapter_config.json, mutated adapter weights and
mutated data files either load or raise PeftrunError (one line), never another exception.

In-process through the functions the CLI calls: `read_adapter` and `load_adapted` for an adapter folder (merge,
generate, eval --adapter, combine), `load_splits`, `label_names_for` and `tokenize_split` for data (train, eval);
then a few of the same inputs through the real CLI for exit code 0 or 2 and no traceback. Rank-sized numbers
are drawn below 64 or beyond the bounds: a rank of a million that passes the bounds builds layers of that size
before the shapes are compared, which costs memory, not correctness.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows

from peftrun.errors import PeftrunError

EXAMPLES = int(os.environ.get("PEFTRUN_FUZZ_INPUT_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
CONFIG, WEIGHTS, RECIPE_COPY = "adapter_config.json", "adapter_model.safetensors", "peftrun_recipe.yaml"


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A tiny classifier, its data, a LoRA adapter saved with its recipe copy, and a scratch folder."""
    from peftrun.adapted import wrap
    from peftrun.io.peft_format import save_adapter
    from peftrun.models import load_model
    from peftrun.recipe import recipe_from_dict

    root = tmp_path_factory.mktemp("fuzz_inputs")
    model_dir = tiny_model_dir(root)
    write_rows(root / "data" / "train.csv", 12)
    write_rows(root / "data" / "validation.csv", 4)
    recipe = recipe_from_dict(tiny_recipe_dict(model_dir, root / "data", root / "unused"))
    recipe.model.num_labels = 2
    peft_model = wrap(load_model(recipe.model), "SEQ_CLS", "lora", recipe.method_config)
    adapter = save_adapter(peft_model, root / "adapter", base_model=str(model_dir), recipe=recipe)
    return {
        "root": root,
        "adapter": adapter,
        "config": json.loads((adapter / CONFIG).read_text()),
        "weights": (adapter / WEIGHTS).read_bytes(),
        "recipe": recipe,
        "scratch": root / "scratch",
    }


def fresh_copy(kit) -> Path:
    scratch = kit["scratch"]
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(kit["adapter"], scratch)
    return scratch


def load_ok_or_user_error(folder: Path) -> None:
    """read_adapter, then (where it reads) the whole load onto the base: success or one PeftrunError line."""
    from peftrun.io.loading import load_adapted
    from peftrun.io.peft_format import read_adapter

    stage = "read"
    try:
        read_adapter(folder)
        stage = "load"
        load_adapted(folder)
        event("loaded")
    except PeftrunError as exc:
        event(f"refused at {stage}")  # --hypothesis-show-statistics: how far the mutations get
        text = exc.render()
        assert text and "\n" not in text, text


# ------------------------------------------------------------------ adapter_config.json

NUMBERS = st.one_of(
    st.integers(-2, 63),
    st.sampled_from([2**20 + 1, 2**31, 2**63, 10**30, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not (64 <= abs(x) <= 2**20)),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 1e-320, -0.0, 0.5]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), NUMBERS, st.text(max_size=12),
    st.sampled_from(["LORA", "IA3", "LOHA", "LOKR", "ADALORA", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING",
                     "ADAPTION_PROMPT", "BOTTLENECK", "SEQ_CLS", "CAUSAL_LM", "query", "all-linear", ".*", "a\x00b"]),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "task_type", "base_model_name_or_path", "lora_dropout",
        "modules_to_save", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "fan_in_fan_out", "bias",
        "layers_to_transform", "layers_pattern", "inference_mode", "revision", "exclude_modules", "init_lora_weights"]


def _json_text(config, allow_nan: bool) -> str:
    return json.dumps(config, allow_nan=allow_nan, default=str)


@FUZZ
@given(data=st.data())
def test_mutated_adapter_configs_load_or_raise_a_user_error(kit, data):
    folder = fresh_copy(kit)
    shape = data.draw(st.sampled_from(["edit", "edit", "edit", "whole", "bytes", "text"]), label="shape")
    if shape == "bytes":
        raw = data.draw(st.binary(max_size=200), label="bytes")
    elif shape == "text":
        text = _json_text(kit["config"], True)
        at = data.draw(st.integers(0, len(text)), label="at")
        cut = data.draw(st.integers(0, 12), label="cut")
        piece = data.draw(st.sampled_from(["", "NaN", "Infinity", "1e400", "[", "{", '"', ",", "9" * 5000, "\xff"]))
        raw = (text[:at] + piece + text[at + cut:]).encode("utf-8", "surrogatepass")
    elif shape == "whole":
        raw = _json_text(data.draw(VALUES, label="whole"), True).encode()
    else:
        config = copy.deepcopy(kit["config"])
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            key = data.draw(st.sampled_from(KEYS), label="key")
            op = data.draw(st.sampled_from(["drop", "set", "swap"]), label="op")
            if op == "drop":
                config.pop(key, None)
            elif op == "set":
                config[key] = data.draw(VALUES, label="value")
            elif key in config:  # the same value as another type
                old = config[key]
                config[key] = str(old) if isinstance(old, (int, float)) else [old] if not isinstance(old, list) else 7
        raw = _json_text(config, True).encode()
    (folder / CONFIG).write_bytes(raw)
    load_ok_or_user_error(folder)


# ------------------------------------------------------------------ adapter_model.safetensors


@FUZZ
@given(data=st.data())
def test_mutated_adapter_weights_load_or_raise_a_user_error(kit, data):
    folder = fresh_copy(kit)
    raw = kit["weights"]
    op = data.draw(st.sampled_from(["truncate", "flip", "nan", "dtype", "drop", "extra", "bytes", "empty"]), label="op")
    if op == "truncate":
        (folder / WEIGHTS).write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="length")])
    elif op == "flip":
        edited = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            at = data.draw(st.integers(0, len(raw) - 1), label="at")
            edited[at] = data.draw(st.integers(0, 255), label="byte")
        (folder / WEIGHTS).write_bytes(bytes(edited))
    elif op == "bytes":
        (folder / WEIGHTS).write_bytes(data.draw(st.binary(max_size=300), label="bytes"))
    elif op == "empty":
        (folder / WEIGHTS).write_bytes(b"")
    else:
        import torch

        state = load_file(str(kit["adapter"] / WEIGHTS))
        key = data.draw(st.sampled_from(sorted(state)), label="key")
        if op == "nan":
            state[key] = state[key].clone()
            state[key].view(-1)[data.draw(st.integers(0, state[key].numel() - 1))] = data.draw(
                st.sampled_from([math.nan, math.inf, -math.inf]), label="value"
            )
        elif op == "dtype":
            state[key] = state[key].to(data.draw(st.sampled_from([torch.float16, torch.int8, torch.bool, torch.float64])))
        elif op == "drop":
            del state[key]
        else:
            state[key + ".extra"] = torch.zeros(2, 3)
        save_file(state, str(folder / WEIGHTS))
    load_ok_or_user_error(folder)


# ------------------------------------------------------------------ data files

LABELS = st.one_of(
    st.sampled_from(["pos", "neg", "", " "]), st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False),
    st.lists(st.sampled_from(["pos", "neg", 1]), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2), st.text(max_size=5),
)
TEXTS = st.one_of(st.text(max_size=20), st.none(), st.integers(), st.lists(st.text(max_size=4), max_size=2))
DATA_OPS = ["valid", "drop column", "rename column", "one value", "column type", "bytes", "empty", "no rows"]


def _rows(data, name: str) -> list[dict]:
    """Valid rows (text, label pos/neg) with one mutation: a column dropped or renamed, one value or a whole
    column of another type (a list, a mapping, a number, null, blank)."""
    n = data.draw(st.integers(1, 8), label=f"{name} rows")
    rows = [{"text": f"a day {i}", "label": "pos" if i % 2 else "neg"} for i in range(n)]
    op = data.draw(st.sampled_from(DATA_OPS[:5]), label=f"{name} op")
    column = data.draw(st.sampled_from(["text", "label"]), label=f"{name} column")
    if op == "drop column":
        for row in rows:
            row.pop(column)
    elif op == "rename column":
        for row in rows:
            row["other"] = row.pop(column)
    elif op == "one value":
        rows[data.draw(st.integers(0, n - 1))][column] = data.draw(LABELS if column == "label" else TEXTS)
    elif op == "column type":
        value = data.draw(LABELS if column == "label" else TEXTS, label=f"{name} value")
        for row in rows:
            row[column] = value
    return rows


def _write_data(folder: Path, name: str, data) -> None:
    kind = data.draw(st.sampled_from(["jsonl", "csv"]), label=f"{name} kind")
    for old in folder.glob(f"{name}.*"):
        old.unlink()
    file = folder / f"{name}.{kind}"
    op = data.draw(st.sampled_from(["rows", "rows", "rows", "bytes", "empty", "no rows"]), label=f"{name} file")
    if op == "bytes":
        file.write_bytes(data.draw(st.binary(max_size=200), label=f"{name} bytes"))
    elif op == "empty":
        file.write_bytes(b"")
    elif op == "no rows":
        file.write_text("text,label\n" if kind == "csv" else "\n")
    elif kind == "jsonl":
        file.write_text("".join(json.dumps(r) + "\n" for r in _rows(data, name)))
    else:
        import csv

        rows = _rows(data, name)
        with open(file, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})


@FUZZ
@given(data=st.data())
def test_mutated_data_files_load_or_raise_a_user_error(kit, data):
    from peftrun.data import label_names_for, load_splits, tokenize_split
    from peftrun.models import load_tokenizer

    folder = kit["root"] / "fuzz_data"
    folder.mkdir(exist_ok=True)
    _write_data(folder, "train", data)
    if data.draw(st.booleans(), label="with validation"):
        _write_data(folder, "validation", data)
    else:
        for old in folder.glob("validation.*"):
            old.unlink()
    recipe = kit["recipe"].model_copy(deep=True)
    recipe.data.path = str(folder)
    tokenizer = kit.setdefault("tokenizer", load_tokenizer(recipe.model))
    try:
        splits = load_splits(recipe.data, recipe.training.seed)
        names = label_names_for(splits, recipe.data)
        for split in (splits.train, splits.eval):
            tokenize_split(split, recipe.data, tokenizer, "SEQ_CLS", names, for_eval=True)
        event("tokenized")
    except PeftrunError as exc:
        event("refused: " + exc.message[:40])
        text = exc.render()
        assert text and "\n" not in text, text


# ------------------------------------------------------------------ the same through the real CLI


def test_the_cli_exits_0_or_2_without_a_traceback(kit, tmp_path):
    cases = {}
    for name, edit in {
        "config_random_bytes": lambda f: (f / CONFIG).write_bytes(bytes(range(256))),
        "config_list": lambda f: (f / CONFIG).write_text("[1, 2]"),
        "weights_flipped": lambda f: (f / WEIGHTS).write_bytes(b"\x00" * 8 + kit["weights"][8:]),
        "recipe_copy_list": lambda f: (f / RECIPE_COPY).write_text("- 1\n- 2\n"),
    }.items():
        folder = tmp_path / name
        shutil.copytree(kit["adapter"], folder)
        edit(folder)
        cases[name] = folder
    for name, folder in cases.items():
        proc = run_cli("merge", "--adapter", str(folder), "--output", str(tmp_path / f"{name}-merged"))
        assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert str(folder) in proc.stderr, proc.stderr
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text('{"text": "a", "label": {"x": 1}}\n')
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(Path(kit["recipe"].model.name_or_path),
                                                                tmp_path / "d", tmp_path / "out"))
    proc = run_cli("eval", str(recipe), "--adapter", str(kit["adapter"]))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "column 'label' must hold one value per row" in proc.stderr
