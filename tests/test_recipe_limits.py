"""Recipe input handling (issue 13): YAML read with limits, values that would crash a run refused at
validation, broken templates and non-scalars refused, credentials never echoed. Each mistake is one
exit-2 line naming the file (and key), with no traceback.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from peftrun.errors import PeftrunError, mask_secrets
from peftrun.recipe import MAX_SEED, MAX_SIZE, load_recipe, recipe_from_dict
from peftrun.yaml_safe import MAX_DEPTH, MAX_NODES, MAX_YAML_BYTES, parse_yaml, read_yaml

REPO = Path(__file__).resolve().parent.parent
TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


def minimal(**sections) -> dict:
    data = {
        "model": {"name_or_path": "bigscience/mt0-large", "task_type": "SEQ_2_SEQ_LM"},
        "method": {"name": "lora", "r": 8},
        "data": {"path": "ought/raft"},
        "output_dir": "out/test",
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict) and key != "method":
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def one_line_exit_2(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def refused(data: dict, *needles: str) -> str:
    with pytest.raises(PeftrunError) as info:
        recipe_from_dict(data, source="r.yaml")
    text = info.value.render()
    assert "\n" not in text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


# ------------------------------------------------------------------ YAML with limits, through the CLI


def _bomb(levels: int = 9, width: int = 10) -> str:
    names = [f"l{i}" for i in range(levels + 1)]
    text = f"{names[0]}: &{names[0]} [{', '.join(['lol'] * width)}]\n"
    for prev, name in zip(names, names[1:], strict=False):
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * width)}]\n"
    return text


YAML_CASES = {
    "alias_bomb": (_bomb(), "alias bomb"),
    "self_reference_map": ("model: &a\n  inner: *a\n", "refers to itself"),
    "self_reference_list": ("model: &a [1, *a]\n", "refers to itself"),
    "deep_flow": ("model: " + "[" * 5000 + "]" * 5000 + "\n", f"nested deeper than {MAX_DEPTH}"),
    "deep_block": ("".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v\n", "nested deeper"),
    "deep_by_aliases": (
        "a0: &a0 [1]\n" + "".join(f"a{i + 1}: &a{i + 1} [*a{i}]\n" for i in range(MAX_DEPTH + 5)),
        "once aliases are followed",
    ),
    "not_utf8": (b"model:\n  name_or_path: caf\xe9\n", "not UTF-8"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    "control_character": ("model: a\x01b\n", "not valid YAML"),
    "too_large": ("# " + "x" * (MAX_YAML_BYTES + 10) + "\n", "over the limit"),
    "top_level_list": ("- model\n- data\n", "got list"),
    "top_level_scalar": ("just some words\n", "got str"),
    "empty": ("", "empty"),
    "only_comments": ("# nothing here\n", "empty"),
    "python_tag": ("model: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
    "impossible_date": ("model: 2024-13-45\n", "cannot be read"),
    "int_of_5000_digits": ("model: " + "7" * 5000 + "\n", "cannot be read"),
    "two_documents": ("a: 1\n---\nb: 2\n", "single document"),
    "undefined_alias": ("a: *nowhere\n", "undefined alias"),
    "unhashable_key": ("? [a, b]\n: 1\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_yaml_over_a_limit_is_one_line_naming_the_file(tmp_path, case):
    content, needle = YAML_CASES[case]
    path = tmp_path / f"{case}.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    line = one_line_exit_2(run_cli("validate", str(path)))
    assert str(path) in line and needle in line, line


def test_an_alias_bomb_is_refused_without_expanding_it():
    # 10**30 values once expanded: measured, not built
    with pytest.raises(PeftrunError, match="alias bomb"):
        parse_yaml(_bomb(levels=30), source="bomb.yaml")


def test_aliases_within_the_limits_still_work():
    data = parse_yaml("base: &b {r: 8, lora_alpha: 16}\nmethod:\n  <<: *b\n  name: lora\n", source="x.yaml")
    assert data["method"] == {"r": 8, "lora_alpha": 16, "name": "lora"}
    wide = "a: &a [" + ", ".join(["1"] * 100) + "]\nb: [" + ", ".join(["*a"] * (MAX_NODES // 200)) + "]\n"
    assert len(parse_yaml(wide, source="wide.yaml")["b"]) == MAX_NODES // 200


def test_read_yaml_is_the_loader_for_any_yaml_file(tmp_path):
    """The function other modules call for YAML they read (e.g. the recipe copy in an adapter folder)."""
    good = tmp_path / "peftrun_recipe.yaml"
    good.write_text("model: {name_or_path: x}\n")
    assert read_yaml(good) == {"model": {"name_or_path": "x"}}
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n")
    with pytest.raises(PeftrunError, match="got list") as info:
        read_yaml(bad, what="saved recipe")
    assert str(bad) in info.value.render()
    assert read_yaml(bad, mapping=False) == ["a"]
    with pytest.raises(PeftrunError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")


def test_set_overrides_go_through_the_same_limits(tmp_path):
    recipe = REPO / "recipes" / "quickstart.yaml"
    with pytest.raises(PeftrunError, match="nested deeper"):
        load_recipe(recipe, ["model.config_overrides.x=" + "[" * 500 + "]" * 500])
    with pytest.raises(PeftrunError, match="key path"):
        load_recipe(recipe, [".".join(["k"] * 500) + "=1"])
    # text that is not YAML is still taken as a string, as before
    assert load_recipe(recipe, ["data.text_column=[not yaml"]).data.text_column == "[not yaml"


# ------------------------------------------------------------------ values that would crash a run later


@pytest.mark.parametrize(
    ("section", "key", "value", "needle"),
    [
        ("training", "weight_decay", math.inf, "weight_decay"),
        ("training", "max_grad_norm", math.inf, "finite"),
        ("training", "learning_rate", math.nan, "learning_rate"),
        ("training", "warmup_ratio", math.nan, "warmup_ratio"),
        ("training", "seed", -1, "greater than or equal to 0"),
        ("training", "seed", MAX_SEED + 1, str(MAX_SEED)),
        ("training", "seed", 10**30, "seed"),
        ("training", "batch_size", 10**12, str(MAX_SIZE)),
        ("training", "eval_batch_size", 2**40, str(MAX_SIZE)),
        ("training", "num_epochs", 10**18, str(MAX_SIZE)),
        ("training", "gradient_accumulation_steps", 2**30, str(MAX_SIZE)),
        ("training", "max_steps", 2**63, "max_steps"),
        ("training", "num_workers", 10**6, "num_workers"),
        ("data", "max_length", 2**40, str(MAX_SIZE)),
        ("data", "target_max_length", 2**40, str(MAX_SIZE)),
        ("data", "eval_fraction", math.nan, "eval_fraction"),
        ("model", "num_labels", 2**40, str(MAX_SIZE)),
        ("model", "config_overrides", {"hidden_dropout_prob": math.nan}, "finite"),
        ("model", "config_overrides", {"vocab_size": 10**40}, "in size"),
        ("distributed", "num_processes", 10**9, "num_processes"),
        ("distributed", "deepspeed", {"zero_optimization": {"stage": 2, "reduce_bucket_size": math.inf}}, "finite"),
    ],
)
def test_values_that_would_crash_later_are_refused_at_validation(section, key, value, needle):
    text = refused(minimal(**{section: {key: value}}), f"{section}.{key}", needle)
    assert text.startswith("r.yaml")


@pytest.mark.parametrize(
    ("method", "key", "value", "needle"),
    [
        ({"name": "lora"}, "lora_alpha", math.nan, "finite"),
        ({"name": "lora"}, "lora_alpha", math.inf, "finite"),
        ({"name": "lora"}, "r", 10**9, "in size"),
        ({"name": "lora"}, "lora_dropout", math.nan, "lora_dropout"),
        ({"name": "lora"}, "rank_pattern", {"q": 10**9}, "method.rank_pattern.q"),
        ({"name": "lora"}, "alpha_pattern", {"q": math.inf}, "method.alpha_pattern.q"),
        ({"name": "adalora"}, "orth_reg_weight", math.inf, "finite"),
        ({"name": "adalora", "total_step": 100}, "init_r", 10**12, "in size"),
        ({"name": "loha"}, "alpha", math.nan, "finite"),
        ({"name": "lokr"}, "decompose_factor", -(10**12), "in size"),
        ({"name": "bottleneck"}, "reduction_factor", math.inf, "finite"),
        ({"name": "ia3"}, "target_modules", ["q\x00"], "NUL"),
        ({"name": "prompt_tuning"}, "num_virtual_tokens", 10**10, "in size"),
        ({"name": "prefix_tuning"}, "encoder_hidden_size", 10**10, "in size"),
    ],
)
def test_every_methods_numbers_are_checked_without_method_code(method, key, value, needle):
    refused(minimal(method={**method, key: value}), f"method.{key}", needle)


def test_sane_values_at_the_bounds_still_validate():
    recipe = recipe_from_dict(
        minimal(
            training={"seed": MAX_SEED, "batch_size": MAX_SIZE, "weight_decay": 0.1, "max_grad_norm": None},
            data={"max_length": MAX_SIZE},
            method={"name": "lora", "r": 64, "lora_alpha": 128.0, "lora_dropout": 0.05},
            model={"config_overrides": {"rope_theta": 10_000_000.0, "max_position_embeddings": 131072}},
        )
    )
    assert recipe.training.seed == MAX_SEED and recipe.method_config.r == 64


def test_nan_through_the_cli_is_one_line_with_file_line_and_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(minimal(training={"weight_decay": 0.0})).replace("weight_decay: 0.0", "weight_decay: .inf"))
    line = one_line_exit_2(run_cli("validate", str(path)))
    assert f"{path}:" in line and "training.weight_decay" in line, line
    method = minimal(method={"name": "lora", "lora_alpha": 8.0})
    path.write_text(yaml.safe_dump(method).replace("lora_alpha: 8.0", "lora_alpha: .nan"))
    line = one_line_exit_2(run_cli("validate", str(path)))
    assert "method.lora_alpha" in line and "finite" in line, line


# ------------------------------------------------------------------ templates and non-scalars


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("Tweet text : {Tweet text Label : ", "not a valid template"),
        ("Label } here", "not a valid template"),
        ("{}", "names no column"),
        ("{0} and {1}", "names no column"),
        ("{text.__class__}", "reaches into a value"),
        ("{text[0]}", "reaches into a value"),
        ("{text:>99999999}", "format specs"),
        ("{text:{width}}", "format specs"),
        ("{text!x}", "conversion"),
    ],
)
def test_broken_templates_are_refused_at_validation(template, needle):
    refused(minimal(data={"template": template}), "data.template", needle)
    refused(minimal(data={"target_template": template}), "data.target_template", needle)


def test_good_templates_still_validate():
    for template in ("Tweet text : {Tweet text} Label : ", "{question} {{literal}} {text!r}", "no fields"):
        assert recipe_from_dict(minimal(data={"template": template})).data.template == template


def test_broken_template_through_the_cli(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(minimal(data={"template": "Tweet : {Tweet text"})))
    line = one_line_exit_2(run_cli("validate", str(path)))
    assert "data.template" in line and "not a valid template" in line


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"verbalizer": {"0": ["a", "b"]}}, "data.verbalizer.0"),
        ({"verbalizer": {"0": {"x": 1}}}, "data.verbalizer.0"),
        ({"label_names": [["a"], "b"]}, "data.label_names.0"),
        ({"columns": {"text": ["a"]}}, "data.columns.text"),
        ({"text_column": ["a"]}, "data.text_column"),
        ({"template": {"a": 1}}, "data.template"),
    ],
)
def test_non_scalars_where_scalars_belong_are_refused(data, key):
    refused(minimal(data=data), key)


def test_scalar_labels_are_still_read_as_text():
    recipe = recipe_from_dict(minimal(data={"verbalizer": {0: "no", 1: True}, "label_names": [0, 1.5]}))
    assert recipe.data.verbalizer == {"0": "no", "1": "True"} and recipe.data.label_names == ["0", "1.5"]


# ------------------------------------------------------------------ credentials never echoed


def test_mask_secrets_covers_token_shapes_and_environment_values(monkeypatch):
    assert TOKEN not in mask_secrets(f"x {TOKEN} y") and "<redacted>" in mask_secrets(TOKEN)
    assert TOKEN not in mask_secrets(f"/data/{TOKEN}_suffix/file")
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-value-from-env")
    assert "s3cr3t-value-from-env" not in mask_secrets("path /tmp/s3cr3t-value-from-env/x")
    assert "s3cr3t" not in PeftrunError("bad s3cr3t-value-from-env", where="s3cr3t-value-from-env").render()


@pytest.mark.parametrize(
    "data",
    [
        {TOKEN: 1},  # a top-level key
        minimal(data={TOKEN: "x"}),  # a nested key
        minimal(method={"name": "lora", TOKEN: 1}),  # a method parameter
        minimal(distributed={"deepspeed": {TOKEN: 1}}),  # an extra key of an open section
        minimal(model={"config_overrides": {TOKEN: 1}}),  # a key under an `Any` field
        minimal(output_dir=f"/tmp/{TOKEN}/run"),  # a path
        minimal(data={"label_names": [f"x{TOKEN}"]}),  # a list item
        minimal(method={"name": TOKEN}),  # where a did-you-mean would answer
        minimal(training={"seed": f"{TOKEN}{TOKEN}"}),  # a wrong type
    ],
)
def test_a_token_anywhere_in_a_recipe_is_never_echoed(data):
    text = refused(data)
    assert "hf_" not in text and "AbCdEf" not in text, text


def test_a_token_in_paths_and_options_is_never_echoed(tmp_path):
    folder = tmp_path / TOKEN
    folder.mkdir()
    missing = one_line_exit_2(run_cli("validate", str(folder / "nope.yaml")))
    assert TOKEN not in missing and "recipe file not found" in missing
    bad = folder / "bad.yaml"
    bad.write_text(f"model: [\n{TOKEN}: 1\n")
    line = one_line_exit_2(run_cli("validate", str(bad)))
    assert TOKEN not in line and "not valid YAML" in line
    bad.write_text(yaml.safe_dump({f"{TOKEN}x": 1}))
    assert TOKEN not in one_line_exit_2(run_cli("validate", str(bad)))
    usage = run_cli("validate", str(REPO / "recipes" / "quickstart.yaml"), f"--{TOKEN}")
    assert usage.returncode == 2 and TOKEN not in usage.stderr and "No such option" in usage.stderr
    override = run_cli("validate", str(REPO / "recipes" / "quickstart.yaml"), "--set", f"data.{TOKEN}=1")
    assert TOKEN not in one_line_exit_2(override)


# ------------------------------------------------------------------ found by the fuzz test


def test_a_recipe_with_deepspeeds_own_keys_survives_its_saved_copy():
    """to_dict() writes every DeepSpeed key out, defaults included; reading that copy back must work."""
    recipe = recipe_from_dict(minimal(distributed={"deepspeed": {"zero_optimization": {"stage": 2}}}))
    again = recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again.distributed.deepspeed.json_config == {"zero_optimization": {"stage": 2}}
    refused(
        minimal(distributed={"deepspeed": {"zero_stage": 2, "zero_optimization": {"stage": 2}}}),
        "not both",
    )


def test_explicit_tags_that_cannot_be_built_are_a_yaml_error():
    for text in ("a: !!timestamp x\n", "a: !!int x\n", "a: !!float x\n", "a: !!map [1]\n"):
        with pytest.raises(PeftrunError, match="not valid YAML"):
            parse_yaml(text, source="t.yaml")


def test_key_lines_follow_the_document():
    from peftrun.yaml_safe import parse_yaml_lines

    _, lines = parse_yaml_lines("a:\n  b: 1\n  c:\n    - x\n    - y\na:\n  b: 2\n", source="l.yaml")
    assert lines[("a", "b")] == 7 and lines[("a", "c", "1")] == 5
