"""The files shipped with the package, in ``workbench/shipped/``: the templates and JSON Schemas
(``data_templates/``), and the pipelines and notebooks (``pipelines/``, ``notebooks/`` with
``notebooks/dashboards/``) that :func:`copy_into_home` gives each home to edit."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from workbench.pool import make_folders, write_file_atomically

SHIPPED = Path(__file__).resolve().parent / "shipped"
TEMPLATES_DIR = SHIPPED / "data_templates"
SHIPPED_PIPELINES = SHIPPED / "pipelines"
SHIPPED_NOTEBOOKS = SHIPPED / "notebooks"
HOME_COPIES = ("pipelines", "notebooks")  # folders of a home that start as the shipped ones


def template_path(name: str) -> Path:
    """Path of a file in ``data_templates/``, e.g. ``template_path("workbench.toml")``."""
    return TEMPLATES_DIR / name


def copy_into_home(home: Path) -> list[Path]:
    """Copy the shipped pipelines and notebooks into ``home/pipelines`` and ``home/notebooks``;
    files the home has already (perhaps edited) are kept. Return the files copied.

    Example: ``copy_into_home(Path("~/sleep-lab").expanduser())``.
    """
    copied = []
    for name in HOME_COPIES:
        for source in sorted((SHIPPED / name).rglob("*")):
            if not source.is_file() or source.name.startswith(".") or "__pycache__" in source.parts:
                continue
            target = home / name / source.relative_to(SHIPPED / name)
            if target.exists():
                continue
            make_folders(target.parent)
            copied.append(write_file_atomically(target, source.read_bytes(), durable=False))
    return copied


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
