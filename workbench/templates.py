"""Locate the templates and JSON Schemas shipped in ``data_templates/``."""

from __future__ import annotations

import functools
import json
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "data_templates"


def template_path(name: str) -> Path:
    """Path of a file in ``data_templates/``, e.g. ``template_path("workbench.toml")``."""
    return TEMPLATES_DIR / name


@functools.cache
def load_schema(name: str) -> dict:
    """A JSON Schema from ``data_templates/schemas/``, e.g. ``load_schema("study")``."""
    return json.loads((TEMPLATES_DIR / "schemas" / f"{name}.schema.json").read_text("utf-8"))


def schema_validator(schema: dict):
    """A Draft 2020-12 validator of ``schema``.

    jsonschema is imported here, on first use, not with the module: with its format extras
    installed (Jupyter's servers require them) the import alone costs over a second, which
    every command, kernel and dashboard would otherwise pay.

    Example: ``schema_validator(load_schema("study")).is_valid({})``.
    """
    import jsonschema

    return jsonschema.Draft202012Validator(schema)
