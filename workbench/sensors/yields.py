"""Data yield and gaps per subject, device, sensor and local day, from the sensor tables.

After RAPIDS (Vega et al. 2021): a valid minute holds at least one record; a valid hour has at
least the study's ``yield_hour_share`` (0.5) of its sampling slots filled, where a slot is a
minute or the sensor's nominal interval when that is longer (so a 10-minute location sensor can
have valid hours). ``yield_pct`` is valid hours over the hours of that local day the subject
was in the study. Gaps follow JTrack's analysis: intervals between consecutive records longer
than max(300 s, 3 x the median interval). Days of the study without a record have a row of
zeros, so a silent day shows as a 0 % day rather than as no day.

Example::

    low = workbench.data_yield(config, "demo").filter(pl.col("yield_pct") < 50)
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass

import polars as pl
from sqlalchemy import select

from workbench.catalog import Catalog, devices, open_catalog, subjects
from workbench.config import Config
from workbench.identifiers import check_name
from workbench.pool import DataPool
from workbench.sensors.loading import Bound, sensor_data
from workbench.sensors.schemas import sensor_schema
from workbench.studies import get_study
from workbench.subjects import study_zones
from workbench.times import DAY_MS, now_ms

GAP_FLOOR_S = 300  # a gap is longer than max(300 s, 3 x the median interval)
GAP_FACTOR = 3
YIELD_SCHEMA = {
    "subject": pl.String,
    "device": pl.String,
    "sensor": pl.String,
    "day": pl.Date,
    "in_study_hours": pl.Float64,
    "records": pl.Int64,
    "valid_minutes": pl.Int64,
    "valid_hours": pl.Int64,
    "yield_pct": pl.Float64,
    "median_interval_s": pl.Float64,
    "gaps": pl.Int64,
    "longest_gap_min": pl.Float64,
    "missing_ids": pl.Int64,
    "duplicate_ids": pl.Int64,
}


@dataclass(frozen=True)
class Period:
    """When a subject was in the study (ms since the epoch), and its zone."""

    subject: str
    start: int
    end: int
    zone: str


def data_yield(
    config: Config,
    study: str,
    *,
    sensor: str | None = None,
    subjects: list[str] | None = None,
    start: Bound = None,
    end: Bound = None,
) -> pl.DataFrame:
    """One row per subject, device, sensor and local day: ``records``, ``valid_minutes``,
    ``valid_hours``, ``yield_pct``, ``median_interval_s``, ``gaps``, ``longest_gap_min``,
    ``missing_ids`` and ``duplicate_ids`` (where records carry an ``id``), and
    ``in_study_hours`` (the hours of that day the subject was in the study).

    Example: ``data_yield(config, "demo", sensor="location").sort("yield_pct").head()``.
    """
    study = check_name("study", study)
    catalog = open_catalog(config)
    try:
        definition = get_study(catalog, study).definition
        periods = study_periods(catalog, study)
        registered = registered_devices(catalog, study)
    finally:
        catalog.dispose()
    share = float(definition.get("yield_hour_share", 0.5))
    if sensor is not None:
        names = [check_name("sensor", sensor)]
    else:
        tables = DataPool.of(config).tables / study
        built = {p.name for p in tables.glob("*") if p.is_dir() and not p.name.startswith("_")}
        names = sorted(set(definition["sensors"]) | built)
    if subjects is not None:
        wanted = set(subjects)
        periods = {s: p for s, p in periods.items() if s in wanted}
    frames = []
    for name in names:
        data = sensor_data(config, study, name, subjects=subjects, start=start, end=end)
        observed = observed_yield(data, name, share)
        frames.append(with_study_days(observed, name, periods, registered))
    result = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=YIELD_SCHEMA)
    if isinstance(start, dt.date | str) or isinstance(end, dt.date | str):
        result = _clip_days(result, start, end)
    return result.sort("subject", "device", "sensor", "day")


def observed_yield(data: pl.LazyFrame, sensor: str, share: float) -> pl.DataFrame:
    """Per subject, device and day: counts, valid minutes and hours, intervals, ids."""
    schema = sensor_schema(sensor)
    slot = schema.slot_minutes
    per_hour = 60 / slot
    keys = ["subject", "device", "day"]
    has_id = any(f.name == "id" for f in schema.table_fields)
    columns = [*keys, "time", "local_time", *(["id"] if has_id else [])]
    # Whole minutes of local time as integers: cheaper than truncating datetimes.
    rows = data.select(columns).with_columns(minute=pl.col("local_time").dt.epoch("ms") // 60_000)
    hours = (
        rows.group_by([*keys, "minute"])
        .agg(records=pl.len())
        .group_by([*keys, pl.col("minute") // 60])
        .agg(
            records=pl.col("records").sum(),
            minutes=pl.len(),
            slots=(pl.col("minute") // slot).n_unique(),
        )
        .group_by(keys)
        .agg(
            records=pl.col("records").sum(),
            valid_minutes=pl.col("minutes").sum(),
            valid_hours=(pl.col("slots") >= share * per_hour).sum(),
        )
    )
    interval = pl.col("time").sort().dt.epoch("ms").diff() / 1000
    limit = pl.max_horizontal(pl.lit(float(GAP_FLOOR_S)), GAP_FACTOR * interval.median())
    known = pl.col("id").drop_nulls()
    ids = (
        {
            "missing_ids": pl.when(known.len() > 0).then(
                known.max() - known.min() + 1 - known.n_unique()
            ),
            "duplicate_ids": pl.when(known.len() > 0).then(known.len() - known.n_unique()),
        }
        if has_id
        else {}
    )
    spacing = rows.group_by(keys).agg(
        median_interval_s=interval.median(),
        gaps=(interval > limit).sum().cast(pl.Int64),
        longest_gap_min=interval.max() / 60,
        **ids,
    )
    counted, spaced = pl.collect_all([hours, spacing])
    observed = counted.join(spaced, on=keys, how="left")
    if not has_id:
        observed = observed.with_columns(
            missing_ids=pl.lit(None, pl.Int64), duplicate_ids=pl.lit(None, pl.Int64)
        )
    return observed.with_columns(sensor=pl.lit(sensor))


def study_periods(catalog: Catalog, study: str) -> dict[str, Period]:
    """When each subject with a device was in the study: from joining (the device's
    ``time_joined``, else its registration) to leaving, removal, the study's duration or now,
    whichever comes first."""
    definition = get_study(catalog, study).definition
    default_zone, own = study_zones(catalog, study)
    duration = int(definition["duration_days"]) * DAY_MS
    now = now_ms()
    with catalog.engine.connect() as conn:
        rows = conn.execute(
            select(
                devices.c.subject_id,
                devices.c.status,
                devices.c.time_joined,
                devices.c.time_left,
                devices.c.registered_at,
                subjects.c.removed_at,
            )
            .join(
                subjects,
                (subjects.c.study_id == devices.c.study_id)
                & (subjects.c.subject_id == devices.c.subject_id),
            )
            .where(devices.c.study_id == study)
        ).all()
    spans: dict[str, list] = {}
    for row in rows:
        joined = row.time_joined or row.registered_at
        left = row.time_left if row.status != 0 else None
        span = spans.setdefault(row.subject_id, [joined, left, row.removed_at, True])
        span[0] = min(span[0], joined)
        if left is None:
            span[3] = False  # a device still active: the subject has not left
        elif span[1] is None or left > span[1]:
            span[1] = left
    periods = {}
    for subject, (joined, left, removed, all_left) in spans.items():
        ends = [joined + duration, now]
        if all_left and left is not None:
            ends.append(left)
        if removed is not None:
            ends.append(removed)
        periods[subject] = Period(
            subject, joined, max(joined, min(ends)), own.get(subject, default_zone)
        )
    return periods


def registered_devices(catalog: Catalog, study: str) -> dict[tuple[str, str], list[str]]:
    """(subject, app) -> the devices the subject registered with that app."""
    with catalog.engine.connect() as conn:
        rows = conn.execute(
            select(devices.c.subject_id, devices.c.app, devices.c.device_id).where(
                devices.c.study_id == study
            )
        ).all()
    found: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        found.setdefault((row.subject_id, row.app), []).append(row.device_id)
    return found


def with_study_days(
    observed: pl.DataFrame,
    sensor: str,
    periods: dict[str, Period],
    registered: dict[tuple[str, str], list[str]],
) -> pl.DataFrame:
    """Add the study days without records (as zeros) and each day's hours in the study."""
    app = "ema" if sensor == "ema" else "main"
    seen: dict[str, set[str]] = {}
    for subject, device in observed.select("subject", "device").unique().iter_rows():
        seen.setdefault(subject, set()).add(device)
    grid = []
    for subject, period in periods.items():
        hours = in_study_hours(period)
        for device in sorted(seen.get(subject) or registered.get((subject, app), [])):
            grid.extend((subject, device, day, h) for day, h in hours.items())
    frame = pl.DataFrame(
        grid,
        schema={
            "subject": pl.String,
            "device": pl.String,
            "day": pl.Date,
            "in_study_hours": pl.Float64,
        },
        orient="row",
    )
    merged = frame.join(observed, on=["subject", "device", "day"], how="full", coalesce=True)
    zero = {"records": 0, "valid_minutes": 0, "valid_hours": 0}
    merged = merged.with_columns(
        sensor=pl.lit(sensor),
        in_study_hours=pl.col("in_study_hours").fill_null(0.0),
        **{name: pl.col(name).fill_null(value).cast(pl.Int64) for name, value in zero.items()},
    )
    merged = merged.with_columns(
        yield_pct=pl.when(pl.col("in_study_hours") > 0)
        .then(pl.min_horizontal(100.0, 100 * pl.col("valid_hours") / pl.col("in_study_hours")))
        .otherwise(None)
    )
    return merged.select([pl.col(name).cast(kind) for name, kind in YIELD_SCHEMA.items()])


def in_study_hours(period: Period) -> dict[dt.date, float]:
    """Hours of each local day the subject spent in the study (a day of a time change in the
    zone has 23 or 25 hours)."""
    zone = zoneinfo.ZoneInfo(period.zone)
    start = dt.datetime.fromtimestamp(period.start / 1000, dt.UTC)
    end = dt.datetime.fromtimestamp(period.end / 1000, dt.UTC)
    day = start.astimezone(zone).date()
    hours: dict[dt.date, float] = {}
    while True:
        begin = dt.datetime.combine(day, dt.time(), zone).astimezone(dt.UTC)
        following = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone)
        finish = following.astimezone(dt.UTC)
        if begin >= end:
            break
        overlap = (min(finish, end) - max(begin, start)).total_seconds() / 3600
        if overlap > 0:
            hours[day] = round(overlap, 6)
        day += dt.timedelta(days=1)
    return hours


def _clip_days(frame: pl.DataFrame, start: Bound, end: Bound) -> pl.DataFrame:
    """Keep the grid's days within a date range given as dates (or ISO dates)."""

    def as_date(value):
        if isinstance(value, str) and len(value) == 10:
            return dt.date.fromisoformat(value)
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            return value
        return None

    low, high = as_date(start), as_date(end)
    if low is not None:
        frame = frame.filter(pl.col("day") >= low)
    if high is not None:
        frame = frame.filter(pl.col("day") <= high)
    return frame
