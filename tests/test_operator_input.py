"""Names an operator types that become paths are checked before anything is written or
deleted (the questionnaire commands are covered in test_export.py)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from workbench.cli import cli

BAD_NAMES = ["../outside", "../../..", "/tmp/elsewhere", "..", "a/../../b"]

COMMANDS = [
    ["study", "create", "{name}"],
    ["study", "show", "{name}"],
    ["study", "archive", "{name}"],
    ["enroll", "{name}", "--count", "1"],
    ["status", "{name}"],
    ["sanity", "{name}"],
    ["subject", "remove", "{name}", "demo_00001"],
    ["subject", "remove", "demo", "{name}"],
    ["subject", "restore", "demo", "{name}"],
    ["subject", "reset-devices", "{name}", "demo_00001"],
    ["junk", "list", "--study", "{name}"],
    ["junk", "prune", "--all", "--study", "{name}"],
]


def snapshot(root):
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith("catalog.sqlite")
    }


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_names_that_leave_their_folder_are_refused(home, study, subjects, command, name):
    args = [part.replace("{name}", name) for part in command]
    root = home.home.parent
    before = snapshot(root)
    result = CliRunner().invoke(cli, ["--home", str(home.home), *args])
    assert result.exit_code == 2, result.output
    assert "invalid" in result.output and "name" in result.output
    assert "Traceback" not in result.output
    assert snapshot(root) == before


def test_a_study_file_naming_a_folder_outside_the_home_is_refused(home, tmp_path):
    definition = {"id": "ema", "duration_days": 7, "sensors": {"ema": {}}, "resources": "../../etc"}
    path = tmp_path / "ema.json"
    path.write_text(json.dumps(definition))
    result = CliRunner().invoke(
        cli, ["--home", str(home.home), "study", "create", "ema", "--from", str(path)]
    )
    assert result.exit_code == 2 and "inside the workbench home" in result.output
