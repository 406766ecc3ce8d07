"""What method tests share beyond the peft oracle: a full-size recipe counted on the meta device, and the
CLI's refusal to merge an adapter that adds modules of its own."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO, run_cli

from peftrun.adapted import PeftrunModel, wrap
from peftrun.io.peft_format import save_adapter


def recipe_model(name: str) -> PeftrunModel:
    """recipes/NAME's method applied to its base model, built on the meta device (no weights)."""
    from peftrun.models import build_from_config
    from peftrun.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / name)
    model = build_from_config(recipe.model.name_or_path, recipe.model.task_type, meta=True)
    return wrap(model, recipe.model.task_type, recipe.method.name, recipe.method_config)


def assert_merge_refused(
    tmp_path: Path, model: PeftrunModel, base: Path, task_type: str, message: str
) -> None:
    """`model` saved as an adapter of `base` (with the recipe merge reads): `peftrun merge` exits 2 with
    `message` and writes nothing."""
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, base_model=str(base))
    (adapter / "peftrun_recipe.yaml").write_text(
        f"model: {{name_or_path: '{base}', task_type: {task_type}, tokenizer: byt5}}\n"
    )
    result = run_cli("merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "merged").exists()
