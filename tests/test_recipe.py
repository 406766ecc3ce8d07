"""The recipe schema in-process: line numbers, overrides, did-you-mean, and the checks beyond the schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftrun.errors import PeftrunError, did_you_mean
from peftrun.recipe import apply_overrides, check_deepspeed_config, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent


def minimal(**extra) -> dict:
    data = {
        "model": {"name_or_path": "bigscience/mt0-large", "task_type": "SEQ_2_SEQ_LM"},
        "method": {"name": "lora", "r": 8},
        "data": {"path": "ought/raft"},
        "output_dir": "out/test",
    }
    data.update(extra)
    return data


def test_bundled_recipes_validate():
    for name in ("quickstart", "mt0_large_lora", "t0_3b_lora_twitter"):
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert recipe.method.name == "lora" and recipe.method_config.r == 8


def test_t0_recipe_resolves_the_seeds_settings():
    r = load_recipe(REPO / "recipes" / "t0_3b_lora_twitter.yaml")
    assert (r.method_config.lora_alpha, r.method_config.lora_dropout) == (32, 0.1)
    assert (r.training.learning_rate, r.training.num_epochs, r.training.batch_size) == (3e-3, 5, 8)
    assert r.data.max_length == 64 and r.model.trust_remote_code is False


def test_errors_carry_file_line_and_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model:\n  name_or_path: m\n  task_type: SEQ_CLS\ndata:\n  path: d\ntraining:\n  epochs: 3\n"
    )
    with pytest.raises(PeftrunError) as info:
        load_recipe(path)
    assert info.value.where == f"{path}:7: training.epochs"
    assert info.value.message == "unknown key 'epochs'"
    assert info.value.hint is None or "num_epochs" in info.value.hint
    assert info.value.render().startswith(f"{path}:7: training.epochs: unknown key 'epochs'")


def test_overrides_parse_yaml_values_and_make_sections():
    data = apply_overrides(
        minimal(), ["training.learning_rate=1e-4", "method.target_modules=[q, v]", "data.name="]
    )
    # YAML reads "1e-4" as text; the schema takes it as the number
    assert recipe_from_dict(data).training.learning_rate == 1e-4
    assert data["method"]["target_modules"] == ["q", "v"]
    assert data["data"]["name"] == ""
    with pytest.raises(PeftrunError, match="--set expects key.path=value"):
        apply_overrides(minimal(), ["=3"])


def test_did_you_mean():
    assert did_you_mean("lerning_rate", ["learning_rate", "seed"]) == "did you mean 'learning_rate'?"
    assert did_you_mean("zzz", ["learning_rate"]) is None


def test_deepspeed_auto_values_take_the_recipes():
    recipe = recipe_from_dict(minimal(training={"batch_size": 4, "gradient_accumulation_steps": 2}))
    where = lambda *k: ".".join(k)  # noqa: E731
    check_deepspeed_config(
        {
            "gradient_accumulation_steps": "auto",
            "train_micro_batch_size_per_gpu": 4,
            "train_batch_size": 8,
            "fp16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3},
        },
        recipe,
        where=where,
    )
    with pytest.raises(PeftrunError) as info:
        check_deepspeed_config({"train_batch_size": 32}, recipe, where=where)
    assert info.value.where == "train_batch_size" and "gives 8" in info.value.message
    with pytest.raises(PeftrunError, match="stage must be 0, 1, 2 or 3"):
        check_deepspeed_config({"zero_optimization": {"stage": 4}}, recipe, where=where)
    with pytest.raises(PeftrunError, match="optimizer.params.lr=0.1"):
        check_deepspeed_config({"optimizer": {"params": {"lr": 0.1}}}, recipe, where=where)


def test_deepspeed_world_size_counts_processes_and_machines():
    data = minimal(training={"batch_size": 2}, distributed={"num_processes": 4, "num_machines": 2})
    data["distributed"]["deepspeed"] = {"train_batch_size": 16}
    assert recipe_from_dict(data).distributed.num_processes == 4
    data["distributed"]["deepspeed"] = {"train_batch_size": 8}
    with pytest.raises(PeftrunError, match="gives 16"):
        recipe_from_dict(data)


@pytest.mark.parametrize("value", ["/", "~", ".", "..", str(REPO), str(Path.home())])
def test_output_dir_must_be_a_folder_of_its_own(value):
    with pytest.raises(PeftrunError) as info:
        recipe_from_dict(minimal(output_dir=value), source="r.yaml")
    assert info.value.where == "r.yaml: output_dir"


@pytest.mark.parametrize("value", ["out/run", "runs/a/b", "/tmp/peftrun-test-out"])
def test_ordinary_output_dirs_are_fine(value):
    assert recipe_from_dict(minimal(output_dir=value)).output_dir == value


def test_secret_keys_anywhere_are_refused():
    data = minimal()
    data["distributed"] = {"deepspeed": {"comms_logger": {"api_key": "abc"}}}
    with pytest.raises(PeftrunError) as info:
        recipe_from_dict(data)
    assert info.value.where == "distributed.deepspeed.comms_logger.api_key"
    assert "abc" not in info.value.render()


def test_resolved_recipe_round_trips(tmp_path):
    import yaml

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", ["training.seed=3"])
    path = tmp_path / "copy.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    again = load_recipe(path)
    assert again.to_dict() == recipe.to_dict() and again.training.seed == 3
    assert recipe._overrides == ["training.seed=3"]
