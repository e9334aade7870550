"""Feature families on tiny hand-made sensor tables whose answers are known."""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta

import polars as pl
import pytest

from workbench.errors import UnknownFeatureFamily
from workbench.features import app_minutes, compute_family, family, list_families, task_minutes
from workbench.features.location import EARTH_RADIUS_KM, LocationParams
from workbench.features.motion import (
    AccelerometerParams,
    G,
    combine,
    partial,
    summarise_accelerometer,
)

DAY = date(2024, 3, 4)
MIDNIGHT = datetime(2024, 3, 4)
OFFSET = timedelta(hours=1)  # the subject's zone is UTC+1
KM_PER_DEGREE = EARTH_RADIUS_KM * math.pi / 180


def table(rows: list[dict]) -> pl.DataFrame:
    """A sensor table as the loader gives it, from rows with a naive local ``at``."""
    out = []
    for row in rows:
        row = dict(row)
        local = row.pop("at")
        out.append(
            {
                "subject": row.pop("subject", "s1"),
                "device": "d1",
                "time": local - OFFSET,
                "local_time": local,
                "day": local.date(),
                **row,
                "batch": 1,
            }
        )
    return pl.DataFrame(out).with_columns(
        pl.col("time").dt.replace_time_zone("UTC").cast(pl.Datetime("ms", "UTC")),
        pl.col("local_time").cast(pl.Datetime("ms")),
    )


def fixes(start: datetime, minutes: int, lat: float, lon: float, every: int = 10) -> list[dict]:
    """Location fixes every ``every`` minutes for ``minutes`` at one point."""
    return [
        {"at": start + timedelta(minutes=m), "lat": lat, "lon": lon, "accuracy": 10.0}
        for m in range(0, minutes, every)
    ]


def row(result, day=DAY, subject="s1") -> dict:
    rows = result.table.filter((pl.col("subject") == subject) & (pl.col("day") == day)).to_dicts()
    assert len(rows) == 1
    return rows[0]


# -- registry -------------------------------------------------------------------------------


def test_every_family_is_registered_with_documented_columns():
    assert list_families() == [
        "location", "activity", "app_usage", "accelerometer", "gyroscope", "ema", "labels"
    ]  # fmt: skip
    for name in list_families():
        entry = family(name)
        assert entry.sensors and entry.features
        for feature in entry.features:
            assert feature.name.startswith(name.split("_")[0]) and feature.unit
            assert feature.description
        empty = entry.compute({})
        assert empty.table.height == 0
        assert empty.table.columns == ["subject", "day", *entry.columns]


def test_an_unknown_family_is_named():
    with pytest.raises(UnknownFeatureFamily, match="walking"):
        family("walking")


# -- location -------------------------------------------------------------------------------

HOME = (50.0, 6.0)
WORK = (50.0 + 1 / KM_PER_DEGREE, 6.0)  # 1 km north of home


def home_and_work_day() -> list[dict]:
    """00:00-06:00 at home, 06:00-12:00 at work, 12:00-18:00 at home (fixes every 10 min)."""
    return (
        fixes(MIDNIGHT, 360, *HOME)
        + fixes(MIDNIGHT + timedelta(hours=6), 360, *WORK)
        + fixes(MIDNIGHT + timedelta(hours=12), 360, *HOME)
    )


def test_two_places_one_km_apart_with_six_hours_at_home_at_night():
    result = compute_family("location", {"location": table(home_and_work_day())})
    got = row(result)
    assert got["location_places"] == 2
    # Each fix lasts until the next (10 min), the last one the interval; the fixes at 05:50 and
    # 11:50 lead 1 km away in 10 minutes: moving, at no place.
    assert got["location_home_minutes"] == pytest.approx(350 + 360)
    assert got["location_max_from_home_km"] == pytest.approx(1.0, rel=1e-3)
    # home -> work at 06:00 and back at 12:00: two 1 km steps.
    assert got["location_distance_km"] == pytest.approx(2.0, rel=1e-3)
    # Only the two 10-minute steps that cross 1 km are moving.
    assert got["location_moving_minutes"] == pytest.approx(20)
    # Time at places: home 710 min, work 350 min.
    p = [710 / 1060, 350 / 1060]
    entropy = -sum(x * math.log(x) for x in p)
    assert got["location_entropy"] == pytest.approx(entropy)
    assert got["location_normalized_entropy"] == pytest.approx(entropy / math.log(2))


def test_entropy_of_two_places_with_equal_time_is_ln_2():
    rows = fixes(MIDNIGHT, 310, *HOME) + fixes(MIDNIGHT + timedelta(minutes=310), 300, *WORK)
    got = row(compute_family("location", {"location": table(rows)}))
    # home: 31 fixes, the last moving (300 min); work: 30 fixes, the last lasting the interval.
    assert got["location_entropy"] == pytest.approx(math.log(2))
    assert got["location_normalized_entropy"] == pytest.approx(1.0)


def test_radius_of_gyration_of_two_points_with_equal_time():
    # Two points 2 km apart, visited alternately for 10 minutes each, far above the cluster size:
    # the centre is midway, every fix is 1 km from it.
    north, south = (50.0 + 1 / KM_PER_DEGREE, 6.0), (50.0 - 1 / KM_PER_DEGREE, 6.0)
    rows = [
        {"at": MIDNIGHT + timedelta(minutes=10 * i), "lat": p[0], "lon": p[1], "accuracy": 5.0}
        for i, p in enumerate([north, south] * 6)
    ]
    got = row(compute_family("location", {"location": table(rows)}))
    assert got["location_radius_gyration_km"] == pytest.approx(1.0, rel=1e-3)
    assert got["location_distance_km"] == pytest.approx(22.0, rel=1e-3)
    assert got["location_places"] == 0  # always moving: no stay
    assert got["location_entropy"] is None
    assert got["location_home_minutes"] is None


def test_inaccurate_fixes_and_isolated_jumps_are_dropped():
    rows = fixes(MIDNIGHT, 360, *HOME)
    rows[10] = {**rows[10], "lat": 51.0}  # 111 km away and back within 20 minutes
    rows[20] = {**rows[20], "lat": 50.01, "accuracy": 500.0}  # worse than the accuracy limit
    got = row(compute_family("location", {"location": table(rows)}))
    assert got["location_distance_km"] == pytest.approx(0.0)
    assert got["location_max_from_home_km"] == pytest.approx(0.0, abs=1e-6)
    assert got["location_home_minutes"] == pytest.approx(360)
    loose = LocationParams(max_accuracy_m=1000.0)
    got = row(compute_family("location", {"location": table(rows)}, loose))
    assert got["location_max_from_home_km"] == pytest.approx(0.01 * KM_PER_DEGREE, rel=1e-3)


def test_time_is_capped_and_split_at_local_midnight():
    # One fix at 23:50, the next at 00:10 of the next day (20 min: within the cap), then a gap.
    rows = fixes(MIDNIGHT + timedelta(hours=20), 240, *HOME) + fixes(
        MIDNIGHT + timedelta(days=1, minutes=10), 60, *HOME
    )
    rows.append({**rows[-1], "at": MIDNIGHT + timedelta(days=1, hours=5)})  # after 4 h 10 min
    result = compute_family("location", {"location": table(rows)})
    first, second = row(result), row(result, DAY + timedelta(days=1))
    assert first["location_home_minutes"] == pytest.approx(240)  # 20:00 to midnight
    # 00:00-00:10 from the 23:50 fix, 00:10-01:00, the 01:00 fix capped at 20 minutes and the
    # 05:00 fix lasting the interval.
    assert second["location_home_minutes"] == pytest.approx(10 + 50 + 20 + 10)


def test_home_is_the_place_occupied_at_night_over_all_days():
    # Day 1: the whole day at work; day 2: 00:00-06:00 at home. Home is where the nights are.
    rows = fixes(MIDNIGHT + timedelta(hours=8), 600, *WORK) + fixes(
        MIDNIGHT + timedelta(days=1), 360, *HOME
    )
    result = compute_family("location", {"location": table(rows)})
    assert row(result)["location_home_minutes"] == 0.0
    assert row(result)["location_max_from_home_km"] == pytest.approx(1.0, rel=1e-3)
    assert row(result, DAY + timedelta(days=1))["location_home_minutes"] == pytest.approx(360)


def test_out_of_range_coordinates_are_kept():
    far = (95.0, 200.0)  # as JTrack's rotation can give
    rows = fixes(MIDNIGHT, 360, *far) + fixes(MIDNIGHT + timedelta(hours=6), 120, 95.005, 200.0)
    got = row(compute_family("location", {"location": table(rows)}))
    assert got["location_places"] == 2
    assert got["location_home_minutes"] == pytest.approx(350)
    assert got["location_distance_km"] == pytest.approx(0.005 * KM_PER_DEGREE, rel=1e-3)


def test_a_day_with_no_usable_fix_has_a_row_of_nulls_and_a_reason():
    rows = fixes(MIDNIGHT, 60, *HOME)
    rows = [{**r, "accuracy": 900.0} for r in rows] + fixes(MIDNIGHT + timedelta(days=1), 60, *HOME)
    result = compute_family("location", {"location": table(rows)})
    got = row(result)
    assert all(got[c] is None for c in family("location").columns)
    assert row(result, DAY + timedelta(days=1))["location_places"] == 1
    reason = "location (all features): no fix within the accuracy and speed limits"
    assert result.reasons[reason] == 1
    assert result.table.height == 2  # no row for days without fixes


# -- activity -------------------------------------------------------------------------------


def activity(at: datetime, code: int, confidence: float = 90.0) -> dict:
    return {"at": at, "activityType": code, "confidence": confidence}


def test_activity_minutes_cap_each_detection_at_five_minutes():
    at = MIDNIGHT + timedelta(hours=9)
    rows = [
        activity(at, 3),  # STILL, next after 12 min: 5
        activity(at + timedelta(minutes=12), 7),  # WALKING 3 min
        activity(at + timedelta(minutes=15), 2),  # ON_FOOT counts as walking: 2 min
        activity(at + timedelta(minutes=17), 0),  # IN_VEHICLE, the last: 5
        activity(at + timedelta(minutes=17), 3, 75.0),  # same detection, less confident
    ]
    got = row(compute_family("activity", {"activity": table(rows)}))
    assert got["activity_still_minutes"] == 5
    assert got["activity_walking_minutes"] == 5
    assert got["activity_vehicle_minutes"] == 5
    assert got["activity_running_minutes"] == 0
    assert got["activity_transitions"] == 2  # still -> walking -> (walking) -> vehicle


def test_activity_days_without_detections_have_no_row():
    rows = [activity(MIDNIGHT + timedelta(hours=1), 8), activity(MIDNIGHT + timedelta(days=2), 1)]
    result = compute_family("activity", {"activity": table(rows)})
    assert result.table.get_column("day").to_list() == [DAY, DAY + timedelta(days=2)]
    assert row(result)["activity_running_minutes"] == 5


# -- app usage ------------------------------------------------------------------------------


def snapshot(hour: int, app: str, minutes: float, day: int = 0) -> dict:
    at = MIDNIGHT + timedelta(days=day, hours=hour)
    begin = int((MIDNIGHT + timedelta(days=day) - OFFSET).timestamp() * 1000)
    return {
        "at": at,
        "appName": app,
        "beginTimeStamp": begin,
        "endTimeStamp": begin + hour * 3_600_000,
        "lastTimeUsed": begin,
        "totalTimeinForeground": int(minutes * 60_000),
    }


def test_app_minutes_come_from_cumulative_snapshots_never_summed():
    rows = [
        snapshot(9, "Mail", 10),
        snapshot(10, "Mail", 10),  # unchanged: an overlapping snapshot
        snapshot(11, "Mail", 30),
        snapshot(11, "Maps", 30),
        snapshot(9, "Mail", 5, day=1),  # the next day starts again from midnight
    ]
    frames = {"application_usage": table(rows)}
    per_app = app_minutes(frames)
    assert per_app.filter(pl.col("day") == DAY).select("app", "minutes").rows() == [
        ("Mail", 30.0),
        ("Maps", 30.0),
    ]
    result = compute_family("app_usage", frames)
    got = row(result)
    assert got["app_minutes_total"] == 60
    assert got["app_count"] == 2
    assert got["app_entropy"] == pytest.approx(math.log(2))
    nxt = row(result, DAY + timedelta(days=1))
    assert (nxt["app_minutes_total"], nxt["app_count"], nxt["app_entropy"]) == (5, 1, 0.0)


def test_a_day_with_only_zero_usage_has_no_entropy_and_a_reason():
    frames = {"application_usage": table([snapshot(9, "Mail", 0)])}
    result = compute_family("app_usage", frames)
    got = row(result)
    assert (got["app_minutes_total"], got["app_count"], got["app_entropy"]) == (0, 0, None)
    assert result.reasons == {"app_entropy: no app in the foreground": 1}


# -- motion ---------------------------------------------------------------------------------


def samples(start: datetime, seconds: int, shaking: bool) -> list[dict]:
    """Accelerometer at 5 Hz: at rest (gravity on z) or shaking (z alternating 0 and 2 g)."""
    out = []
    for i in range(seconds * 5):
        z = (2 * G if i % 2 else 0.0) if shaking else G
        out.append({"at": start + timedelta(milliseconds=200 * i), "x": 0.0, "y": 0.0, "z": z})
    return out


def test_accelerometer_active_minutes_at_rest_and_shaking():
    rows = samples(MIDNIGHT + timedelta(hours=10), 120, False) + samples(
        MIDNIGHT + timedelta(hours=11), 180, True
    )
    got = row(compute_family("accelerometer", {"accelerometer": table(rows)}))
    assert got["accelerometer_active_minutes"] == 3
    assert got["accelerometer_magnitude_mean"] == pytest.approx(G)
    n_rest, n_shake = 600, 900
    values = [G] * n_rest + [0.0, 2 * G] * (n_shake // 2)
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    assert got["accelerometer_magnitude_sd"] == pytest.approx(sd)


def test_streaming_combine_equals_the_one_shot_computation():
    rows = samples(MIDNIGHT + timedelta(hours=10), 3000, True)
    rows += samples(MIDNIGHT + timedelta(hours=23, minutes=50), 1200, False)  # into the next day
    whole = table(rows)
    chunks = [whole.slice(i, 6000) for i in range(0, whole.height, 6000)]
    assert len(chunks) > 3
    streamed = summarise_accelerometer(
        combine(partial(c, gravity=G) for c in chunks), AccelerometerParams()
    )
    once = compute_family("accelerometer", {"accelerometer": whole.lazy()})
    assert streamed.table.height == once.table.height == 2
    assert streamed.table.columns == once.table.columns[: len(streamed.table.columns)]
    for a, b in zip(streamed.table.sort("day").rows(), once.table.rows(), strict=True):
        assert a == pytest.approx(b)


def test_gyroscope_magnitude():
    rows = [
        {"at": MIDNIGHT + timedelta(seconds=s), "x": 3.0, "y": 4.0, "z": 0.0 if s else 12.0}
        for s in range(2)
    ]
    got = row(compute_family("gyroscope", {"gyroscope": table(rows)}))
    # magnitudes 13 and 5
    assert got["gyroscope_magnitude_mean"] == pytest.approx(9.0)
    assert got["gyroscope_magnitude_sd"] == pytest.approx(math.sqrt(32))


# -- EMA and labels -------------------------------------------------------------------------


def answer(at: datetime, started: datetime, question: int) -> dict:
    return {
        "at": at,
        "questionId": question,
        "startTime": int((started - OFFSET).timestamp() * 1000),
    }


def test_ema_prompts_are_distinct_start_times_on_the_day_they_opened():
    morning = MIDNIGHT + timedelta(hours=9)
    late = MIDNIGHT + timedelta(hours=23, minutes=59)
    rows = [
        answer(morning, morning, 1),
        answer(morning, morning, 2),
        answer(morning + timedelta(hours=5), morning + timedelta(hours=5), 1),
        answer(late + timedelta(minutes=2), late, 1),  # answered after midnight
    ]
    result = compute_family("ema", {"ema": table(rows)})
    got = row(result)
    assert (got["ema_prompts_answered"], got["ema_questions_answered"]) == (3, 4)
    assert result.table.height == 1


def label(task: str, start: datetime, minutes: float) -> dict:
    begin = int((start - OFFSET).timestamp() * 1000)
    return {
        "at": start + timedelta(minutes=minutes),
        "taskName": task,
        "startTimestamp": begin,
        "endTimestamp": begin + int(minutes * 60_000),
        "duration": minutes * 60,
    }


def test_labelled_minutes_in_total_and_per_task():
    at = MIDNIGHT + timedelta(hours=8)
    rows = [
        label("walk", at, 20),
        label("walk", at + timedelta(hours=2), 10),
        label("read", at, 15),
    ]
    frames = {"active_labeling": table(rows)}
    got = row(compute_family("labels", frames))
    assert (got["labels_minutes_total"], got["labels_count"]) == (45, 3)
    per_task = task_minutes(frames)
    assert per_task.select("task", "minutes", "labels").rows() == [
        ("read", 15.0, 1),
        ("walk", 30.0, 2),
    ]
