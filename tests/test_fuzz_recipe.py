"""Fuzzing the recipe entry point: mutated bundled recipes, mutated YAML text and random bytes either
validate or raise PeftrunError (one line, no credential), never another exception.

In-process through `load_recipe`, the function `peftrun validate` (and every command taking a recipe)
calls; then a few of the same inputs through the real CLI for exit code 0 or 2 and no traceback.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftrun.errors import PeftrunError
from peftrun.recipe import load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent
RECIPE_FILES = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "offline").glob("*.yaml"))
TOKEN = "hf_" + "ZyXwVuTsRqPoNmLkJiHgFeDcBa9876543210"
EXAMPLES = int(os.environ.get("PEFTRUN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _texts() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in RECIPE_FILES}


TEXTS = _texts()
DATAS = {path: yaml.safe_load(text) for path, text in TEXTS.items()}

KEYS = st.one_of(
    st.sampled_from(["r", "name", "seed", "template", "batch_size", "x", "token", TOKEN, "lora_alpha", "deepspeed"]),
    st.text(max_size=12),
    st.integers(-3, 3),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**20, 2**20 + 1, 2**31, 2**32, 2**63, -(2**63) - 1, 10**40]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]),
    st.text(max_size=30),
    st.sampled_from(["", "lora", "SEQ_CLS", "{", "{x", "{}", "{a.b}", "{a:>9}", "~nobody/x", "/", "a\x00b", TOKEN,
                     f"/tmp/{TOKEN}", "inf", "nan", "1e999", "auto", "cuda", "-1"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=8,
)
OPS = ["delete", "replace", "nest", "listify", "add", "rename", "swap"]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _mutate(data, path, op, value, key):
    """Apply one mutation at `path`; a path an earlier mutation removed is skipped by the caller."""
    if not path:
        if op == "replace":
            return value
        if op == "add" and isinstance(data, dict):
            data[key] = value
        return data
    node = data
    for part in path[:-1]:
        node = node[part]
    last = path[-1]
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
    elif op == "swap":  # the same value as another type: a number as text, text as a number, a scalar as a list
        old = node[last]
        node[last] = (
            str(old) if isinstance(old, (int, float)) and not isinstance(old, bool)
            else [old] if not isinstance(old, (list, dict))
            else 12345
        )
    return data


def _expect_ok_or_user_error(call, secret_in_input: bool):
    try:
        recipe = call()
    except PeftrunError as exc:
        text = exc.render()
        assert text and "\n" not in text, text
        if secret_in_input:
            assert TOKEN not in text and TOKEN[:20] not in text, text
        return None
    # a recipe that validates also survives being saved and read back (the copy beside every adapter)
    again = recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict(), sort_keys=False)))
    assert again.to_dict() == recipe.to_dict()
    return recipe


def _write(tmp_dir: Path, content: str | bytes) -> Path:
    path = tmp_dir / "fuzzed.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    return path


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_every_bundled_recipe_validates_as_the_fuzz_starting_point():
    assert len(RECIPE_FILES) >= 30
    for path in RECIPE_FILES:
        if path.name.startswith("opt_6.7b_int8"):
            continue  # 8-bit weights need a CUDA GPU: refused on a CPU machine, by design
        load_recipe(path)


@FUZZ
@given(data=st.data())
def test_mutated_recipes_validate_or_raise_a_user_error(fuzz_dir, data):
    source = data.draw(st.sampled_from(RECIPE_FILES), label="recipe")
    recipe = copy.deepcopy(DATAS[source])
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        paths = list(_paths(recipe))
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(OPS), label="op")
        value = data.draw(VALUES, label="value") if op in ("replace", "add") else None
        key = data.draw(KEYS, label="key") if op in ("nest", "add", "rename") else None
        try:
            recipe = _mutate(recipe, path, op, value, key)
        except (KeyError, IndexError, TypeError):
            continue
    text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    file = _write(fuzz_dir, text)
    _expect_ok_or_user_error(lambda: load_recipe(file), TOKEN in text)


FRAGMENTS = [
    "&a ", "*a", "<<: *a\n", "[", "]", "{", "}", ": ", "- ", "\t", "'", '"', "!!python/object:os.system ",
    "!!binary ", "!!timestamp ", "? ", "---\n", "...\n", "%YAML 1.1\n", "\n  ", "#", "|\n", ">-\n",
    "\x00", "\x01", "\ufeff", "\u2028", "9" * 5000, "1e999", ".nan", ".inf", "2024-13-45", TOKEN, f"{TOKEN}: 1\n",
]


@FUZZ
@given(data=st.data())
def test_mutated_yaml_text_validates_or_raises_a_user_error(fuzz_dir, data):
    source = data.draw(st.sampled_from(RECIPE_FILES), label="recipe")
    text = TEXTS[source]
    for _ in range(data.draw(st.integers(1, 5), label="edits")):
        at = data.draw(st.integers(0, len(text)), label="at")
        cut = data.draw(st.integers(0, 8), label="cut")
        piece = data.draw(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), label="piece")
        text = text[:at] + piece + text[at + cut:]
    file = _write(fuzz_dir, text)
    _expect_ok_or_user_error(lambda: load_recipe(file), TOKEN in text)


@FUZZ
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_random_files_validate_or_raise_a_user_error(fuzz_dir, content):
    file = _write(fuzz_dir, content)
    _expect_ok_or_user_error(lambda: load_recipe(file), False)


@FUZZ
@given(
    data=st.data(),
    overrides=st.lists(
        st.tuples(
            st.one_of(
                st.sampled_from(["training.seed", "training.batch_size", "method.r", "method.lora_alpha",
                                 "data.template", "model.config_overrides.x", "output_dir", "training",
                                 "distributed.deepspeed.zero_optimization.stage", TOKEN, "a.b.c"]),
                st.text(max_size=15),
            ),
            st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=20), st.integers().map(str)),
        ).map(lambda kv: f"{kv[0]}={kv[1]}"),
        min_size=1,
        max_size=3,
    ),
)
def test_random_set_overrides_validate_or_raise_a_user_error(data, overrides):
    source = data.draw(st.sampled_from(RECIPE_FILES), label="recipe")
    _expect_ok_or_user_error(lambda: load_recipe(source, overrides), any(TOKEN in o for o in overrides))


# ------------------------------------------------------------------ the same through the real CLI


def _cli_cases(tmp_path: Path) -> list[Path]:
    quick = TEXTS[REPO / "recipes" / "quickstart.yaml"]
    cases = {
        "valid.yaml": quick,
        "random_bytes.yaml": bytes(range(256)) * 3,
        "nan_alpha.yaml": quick.replace("lora_alpha: 16", "lora_alpha: .nan"),
        "huge_batch.yaml": quick.replace("batch_size: 16", "batch_size: 99999999999999999999"),
        "broken_template.yaml": quick.replace("text_column: text", "template: '{text'"),
        "token_key.yaml": quick + f"{TOKEN}: 1\n",
        "bomb.yaml": "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
            f"b{i}: &b{i} [{', '.join(['*a' if i == 0 else f'*b{i - 1}'] * 10)}]\n" for i in range(8)
        ),
    }
    paths = []
    for name, content in cases.items():
        paths.append(_write(tmp_path, content).rename(tmp_path / name))
    return paths


def test_the_cli_exits_0_or_2_without_a_traceback(tmp_path):
    for path in _cli_cases(tmp_path):
        proc = run_cli("validate", str(path), cwd=REPO)
        assert proc.returncode == (0 if path.name == "valid.yaml" else 2), (path.name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr + proc.stdout, proc.stderr
        if proc.returncode == 2:
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
