"""`workbench tables export`: files per sensor, subject and day, the data dictionary, the
manifest's hashes, the filters, and an output folder that is checked before anything is written."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import zoneinfo
from pathlib import Path

import orjson
import polars as pl
import pytest
from click.testing import CliRunner

from tests.conftest import REPO
from workbench.catalog import open_catalog
from workbench.cli import cli
from workbench.config import init_home
from workbench.enrollment import enroll
from workbench.errors import OutputRefused
from workbench.sensors.loading import sensor_data
from workbench.sensors.schemas import sensor_schema
from workbench.sensors.sharing import DICTIONARY, MANIFEST, MARKER, export_tables
from workbench.sensors.tables import build_tables
from workbench.simulators.days import simulate_days
from workbench.simulators.phones import IngestPhones
from workbench.studies import create_study, definition_from_options

SENSORS = ["accelerometer", "activity", "location", "application_usage", "ema"]
FIRST = dt.date(2026, 3, 2)
ZONE = "Europe/Berlin"
FORMULA_APP = '=HYPERLINK("http://evil.example","x")'


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A home whose study "demo" (Europe/Berlin) holds 3 simulated days of 2 subjects, and one
    app-usage record whose app name a spreadsheet would run; the tables built."""
    config = init_home(tmp_path_factory.mktemp("export") / "home")
    catalog = open_catalog(config)
    try:
        create_study(catalog, definition_from_options("demo", sensors=SENSORS, timezone=ZONE))
    finally:
        catalog.dispose()
    simulate_days(config, "demo", subjects=2, days=3, start=FIRST, seed=3)
    catalog = open_catalog(config)
    try:
        (person,) = enroll(catalog, "demo", 1)
    finally:
        catalog.dispose()
    noon = dt.datetime(2026, 3, 3, 12, tzinfo=zoneinfo.ZoneInfo(ZONE))
    ms = int(noon.timestamp() * 1000)
    record = {"studyId": "demo", "username": person.subject, "deviceid": "phone-x",
              "sensorname": "application_usage", "timestamp": ms, "appName": FORMULA_APP,
              "beginTimeStamp": ms - 3_600_000, "endTimeStamp": ms, "lastTimeUsed": ms,
              "totalTimeinForeground": 60_000}  # fmt: skip
    phones = IngestPhones(config)
    try:
        phones.register("demo", person.subject, "phone-x", person.token, joined=ms - 86_400_000)
        phones.send(orjson.dumps([record]), person.token)
    finally:
        phones.close()
    build_tables(config, "demo", processes=1)
    return config


def invoke(config, *args):
    return CliRunner().invoke(cli, ["--home", str(config.home), "tables", "export", "demo", *args])


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def day_files(folder: Path) -> set[str]:
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, DICTIONARY, MARKER)
    }


def names(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_one_file_per_sensor_subject_and_day_with_the_hashes_of_the_manifest(built, tmp_path):
    out = tmp_path / "share"
    done = invoke(built, "--out", str(out))
    assert done.exit_code == 0, done.output
    assert "exported" in done.output and str(out / MANIFEST) in done.output
    listed = manifest(out)
    assert listed["study"] == "demo" and listed["file_format"] == "parquet"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", listed["workbench_version"])
    assert listed["created"].endswith("Z") and listed["filters"]["subjects"] is None
    assert {f["path"] for f in listed["files"]} == day_files(out)
    for entry in [*listed["files"], listed["dictionary"]]:
        data = (out / entry["path"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)
    for entry in listed["files"]:
        sensor, subject, name = entry["path"].split("/")
        assert name == f"{sensor}_{subject}_{entry['day']}.parquet"
        frame = pl.read_parquet(out / entry["path"])
        assert frame.height == entry["rows"] > 0
        assert frame["subject"].unique().to_list() == [subject]
        assert frame["day"].unique().to_list() == [dt.date.fromisoformat(entry["day"])]
    # together, the files hold exactly what sensor_data loads
    for sensor in SENSORS:
        exported = pl.concat(
            [pl.read_parquet(out / f["path"]) for f in listed["files"] if f["sensor"] == sensor]
        )
        loaded = sensor_data(built, "demo", sensor).collect()
        assert exported.sort(pl.all()).equals(loaded.sort(pl.all())), sensor
    assert sorted({f["sensor"] for f in listed["files"]}) == sorted(SENSORS)


def test_csv_has_iso_times_and_neutralised_text(built, tmp_path):
    out = tmp_path / "csv"
    assert invoke(built, "--out", str(out), "--format", "csv").exit_code == 0
    listed = manifest(out)
    assert all(f["path"].endswith(".csv") for f in listed["files"])
    location = next(f for f in listed["files"] if f["sensor"] == "location")
    frame = pl.read_csv(out / location["path"], infer_schema=False)
    assert frame["time"].str.contains(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$").all()
    assert frame["local_time"].str.contains(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}$").all()
    utc = dt.datetime.fromisoformat(frame["time"][0])
    local = dt.datetime.fromisoformat(frame["local_time"][0])
    assert utc.astimezone(zoneinfo.ZoneInfo(ZONE)).replace(tzinfo=None) == local
    apps = "\n".join(
        (out / f["path"]).read_text() for f in listed["files"] if f["sensor"] == "application_usage"
    )
    assert "'=HYPERLINK" in apps and "\n=HYPERLINK" not in apps and ",=HYPERLINK" not in apps


def test_the_dictionary_lists_every_exported_column_with_unit_and_description(built, tmp_path):
    out = tmp_path / "share"
    export_tables(built, "demo", out)
    dictionary = pl.read_csv(out / DICTIONARY, infer_schema=False).fill_null("")
    assert dictionary.columns == ["sensor", "column", "type", "unit", "description"]
    rows = {(r["sensor"], r["column"]): r for r in dictionary.iter_rows(named=True)}
    for entry in manifest(out)["files"]:
        for column in pl.read_parquet_schema(out / entry["path"]):
            row = rows[(entry["sensor"], column)]
            assert row["description"] and row["type"]
    for sensor in SENSORS:
        for spec in sensor_schema(sensor).table_fields:
            assert rows[(sensor, spec.name)]["unit"] == (spec.unit or "")
    assert rows[("location", "lat")]["unit"] and rows[("accelerometer", "x")]["unit"] == "m/s^2"


def test_subjects_sensors_and_days_are_filtered(built, tmp_path):
    out = tmp_path / "some"
    done = invoke(built, "--out", str(out), "--subjects", "demo_00002", "--sensor", "location",
                  "--sensor", "activity", "--start", "2026-03-03", "--end", "2026-03-03")  # fmt: skip
    assert done.exit_code == 0, done.output
    listed = manifest(out)
    assert listed["filters"] == {
        "subjects": ["demo_00002"],
        "sensors": ["location", "activity"],
        "start": "2026-03-03",
        "end": "2026-03-03",
    }
    assert {(f["sensor"], f["subject"], f["day"]) for f in listed["files"]} == {
        ("location", "demo_00002", "2026-03-03"),
        ("activity", "demo_00002", "2026-03-03"),
    }
    for sensor in ("location", "activity"):
        loaded = sensor_data(
            built, "demo", sensor, subjects=["demo_00002"], start="2026-03-03", end="2026-03-03"
        ).collect()
        rows = sum(f["rows"] for f in listed["files"] if f["sensor"] == sensor)
        assert rows == loaded.height > 0
    # local days of the study's zone: the Berlin midnight, not UTC's
    frame = pl.read_parquet(out / listed["files"][0]["path"])
    local = frame["time"].dt.convert_time_zone(ZONE).dt.date().unique().to_list()
    assert local == [dt.date(2026, 3, 3)]
    utc = dt.UTC
    assert frame["time"].min() >= dt.datetime(2026, 3, 2, 23, tzinfo=utc)  # Berlin's midnight
    assert frame["time"].max() < dt.datetime(2026, 3, 3, 23, tzinfo=utc)
    assert sorted(pl.read_csv(out / DICTIONARY)["sensor"].unique()) == ["activity", "location"]


def test_an_unknown_subject_or_sensor_writes_nothing(built, tmp_path):
    out = tmp_path / "none"
    unknown = invoke(built, "--out", str(out), "--subjects", "demo_00001,nobody")
    assert unknown.exit_code != 0 and "nobody" in unknown.output
    sensor = invoke(built, "--out", str(out), "--sensor", "gyroscope")
    assert sensor.exit_code == 3 and "gyroscope" in sensor.output
    assert not out.exists()


def test_the_true_latitude_in_alt_is_nowhere_in_the_export(built, tmp_path):
    out = tmp_path / "csv"
    export_tables(built, "demo", out, fmt="csv")
    raw = [
        record["alt"]
        for path in (built.pool / "studies" / "demo").rglob("*location*.json")
        for record in orjson.loads(path.read_bytes())
    ]
    assert len(raw) > 100
    text = "\n".join(p.read_text() for p in out.rglob("*.csv"))
    assert not any(repr(alt) in text for alt in raw)
    for path in out.rglob("*.csv"):
        assert "alt" not in path.read_text().splitlines()[0].split(",")
    assert "alt" not in pl.read_csv(out / DICTIONARY)["column"].to_list()


def refusals(config, tmp_path) -> dict:
    """Folders the export must refuse, each with what it finds there."""
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("chapter 1")
    linked = tmp_path / "linked"
    export_tables(config, "demo", linked, sensors=["ema"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (linked / "location").symlink_to(elsewhere)  # a previous export whose folder leads out
    return {
        "a file": (a_file, "is a file"),
        "a folder of others": (foreign, "not empty"),
        "inside the pool": (config.pool / "share", "inside the data pool"),
        "the pool": (config.pool, "inside the data pool"),
        "holding the home": (config.home.parent, "holds the"),
        "a link out of the folder": (linked, "is a link"),
        "escaping with ..": (config.pool / "studies" / ".." / "x", "inside the data pool"),
    }


@pytest.mark.parametrize("case", ["a file", "a folder of others", "inside the pool", "the pool",
                                  "holding the home", "a link out of the folder",
                                  "escaping with .."])  # fmt: skip
def test_a_bad_out_is_refused_with_a_clear_error_and_nothing_written(built, tmp_path, case):
    out, message = refusals(built, tmp_path)[case]
    before, pool_before = tree(tmp_path), names(built.pool)
    done = invoke(built, "--out", str(out))
    assert done.exit_code == 2, done.output
    assert done.output.startswith("error: ") and message in done.output
    assert len(done.output.strip().splitlines()) == 1
    assert tree(tmp_path) == before and names(built.pool) == pool_before
    with pytest.raises(OutputRefused):
        export_tables(built, "demo", out)


def test_overwrite_writes_into_a_folder_of_others_and_leaves_their_files(built, tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "thesis.docx").write_text("chapter 1")
    (out / "location").mkdir()
    (out / "location" / "notes.txt").write_text("mine")
    done = invoke(built, "--out", str(out), "--overwrite", "--sensor", "location")
    assert done.exit_code == 0, done.output
    assert (out / "thesis.docx").read_text() == "chapter 1"
    assert (out / "location" / "notes.txt").read_text() == "mine"
    assert {f["path"] for f in manifest(out)["files"]} == day_files(out) - {
        "thesis.docx",
        "location/notes.txt",
    }


def test_a_second_export_replaces_the_first_and_keeps_other_files(built, tmp_path):
    out = tmp_path / "share"
    first = export_tables(built, "demo", out, fmt="csv")
    (out / "README.txt").write_text("for the partner lab")
    (out / "location" / "demo_00001" / "checked.txt").write_text("ok")
    second = export_tables(built, "demo", out, subjects=["demo_00001"], sensors=["location"])
    days = sensor_data(built, "demo", "location", subjects="demo_00001").collect()["day"]
    assert second.removed == len(first.files) and len(second.files) == days.n_unique() == 3
    assert day_files(out) == {f["path"] for f in manifest(out)["files"]} | {
        "README.txt",
        "location/demo_00001/checked.txt",
    }
    assert not (out / "accelerometer").exists()  # emptied folders of the export go too


KILLED = """
import os, signal, sys
from pathlib import Path
import workbench.sensors.sharing as sharing
from workbench.config import load_config
real, calls = sharing.write_file_atomically, []
def dying(path, data, **options):
    calls.append(path)
    if len(calls) == 4:  # the marker and two day files written, the third not
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data, **options)
sharing.write_file_atomically = dying
sharing.export_tables(load_config(sys.argv[1]), "demo", Path(sys.argv[2]))
"""


def test_a_killed_export_has_no_manifest_and_the_next_one_completes(built, tmp_path):
    out = tmp_path / "share"
    export_tables(built, "demo", out, sensors=["location"])
    assert (out / MANIFEST).exists()
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, str(built.home), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / MARKER).exists() and not (out / MANIFEST).exists()
    assert invoke(built, "--out", str(out)).exit_code == 0  # recognised: no --overwrite
    listed = manifest(out)
    assert {f["path"] for f in listed["files"]} == day_files(out)
    assert not [p for p in out.rglob("*.tmp")]
    for entry in listed["files"]:
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


def test_export_files_are_private(built, tmp_path):
    out = tmp_path / "share"
    export_tables(built, "demo", out, sensors=["ema"])
    for path in [out, *out.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode in (0o700, 0o600), (path, oct(mode))
