"""Every user mistake ends in one line naming what is wrong and where, exit code 2, no traceback.

Each case is a bad recipe (or a bad file beside a good one) run through the real CLI. A property test then
mutates valid recipes at random and checks that validation accepts them or raises PeftrunError, nothing else.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from faults import fault_env
from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows

from peftrun.errors import PeftrunError


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    model = tiny_model_dir(root)
    write_rows(root / "data" / "train.csv", 24)
    write_rows(root / "data" / "validation.csv", 8)
    return root, model


def base_recipe(work) -> dict:
    root, model = work
    return tiny_recipe_dict(model, root / "data", root / "out_unused", num_epochs=1)


def line_of(text: str, key: str, after: str | None = None) -> int:
    """1-based line of `key:` in YAML text (the first one after the line holding `after:`)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{after}:")) if after else 0
    return next(i + 1 for i, line in enumerate(lines) if i >= start and line.strip().startswith(f"{key}:"))


def expect_user_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def validate(tmp_path: Path, data: dict | str, *extra: str):
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path, text, run_cli("validate", str(path), *extra)


# ------------------------------------------------------------------ schema mistakes: `peftrun validate`


def test_unknown_top_level_key_says_did_you_mean(work, tmp_path):
    data = base_recipe(work)
    data["trainig"] = data.pop("training")
    path, text, proc = validate(tmp_path, data)
    expect_user_error(
        proc,
        f"{path}:{line_of(text, 'trainig')}: trainig",
        "unknown key 'trainig'",
        "did you mean 'training'",
    )


def test_unknown_nested_key_says_did_you_mean(work, tmp_path):
    data = base_recipe(work)
    data["training"]["learning_rat"] = data["training"].pop("learning_rate")
    path, text, proc = validate(tmp_path, data)
    expect_user_error(
        proc, f"{path}:{line_of(text, 'learning_rat')}: training.learning_rat", "did you mean 'learning_rate'"
    )


def test_wrong_type_names_key_and_value(work, tmp_path):
    data = base_recipe(work)
    data["training"]["batch_size"] = "eight"
    path, text, proc = validate(tmp_path, data)
    expect_user_error(proc, f"{path}:{line_of(text, 'batch_size')}: training.batch_size", "'eight'")


def test_value_out_of_range(work, tmp_path):
    data = base_recipe(work)
    data["training"]["learning_rate"] = -1
    _, _, proc = validate(tmp_path, data)
    expect_user_error(proc, "training.learning_rate", "greater than 0", "(got -1)")


def test_unknown_task_type(work, tmp_path):
    data = base_recipe(work)
    data["model"]["task_type"] = "SEQ2SEQ"
    _, _, proc = validate(tmp_path, data)
    expect_user_error(proc, "model.task_type", "'SEQ_2_SEQ_LM'", "(got 'SEQ2SEQ')")


def test_unknown_method_says_did_you_mean(work, tmp_path):
    data = base_recipe(work)
    data["method"]["name"] = "lorra"
    path, text, proc = validate(tmp_path, data)
    expect_user_error(
        proc, f"{path}:{line_of(text, 'name', after='method')}: method.name", "did you mean 'lora'"
    )


def test_unknown_method_parameter(work, tmp_path):
    data = base_recipe(work)
    data["method"]["lora_alpah"] = 8
    _, _, proc = validate(tmp_path, data)
    expect_user_error(proc, "method.lora_alpah", "unknown key", "did you mean 'lora_alpha'")


def test_missing_required_key(work, tmp_path):
    data = base_recipe(work)
    del data["model"]["name_or_path"]
    _, _, proc = validate(tmp_path, data)
    expect_user_error(proc, "model.name_or_path", "required key is missing")


def test_invalid_yaml_names_the_line(tmp_path):
    path, _, proc = validate(tmp_path, "model:\n  name_or_path: x\n  task_type: [SEQ_CLS\ndata: {}\n")
    expect_user_error(proc, f"{path}:", "not valid YAML")


def test_recipe_that_is_not_a_mapping(tmp_path):
    path, _, proc = validate(tmp_path, "- model\n- data\n")
    expect_user_error(proc, str(path), "a recipe is a YAML mapping", "got list")


def test_recipe_file_not_found(tmp_path):
    expect_user_error(run_cli("validate", str(tmp_path / "nope.yaml")), "nope.yaml", "recipe file not found")


def test_bad_set_override(work, tmp_path):
    path = write_recipe(tmp_path / "ok.yaml", base_recipe(work))
    expect_user_error(run_cli("validate", str(path), "--set", "training"), "--set expects key.path=value")


def test_deepspeed_config_that_contradicts_the_recipe(work, tmp_path):
    data = base_recipe(work)
    data["training"]["gradient_accumulation_steps"] = 2
    data["distributed"] = {"strategy": "deepspeed", "deepspeed": {"gradient_accumulation_steps": 4}}
    path, text, proc = validate(tmp_path, data)
    expect_user_error(
        proc,
        f"{path}:{line_of(text, 'gradient_accumulation_steps', after='deepspeed')}: "
        "distributed.deepspeed.gradient_accumulation_steps",
        "sets gradient_accumulation_steps=4 but the recipe's training.gradient_accumulation_steps gives 2",
    )


def test_deepspeed_micro_batch_and_precision_contradictions(work, tmp_path):
    data = base_recipe(work)
    data["distributed"] = {"strategy": "deepspeed", "deepspeed": {"train_micro_batch_size_per_gpu": 16}}
    expect_user_error(
        validate(tmp_path, data)[2], "train_micro_batch_size_per_gpu=16", "training.batch_size gives 4"
    )
    data["distributed"]["deepspeed"] = {"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": True}}
    expect_user_error(
        validate(tmp_path, data)[2], "distributed.deepspeed.bf16.enabled", "mixed_precision is 'no'"
    )


def test_output_dir_that_is_not_a_folder_of_its_own(work, tmp_path):
    data = base_recipe(work)
    for value, what in (("/", "the filesystem root"), ("~", "your home folder"), (".", "the current folder")):
        data["output_dir"] = value
        expect_user_error(validate(tmp_path, data)[2], "output_dir", what)


# ------------------------------------------------------------------ mistakes found when the run starts


def train(tmp_path: Path, data: dict, *extra: str, env: dict | None = None):
    path = write_recipe(tmp_path / "bad.yaml", data)
    return run_cli("train", str(path), *extra, env=env)


def test_model_that_cannot_be_found_offline(work, tmp_path):
    data = base_recipe(work)
    data["model"]["name_or_path"] = "no-such-org/no-such-model"
    data["output_dir"] = str(tmp_path / "out")
    expect_user_error(
        train(tmp_path, data), "model.name_or_path", "'no-such-org/no-such-model' cannot be loaded"
    )


def test_model_without_a_head_for_the_task(work, tmp_path):
    data = base_recipe(work)
    data["model"]["task_type"] = "SEQ_2_SEQ_LM"
    data["output_dir"] = str(tmp_path / "out")
    expect_user_error(train(tmp_path, data), "model.task_type", "BertConfig has no SEQ_2_SEQ_LM form")


def test_method_and_task_that_cannot_work(work, tmp_path):
    from peftrun.methods import TASK_TYPES, get_method, method_names

    limited = [(n, get_method(n)) for n in method_names() if set(get_method(n).task_types) != set(TASK_TYPES)]
    if not limited:
        pytest.skip("every registered method trains every task type")
    name, method = limited[0]
    data = base_recipe(work)
    data["method"] = {"name": name}
    data["model"]["task_type"] = next(t for t in TASK_TYPES if t not in method.task_types)
    expect_user_error(
        validate(tmp_path, data)[2], "model.task_type", f"method '{name}' cannot train task_type"
    )


def test_data_file_missing(work, tmp_path):
    data = base_recipe(work)
    data["data"] = {"train_file": str(tmp_path / "missing.csv")}
    data["output_dir"] = str(tmp_path / "out")
    expect_user_error(train(tmp_path, data), "data.train_file", "missing.csv", "data file not found")


def test_data_column_missing_lists_the_columns_there_are(work, tmp_path):
    data = base_recipe(work)
    data["data"]["text_column"] = "sentence"
    data["output_dir"] = str(tmp_path / "out")
    expect_user_error(train(tmp_path, data), "column(s) ['sentence']", "columns there are: 'text', 'label'")


def test_target_modules_matching_nothing_lists_candidates(work, tmp_path):
    data = base_recipe(work)
    data["method"]["target_modules"] = ["q_proj", "v_proj"]
    data["output_dir"] = str(tmp_path / "out")
    expect_user_error(
        train(tmp_path, data), "method.target_modules", "match no module", "query", "value", "dense"
    )


def test_empty_dataset_after_filtering(work, tmp_path):
    data = base_recipe(work)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "train.csv").write_text('text,label\n"  ",pos\n"",neg\n')
    data["data"]["path"] = str(tmp_path / "blank")
    data["output_dir"] = str(tmp_path / "out")
    expect_user_error(train(tmp_path, data), "the training set is empty")


def test_non_empty_output_dir_without_overwrite(work, tmp_path):
    data = base_recipe(work)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    data["output_dir"] = str(out)
    expect_user_error(train(tmp_path, data), f"output_dir ({out})", "not empty", "overwrite: true")
    assert (out / "notes.txt").read_text() == "mine"


def test_nan_loss_stops_and_names_the_last_good_checkpoint(work, tmp_path):
    data = base_recipe(work)
    out = tmp_path / "out"
    data["output_dir"] = str(out)
    data["training"]["save_steps"] = 2
    proc = train(tmp_path, data, env=fault_env("loss:3:nan"))
    expect_user_error(
        proc,
        "the loss became nan at step 3 (epoch 0, batch 2)",
        f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}",
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert not (out / "adapter_model.safetensors").exists()  # nothing after the NaN was saved


def test_debug_shows_the_traceback(work, tmp_path):
    data = base_recipe(work)
    data["training"]["batch_size"] = "eight"
    path = write_recipe(tmp_path / "bad.yaml", data)
    proc = run_cli("--debug", "validate", str(path))
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "PeftrunError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


# ------------------------------------------------------------------ bad adapter files: `peftrun merge`


@pytest.fixture(scope="module")
def adapter(work, tmp_path_factory):
    """A LoRA adapter saved by peftrun for the tiny classifier."""
    from peftrun.adapted import wrap
    from peftrun.io.peft_format import save_adapter
    from peftrun.methods import get_method
    from peftrun.models import load_model
    from peftrun.recipe import ModelSection

    _, model_dir = work
    section = ModelSection(name_or_path=str(model_dir), task_type="SEQ_CLS", num_labels=2)
    config = get_method("lora").Config(r=4, lora_alpha=8)
    peft_model = wrap(load_model(section), "SEQ_CLS", "lora", config)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    return save_adapter(peft_model, folder, base_model=str(model_dir))


def test_adapter_for_another_base_model_names_keys_and_shapes(adapter, tmp_path):
    from tiny import save_tiny

    other = tmp_path / "wider-bert"
    save_tiny(other, "bert", "SEQ_CLS", vocab_size=384, num_labels=2, hidden_size=48, intermediate_size=96)
    proc = run_cli(
        "merge", "--adapter", str(adapter), "--base", str(other), "--output", str(tmp_path / "merged")
    )
    expect_user_error(
        proc,
        "does not fit this base model",
        "shapes differ",
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight: checkpoint (4, 32) vs model (4, 48)",
    )
    assert not (tmp_path / "merged").exists()


def test_truncated_safetensors_is_named(adapter, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    proc = run_cli("merge", "--adapter", str(broken), "--output", str(tmp_path / "merged"))
    expect_user_error(proc, str(weights), "truncated or corrupt")
    assert not (tmp_path / "merged").exists()


def test_corrupt_adapter_config_is_named(adapter, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA",')
    proc = run_cli("merge", "--adapter", str(broken), "--output", str(tmp_path / "merged"))
    expect_user_error(proc, str(broken / "adapter_config.json"), "not valid JSON")


# ------------------------------------------------------------------ property: validation never crashes

VALUES = [
    None,
    True,
    0,
    -1,
    3,
    1e9,
    -0.5,
    float("nan"),
    "",
    "x",
    "lora",
    "SEQ_CLS",
    [],
    [1, "a"],
    {},
    {"a": 1},
]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _mutate(data: dict, path: tuple, op: str, value, key):
    node = data
    for part in path[:-1]:
        node = node[part]
    last = path[-1] if path else None
    if not path:
        if op == "add" and isinstance(data, dict):
            data[key] = value
        return data if op != "replace" else value
    if op == "delete" and isinstance(node, dict):
        node.pop(last, None)
    elif op == "replace":
        node[last] = value
    elif op == "nest":
        node[last] = {key: node[last]}
    elif op == "listify":
        node[last] = [node[last]]
    elif op == "add" and isinstance(node[last], dict):
        node[last][key] = value
    elif op == "rename" and isinstance(node, dict):
        node[key] = node.pop(last)
    return data


def test_random_mutations_of_valid_recipes_never_crash(work):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from peftrun.recipe import recipe_from_dict

    valid = base_recipe(work)
    valid["distributed"] = {
        "deepspeed": {"gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}
    }
    recipe_from_dict(copy.deepcopy(valid))  # the starting point is valid
    paths = list(_paths(valid))
    keys = st.one_of(
        st.sampled_from(["r", "model", "token", "name", "lora_alpha", "num_epochs", "x"]), st.integers(0, 3)
    )

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(paths),
                st.sampled_from(["delete", "replace", "nest", "listify", "add", "rename"]),
                st.sampled_from(VALUES),
                keys,
            ),
            min_size=1,
            max_size=4,
        )
    )
    def check(mutations):
        data = copy.deepcopy(valid)
        for path, op, value, key in mutations:
            try:
                data = _mutate(data, path, op, copy.deepcopy(value), key)
            except (KeyError, IndexError, TypeError):
                continue  # an earlier mutation removed or reshaped this path
        try:
            recipe_from_dict(data, source="mutated.yaml")
        except PeftrunError as exc:
            assert exc.render()

    check()
