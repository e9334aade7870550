"""Simulated days: the records are in the app's shapes and batch sizes, and the truth the
simulation keeps agrees with the records it produced."""

from __future__ import annotations

import datetime
import re
import zoneinfo
from collections import Counter, defaultdict

import orjson
import polars as pl
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from workbench.catalog import uploads
from workbench.cli import cli
from workbench.ledger import verify
from workbench.sanity import sanity_check
from workbench.sensors.schemas import check_batch, sensor_schema
from workbench.simulators.days import (
    EMA_QUESTIONS,
    PARTIAL_AFTER_MS,
    RECORDING_TAIL,
    SAMPLES_PER_MINUTE,
    STILL,
    haversine_km,
    local_midnight_ms,
    plan_days,
    simulate_days,
)
from workbench.subjects import study_zones

START = datetime.date(2024, 3, 4)  # a Monday; two weeks take in two weekends and, in New
# York, the day the clocks go forward (10 March: 23 hours)
SUBJECTS = ["demo_00001", "demo_00002", "demo_00003"]
ZONES = {"demo_00003": "Asia/Tokyo"}  # the others live in the study's zone


def _plan(**options):
    settings = dict(days=14, start=START, timezone="America/New_York", zones=ZONES, seed=4)
    return list(plan_days("demo", SUBJECTS, **{**settings, **options}))


@pytest.fixture(scope="module")
def planned():
    """Three subjects' fortnight with true coordinates."""
    return _plan(obfuscate=False)


def _records(subject_days, sensor):
    return [r for b in subject_days.batches if b.sensor == sensor for r in orjson.loads(b.body)]


def _local(ms, zone):
    return datetime.datetime.fromtimestamp(ms / 1000, zoneinfo.ZoneInfo(zone))


def test_every_batch_fits_its_schema_and_is_cut_as_the_app_cuts(planned):
    for subject_days in planned:
        by_sensor = defaultdict(list)
        for batch in subject_days.batches:
            assert check_batch(batch.sensor, batch.body) is None, batch.sensor
            records = orjson.loads(batch.body)
            assert len(records) == batch.records and "id" not in records[0]
            by_sensor[batch.sensor].append(records)
        assert set(by_sensor) == {
            "accelerometer", "gyroscope", "location", "activity", "application_usage", "ema",
            "active_labeling",
        }  # fmt: skip
        assert all(len(b) == EMA_QUESTIONS for b in by_sensor.pop("ema"))  # a prompt a batch
        for sensor, batches in by_sensor.items():
            size = sensor_schema(sensor).batch_records
            for this, after in zip(batches, [*batches[1:], None], strict=True):
                assert len(this) <= size
                if len(this) < size and after is not None:  # a partial batch: a day went by
                    assert after[0]["timestamp"] - this[0]["timestamp"] > PARTIAL_AFTER_MS
            stamps = [r["timestamp"] for b in batches for r in b]
            assert stamps == sorted(stamps)
        full = [len(b) for s in ("location", "accelerometer") for b in by_sensor[s]]
        assert 100 in full and 6000 in full


def test_nights_are_spent_at_home_in_local_time(planned):
    for subject_days in planned:
        zone, home = subject_days.profile.zone, subject_days.profile.places[0]
        nights = [
            r
            for r in _records(subject_days, "location")
            if _local(r["timestamp"], zone).hour < 5 and r["accuracy"] <= 100
        ]
        assert len(nights) > 100
        distances = haversine_km(
            [r["lat"] for r in nights], [r["lon"] for r in nights], home.lat, home.lon
        )
        assert distances.max() < 0.3  # within the fixes' accuracy of home
        assert all(r["alt"] == r["lat"] for r in nights)
        bad = [r for r in _records(subject_days, "location") if r["accuracy"] > 100]
        assert bad and {r["provider"] for r in bad} == {"network"}


def test_motion_is_recorded_only_while_moving_and_for_30_minutes_after(planned):
    for subject_days in planned:
        tl = subject_days.timeline
        per_minute = Counter((r["timestamp"] - tl.start_ms) // 60_000
                             for r in _records(subject_days, "accelerometer"))  # fmt: skip
        moving = [m for m in range(len(tl.mode)) if tl.mode[m] != STILL and tl.phone[m]]
        assert moving and all(per_minute[m] == SAMPLES_PER_MINUTE for m in moving)
        for minute in per_minute:
            recent = tl.mode[max(0, minute - RECORDING_TAIL) : minute + 1]
            assert (recent != STILL).any() and tl.phone[minute]
        assert sum(per_minute.values()) == subject_days.truth["records_accelerometer"].sum()


def test_app_usage_snapshots_are_cumulative_within_a_local_day(planned):
    for subject_days in planned:
        zone, truth = subject_days.profile.zone, subject_days.truth
        series = defaultdict(list)
        for r in _records(subject_days, "application_usage"):
            day = _local(r["endTimeStamp"], zone).date()
            midnight = datetime.datetime.combine(day, datetime.time(), zoneinfo.ZoneInfo(zone))
            assert r["beginTimeStamp"] == midnight.timestamp() * 1000  # restarts at midnight
            assert r["lastTimeUsed"] <= r["endTimeStamp"]
            series[(day, r["appName"])].append(r["totalTimeinForeground"])
        assert len({day for day, _app in series}) >= 10
        for totals in series.values():
            assert totals == sorted(totals)
        # the day's last snapshot (23:59, when the phone was on) holds the day's app minutes
        last = defaultdict(int)
        for (day, app), totals in series.items():
            last[(day, app)] = totals[-1]
        for row in truth.iter_rows(named=True):
            if 23 in row["hours_application_usage"]:
                for app in ("WhatsApp", "Chrome", "Instagram", "Gmail", "Spotify", "YouTube"):
                    minutes = row[f"app_minutes_{app.lower()}"]
                    assert last[(row["day"], app)] == minutes * 60_000
        apps = [
            c for c in truth.columns if c.startswith("app_minutes_") and c != "app_minutes_total"
        ]
        assert (
            truth.select(pl.sum_horizontal(apps)).to_series().to_list()
            == truth["app_minutes_total"].to_list()
        )


def test_the_truth_agrees_with_the_records(planned):
    for subject_days in planned:
        zone, truth = subject_days.profile.zone, subject_days.truth
        assert truth["day"].to_list() == [START + datetime.timedelta(days=d) for d in range(14)]
        for sensor in ("location", "activity", "application_usage", "ema", "active_labeling"):
            hours, counts = defaultdict(set), Counter()
            for r in _records(subject_days, sensor):
                local = _local(r["timestamp"], zone)
                hours[local.date()].add(local.hour)
                counts[local.date()] += 1
            for row in truth.iter_rows(named=True):
                assert row[f"hours_{sensor}"] == sorted(hours[row["day"]]), (sensor, row["day"])
                assert row[f"records_{sensor}"] == counts[row["day"]]
        answered, labelled = Counter(), defaultdict(float)
        for r in _records(subject_days, "ema"):
            answered[_local(r["timestamp"], zone).date()] += 1 / EMA_QUESTIONS
        for r in _records(subject_days, "active_labeling"):
            labelled[(_local(r["timestamp"], zone).date(), r["taskName"])] += r["duration"] / 60
        for row in truth.iter_rows(named=True):
            assert row["ema_answered"] == round(answered[row["day"]]) <= row["ema_prompts"]
            for task in ("walking", "commuting"):
                assert row[f"labelled_minutes_{task}"] == labelled[(row["day"], task)]
            modes = sum(row[f"{m}_minutes"] for m in ("walking", "running", "bicycle", "vehicle"))
            assert row["moving_minutes"] == modes
            following = row["day"] + datetime.timedelta(days=1)
            length = local_midnight_ms(following, zone) - local_midnight_ms(row["day"], zone)
            assert row["still_minutes"] + modes == length // 60_000  # 1380 when clocks go on
            assert row["walked_km"] <= row["walking_minutes"] * 5 / 60 + 1e-9
            assert row["walked_km"] <= row["travelled_km"] + 1e-9
            assert row["home_minutes"] <= row["still_minutes"] and row["places"] >= 1
        weekdays = truth.filter(pl.col("day").dt.weekday() <= 5)
        assert (weekdays["places"] >= 2).all() and (weekdays["travelled_km"] > 1).all()
    days = pl.concat([s.truth for s in planned])
    short = days.filter(pl.col("day") == datetime.date(2024, 3, 10), pl.col("zone") != "Asia/Tokyo")
    assert (short["still_minutes"] + short["moving_minutes"] == 23 * 60).all()
    assert days["labelled_minutes_walking"].sum() > 0 and days["running_minutes"].sum() >= 0
    assert (days["phone_minutes"] <= 6 * 60).any()  # a day of poor yield
    assert ((days["phone_minutes"] < 1440) & (days["phone_minutes"] > 6 * 60)).any()  # a gap


def test_coordinates_are_rotated_as_the_app_does_but_alt_keeps_the_true_latitude(planned):
    rotated = _plan(obfuscate=True, sensors=["location"])
    for true, shown in zip(planned, rotated, strict=True):
        truth_records, shown_records = _records(true, "location"), _records(shown, "location")
        assert len(truth_records) == len(shown_records)
        for a, b in zip(truth_records, shown_records, strict=True):
            assert b["alt"] == a["lat"] and b["timestamp"] == a["timestamp"]
            assert abs(b["lat"] - a["lat"]) + abs(b["lon"] - a["lon"]) > 0.01
        assert shown.truth["travelled_km"].to_list() == true.truth["travelled_km"].to_list()


def test_a_seed_gives_the_same_days_and_another_seed_others():
    def bodies(seed):
        (one,) = plan_days("demo", ["demo_00001"], days=2, start=START, seed=seed,
                           sensors=["location", "activity", "application_usage"])  # fmt: skip
        return [b.body for b in one.batches], one.truth

    first, again, other = bodies(7), bodies(7), bodies(8)
    assert first[0] == again[0] and first[1].equals(again[1])
    assert first[0] != other[0]


def test_simulate_stores_batches_through_the_ingest_path(home, catalog, study):
    truth = simulate_days(home, "demo", subjects=2, days=2, seed=5, start=START,
                          zones={"demo_00002": "Asia/Tokyo"})  # fmt: skip
    assert truth.failed == 0 and truth.stored == truth.batches > 0
    with catalog.engine.connect() as conn:
        rows = conn.execute(select(uploads.c.subject_id, uploads.c.sensor)).all()
    assert len(rows) == truth.batches
    assert {r.sensor for r in rows} == {"accelerometer", "location"}  # what the study records
    assert study_zones(catalog, "demo") == ("UTC", {"demo_00002": "Asia/Tokyo"})
    assert truth.days.height == 4 and truth.homes["subject"].to_list() == [
        "demo_00001",
        "demo_00002",
    ]
    assert verify(home) == [] and sanity_check(home, catalog=catalog, settle=0).ok


def test_the_simulate_command_stores_batches_and_writes_the_truth(home, catalog, study, tmp_path):
    path = tmp_path / "truth.parquet"
    result = CliRunner().invoke(
        cli,
        ["--home", str(home.home), "simulate", "demo", "--subjects", "2", "--days", "2",
         "--seed", "3", "--truth", str(path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    batches = int(re.search(r"(\d+) batches", result.output).group(1))
    with catalog.engine.connect() as conn:
        stored = conn.execute(select(func.count()).select_from(uploads)).scalar_one()
    assert stored == batches > 0 and f"{batches} stored" in result.output
    table = pl.read_parquet(path)
    assert table.height == 4 and {"home_lat", "home_minutes", "travelled_km"} <= set(table.columns)
    yesterday = datetime.date.today() - datetime.timedelta(days=1)
    assert max(table["day"]) in (yesterday, datetime.date.today())  # the days end yesterday


@pytest.mark.slow
def test_simulate_uploads_to_a_running_server(home, catalog, server):
    truth = simulate_days(home, "demo", subjects=1, days=1, seed=2, start=START, url=server.url)
    assert truth.failed == 0, truth.errors[:3]
    assert truth.stored == truth.batches > 0
    with catalog.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(uploads)).scalar_one() == truth.batches
