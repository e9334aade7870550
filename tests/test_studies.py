"""Study definitions: schema, defaults, JTrack import, the study commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from workbench.cli import cli
from workbench.errors import InvalidDefinition
from workbench.studies import (
    create_study,
    definition_from_jtrack,
    definition_from_options,
    get_study,
    list_studies,
    validate_definition,
)

JTRACK = Path(__file__).parent / "data" / "jtrack_study.json"


def run(home, *args):
    return CliRunner().invoke(cli, ["--home", str(home.home), *args])


def test_defaults_are_filled_in():
    filled = validate_definition({"id": "s1", "duration_days": 7, "sensors": {"location": {}}})
    assert filled["auth"] == "token" and filled["checksum_required"] is False
    assert filled["sensors"]["location"]["batches_per_day"] == 24
    assert filled["max_body_bytes"] == 16 * 1024 * 1024 and filled["left_grace_hours"] == 24


@pytest.mark.parametrize(
    "change, message",
    [
        ({"duration_days": 0}, "duration_days: 0 is less than the minimum"),
        ({"sensors": {}}, "sensors: {} should be non-empty"),
        ({"sensors": {"../x": {}}}, "does not match"),
        ({"auth": "none"}, "auth: 'none' is not one of"),
        ({"colour": "red"}, "Additional properties"),
    ],
)
def test_invalid_definitions_say_what_is_wrong(change, message):
    definition = {"id": "s1", "duration_days": 7, "sensors": {"location": {}}, **change}
    with pytest.raises(InvalidDefinition) as info:
        validate_definition(definition)
    assert message in info.value.message


def test_jtrack_import_maps_the_keys():
    raw = json.loads(JTRACK.read_text())
    definition = validate_definition(definition_from_jtrack(raw, "sleep2020"))
    assert definition["duration_days"] == 28
    assert list(definition["sensors"]) == raw["sensor_list"]
    assert definition["sensors"]["accelerometer"]["frequency_hz"] == 50
    assert definition["ema"] is True and definition["survey"] is True
    assert definition["tasks"] == ["tapping"]
    assert definition["auth"] == "legacy"  # JTrack had no tokens: kept explicit
    assert definition["imported_from"] == raw


def test_study_commands(home):
    created = run(
        home, "study", "create", "walk", "--duration", "10", "--sensors", "accelerometer,location"
    )
    assert created.exit_code == 0, created.output
    assert (
        "created study walk: 10 days, sensors accelerometer, location, auth token, time zone UTC"
        in created.output
    )
    imported = run(home, "study", "create", "sleep2020", "--from", str(JTRACK))
    assert imported.exit_code == 0 and "legacy auth" in imported.output
    listing = run(home, "study", "list")
    assert "sleep2020" in listing.output and "walk" in listing.output
    as_json = json.loads(run(home, "study", "list", "--json").output)
    assert [s["id"] for s in as_json] == ["sleep2020", "walk"]
    shown = json.loads(run(home, "study", "show", "walk").output)
    assert shown["duration_days"] == 10 and shown["status"] == "active"
    assert run(home, "study", "archive", "walk").exit_code == 0
    assert json.loads(run(home, "study", "show", "walk").output)["status"] == "archived"
    again = run(home, "study", "archive", "walk")
    assert again.exit_code == 4 and "archived already" in again.output


def test_duplicate_and_unknown_studies_are_errors(home, catalog):
    create_study(catalog, definition_from_options("one"))
    dup = run(home, "study", "create", "one")
    assert dup.exit_code == 4 and "exists already" in dup.output
    missing = run(home, "study", "show", "two")
    assert missing.exit_code == 4 and "no study 'two'" in missing.output


def test_create_from_a_workbench_definition_file(home, tmp_path, catalog):
    path = tmp_path / "study.json"
    path.write_text(
        json.dumps(
            {
                "id": "ignored",
                "duration_days": 5,
                "sensors": {"ema": {"batches_per_day": 3}},
                "checksum_required": True,
            }
        )
    )
    assert run(home, "study", "create", "fromfile", "--from", str(path)).exit_code == 0
    study = get_study(catalog, "fromfile")
    assert study.definition["checksum_required"] is True and study.sensors == {
        "ema": {"batches_per_day": 3}
    }


def test_invalid_study_id_is_refused(home):
    result = run(home, "study", "create", "../etc")
    assert result.exit_code == 2 and "invalid study name" in result.output


def test_list_is_sorted(catalog):
    for name in ("b", "a", "c"):
        create_study(catalog, definition_from_options(name))
    assert [s.id for s in list_studies(catalog)] == ["a", "b", "c"]
