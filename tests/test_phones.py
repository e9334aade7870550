"""The device simulator: batches in the app's real shapes, and uploads to a real gunicorn
server."""

from __future__ import annotations

import random
from collections import defaultdict

import orjson
import pytest
from sqlalchemy import func, select

from workbench.catalog import devices, rejections, uploads
from workbench.ledger import verify
from workbench.sensors.schemas import COMMON_FIELDS, check_batch, known_sensors, sensor_schema
from workbench.simulators.phones import make_batch, simulate

T = 1_700_000_000_000


@pytest.mark.parametrize("sensor", [*known_sensors(), "thermometer"])
def test_every_batch_fits_its_sensor_schema(sensor):
    records = make_batch("demo", "demo_00001", "d1", sensor, T, 3 * 3_600_000, 60, random.Random(1))
    assert check_batch(sensor, orjson.dumps(records)) is None
    schema = sensor_schema(sensor)
    if not schema.generic:  # the app's fields, all of them; only Garmin sends a row id
        expected = {f.name for f in schema.fields if f.name != "id" or sensor == "garmin"}
        assert {key for r in records for key in r} == set(COMMON_FIELDS) | expected


def test_records_carry_the_apps_codes_and_cumulative_usage():
    rng = random.Random(2)
    activity = make_batch("demo", "s", "d", "activity", T, 3_600_000, 100, rng)
    assert {r["activityType"] for r in activity} <= {0, 1, 2, 3, 4, 5, 7, 8}
    assert min(r["confidence"] for r in activity) >= 70
    # two days of hourly snapshots: per app non-decreasing within a UTC day, new after midnight
    usage = make_batch("demo", "s", "d", "application_usage", T, 2 * 86_400_000, 48, rng)
    totals = defaultdict(list)
    for r in usage:
        assert r["beginTimeStamp"] % 86_400_000 == 0 and r["endTimeStamp"] == r["timestamp"]
        totals[(r["beginTimeStamp"], r["appName"])].append(r["totalTimeinForeground"])
    assert len({day for day, _app in totals}) >= 2
    assert all(t == sorted(t) for t in totals.values())
    location = make_batch("demo", "s", "d", "location", T, 3_600_000, 10, rng)
    assert all(r["provider"] and r["accuracy"] > 0 and r["alt"] == r["lat"] for r in location)
    moves = make_batch("demo", "s", "d", "accelerometer", T, 60_000, 50, rng)
    assert any(len(repr(r["x"]).split(".")[1]) == 5 for r in moves)


@pytest.mark.slow
def test_simulation_fills_the_pool(home, catalog, server):
    report = simulate(home, "demo", subjects=8, days=2, url=server.url, batches_per_day=6, seed=3)
    assert report.failed == 0, report.errors[:3]
    assert report.stored > 0 and report.duplicates > 0
    assert report.fates["leaves"] >= 1 and report.fates["silent"] >= 1
    with catalog.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(uploads)).scalar_one() == report.stored
        assert conn.execute(select(func.count()).select_from(rejections)).scalar_one() == 0
        left = conn.execute(
            select(func.count()).select_from(devices).where(devices.c.status == 1)
        ).scalar_one()
        sensors = set(conn.execute(select(uploads.c.sensor).distinct()).scalars())
    assert left == report.fates["leaves"]
    assert sensors == {"accelerometer", "location"}
    assert verify(home) == []
    assert "stored" in report.summary()


@pytest.mark.slow
def test_simulate_command_needs_a_running_server(home, study):
    from click.testing import CliRunner

    from workbench.cli import cli

    result = CliRunner().invoke(
        cli,
        [
            "--home",
            str(home.home),
            "simulate",
            "demo",
            "--subjects",
            "1",
            "--days",
            "1",
            "--url",
            "http://127.0.0.1:9",
        ],
    )
    assert (
        result.exit_code == 1 and "no upload server answers at http://127.0.0.1:9" in result.output
    )
