"""Inputs other than the recipe (adapter folders, data files, the disk) end in one PeftrunError / exit-2 line
naming the file and the key, tensor or value; non-finite numbers are refused where they enter (issue #13,
classes 4 and 5). The checkpoint side (non-finite weights, a corrupt newest checkpoint) is in
test_checkpoint_faults.py; random mutations of the same inputs in test_fuzz_inputs.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from adapter_kit import save_lm, save_lora
from conftest import run_cli
from safetensors.torch import load_file, save_file
from test_cli import run_patched
from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows

import peftrun
from peftrun.errors import PeftrunError
from peftrun.io.peft_format import read_adapter, read_recipe_copy

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    model = tiny_model_dir(root)
    write_rows(root / "data" / "train.csv", 16)
    write_rows(root / "data" / "validation.csv", 8)
    return root, model


@pytest.fixture(scope="module")
def adapter(work):
    """A LoRA adapter of the tiny BERT classifier, saved by peftrun with its recipe copy."""
    from peftrun.adapted import wrap
    from peftrun.io.peft_format import save_adapter
    from peftrun.models import load_model
    from peftrun.recipe import recipe_from_dict

    root, model_dir = work
    recipe = recipe_from_dict(tiny_recipe_dict(model_dir, root / "data", root / "unused"))
    recipe.model.num_labels = 2
    peft_model = wrap(load_model(recipe.model), "SEQ_CLS", "lora", recipe.method_config)
    return save_adapter(peft_model, root / "adapter", base_model=str(model_dir), recipe=recipe)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_combine")
    base = save_lm(root / "base")
    return {"root": root, "base": base, "a": save_lora(base, root / "a", seed=1), "b": save_lora(base, root / "b", seed=2)}


def copy_of(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def set_config(folder: Path, edit) -> None:
    config = json.loads((folder / CONFIG).read_text())
    edit(config)
    (folder / CONFIG).write_text(json.dumps(config))


def set_tensor(folder: Path, key_part: str, fill: float) -> str:
    state = load_file(str(folder / WEIGHTS))
    key = next(k for k in sorted(state) if key_part in k)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = fill
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    return key


def refusal(call) -> str:
    with pytest.raises(PeftrunError) as info:
        call()
    text = info.value.render()
    assert "\n" not in text
    return text


def expect_exit_2(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------ adapter_config.json


CONFIG_TEXTS = {
    "a list": ("[1, 2]", "must hold a JSON object of peft's fields, not a list"),
    "a number": ("7", "not a number"),
    "a string": ('"LORA"', "not a string"),
    "null": ("null", "not null"),
    "invalid JSON": ('{"peft_type": "LORA",', "is not valid JSON"),
    "NaN literal": ('{"peft_type": "LORA", "r": NaN}', "holds NaN: its numbers must be finite"),
    "Infinity literal": ('{"peft_type": "LORA", "lora_alpha": -Infinity}', "holds -Infinity"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_TEXTS))
def test_adapter_config_that_is_not_a_json_object_is_named(adapter, tmp_path, case):
    text, needle = CONFIG_TEXTS[case]
    folder = copy_of(adapter, tmp_path)
    (folder / CONFIG).write_text(text)
    message = refusal(lambda: read_adapter(folder))
    assert message.startswith(f"{folder / CONFIG}: ") and needle in message, message


def test_adapter_config_that_is_not_utf8_or_nested_too_deep(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    (folder / CONFIG).write_bytes(b'{"peft_type": "LORA\xff\xfe"}')
    assert "is not UTF-8 text (byte 0xff at offset 19)" in refusal(lambda: read_adapter(folder))
    (folder / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in refusal(lambda: read_adapter(folder))


FIELD_EDITS = {
    "peft_type missing": (lambda c: c.pop("peft_type"), "'peft_type' is missing"),
    "peft_type a list": (lambda c: c.update(peft_type=["LORA"]), "'peft_type' must be a string"),
    "peft_type unknown": (lambda c: c.update(peft_type="LORAX"), "peft_type 'LORAX' is not a method"),
    "r missing": (lambda c: c.pop("r"), "'r' is missing"),
    "r a string": (lambda c: c.update(r="four"), "r: Input should be a valid integer"),
    "r a list": (lambda c: c.update(r=[4]), "r: Input should be a valid integer"),
    "r huge": (lambda c: c.update(r=2**40), "'r' must be at most 1048576 in size"),
    "r beyond int64": (lambda c: c.update(r=10**30), "'r' must be at most"),
    "target_modules missing": (lambda c: c.pop("target_modules"), "'target_modules' is missing"),
    "target_modules a number": (lambda c: c.update(target_modules=3), "target_modules"),
    "task_type unknown": (lambda c: c.update(task_type="QUESTION_ANS"), "'task_type' \"QUESTION_ANS\" is not a task"),
    "base model a number": (lambda c: c.update(base_model_name_or_path=5), "'base_model_name_or_path' must be a string"),
}


@pytest.mark.parametrize("case", sorted(FIELD_EDITS))
def test_missing_or_wrong_typed_fields_name_the_key(adapter, tmp_path, case):
    edit, needle = FIELD_EDITS[case]
    folder = copy_of(adapter, tmp_path)
    set_config(folder, edit)
    message = refusal(lambda: read_adapter(folder))
    assert message.startswith(f"{folder / CONFIG}: ") and needle in message, message


def test_a_number_that_overflows_to_inf_is_named(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    text = (folder / CONFIG).read_text()
    config = json.loads(text)
    (folder / CONFIG).write_text(text.replace(f'"lora_alpha": {config["lora_alpha"]}', '"lora_alpha": 1e400'))
    assert "'lora_alpha' must be a finite number (got inf)" in refusal(lambda: read_adapter(folder))


def test_fields_come_back_in_the_types_peftrun_uses(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    set_config(folder, lambda c: c.update(lora_alpha="16", r="4"))  # pydantic's lax mode reads these as numbers
    config, _ = read_adapter(folder)
    assert config["lora_alpha"] == 16 and config["r"] == 4


def test_bad_adapter_config_through_the_cli(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    (folder / CONFIG).write_text("[]")
    proc = run_cli("merge", "--adapter", str(folder), "--output", str(tmp_path / "merged"))
    expect_exit_2(proc, str(folder / CONFIG), "not a list")
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------ weights: non-finite refused where they enter


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_non_finite_adapter_weights_are_refused_naming_the_tensor(adapter, tmp_path, fill):
    folder = copy_of(adapter, tmp_path)
    key = set_tensor(folder, "lora_B", fill)
    message = refusal(lambda: read_adapter(folder))
    assert message.startswith(f"{folder / WEIGHTS}: tensor '{key}' holds NaN or infinite values"), message


def test_merge_of_a_nan_adapter_exits_2_and_writes_nothing(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    key = set_tensor(folder, "lora_A", float("nan"))
    proc = run_cli("merge", "--adapter", str(folder), "--output", str(tmp_path / "merged"))
    expect_exit_2(proc, str(folder / WEIGHTS), key)
    assert not (tmp_path / "merged").exists()


def test_pickle_weights_that_are_not_a_tensor_mapping_are_refused(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    (folder / WEIGHTS).unlink()
    torch.save([torch.zeros(2)], folder / "adapter_model.bin")
    assert "holds list, not a mapping of tensor names to tensors" in refusal(
        lambda: read_adapter(folder, allow_pickle=True)
    )
    torch.save({"w": torch.tensor([float("nan")])}, folder / "adapter_model.bin")
    assert "tensor 'w' holds NaN" in refusal(lambda: read_adapter(folder, allow_pickle=True))


def test_merge_verification_fails_on_non_finite_output(adapter, tmp_path):
    """Finite weights whose product overflows float32: no longer 'verified' by a NaN difference."""
    from peftrun.merge import merge

    folder = copy_of(adapter, tmp_path)
    state = load_file(str(folder / WEIGHTS))
    for key in state:
        if "lora_" in key:
            state[key] = torch.full_like(state[key], 3e38)
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    message = refusal(lambda: merge(folder, tmp_path / "merged"))
    assert "is not finite (NaN or inf); nothing written" in message and str(folder) in message
    assert not (tmp_path / "merged").exists()


def test_verify_finite_checks_the_merged_weights_too(tmp_path):
    from peftrun.merge import verify_finite

    finite = torch.zeros(2, 3)
    layer = torch.nn.Linear(2, 2)
    verify_finite(tmp_path, finite, finite, layer)  # all finite: nothing to say
    with torch.no_grad():
        layer.bias[1] = float("inf")
    assert "merged weight 'bias' is not finite" in refusal(lambda: verify_finite(tmp_path, finite, finite, layer))
    assert "after merging is not finite" in refusal(
        lambda: verify_finite(tmp_path, finite, torch.tensor([float("nan")]), layer)
    )


# ------------------------------------------------------------------ the recipe copy inside an adapter folder


SAVED_RECIPES = {
    "a list": ("- model\n- data\n", "a saved recipe is a YAML mapping of keys to values, got list"),
    "a number": ("42\n", "a saved recipe is a YAML mapping of keys to values, got int"),
    "model a list": ("model: [a, b]\n", "section 'model' must be a mapping, not list"),
    "data a string": ("data: plain\n", "section 'data' must be a mapping, not str"),
    "model.dtype wrong": ("model:\n  dtype: 5\n", "model.dtype"),
    "model.num_labels huge": ("model:\n  num_labels: 99999999999\n", "model.num_labels"),
    "model.config_overrides NaN": ("model:\n  config_overrides: {x: .nan}\n", "must be a finite number"),
    "data.format wrong": ("data:\n  format: [alpaca]\n", "data.format"),
    "data.label_names a mapping": ("data:\n  label_names: {a: 1}\n", "data.label_names"),
}


@pytest.mark.parametrize("case", sorted(SAVED_RECIPES))
def test_malformed_saved_recipe_is_named(adapter, tmp_path, case):
    text, needle = SAVED_RECIPES[case]
    folder = copy_of(adapter, tmp_path)
    (folder / "peftrun_recipe.yaml").write_text(text)
    message = refusal(lambda: read_recipe_copy(folder))
    assert message.startswith(str(folder / "peftrun_recipe.yaml")) and needle in message, message


def test_partial_saved_recipe_still_reads(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    (folder / "peftrun_recipe.yaml").write_text("data:\n  format: alpaca\n")
    assert read_recipe_copy(folder) == {"data": {"format": "alpaca"}}


def test_malformed_saved_recipe_through_the_cli(adapter, tmp_path):
    folder = copy_of(adapter, tmp_path)
    (folder / "peftrun_recipe.yaml").write_text("model: 3\n")
    proc = run_cli("merge", "--adapter", str(folder), "--output", str(tmp_path / "merged"))
    expect_exit_2(proc, str(folder / "peftrun_recipe.yaml"), "section 'model' must be a mapping")


# ------------------------------------------------------------------ combine: inputs checked, output finite


def test_combine_refuses_nan_inputs(lm, tmp_path):
    folder = copy_of(lm["a"], tmp_path)
    key = set_tensor(folder, "lora_A", float("nan"))
    message = refusal(lambda: peftrun.combine([(folder, 0.5), (lm["b"], 0.5)], tmp_path / "out"))
    assert f"tensor '{key}' holds NaN" in message and str(folder / WEIGHTS) in message
    assert not (tmp_path / "out").exists()


def test_combine_refuses_a_factor_without_its_partner(lm, tmp_path):
    folder = copy_of(lm["a"], tmp_path)
    state = load_file(str(folder / WEIGHTS))
    gone = next(k for k in sorted(state) if k.endswith(".lora_B.weight"))
    del state[gone]
    save_file(state, str(folder / WEIGHTS))
    message = refusal(lambda: peftrun.combine([(folder, 1.0)], tmp_path / "out"))
    assert f"has no '{gone}' beside it" in message and str(folder / WEIGHTS) in message


def test_combine_refuses_factors_of_two_ranks(lm, tmp_path):
    folder = copy_of(lm["a"], tmp_path)
    state = load_file(str(folder / WEIGHTS))
    key = next(k for k in sorted(state) if k.endswith(".lora_B.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    save_file(state, str(folder / WEIGHTS))
    message = refusal(lambda: peftrun.combine([(folder, 1.0)], tmp_path / "out"))
    assert "they must be matrices (r × in) and (out × r) of one rank r" in message


def test_combine_refuses_mismatched_shapes_across_adapters(lm, tmp_path):
    wide = save_lora(lm["base"], tmp_path / "wide", seed=3, r=4)
    state = load_file(str(wide / WEIGHTS))
    a_key = next(k for k in sorted(state) if k.endswith(".lora_A.weight"))
    state[a_key] = torch.zeros(4, state[a_key].shape[1] + 8)  # another input width than adapter a has
    save_file(state, str(wide / WEIGHTS))
    message = refusal(lambda: peftrun.combine([(lm["a"], 0.5), (wide, 0.5)], tmp_path / "out"))
    module = a_key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
    assert f"module '{module}' has different shapes across the adapters" in message


def test_combine_never_writes_an_overflowed_result(lm, tmp_path):
    big = copy_of(lm["a"], tmp_path, "big")  # finite weights, and a finite weight: their product is not
    state = load_file(str(big / WEIGHTS))
    save_file({k: torch.full_like(v, 1e30) for k, v in state.items()}, str(big / WEIGHTS))
    for method in ("cat", "svd"):
        message = refusal(
            lambda method=method: peftrun.combine([(big, 1e30), (lm["b"], 1.0)], tmp_path / method, method=method)
        )
        assert "is not finite (it overflowed float32); nothing written" in message
        assert not (tmp_path / method).exists()


def test_combine_cli_missing_key_exits_2(lm, tmp_path):
    folder = copy_of(lm["a"], tmp_path)
    set_config(folder, lambda c: c.pop("target_modules"))
    proc = run_cli("combine", "--adapter", f"{folder}:1", "--output", str(tmp_path / "out"))
    expect_exit_2(proc, str(folder / CONFIG), "'target_modules' is missing")


# ------------------------------------------------------------------ data files


def data_cfg(**fields):
    from peftrun.recipe import DataSection

    return DataSection(**{"path": "unused", **fields})


@pytest.mark.parametrize("name", ["train.csv", "train.jsonl", "train.json", "train.tsv", "train.parquet"])
def test_zero_byte_data_files_are_named(tmp_path, name):
    from peftrun.data import load_file as load_data

    (tmp_path / name).write_bytes(b"")
    message = refusal(lambda: load_data(tmp_path / name, "data.train_file", data_cfg()))
    assert message == f"data.train_file ({tmp_path / name}): {name} is empty (0 bytes): no rows to read"


@pytest.mark.parametrize(("name", "text"), [("h.csv", "text,label\n"), ("l.json", "[]"), ("ws.jsonl", "\n\n")])
def test_data_files_without_rows_are_named(tmp_path, name, text):
    from peftrun.data import load_file as load_data

    (tmp_path / name).write_text(text)
    message = refusal(lambda: load_data(tmp_path / name, "data.train_file", data_cfg()))
    assert str(tmp_path / name) in message and ("has no rows" in message or "cannot read" in message), message


@pytest.mark.parametrize(
    ("rows", "shape"),
    [([{"text": "a", "label": [1, 2]}, {"text": "b", "label": [3]}], "a list"),
     ([{"text": "a", "label": {"x": 1}}], "a mapping"),
     ([{"text": ["a", "b"], "label": "pos"}], "a list")],
)
def test_non_scalar_labels_or_texts_are_named(tmp_path, rows, shape):
    from peftrun.data import load_file as load_data

    file = tmp_path / "train.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = refusal(lambda: load_data(file, "data.train_file", data_cfg()))
    assert message.startswith(f"data.train_file ({file}): column '")
    assert f"must hold one value per row (a text or a label), not {shape}" in message


def test_token_rows_need_lists(tmp_path):
    from peftrun.data import load_file as load_data

    file = tmp_path / "train.jsonl"
    file.write_text(json.dumps({"tokens": ["a", "b"], "ner_tags": "O"}) + "\n")
    cfg = data_cfg(format="tokens", tokens_column="tokens", tags_column="ner_tags")
    assert "column 'ner_tags' must hold a list of words or tags" in refusal(lambda: load_data(file, "data.path", cfg))


def test_empty_eval_file_through_train_exits_2(work, tmp_path):
    root, model = work
    (tmp_path / "d").mkdir()
    write_rows(tmp_path / "d" / "train.csv", 8)
    (tmp_path / "d" / "validation.jsonl").write_bytes(b"")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(model, tmp_path / "d", tmp_path / "out"))
    expect_exit_2(run_cli("train", str(recipe)), "validation.jsonl is empty (0 bytes)")


def test_list_labels_through_train_exit_2(work, tmp_path):
    root, model = work
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"row {i}", "label": ["pos"]}) + "\n" for i in range(6))
    )
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(model, tmp_path / "d", tmp_path / "out"))
    expect_exit_2(run_cli("train", str(recipe)), "train.jsonl", "column 'label' must hold one value per row")


def test_unreadable_data_file_is_one_line_naming_the_cause(work, tmp_path):
    """datasets logs a line of its own before raising, and wraps the cause: the user sees one line, the cause."""
    root, model = work
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_bytes(b"\x00\xff{a")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(model, tmp_path / "d", tmp_path / "out"))
    expect_exit_2(run_cli("train", str(recipe)), f"({tmp_path / 'd' / 'train.jsonl'}): cannot read train.jsonl: JSON parse")


# ------------------------------------------------------------------ evaluation: a NaN loss is no JSON


def test_eval_with_a_non_finite_loss_exits_2_naming_the_adapter(work, adapter, tmp_path):
    """The base (not the adapter, which read_adapter checks) computes NaN: eval says so instead of printing
    `metrics={"eval_loss": NaN}`, which is not JSON."""
    from tiny import save_tiny

    root, _ = work
    broken = tmp_path / "nan-base"
    model = save_tiny(broken, "bert", "SEQ_CLS", vocab_size=384, num_labels=2)
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    data = tiny_recipe_dict(broken, root / "data", tmp_path / "out")
    recipe = write_recipe(tmp_path / "eval.yaml", data)
    proc = run_cli("eval", str(recipe), "--adapter", str(adapter))
    expect_exit_2(proc, "eval_loss is nan on the eval split", f"the adapter {adapter}")
    assert "metrics=" not in proc.stdout


# ------------------------------------------------------------------ a full disk names the file


def test_writes_that_fail_without_a_name_are_named(tmp_path):
    from safetensors import SafetensorError

    from peftrun.io.atomic import atomic_dir, naming_files
    from peftrun.io.peft_format import save_torch

    final = tmp_path / "out"
    with pytest.raises(OSError) as info, atomic_dir(final) as tmp:
        (tmp / "a.json").write_text("{}")
        (tmp / "b.bin").write_text("partial")
        raise OSError(28, "No space left on device")
    assert (info.value.errno, info.value.filename) == (28, str(final / "b.bin"))
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(OSError) as info, naming_files(tmp_path / "x.safetensors"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert info.value.filename == str(tmp_path / "x.safetensors") and info.value.strerror == "No space left on device"
    with pytest.raises(SafetensorError), naming_files(tmp_path / "x.safetensors"):
        raise SafetensorError("not an I/O error")  # a bug stays a bug
    with pytest.raises(OSError) as info:
        save_torch({"a": 1}, tmp_path / "missing" / "x.pt")
    assert info.value.filename == str(tmp_path / "missing" / "x.pt")


FILE_SIZE_LIMIT = """
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1500, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
"""


def test_combine_on_a_full_disk_names_the_file(lm, tmp_path):
    """A real write failure (a file-size limit, as a full disk would), inside safetensors' own writer."""
    out = tmp_path / "out"
    proc = run_patched(FILE_SIZE_LIMIT, "combine", "--adapter", f"{lm['a']}:1", "--output", str(out))
    expect_exit_2(proc, f"{out / WEIGHTS}: File too large")
    assert not out.exists()


ENOSPC_IN_SAFETENSORS = """
    import safetensors.torch
    from safetensors import SafetensorError
    real = safetensors.torch.save_file
    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    safetensors.torch.save_file = full
"""


def test_train_checkpoint_on_a_full_disk_names_the_file(work, tmp_path):
    root, model = work
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_recipe_dict(model, root / "data", out, num_epochs=1, save_steps=2)
    )
    proc = run_patched(ENOSPC_IN_SAFETENSORS, "train", str(recipe))
    expect_exit_2(proc, f"{out / 'checkpoints' / 'step-000002' / WEIGHTS}: No space left on device")
    assert not (out / "checkpoints" / "step-000002").exists()


def test_saved_recipe_copy_round_trips_through_yaml(adapter):
    saved = yaml.safe_load((adapter / "peftrun_recipe.yaml").read_text())
    assert read_recipe_copy(adapter) == saved
