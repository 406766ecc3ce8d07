"""The recipe's JSON Schema: current, shipped, pointed at by every bundled recipe, and as strict as the loader."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from peftrun.schema import schema_text
from peftrun.yaml_safe import parse_yaml, read_yaml_text

jsonschema = pytest.importorskip("jsonschema")

SHIPPED = REPO / "schema" / "recipe.schema.json"
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
COMMENT = re.compile(r"^# yaml-language-server: \$schema=(\S+)$")


def validator():
    schema = json.loads(SHIPPED.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def read(path: Path) -> dict:
    return parse_yaml(read_yaml_text(path, what="recipe"), source=str(path))


def test_the_shipped_schema_is_current():
    fresh = schema_text()
    if SHIPPED.read_text() != fresh:
        SHIPPED.write_text(fresh)
        pytest.fail(f"{SHIPPED} was stale (a recipe key or method parameter changed): regenerated, commit it")


def test_peftrun_schema_prints_and_writes_it(tmp_path):
    printed = run_cli("schema")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == json.loads(schema_text())
    written = run_cli("schema", "--output", str(tmp_path / "s.json"))
    assert written.returncode == 0 and (tmp_path / "s.json").read_text() == schema_text()


def test_every_method_parameter_is_in_the_schema():
    from peftrun.methods import get_method, method_names

    branches = {b["title"]: b for b in json.loads(schema_text())["$defs"]["MethodSection"]["oneOf"]}
    assert sorted(branches) == sorted(method_names())
    for name in method_names():
        method = get_method(name)
        components = {"text_encoder"} if "TEXT_TO_IMAGE" in method.task_types else set()
        assert set(branches[name]["properties"]) == {"name", *method.Config.model_fields, *components}, name
    assert branches["lora"]["properties"]["r"]["default"] == 8


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_every_bundled_recipe_points_at_the_schema_and_validates(path):
    first = path.read_text().splitlines()[0]
    match = COMMENT.match(first)
    assert match, f"{path} lacks the first line '# yaml-language-server: $schema=...'"
    assert (path.parent / match.group(1)).resolve() == SHIPPED.resolve()
    errors = [f"{list(e.path)}: {e.message[:200]}" for e in validator().iter_errors(read(path))]
    assert not errors, errors


BAD = [
    ("training", "learning_rat", 1e-4),  # a typo
    ("training", "batch_size", "eight"),  # a wrong type
    ("training", "batch_size", 0),  # out of bounds
    ("method", "num_virtual_tokens", 20),  # a parameter of another method
    ("method", "name", "lorra"),  # no such method
    ("training", "report_to", ["tensorbord"]),
    ("model", "task_type", "CAUSAL"),
]


@pytest.mark.parametrize("section,key,value", BAD, ids=[f"{s}.{k}" for s, k, _ in BAD])
def test_a_bad_recipe_is_rejected_by_the_schema_and_by_the_loader(section, key, value):
    from peftrun.errors import PeftrunError
    from peftrun.recipe import recipe_from_dict

    good = read(REPO / "recipes" / "quickstart.yaml")
    assert not list(validator().iter_errors(good))
    bad = copy.deepcopy(good)
    bad[section][key] = value
    assert list(validator().iter_errors(bad)), f"schema accepted {section}.{key}={value!r}"
    with pytest.raises(PeftrunError):
        recipe_from_dict(bad)


def test_a_method_left_unnamed_is_lora():
    good = read(REPO / "recipes" / "quickstart.yaml")
    good["method"] = {"r": 4, "lora_alpha": 8}
    assert not list(validator().iter_errors(good))
    good["method"] = {"num_virtual_tokens": 8}
    assert list(validator().iter_errors(good))
