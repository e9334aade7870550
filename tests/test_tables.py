"""The sensor tables: typed, exactly-once, faithful, private, incremental and crash-safe
(a build killed with SIGKILL at any step and run again gives the same dataset)."""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import polars as pl
import pytest

import workbench
from tests.conftest import START_MS, Phone, scheduler_consumers
from workbench.catalog import open_catalog, uploads
from workbench.enrollment import enroll
from workbench.errors import InvalidTimezone, NoSensorTable
from workbench.pool import DataPool
from workbench.sensors import chunks as chunks_module
from workbench.sensors import tables as tables_module
from workbench.sensors.schemas import sensor_schema
from workbench.simulators.phones import make_batch
from workbench.studies import create_study, definition_from_options
from workbench.subjects import set_timezone

KILL_TABLES = Path(__file__).resolve().parent / "kill_tables.py"
SENSORS = ["accelerometer", "location", "activity", "thermometer"]
# 2023-11-14 22:13:20 UTC: 23:13 in Berlin, so a batch of an hour crosses local midnight.
MINUTE = 60_000


@pytest.fixture
def walk(catalog):
    """A study "walk" in Berlin with two registered phones (in-process server)."""
    create_study(
        catalog,
        definition_from_options(
            "walk", duration_days=14, sensors=SENSORS, timezone="Europe/Berlin"
        ),
    )
    return enroll(catalog, "walk", 2)


@pytest.fixture
def phones(client, walk):
    found = []
    for enrollment in walk:
        phone = Phone(client, enrollment, study="walk")
        assert phone.register().status_code == 200
        found.append(phone)
    return found


def send(phone: Phone, records: list[dict]) -> None:
    answer = phone.upload(records)
    assert answer.status_code == 200, answer.text


def batch(phone: Phone, sensor: str, start: int, n: int, seed: int, span: int = 60 * MINUTE):
    return make_batch(
        "walk", phone.subject, phone.device, sensor, start, span, n, random.Random(seed)
    )


def round_of(phones, start: int, seed: int) -> dict:
    """One round of uploads: per phone an hour of accelerometer, location and activity, and a
    thermometer record (a sensor without a schema). Returns the records sent per sensor."""
    sent: dict[str, list] = {s: [] for s in SENSORS}
    for k, phone in enumerate(phones):
        for sensor, n in (("accelerometer", 120), ("location", 6), ("activity", 12)):
            records = batch(phone, sensor, start, n, seed * 10 + k)
            for i, record in enumerate(records):
                if sensor == "location":  # the true latitude, as the app's defect sends it
                    record["alt"] = 77.123456 + i / 1000 + k / 10_000
            send(phone, records)
            sent[sensor].extend(records)
        extra = batch(phone, "thermometer", start, 3, seed)
        for r in extra:
            r["celsius"] = 21.5
        send(phone, extra)
        sent["thermometer"].extend(extra)
    return sent


def table(config, sensor: str, study: str = "walk") -> pl.DataFrame:
    frame = workbench.sensor_data(config, study, sensor).collect()
    return frame.sort(frame.columns)


def dataset(config) -> dict[str, pl.DataFrame]:
    found = {s: table(config, s) for s in SENSORS}
    q = workbench.quarantine_table(config, "walk")
    found["quarantine"] = q.sort(q.columns)
    return found


def test_tables_are_typed_with_local_days_and_leave_alt_out(home, phones):
    sent = round_of(phones, START_MS, seed=1)
    summary = workbench.build_tables(home, "walk", processes=1)
    assert summary.quarantined == 0 and summary.skipped == []
    for sensor in ("accelerometer", "location", "activity"):
        frame = table(home, sensor)
        assert dict(frame.schema) == sensor_schema(sensor).columns()
        assert frame.height == len(sent[sensor])
    location = table(home, "location")
    assert "alt" not in location.columns
    raw_alts = {r["alt"] for r in sent["location"]}
    assert not any(
        v in raw_alts
        for col in location.columns
        if location[col].dtype == pl.Float64
        for v in location[col]
    )
    # local time in Berlin (UTC+1 in November) and the local day, which starts at 23:00 UTC
    row = location.row(0, named=True)
    assert row["local_time"] == row["time"].replace(tzinfo=None) + dt.timedelta(hours=1)
    assert row["day"] == row["local_time"].date()
    days = set(table(home, "accelerometer")["day"])
    assert days == {dt.date(2023, 11, 14), dt.date(2023, 11, 15)}  # the hour crosses midnight
    activity = table(home, "activity")
    assert activity["activityType"].dtype == pl.Int64
    assert set(activity["activityType"]) <= {0, 1, 2, 3, 4, 5, 7, 8}
    # every row names its batch in the ledger
    catalog = open_catalog(home)
    with catalog.engine.connect() as conn:
        ids = {r.id for r in conn.execute(uploads.select())}
    catalog.dispose()
    assert set(location["batch"]) <= ids


def test_records_repeated_across_overlapping_batches_appear_once(home, phones):
    phone = phones[0]
    first = batch(phone, "location", START_MS, 10, seed=3)
    send(phone, first)
    # the phone sends the last 4 records again with 6 new ones (a retried, overlapping batch)
    second = first[6:] + batch(phone, "location", START_MS + 2 * 3_600_000, 6, seed=4)
    send(phone, second)
    summary = workbench.build_tables(home, "walk", sensor="location", processes=1)
    frame = table(home, "location")
    assert frame.height == 16
    assert summary.sensors["location"].repeated == 4
    first_batch = frame.filter(pl.col("time") == frame["time"].min())["batch"].item()
    # a repeated record keeps the batch it came with first
    repeated_times = {r["timestamp"] for r in first[6:]}
    kept = frame.filter(pl.col("time").dt.epoch("ms").is_in(list(repeated_times)))
    assert set(kept["batch"]) == {first_batch}
    # the same repeat in a later build is dropped too
    send(phone, first[:3] + batch(phone, "location", START_MS + 5 * 3_600_000, 2, seed=5))
    summary = workbench.build_tables(home, "walk", sensor="location", processes=1)
    assert summary.sensors["location"].repeated == 3
    assert table(home, "location").height == 18


def test_a_record_that_fails_its_schema_is_quarantined_with_the_reason(home, phones):
    phone = phones[0]
    records = batch(phone, "location", START_MS, 5, seed=6)
    del records[2]["accuracy"]
    records[3]["lat"] = "north"
    send(phone, records)
    summary = workbench.build_tables(home, "walk", sensor="location", processes=1)
    assert summary.sensors["location"].quarantined == 2
    assert summary.sensors["location"].rows == 3
    assert "2 quarantined" in summary.summary()
    refused = workbench.quarantine_table(home, "walk", "location").sort("record")
    assert refused["record"].to_list() == [2, 3]
    assert "accuracy" in refused["reason"][0] and "float" in refused["reason"][1]
    assert all("alt" not in orjson.loads(c) for c in refused["content"])  # identifying: never
    assert orjson.loads(refused["content"][1])["lat"] == "north"


def test_a_batch_whose_file_fails_its_hash_is_skipped_whole_and_reported(home, phones):
    phone = phones[0]
    send(phone, batch(phone, "location", START_MS, 5, seed=7))
    send(phone, batch(phone, "location", START_MS + 3_600_000, 5, seed=8))
    catalog = open_catalog(home)
    with catalog.engine.connect() as conn:
        row = conn.execute(uploads.select().order_by(uploads.c.id.desc())).first()
    catalog.dispose()
    path = DataPool.of(home).path(row.path)
    os.chmod(path, 0o600)
    path.write_bytes(path.read_bytes().replace(b'"lat":', b'"lat" :', 1))
    summary = workbench.build_tables(home, "walk", sensor="location", processes=1)
    assert len(summary.skipped) == 1 and f"batch {row.id}" in summary.skipped[0]
    assert "hash" in summary.skipped[0] and "skipped" in summary.summary()
    frame = table(home, "location")
    assert frame.height == 5 and row.id not in set(frame["batch"])  # never half-imported
    refused = workbench.quarantine_table(home, "walk", "location")
    assert refused.filter(pl.col("batch") == row.id)["record"].to_list() == [None]


def test_a_sensor_without_a_schema_is_built_in_the_generic_shape_and_named(home, phones):
    round_of(phones, START_MS, seed=9)
    summary = workbench.build_tables(home, "walk", processes=1)
    assert summary.generic == ["thermometer"]
    assert "thermometer" in summary.summary() and "generic shape" in summary.summary()
    frame = table(home, "thermometer")
    assert frame.height == 6
    assert orjson.loads(frame["data"][0])["celsius"] == 21.5


def test_builds_are_incremental_and_a_rebuild_from_raw_equals_them(home, phones, monkeypatch):
    round_of(phones, START_MS, seed=10)
    first = workbench.build_tables(home, "walk", processes=1)
    assert sum(s.batches for s in first.sensors.values()) == 8
    assert "up to date" in workbench.build_tables(home, "walk").summary()
    for k in range(3):  # overlapping rounds, built one at a time
        round_of(phones, START_MS + (k + 1) * 30 * MINUTE, seed=11 + k)
        later = workbench.build_tables(home, "walk", processes=1)
        assert sum(s.batches for s in later.sensors.values()) == 8  # only the new batches
    incremental = dataset(home)
    monkeypatch.setattr(tables_module, "INLINE_BYTES", 0)  # however small: worker processes
    rebuilt = workbench.build_tables(home, "walk", rebuild=True, processes=2)
    assert (
        len(rebuilt.workers) == 2 and f"{os.uname().nodename}:{os.getpid()}" not in rebuilt.workers
    )
    assert all(s.rebuilt == "--rebuild" for s in rebuilt.sensors.values())
    again = dataset(home)
    for name, frame in incremental.items():
        assert frame.equals(again[name]), name


def test_a_subject_time_zone_moves_its_local_days_and_rebuilds(home, phones, catalog):
    round_of(phones, START_MS, seed=20)
    workbench.build_tables(home, "walk", processes=1)
    subject = phones[0].subject
    set_timezone(catalog, "walk", subject, "America/New_York")
    summary = workbench.build_tables(home, "walk", processes=1)
    assert summary.sensors["location"].rebuilt == "a time zone changed"
    frame = workbench.sensor_data(home, "walk", "location", subjects=[subject]).collect()
    row = frame.row(0, named=True)
    assert row["local_time"] == row["time"].replace(tzinfo=None) - dt.timedelta(hours=5)
    with pytest.raises(InvalidTimezone):
        set_timezone(catalog, "walk", subject, "Mars/Olympus")


def test_sensor_data_reads_only_the_days_and_subjects_asked_for(home, phones):
    day_ms = 24 * 3_600_000
    for d in range(4):
        for phone in phones:
            send(phone, batch(phone, "location", START_MS + 3_600_000 + d * day_ms, 6, seed=d))
    workbench.build_tables(home, "walk", processes=1)
    first = phones[0].subject
    one = workbench.sensor_data(home, "walk", "location", subjects=[first]).collect()
    assert set(one["subject"]) == {first} and one.height == 24
    days = workbench.sensor_data(home, "walk", "location", start="2023-11-16", end="2023-11-17")
    assert set(days.collect()["day"]) == {dt.date(2023, 11, 16), dt.date(2023, 11, 17)}
    # datetimes are read in the study's zone, the end excluded
    start = dt.datetime(2023, 11, 16, 0, 0)
    window = workbench.sensor_data(
        home, "walk", "location", start=start, end=start + dt.timedelta(hours=12)
    )
    assert window.collect()["day"].unique().to_list() == [dt.date(2023, 11, 16)]
    plan = days.explain()
    assert "2023-11-15" not in plan and "2023-11-14" not in plan  # those files are not scanned
    with pytest.raises(NoSensorTable):
        workbench.sensor_data(home, "walk", "gyroscope")
    empty = workbench.sensor_data(home, "walk", "activity").collect()
    assert empty.is_empty() and dict(empty.schema) == sensor_schema("activity").columns()


def build_process(config, *extra, kill: tuple[str, int] | None = None, env=None):
    arguments = ["--home", str(config.home), "tables", "build", "walk", "--processes", "1", *extra]
    if kill:
        command = [sys.executable, str(KILL_TABLES), kill[0], str(kill[1]), "--", *arguments]
    else:
        command = [sys.executable, "-m", "workbench.cli", *arguments]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WORKBENCH_COMPACT_PARTS": "2", **(env or {})},
    )


KILLS = [
    ("before-write", 1),
    ("after-write", 1),
    ("before-write", 4),
    ("after-write", 6),
    ("after-write", 9),
    ("after-delete", 1),
    ("after-delete", 3),
    ("before-mark", 1),
    ("before-mark", 3),
    ("after-mark", 2),
]


@pytest.mark.parametrize("kill", KILLS, ids=[f"{k}-{n}" for k, n in KILLS])
def test_a_build_killed_at_any_step_and_run_again_gives_the_same_dataset(
    kill, home, phones, monkeypatch
):
    monkeypatch.setattr(chunks_module, "COMPACT_PARTS", 2)
    round_of(phones, START_MS, seed=30)
    workbench.build_tables(home, "walk", processes=1)
    round_of(phones, START_MS + 20 * MINUTE, seed=31)
    workbench.build_tables(home, "walk", processes=1)
    sent = round_of(phones, START_MS + 40 * MINUTE, seed=32)
    bad = batch(phones[1], "location", START_MS, 3, seed=33)
    bad[1]["accuracy"] = None
    send(phones[1], bad)
    killed = build_process(home, kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    again = build_process(home)
    assert again.returncode == 0, again.stdout + again.stderr
    after = dataset(home)
    assert after["accelerometer"].height > len(sent["accelerometer"])
    assert after["quarantine"].height == 1
    for sensor in SENSORS:  # nothing twice
        frame = after[sensor]
        assert frame.height == frame.drop("batch").unique().height, sensor
    rebuilt = build_process(home, "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    for name, frame in dataset(home).items():
        assert frame.equals(after[name]), name


def test_consumers_on_a_redis_queue_build_what_one_process_builds(
    home, phones, redis_url, monkeypatch, tmp_path
):
    """Two scheduler consumers (as on two hosts sharing the pool and Redis) build the study's
    chunks; the tables equal a single-process rebuild."""
    empty = tmp_path / "no-pipelines"
    empty.mkdir()
    toml = home.home / "workbench.toml"
    toml.write_text(toml.read_text().replace('folder = "pipelines"', f'folder = "{empty}"'))
    for k in range(3):
        round_of(phones, START_MS + k * 25 * MINUTE, seed=40 + k)
    monkeypatch.setenv("WORKBENCH_REDIS_URL", redis_url)
    config = workbench.load_config(home.home)
    with scheduler_consumers(home.home, 2) as consumers:
        summary = workbench.build_tables(config, "walk", queue=True)
    assert sum(s.batches for s in summary.sensors.values()) == 24
    assert summary.workers and summary.workers <= {
        f"{os.uname().nodename}:{c.pid}" for c in consumers
    }
    shared = dataset(config)
    workbench.build_tables(config, "walk", rebuild=True, processes=1)
    alone = dataset(config)
    for name, frame in alone.items():
        assert frame.equals(shared[name]), name
    assert alone["accelerometer"].height == 3 * 2 * 120


def test_a_version_8_catalog_gains_subject_zones_and_table_builds(home):
    from sqlalchemy import inspect, text

    from workbench.catalog import SCHEMA_VERSION

    catalog = open_catalog(home)
    with catalog.writing() as conn:
        conn.execute(text("DROP TABLE table_builds"))
        conn.execute(text("ALTER TABLE subjects DROP COLUMN timezone"))
        conn.execute(text("UPDATE schema_info SET value = '8' WHERE key = 'version'"))
    catalog.dispose()
    catalog = open_catalog(home)
    try:
        assert catalog.version() == SCHEMA_VERSION == 9
        with catalog.engine.connect() as conn:
            assert "timezone" in {c["name"] for c in inspect(conn).get_columns("subjects")}
            assert "table_builds" in inspect(conn).get_table_names()
    finally:
        catalog.dispose()
    catalog = open_catalog(home)  # upgrading is idempotent: opening again changes nothing
    assert catalog.version() == 9
    catalog.dispose()
