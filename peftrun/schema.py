"""The recipe's JSON Schema, for editors: `peftrun schema` writes it; the bundled recipes point at the copy
shipped in schema/recipe.schema.json (`# yaml-language-server: $schema=...`), so an editor with the YAML
language server completes keys and flags wrong ones as one types.

It is peftrun.recipe.Recipe's pydantic schema with the method section spelled out: one branch per method of
the registry (peftrun/methods), each with that method's own parameters (its Config) and no others. The loader
checks more than a schema can say (which keys go together, the data files exist); what the schema refuses, the
loader refuses too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_ID = "https://peftrun.invalid/recipe.schema.json"  # a stable name, not a place to fetch from
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def recipe_schema() -> dict[str, Any]:
    from peftrun.methods import get_spec, method_names
    from peftrun.recipe import Recipe
    from peftrun.tasks import TEXT_TO_IMAGE

    schema = Recipe.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.setdefault("$defs", {})
    branches = []
    for name in method_names():
        method = get_spec(name)
        own = method.Config.model_json_schema(ref_template="#/$defs/{model}")
        for key, value in own.pop("$defs", {}).items():
            defs.setdefault(key, value)
        properties = {"name": {"const": name, "description": f"{method.kind}: {method.summary}"}}
        properties.update(own.get("properties", {}))
        if TEXT_TO_IMAGE in method.task_types:  # a pipeline's text encoder takes its own parameters of the method
            properties["text_encoder"] = {
                "type": "object",
                "description": "TEXT_TO_IMAGE: the text encoder's adapter, its own parameters of this method",
            }
        branch: dict[str, Any] = {
            "title": name,
            "description": own.get("description") or method.summary,
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
        }
        # `name` may be left out for lora, the default; every other method is named
        required = ([] if name == "lora" else ["name"]) + list(own.get("required", []))
        if required:
            branch["required"] = required
        branches.append(branch)
    section = defs["MethodSection"]
    defs["MethodSection"] = {
        "title": section.get("title", "MethodSection"),
        "description": section.get("description", ""),
        "type": "object",
        "properties": {"name": {"enum": method_names(), "default": "lora", "description": "the PEFT method"}},
        "oneOf": branches,
    }
    return {"$schema": DRAFT, "$id": SCHEMA_ID, **schema}


def schema_text() -> str:
    return json.dumps(recipe_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(output: Path | None) -> str:
    """The schema as text; written to `output` when given."""
    text = schema_text()
    if output is not None:
        from peftrun.io.atomic import atomic_file

        with atomic_file(output) as fh:
            fh.write(text)
    return text
