"""What the package carries besides code, read from inside the package so that a wheel install has it:
architecture configs (models/), example recipes (recipes/, recipes/offline/), their small datasets (data/) and
the recipe schema (schema/).

In a source checkout these four are links to the repository's top-level configs/models, recipes, data and
schema folders (one copy, edited there); a wheel holds the files themselves (pyproject's package-data).
`peftrun recipes` lists the recipes and copies one out.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from peftrun.errors import PeftrunError, did_you_mean

ROOT = Path(__file__).resolve().parent
MODELS = ROOT / "models"
RECIPES = ROOT / "recipes"
DATA = ROOT / "data"
SCHEMA = ROOT / "schema" / "recipe.schema.json"
SCHEMA_COMMENT = re.compile(r"^# yaml-language-server: \$schema=\S+\n", re.M)


@dataclass(frozen=True)
class BundledRecipe:
    name: str  # its path under recipes/ without .yaml: quickstart, offline/minilm_mrpc_lora
    path: Path

    @property
    def summary(self) -> str:
        """The recipe's first comment line after the schema line."""
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#") and "yaml-language-server" not in line:
                return line.lstrip("# ").strip()
            if line and not line.startswith("#"):
                break
        return ""


def recipes() -> list[BundledRecipe]:
    found = sorted(RECIPES.rglob("*.yaml"))
    return [BundledRecipe(p.relative_to(RECIPES).with_suffix("").as_posix(), p) for p in found]


def find_recipe(name: str) -> BundledRecipe:
    name = name.removesuffix(".yaml").removeprefix("recipes/")
    known = recipes()
    for recipe in known:
        if recipe.name == name:
            return recipe
    by_stem = [r for r in known if r.name.rsplit("/", 1)[-1] == name]
    if len(by_stem) == 1:
        return by_stem[0]
    raise PeftrunError(
        f"no bundled recipe named '{name}'",
        hint=did_you_mean(name, [r.name for r in known]) or "`peftrun recipes` lists them",
    )


def data_folders(text: str) -> list[str]:
    """The bundled data folders a recipe names (data.path / *_file under data/), as written in it."""
    folders = []
    for value in re.findall(r"^\s*(?:path|train_file|eval_file|test_file):\s*(\S+)\s*$", text, re.M):
        parts = Path(value).parts
        if len(parts) >= 2 and parts[0] == "data" and (DATA / parts[1]).is_dir():
            folders.append(f"data/{parts[1]}")
    return sorted(set(folders))


def copy_recipe(name: str, dest: Path | None, *, overwrite: bool = False) -> tuple[Path, list[Path]]:
    """Copy a bundled recipe to `dest` (a file, or a folder to put NAME.yaml in; default ./NAME.yaml) with its
    schema line pointing at the installed schema, and the bundled data folders it reads beside it (data/...
    relative to the folder it is copied to, which is where to run it from). Returns (recipe, data folders)."""
    recipe = find_recipe(name)
    stem = recipe.path.name
    target = Path(dest) if dest is not None else Path(stem)
    if target.is_dir():
        target = target / stem
    if target.exists() and not overwrite:
        raise PeftrunError(f"{target} exists", hint="choose another DEST or pass --overwrite")
    text = recipe.path.read_text(encoding="utf-8")
    text = SCHEMA_COMMENT.sub(f"# yaml-language-server: $schema={SCHEMA.resolve().as_uri()}\n", text, count=1)
    target.parent.mkdir(parents=True, exist_ok=True)
    copied = []
    for folder in data_folders(text):
        into = target.parent / folder
        if not into.exists():
            shutil.copytree(DATA / Path(folder).name, into, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
            copied.append(into)
    target.write_text(text, encoding="utf-8")
    return target, copied
