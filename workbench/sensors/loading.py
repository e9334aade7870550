"""Load the sensor tables: a polars LazyFrame over a study's sensor, pruned to the subjects and
local days asked for before any file is opened.

Example::

    import workbench
    config = workbench.load_config()
    week = workbench.sensor_data(config, "demo", "accelerometer", subjects=["demo_00001_1"],
                                 start="2026-03-02", end="2026-03-08").collect()
"""

from __future__ import annotations

import datetime as dt
import os
import zoneinfo
from pathlib import Path

import polars as pl

from workbench.catalog import open_catalog
from workbench.config import Config
from workbench.errors import NoSensorTable
from workbench.identifiers import check_name
from workbench.pool import DataPool
from workbench.sensors.parts import day_of_folder, live_parts, sensor_folder
from workbench.sensors.schemas import sensor_schema
from workbench.studies import get_study
from workbench.subjects import study_zones

Bound = dt.date | dt.datetime | str | None


def sensor_data(
    config: Config,
    study: str,
    sensor: str,
    *,
    subjects: list[str] | str | None = None,
    start: Bound = None,
    end: Bound = None,
) -> pl.LazyFrame:
    """A LazyFrame over ``study``'s table of ``sensor``: columns ``subject``, ``device``,
    ``time`` (UTC), ``local_time``, ``day`` (local), the sensor's fields and ``batch``.

    ``start`` and ``end`` are dates (whole local days, ``end`` included) or datetimes (naive
    ones are read in the study's time zone; ``end`` excluded), or ISO text of either. Only the
    files of the days and subjects asked for are read. Run ``workbench tables build`` (or the
    ``tables`` pipeline) first: rows come from the last build.

    Example: ``sensor_data(config, "demo", "location", start=date(2026, 3, 2)).collect()``.
    """
    study = check_name("study", study)
    sensor = check_name("sensor", sensor)
    if isinstance(subjects, str):
        subjects = [subjects]
    wanted = [check_name("subject", s) for s in subjects] if subjects is not None else None
    catalog = open_catalog(config)
    try:
        definition = get_study(catalog, study).definition
        _default, own_zones = study_zones(catalog, study)
    finally:
        catalog.dispose()
    zone = zoneinfo.ZoneInfo(definition.get("timezone") or "UTC")
    folder = sensor_folder(DataPool.of(config).tables, study, sensor)
    if sensor not in definition["sensors"] and not folder.is_dir():
        raise NoSensorTable(
            f"study {study!r} has no sensor {sensor!r}: it records "
            f"{', '.join(sorted(definition['sensors']))}"
        )
    low, high = _bound(start, zone, end=False), _bound(end, zone, end=True)
    # Dates are local days, as the partitions are. A datetime is an instant: for subjects with a
    # zone of their own its local day may be one off the study's, so read a day more each side.
    margin = dt.timedelta(days=1 if own_zones else 0)
    first = _day(low, zone) - margin if low is not None else None
    last = _day(high, zone) + margin if high is not None else None
    files = _files(folder, first, last, wanted)
    columns = sensor_schema(sensor).columns()
    frame = (
        pl.scan_parquet(files, schema=columns, hive_partitioning=False)
        if files
        else pl.LazyFrame(schema=columns)
    )
    if isinstance(low, dt.date) and not isinstance(low, dt.datetime):
        frame = frame.filter(pl.col("day") >= low)
    elif low is not None:
        frame = frame.filter(pl.col("time") >= low)
    if isinstance(high, dt.date) and not isinstance(high, dt.datetime):
        frame = frame.filter(pl.col("day") <= high)
    elif high is not None:
        frame = frame.filter(pl.col("time") < high)
    return frame


def table_files(config: Config, study: str, sensor: str) -> list[Path]:
    """Every live file of a study's sensor table (for exports and checks)."""
    folder = sensor_folder(DataPool.of(config).tables, check_name("study", study), sensor)
    return _files(folder, None, None, None)


def _bound(value: Bound, zone: zoneinfo.ZoneInfo, *, end: bool) -> dt.date | dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = (
                dt.date.fromisoformat(value)
                if len(value) == 10
                else dt.datetime.fromisoformat(value)
            )
        except ValueError:
            raise ValueError(
                f"{'end' if end else 'start'} {value!r} is neither a date (2026-03-02) nor a "
                "datetime (2026-03-02T08:00)"
            ) from None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=zone)
        return value.astimezone(dt.UTC)
    if isinstance(value, dt.date):
        return value
    raise TypeError(f"start and end take dates, datetimes or ISO text, not {type(value).__name__}")


def _day(bound: dt.date | dt.datetime, zone: zoneinfo.ZoneInfo) -> dt.date:
    if isinstance(bound, dt.datetime):
        return bound.astimezone(zone).date()
    return bound


def _files(
    folder: Path, first: dt.date | None, last: dt.date | None, subjects: list[str] | None
) -> list[Path]:
    try:
        days = [entry.name for entry in os.scandir(folder) if entry.is_dir()]
    except FileNotFoundError:
        return []
    files: list[Path] = []
    for name in sorted(days):
        day = day_of_folder(name)
        if day is None or (first and day < first) or (last and day > last):
            continue
        base = folder / name
        if subjects is None:
            partitions = sorted(e.name for e in os.scandir(base) if e.name.startswith("subject="))
        else:
            partitions = [f"subject={s}" for s in subjects]
        for partition in partitions:
            files.extend(live_parts(base / partition))
    return files
