"""The day table of features: the public callable, incremental writes, the same result on one
process, several processes and two scheduler consumers, and bad input."""

from __future__ import annotations

import dataclasses
import datetime
import subprocess
import sys

import orjson
import polars as pl
import pytest
from click.testing import CliRunner

from tests.conftest import scheduler_consumers
from workbench.catalog import open_catalog
from workbench.cli import cli
from workbench.config import init_home, load_config
from workbench.enrollment import enroll
from workbench.features.build import compute_features, read_features, write_features
from workbench.pipelines import run_pipeline
from workbench.sensors.loading import sensor_data
from workbench.sensors.tables import build_tables
from workbench.simulators.days import plan_days
from workbench.simulators.phones import IngestPhones
from workbench.studies import create_study, definition_from_options

pytestmark = pytest.mark.slow

START = datetime.date(2024, 3, 4)
SENSORS = ["location", "activity", "application_usage", "accelerometer"]


@pytest.fixture
def lab(tmp_path):
    """A study recording four sensors, and a way to send a subject's simulated batches."""
    config = init_home(tmp_path / "home")
    catalog = open_catalog(config)
    create_study(catalog, definition_from_options("demo", duration_days=5, sensors=SENSORS))
    catalog.dispose()
    return config


def enrolled(config, n: int, *, sensors=SENSORS, days: int = 3, seed: int = 1):
    """``n`` new subjects and their planned days (nothing sent yet)."""
    catalog = open_catalog(config)
    try:
        people = enroll(catalog, "demo", n)
    finally:
        catalog.dispose()
    plans = plan_days("demo", [p.subject for p in people], days=days, start=START,
                      sensors=sensors, seed=seed, obfuscate=False)  # fmt: skip
    return list(zip(people, plans, strict=True))


def send(config, person, plan, batches, *, register=True):
    phones = IngestPhones(config)
    try:
        if register:
            p = plan.profile
            phones.register(
                "demo", p.subject, p.device, person.token, joined=plan.timeline.start_ms
            )
        for batch in batches:
            phones.send(batch.body, person.token)
    finally:
        phones.close()


def test_workbench_features_is_the_function_and_the_package():
    code = """
import sys
{first}
import workbench
assert callable(workbench.features), "callable"
assert workbench.features is sys.modules["workbench.features"]
assert workbench.features.family("location").name == "location"
from workbench.features.build import day_schema
assert "location_places" in day_schema([])
from workbench.features import compute_family, list_families
assert "app_usage" in list_families() and callable(compute_family)
print("ok")
"""
    for first in (
        "import workbench.features",
        "import workbench",
        "from workbench import features",
    ):
        done = subprocess.run([sys.executable, "-c", code.format(first=first)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0 and done.stdout.strip() == "ok", (first, done.stderr)


def test_features_are_one_row_per_subject_day_with_yield_and_nulls_for_missing_sensors(lab):
    import workbench

    full, partial = enrolled(lab, 2)
    send(lab, *full, full[1].batches)
    # the second subject's phone records no location: its location features are null
    send(lab, *partial, [b for b in partial[1].batches if b.sensor != "location"])
    build_tables(lab, "demo", processes=1)
    table = workbench.features(lab, "demo")
    assert table.select("subject", "day").is_unique().all()
    assert set(table["subject"]) == {full[0].subject, partial[0].subject}
    mine = table.filter(pl.col("subject") == partial[0].subject)
    assert mine["location_places"].null_count() == mine.height == 3
    assert mine["location_valid_hours"].to_list() == [0, 0, 0]  # a measured zero of yield
    assert mine["activity_still_minutes"].null_count() == 0
    theirs = table.filter(pl.col("subject") == full[0].subject)
    assert theirs["location_places"].null_count() == 0
    expected = {f"{s}_valid_hours" for s in SENSORS} | {f"{s}_yield_pct" for s in SENSORS}
    assert expected | {"valid_day", "valid_hours_max", "in_study_hours"} <= set(table.columns)
    assert (table["valid_hours_max"] == table.select(
        pl.max_horizontal(f"{s}_valid_hours" for s in SENSORS)).to_series()).all()  # fmt: skip
    assert (table["valid_day"] == (table["valid_hours_max"] >= 16)).all()
    result = compute_features(lab, "demo", processes=1)
    assert result.reasons["location (all features): no location data that day"] == 3
    apps = workbench.app_usage(lab, "demo", subjects=full[0].subject)
    assert apps.height and set(apps.columns) == {"subject", "day", "app", "minutes"}
    # a stricter study: fewer valid days
    catalog = open_catalog(lab)
    from workbench.catalog import studies as studies_table

    with catalog.writing() as conn:
        row = conn.execute(studies_table.select()).first()
        definition = orjson.loads(row.definition)
        definition["features_valid_hours"] = 24.5 - 0.5  # every hour of the day
        conn.execute(studies_table.update().values(definition=orjson.dumps(definition).decode()))
    catalog.dispose()
    strict = workbench.features(lab, "demo")
    assert strict["valid_day"].sum() <= table["valid_day"].sum()
    assert (strict["valid_day"] == (strict["valid_hours_max"] >= 24)).all()


def test_out_of_range_coordinates_are_kept_and_give_features(lab):
    ((person, plan),) = enrolled(lab, 1, sensors=["location"])
    shifted = []
    for batch in plan.batches:  # as JTrack's rotation can: latitudes beyond 90 degrees
        records = orjson.loads(batch.body)
        for r in records:
            r["lat"] += 100.0
        shifted.append(dataclasses.replace(batch, body=orjson.dumps(records)))
    send(lab, person, plan, shifted)
    build_tables(lab, "demo", processes=1)
    assert sensor_data(lab, "demo", "location").select(pl.col("lat").min()).collect().item() > 90
    table = compute_features(lab, "demo", processes=1).table
    assert table.height == 3
    assert (table["location_places"] >= 1).all()
    assert table["location_home_minutes"].null_count() == 0
    assert table["location_distance_km"].null_count() == 0


def test_write_features_recomputes_only_subjects_with_new_data(lab):
    (a, plan_a), (b, plan_b) = enrolled(lab, 2)
    half = len(plan_a.batches) // 2
    send(lab, a, plan_a, plan_a.batches[:half])
    send(lab, b, plan_b, plan_b.batches)
    build_tables(lab, "demo", processes=1)
    first = write_features(lab, "demo", processes=1)
    assert first.rebuilt == "first run" and first.recomputed == [a.subject, b.subject]
    folder = first.folder
    assert {p.name for p in folder.iterdir()} >= {
        "features.parquet", "features.csv", "app_usage.parquet", "app_usage.csv", "state.json"
    }  # fmt: skip
    before = read_features(lab, "demo")
    assert before.height == first.rows

    again = write_features(lab, "demo", processes=1)
    assert again.recomputed == [] and "up to date" in again.summary()

    send(lab, a, plan_a, plan_a.batches[half:], register=False)
    build_tables(lab, "demo", processes=1)
    more = write_features(lab, "demo", processes=1)
    assert more.rebuilt is None and more.recomputed == [a.subject]
    after = read_features(lab, "demo")
    assert after.filter(pl.col("subject") == b.subject).equals(
        before.filter(pl.col("subject") == b.subject)
    )
    assert (
        after.filter(pl.col("subject") == a.subject).height
        >= before.filter(pl.col("subject") == a.subject).height
    )
    full = write_features(lab, "demo", rebuild=True, processes=1)
    assert full.rebuilt == "--rebuild"
    fresh = read_features(lab, "demo")
    assert fresh.equals(after)  # incremental == from scratch
    csv = pl.read_csv(folder / "features.csv", try_parse_dates=True)
    assert csv.height == after.height and csv.columns == after.columns


def test_the_command_writes_the_features_and_summarises_null_reasons(lab):
    ((person, plan),) = enrolled(lab, 1, sensors=["activity", "accelerometer"])
    send(lab, person, plan, plan.batches)
    build_tables(lab, "demo", processes=1)
    runner = CliRunner()
    done = runner.invoke(cli, ["--home", str(lab.home), "features", "demo", "--processes", "1"])
    assert done.exit_code == 0, done.output
    assert "features of 1 of 1 subjects recomputed" in done.output
    assert "location (all features): no location data that day" in done.output
    again = runner.invoke(cli, ["--home", str(lab.home), "features", "demo", "--json"])
    assert orjson.loads(again.output)["recomputed"] == []
    unknown = runner.invoke(cli, ["--home", str(lab.home), "features", "nosuch"])
    assert unknown.exit_code == 4 and "error:" in unknown.output


def test_processes_and_two_consumers_give_the_single_process_result(lab, redis_url, monkeypatch):
    for person, plan in enrolled(lab, 3, days=2):
        send(lab, person, plan, plan.batches)
    build_tables(lab, "demo", processes=1)
    single = compute_features(lab, "demo", processes=1)
    spread = compute_features(lab, "demo", processes=2)
    assert spread.table.equals(single.table) and spread.apps.equals(single.apps)
    assert spread.reasons == single.reasons

    monkeypatch.setenv("WORKBENCH_REDIS_URL", redis_url)
    config = load_config(lab.home)
    with scheduler_consumers(lab.home, 2):
        queued = compute_features(config, "demo", queue=True)
    assert queued.table.equals(single.table) and queued.apps.equals(single.apps)
    assert queued.reasons == single.reasons


def test_the_features_pipeline_builds_tables_then_features(lab):
    ((person, plan),) = enrolled(lab, 1, days=2)
    send(lab, person, plan, plan.batches)
    record = run_pipeline(lab, "features", parameters={"study": "demo"})
    assert record.status == "succeeded", record
    assert read_features(lab, "demo").height == 2


def test_a_late_batch_recomputes_its_days_and_the_result_equals_a_rebuild(lab):
    """A batch of an earlier day arriving late: that day (and the days either side) are recomputed,
    location over every day; the other days' rows stay as they were; the table equals a
    rebuild from scratch."""
    ((person, plan),) = enrolled(lab, 1, days=4)
    late = [b for b in plan.batches if b.sensor == "activity"]
    middle = sorted(late, key=lambda b: b.first_ts)[len(late) // 2]  # one batch, mid-study
    send(lab, person, plan, [b for b in plan.batches if b is not middle])
    build_tables(lab, "demo", processes=1)
    write_features(lab, "demo", processes=1)
    before = read_features(lab, "demo")
    send(lab, person, plan, [middle], register=False)
    build_tables(lab, "demo", processes=1)
    days = set(
        sensor_data(lab, "demo", "activity").filter(pl.col("batch") == pl.col("batch").max())
        .collect()["day"]
    )  # fmt: skip
    assert days and len(days) <= 2
    more = write_features(lab, "demo", processes=1)
    assert more.recomputed == [person.subject] and more.rebuilt is None
    after = read_features(lab, "demo")
    one = datetime.timedelta(days=1)
    recomputed = {d + k * one for d in days for k in (-1, 0, 1)}
    untouched = ~pl.col("day").is_in(list(recomputed))
    assert after.filter(untouched).equals(before.filter(untouched))
    changed = after.filter(~untouched).select("activity_still_minutes", "activity_walking_minutes")
    assert not changed.equals(
        before.filter(~untouched).select("activity_still_minutes", "activity_walking_minutes")
    )  # the late detections count now
    write_features(lab, "demo", rebuild=True, processes=1)
    fresh = read_features(lab, "demo")
    for column in fresh.columns:
        assert fresh[column].equals(after[column]), (column, fresh[column], after[column])
