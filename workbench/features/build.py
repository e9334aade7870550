"""The day table of behavioural features: every registered family joined on subject and local
day, with the day's data yield, computed per subject on every core or on the scheduler's
consumers, and written to the pool incrementally.

    features(config, study)        one row per subject and local day, computed now
    app_usage(config, study)       subject, day, app, minutes
    write_features(config, study)  pool/features/<study>/features.parquet and .csv,
                                   app_usage.parquet and .csv; recomputes only the subjects
                                   with new rows in the sensor tables since the last run
    read_features(config, study)   what the last write_features wrote

A subject-day is a row when any sensor has a record that day (or an EMA prompt or a label
started that day). A family whose sensor has no data that day gives nulls, never zeros, and
the reason is counted. Every row carries, per sensor of the study, ``<sensor>_valid_hours``
and ``<sensor>_yield_pct`` (from :func:`workbench.data_yield`, the best device when a subject
has several), ``in_study_hours``, ``valid_hours_max`` (the most valid hours of any sensor)
and ``valid_day``: ``valid_hours_max`` of at least the study's ``features_valid_hours``
(default 16, RAPIDS' ``MIN_VALID_HOURS_PER_DAY``).

Work splits by subject (each subject's days in one piece: home and places are found over all
of a subject's days), so the result does not depend on how the subjects were split.

Example::

    table = workbench.features(config, "demo")
    run = write_features(config, "demo", progress=True)
    print(run.summary())
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from sqlalchemy import select

from workbench import scheduler
from workbench.catalog import Catalog, borrowed_catalog, subjects, table_builds
from workbench.config import Config
from workbench.errors import FeaturesError, NoSensorTable
from workbench.features import app_minutes, family, list_families, task_minutes
from workbench.features.app_usage import APP_TABLE
from workbench.features.family import KEYS, day_windows
from workbench.features.labels import TASK_TABLE
from workbench.identifiers import check_name
from workbench.pool import DataPool, make_folders, write_file_atomically
from workbench.sensors.loading import Bound, sensor_data
from workbench.sensors.parts import QUARANTINE, day_of_folder, parts_of
from workbench.sensors.schemas import sensor_schema
from workbench.sensors.yields import (
    YIELD_SCHEMA,
    Period,
    observed_yield,
    registered_devices,
    study_periods,
    with_study_days,
)
from workbench.studies import get_study
from workbench.times import now_ms
from workbench.workers import worker_pool
from workbench.writers import csv_bytes, write_parquet_atomically

# Raise when a formula or a column changes: the next write_features recomputes every subject.
FEATURES_VERSION = 1
# RAPIDS' default MIN_VALID_HOURS_PER_DAY (phone data quality: valid sensed days).
DEFAULT_VALID_HOURS = 16
QUEUE_TIMEOUT_S = 3600
# Subjects computed together in one process (one scan per sensor); a worker process or a
# consumer takes one subject at a time, so the work spreads evenly.
IN_PROCESS_SHARE = 8
STATE = "state.json"
# Float features are rounded to this many decimals (a micro-minute, a millimetre), so that a
# run gives the same table to the last digit however the subjects were split.
DECIMALS = 6


@dataclass
class FeatureResult:
    """Features of some subjects: the day table, the per-app table and the null reasons."""

    table: pl.DataFrame
    apps: pl.DataFrame
    reasons: Counter[str] = field(default_factory=Counter)
    subjects: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class FeatureRun:
    """What one :func:`write_features` did."""

    study: str
    rows: int = 0
    subjects: int = 0  # subjects in the written table
    recomputed: list[str] = field(default_factory=list)
    rebuilt: str | None = None  # why every subject was recomputed, if they were
    reasons: Counter[str] = field(default_factory=Counter)  # of the recomputed subjects
    folder: Path | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        """A few lines for a terminal or a pipeline's log."""
        if not self.recomputed:
            return f"{self.study}: features up to date ({self.rows} subject-days)"
        why = f" (all: {self.rebuilt})" if self.rebuilt else ""
        lines = [
            f"{self.study}: features of {len(self.recomputed)} of {self.subjects} subjects "
            f"recomputed{why}, {self.rows} subject-days written to {self.folder} "
            f"in {self.seconds:.1f} s"
        ]
        if self.reasons:
            lines.append("  null features of the recomputed subjects (subject-days):")
            for reason, count in sorted(self.reasons.items(), key=lambda r: (-r[1], r[0])):
                lines.append(f"  {count:>8}  {reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "study": self.study,
            "rows": self.rows,
            "subjects": self.subjects,
            "recomputed": self.recomputed,
            "rebuilt": self.rebuilt,
            "reasons": dict(self.reasons),
            "folder": str(self.folder) if self.folder else None,
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------- public API


def features(
    config: Config,
    study: str,
    *,
    subjects: list[str] | str | None = None,
    start: Bound = None,
    end: Bound = None,
    processes: int | None = 1,
) -> pl.DataFrame:
    """One row per subject and local day: every family's features, the day's yield columns
    and ``valid_day``, computed now from the sensor tables (``processes=None``: one per core).

    Home and places are found over the days asked for, so a narrow ``start``..``end`` may
    find another home than the whole study does.

    Example: ``workbench.features(config, "demo").filter(pl.col("valid_day"))``.
    """
    return compute_features(
        config, study, subjects=subjects, start=start, end=end, processes=processes
    ).table


def app_usage(
    config: Config,
    study: str,
    *,
    subjects: list[str] | str | None = None,
    start: Bound = None,
    end: Bound = None,
) -> pl.DataFrame:
    """Foreground minutes per subject, local day and app (the day's largest snapshot).

    Example: ``workbench.app_usage(config, "demo").group_by("app").agg(pl.col("minutes").sum())``.
    """
    return _long_table(config, study, "application_usage", app_minutes, APP_TABLE,
                       subjects=subjects, start=start, end=end)  # fmt: skip


def labelled_minutes(
    config: Config,
    study: str,
    *,
    subjects: list[str] | str | None = None,
    start: Bound = None,
    end: Bound = None,
) -> pl.DataFrame:
    """Labelled minutes and labels per subject, local day and task (active labeling), on the
    local day each label started.

    Example: ``workbench.labelled_minutes(config, "demo").group_by("task").agg(pl.col("minutes").sum())``.
    """
    return _long_table(config, study, "active_labeling", task_minutes, TASK_TABLE,
                       subjects=subjects, start=start, end=end)  # fmt: skip


def _long_table(config, study, sensor, table, schema, *, subjects, start, end) -> pl.DataFrame:
    """A per-day long table (``table`` of the sensor's frame), empty without the sensor."""
    study = check_name("study", study)
    try:
        frame = sensor_data(config, study, sensor, subjects=_wanted(subjects), start=start, end=end)
    except NoSensorTable:
        return pl.DataFrame(schema=schema)
    return _clip(table({sensor: frame}), start, end)


def compute_features(
    config: Config,
    study: str,
    *,
    subjects: list[str] | str | None = None,
    start: Bound = None,
    end: Bound = None,
    processes: int | None = None,
    queue: bool = False,
    progress: bool = False,
    days: dict[str, set[dt.date]] | None = None,
) -> FeatureResult:
    """Features of ``subjects`` (default: every subject of the study), split by subject over
    ``processes`` (default one per core) or, with ``queue``, the scheduler's consumers.
    ``days`` (subject -> local days) limits a subject's rows to those days, apart from the
    families found over all days (location), whose rows cover every day.

    Example: ``compute_features(config, "demo", processes=4).reasons.most_common(3)``.
    """
    began = time.perf_counter()
    study = check_name("study", study)
    with borrowed_catalog(config) as catalog:
        definition = get_study(catalog, study).definition
        names = _wanted(subjects) or _study_subjects(catalog, study)
    sensors = _yield_sensors(config, study, definition)
    valid_hours = float(definition.get("features_valid_hours", DEFAULT_VALID_HOURS))
    job = {
        "study": study,
        "start": _text(start),
        "end": _text(end),
        "sensors": sensors,
        "valid_hours": valid_hours,
        "days": {k: sorted(d.isoformat() for d in v) for k, v in days.items()} if days else None,
    }
    results = _run(config, names, job, processes=processes, queue=queue, progress=progress)
    schema = day_schema(sensors)
    tables = [r["table"] for r in results if r["table"].height]
    apps = [r["apps"] for r in results if r["apps"].height]
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(r["reasons"])
    table = pl.concat(tables) if tables else pl.DataFrame(schema=schema)
    app_table = pl.concat(apps) if apps else pl.DataFrame(schema=APP_TABLE)
    return FeatureResult(
        table=table.sort(KEYS),
        apps=app_table.sort("subject", "day", "app"),
        reasons=reasons,
        subjects=names,
        seconds=time.perf_counter() - began,
    )


def write_features(
    config: Config,
    study: str,
    *,
    rebuild: bool = False,
    processes: int | None = None,
    queue: bool = False,
    progress: bool = False,
) -> FeatureRun:
    """Bring ``pool/features/<study>/`` up to date with the sensor tables: recompute every
    subject with rows from ledger ids past the last run's mark (all of that subject's days),
    keep the others' rows, and write the day table and the per-app table as Parquet and CSV.

    Every subject is recomputed with ``rebuild``, on the first run, after a time zone change
    rebuilt a table, and when the features' definition (families, parameters, the study's
    sensors or ``features_valid_hours``) changed. Run ``tables build`` first.

    Example: ``write_features(load_config(), "demo", progress=True).summary()``.
    """
    began = time.perf_counter()
    study = check_name("study", study)
    pool = DataPool.of(config)
    folder = pool.features / study
    run = FeatureRun(study, folder=folder)
    with borrowed_catalog(config) as catalog, catalog.lock(f"features.{study}"):
        definition = get_study(catalog, study).definition
        sensors = _yield_sensors(config, study, definition)
        key = _definition_key(sensors, definition)
        marks = _table_marks(catalog, study)  # read before listing: later parts count next time
        state = _read_state(folder)
        stored = _read_stored(folder)
        run.rebuilt = "--rebuild" if rebuild else _why_all(state, stored, key, marks, sensors)
        if run.rebuilt:
            touched = _study_subjects(catalog, study)
        else:
            old = {s: m for s, (m, _z) in state["marks"].items()}
            days = _with_neighbours(_touched(pool.tables / study, old))
            touched = sorted(days)
    if touched:
        result = compute_features(
            config,
            study,
            subjects=touched,
            processes=processes,
            queue=queue,
            progress=progress,
            days=None if run.rebuilt else days,
        )
        run.reasons = result.reasons
        table, apps = result.table, result.apps
        if not run.rebuilt and stored is not None:
            table, apps = _merged(stored, table, apps, days)
        make_folders(folder)
        write_parquet_atomically(table, folder / "features.parquet")
        write_file_atomically(folder / "features.csv", csv_bytes(table))
        write_parquet_atomically(apps, folder / "app_usage.parquet")
        write_file_atomically(folder / "app_usage.csv", csv_bytes(apps))
    else:
        table = stored[0] if stored is not None else pl.DataFrame(schema=day_schema(sensors))
    run.recomputed = list(touched)
    run.rows, run.subjects = table.height, table.get_column("subject").n_unique()
    # the mark last: a run killed before this line recomputes the same subjects next time
    make_folders(folder)
    new_state = {
        "version": FEATURES_VERSION,
        "key": key,
        "marks": {s: [m, z] for s, (m, z) in marks.items()},
        "computed_at": now_ms(),
    }
    write_file_atomically(folder / STATE, json.dumps(new_state, indent=1).encode())
    run.seconds = time.perf_counter() - began
    return run


def _with_neighbours(touched: dict[str, set[dt.date]]) -> dict[str, set[dt.date]]:
    """The touched days and the days either side: a location fix or an activity detection
    lasts until the next one, across local midnight, so new records near midnight change the
    neighbouring day too."""
    one = dt.timedelta(days=1)
    return {s: {d + k * one for d in days for k in (-1, 0, 1)} for s, days in touched.items()}


def _merged(
    stored: tuple[pl.DataFrame, pl.DataFrame],
    table: pl.DataFrame,
    apps: pl.DataFrame,
    days: dict[str, set[dt.date]],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The stored tables with the recomputed rows in: of a touched subject, the recomputed days
    whole, and on their other days the families found over all days (places and home)."""
    kept, kept_apps = stored
    pairs = pl.DataFrame(
        [(s, d) for s, ds in days.items() for d in ds],
        schema={"subject": pl.String, "day": pl.Date},
        orient="row",
    )
    subjects_in = pl.col("subject").is_in(list(days))
    fresh = table.join(pairs, on=KEYS, how="semi")
    across = [c for name in ACROSS_DAYS for c in family(name).columns]
    others = (
        kept.filter(subjects_in)
        .join(pairs, on=KEYS, how="anti")
        .drop(across)
        .join(table.select(*KEYS, *across), on=KEYS, how="left")
        .select(kept.columns)
    )
    table = pl.concat([kept.filter(~subjects_in), others, fresh.select(kept.columns)]).sort(KEYS)
    untouched_apps = kept_apps.filter(subjects_in).join(pairs, on=KEYS, how="anti")
    apps = pl.concat([kept_apps.filter(~subjects_in), untouched_apps, apps])
    apps = apps.sort("subject", "day", "app")
    return table, apps


def read_features(
    config: Config, study: str, *, subjects: list[str] | str | None = None
) -> pl.DataFrame:
    """The day table the last :func:`write_features` wrote (empty before the first run).

    Example: ``read_features(config, "demo", subjects="demo_00001")``.
    """
    study = check_name("study", study)
    path = DataPool.of(config).features / study / "features.parquet"
    if not path.is_file():
        return pl.DataFrame(schema={"subject": pl.String, "day": pl.Date})
    table = pl.read_parquet(path)
    wanted = _wanted(subjects)
    return table.filter(pl.col("subject").is_in(wanted)) if wanted is not None else table


def day_schema(sensors: Sequence[str]) -> dict[str, pl.DataType]:
    """The columns of the day table for a study whose yield covers ``sensors``."""
    schema: dict[str, pl.DataType] = {
        "subject": pl.String(),
        "day": pl.Date(),
        "valid_day": pl.Boolean(),
        "valid_hours_max": pl.Int64(),
        "in_study_hours": pl.Float64(),
    }
    for sensor in sensors:
        schema[f"{sensor}_valid_hours"] = pl.Int64()
        schema[f"{sensor}_yield_pct"] = pl.Float64()
    for name in list_families():
        for feature in family(name).features:
            schema[feature.name] = feature.dtype()
    return schema


# Families whose day rows depend on all of a subject's days (places and home are found over
# them all): recomputed over every day whenever a subject has new data.
ACROSS_DAYS = ("location",)


# ---------------------------------------------------------------------------- one share


def compute_share(config: Config, subjects: list[str], job: dict) -> dict:
    """The day table, per-app table and null reasons of a few subjects (one unit of work)."""
    with borrowed_catalog(config) as catalog:
        definition = get_study(catalog, job["study"]).definition
        periods = study_periods(catalog, job["study"])
        registered = registered_devices(catalog, job["study"])
    share = float(definition.get("yield_hour_share", 0.5))
    results = [
        _subject_share(config, subject, job, periods.get(subject), registered, share)
        for subject in subjects
    ]
    reasons: Counter[str] = Counter()
    for result in results:
        reasons.update(result["reasons"])
    return {
        "table": pl.concat([r["table"] for r in results]),
        "apps": pl.concat([r["apps"] for r in results]),
        "reasons": dict(reasons),
    }


def _subject_share(
    config: Config,
    subject: str,
    job: dict,
    period: Period | None,
    registered: dict[tuple[str, str], list[str]],
    share: float,
) -> dict:
    """One subject's rows. Each sensor's table is read once, into memory, for the families
    and the yield alike (a subject's month of 5 Hz accelerometer is about 100 MB)."""
    study, start, end = job["study"], job["start"], job["end"]
    recorded = job["sensors"]
    wanted = sorted({s for name in list_families() for s in family(name).sensors} | set(recorded))
    frames = {}
    for sensor in wanted:
        if sensor not in recorded:
            continue  # no table and not recorded by the study: sensor_data would refuse it
        try:
            lazy = sensor_data(config, study, sensor, subjects=[subject], start=start, end=end)
        except NoSensorTable:
            continue
        lazy = lazy.drop("batch")
        # A month of 5 Hz motion is a million rows: scanned where needed, never held whole.
        frames[sensor] = lazy if _streamed(sensor) else lazy.collect()
    only = (job.get("days") or {}).get(subject)
    every_day = frames
    if only is not None:  # a later run: the touched days, and location over all days
        wanted_days = [dt.date.fromisoformat(d) for d in only]
        # a record lasts until the next one, across midnight: read the days either side too
        one = dt.timedelta(days=1)
        context = sorted({d + k * one for d in wanted_days for k in (-1, 0, 1)})
        frames = {s: f.filter(pl.col("day").is_in(context)) for s, f in frames.items()}
    reasons: Counter[str] = Counter()
    days = []
    for name in list_families():
        entry = family(name)
        source = every_day if name in ACROSS_DAYS else frames
        result = entry.compute({s: source[s] for s in entry.sensors if s in source})
        reasons.update(result.reasons)
        days.append((entry, result.table.with_columns(pl.lit(True).alias(f"_has_{name}"))))
    yields = _yields(frames, recorded, {subject: period} if period else {}, registered, share)
    yields = _clip(yields, start, end)
    if only is not None:
        yields = yields.filter(pl.col("day").is_in(wanted_days))
    observed = yields.filter(pl.col("records") > 0).select(KEYS)
    keys = pl.concat([observed, *(t.select(KEYS) for _e, t in days)]).unique()
    table = _clip(keys, start, end)
    for _entry, part in days:
        table = table.join(part, on=KEYS, how="left")
    for entry, _part in days:
        counted = table if only is None else table.filter(pl.col("day").is_in(wanted_days))
        missing = counted.get_column(f"_has_{entry.name}").null_count()
        if missing and set(recorded) & set(entry.sensors):
            sensors = " or ".join(entry.sensors)
            reasons[f"{entry.name} (all features): no {sensors} data that day"] += missing
    table = _with_yield(table, yields, recorded, job["valid_hours"])
    schema = day_schema(recorded)
    table = table.select([_rounded(pl.col(c).cast(t), t) for c, t in schema.items()])
    apps = _clip(app_minutes(frames), start, end) if "application_usage" in frames else None
    if apps is not None:
        apps = apps.with_columns(pl.col("minutes").round(DECIMALS))
        if only is not None:
            apps = apps.filter(pl.col("day").is_in(wanted_days))
    return {
        "table": table,
        "apps": apps if apps is not None else pl.DataFrame(schema=APP_TABLE),
        "reasons": dict(reasons),
    }


def _streamed(sensor: str) -> bool:
    """Whether a sensor samples faster than once a second (its tables are scanned, not read)."""
    interval = sensor_schema(sensor).interval_s
    return interval is not None and interval < 1


def _yields(
    frames: dict[str, pl.DataFrame | pl.LazyFrame],
    sensors: list[str],
    periods: dict[str, Period],
    registered: dict[tuple[str, str], list[str]],
    share: float,
) -> pl.DataFrame:
    """:func:`workbench.data_yield` of the subject's frames already in memory (the same rows:
    its per-sensor steps, fed the tables read once for the families)."""
    parts = []
    for sensor in sensors:
        frame = frames.get(sensor)
        if frame is None:
            frame = pl.DataFrame(schema=sensor_schema(sensor).columns())
        windows = day_windows(frame) if isinstance(frame, pl.LazyFrame) else [frame.lazy()]
        observed = [observed_yield(w, sensor, share) for w in windows]
        observed = pl.concat(observed) if observed else observed_yield(frame.lazy(), sensor, share)
        parts.append(with_study_days(observed, sensor, periods, registered))
    if not parts:
        return pl.DataFrame(schema=YIELD_SCHEMA)
    return pl.concat(parts, how="vertical")


def _rounded(column: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Floats to ``DECIMALS`` places: a sum's last bits depend on the order polars adds in."""
    return column.round(DECIMALS) if dtype == pl.Float64 else column


def _with_yield(
    table: pl.DataFrame, yields: pl.DataFrame, sensors: list[str], valid_hours: float
) -> pl.DataFrame:
    """``table`` with the yield columns; several devices of a subject: the best device."""
    per = yields.group_by("subject", "day", "sensor").agg(
        pl.col("valid_hours").max(), pl.col("yield_pct").max(), pl.col("in_study_hours").max()
    )
    for sensor in sensors:
        part = per.filter(pl.col("sensor") == sensor).select(
            *KEYS,
            pl.col("valid_hours").alias(f"{sensor}_valid_hours"),
            pl.col("yield_pct").alias(f"{sensor}_yield_pct"),
        )
        table = table.join(part, on=KEYS, how="left")
    hours = per.group_by(KEYS).agg(in_study_hours=pl.col("in_study_hours").max())
    best = pl.max_horizontal([pl.col(f"{s}_valid_hours") for s in sensors]) if sensors else None
    table = table.join(hours, on=KEYS, how="left").with_columns(
        valid_hours_max=best if best is not None else pl.lit(None, pl.Int64)
    )
    return table.with_columns(
        valid_day=pl.col("valid_hours_max").fill_null(0) >= valid_hours,
    )


@scheduler.task("compute_feature_share")
def compute_share_task(home: str, subjects: list[str], job: dict) -> dict:
    """The scheduler task of one share: compute it in this consumer and send it back packed."""
    from workbench.config import load_config

    return _pack(compute_share(load_config(Path(home)), subjects, job))


def _share_in_process(home: str, subjects: list[str], job: dict) -> dict:
    """A share in a worker process (a top-level function, as spawn needs)."""
    from workbench.config import load_config

    return _pack(compute_share(load_config(Path(home)), subjects, job))


def _pack(result: dict) -> dict:
    """A share's result with its tables as Arrow IPC bytes (for a queue or a process pipe)."""
    packed = dict(result)
    for name in ("table", "apps"):
        buffer = io.BytesIO()
        result[name].write_ipc(buffer)
        packed[name] = buffer.getvalue()
    return packed


def _unpack(result: dict) -> dict:
    return {**result, **{n: pl.read_ipc(io.BytesIO(result[n])) for n in ("table", "apps")}}


# ---------------------------------------------------------------------------- running


def _run(
    config: Config,
    names: list[str],
    job: dict,
    *,
    processes: int | None,
    queue: bool,
    progress: bool,
) -> list[dict]:
    if not names:
        return []
    from tqdm import tqdm

    bar = tqdm(total=len(names), unit="subject", desc="features", disable=not progress)
    results: list[dict] = []
    try:
        if queue:
            results = _run_on_queue(config, names, job, bar)
            return results
        workers = min(processes or os.cpu_count() or 1, len(names))
        if workers <= 1:
            for first in range(0, len(names), IN_PROCESS_SHARE):
                share = names[first : first + IN_PROCESS_SHARE]
                results.append(compute_share(config, share, job))
                bar.update(len(share))
            return results
        home = str(config.home)
        with worker_pool(workers) as executor:
            futures = [executor.submit(_share_in_process, home, [s], job) for s in names]
            for future in futures:
                results.append(_unpack(future.result()))
                bar.update(1)
    finally:
        bar.close()
    return results


def _run_on_queue(config: Config, names: list[str], job: dict, bar) -> list[dict]:
    queue = scheduler.open_queue(config)
    handles = [(s, queue.enqueue("compute_feature_share", [s], job)) for s in names]
    results = []
    for subject, handle in handles:
        try:
            value = handle.get(blocking=True, timeout=QUEUE_TIMEOUT_S)
        except Exception as exc:  # huey's TaskException carries the worker's error
            raise FeaturesError(f"features of {subject} failed on a consumer: {exc}") from None
        if value is None:
            raise FeaturesError(
                f"no consumer computed the features of {subject} within an hour: "
                "is `workbench scheduler` running on a host that shares the pool?"
            )
        results.append(_unpack(value))
        bar.update(1)
    return results


# ---------------------------------------------------------------------------- incremental


def _table_marks(catalog: Catalog, study: str) -> dict[str, tuple[int, str]]:
    """Per sensor: the ledger id its table is built to, and the zones it was built with."""
    with catalog.engine.connect() as conn:
        rows = conn.execute(
            select(table_builds.c.sensor, table_builds.c.watermark, table_builds.c.zones).where(
                table_builds.c.study_id == study
            )
        ).all()
    return {row.sensor: (row.watermark, row.zones) for row in rows}


def _touched(tables: Path, marks: dict[str, int]) -> dict[str, set[dt.date]]:
    """Subjects with a live part holding ledger ids past their sensor's mark, and the local
    days of those parts (from the file names alone: a part ``part-<lo>-<hi>`` holds rows of
    batches ``lo`` to ``hi``)."""
    touched: dict[str, set[dt.date]] = {}
    try:
        sensors = [e for e in os.scandir(tables) if e.is_dir() and e.name != QUARANTINE]
    except FileNotFoundError:
        return touched
    for sensor in sensors:
        mark = marks.get(sensor.name, 0)
        for day_entry in os.scandir(sensor.path):
            day = day_of_folder(day_entry.name)
            if day is None:
                continue
            for partition in os.scandir(day_entry.path):
                subject = partition.name.removeprefix("subject=")
                if subject == partition.name or day in touched.get(subject, ()):
                    continue
                if any(hi > mark for _lo, hi, _p in parts_of(Path(partition.path))[0]):
                    touched.setdefault(subject, set()).add(day)
    return touched


def _why_all(
    state: dict | None,
    stored: tuple | None,
    key: str,
    marks: dict[str, tuple[int, str]],
    sensors: list[str],
) -> str | None:
    """Why every subject must be recomputed, or None when the stored table can be updated."""
    if state is None or stored is None:
        return "first run"
    if state.get("key") != key:
        return "the features' definition changed"
    if list(stored[0].schema.items()) != list(day_schema(sensors).items()):
        return "the stored table has other columns"
    for sensor, (mark, zones) in marks.items():
        old = state["marks"].get(sensor)
        if old is not None and (old[1] != zones or old[0] > mark):
            return f"the {sensor} table was rebuilt"
    return None


def _definition_key(sensors: list[str], definition: dict) -> str:
    content = {
        "version": FEATURES_VERSION,
        "families": {name: repr(family(name).params()) for name in list_families()},
        "sensors": sensors,
        "features_valid_hours": definition.get("features_valid_hours", DEFAULT_VALID_HOURS),
        "yield_hour_share": definition.get("yield_hour_share", 0.5),
        "timezone": definition.get("timezone") or "UTC",
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _read_state(folder: Path) -> dict | None:
    try:
        state = json.loads((folder / STATE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("marks"), dict) else None


def _read_stored(folder: Path) -> tuple[pl.DataFrame, pl.DataFrame] | None:
    try:
        return (
            pl.read_parquet(folder / "features.parquet"),
            pl.read_parquet(folder / "app_usage.parquet"),
        )
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------- small parts


def _study_subjects(catalog: Catalog, study: str) -> list[str]:
    with catalog.engine.connect() as conn:
        rows = conn.execute(
            select(subjects.c.subject_id).where(subjects.c.study_id == study)
        ).scalars()
        return sorted(rows)


def _yield_sensors(config: Config, study: str, definition: dict) -> list[str]:
    """The sensors whose yield the day table carries: the study's and any with a table."""
    tables = DataPool.of(config).tables / study
    built = {p.name for p in tables.glob("*") if p.is_dir() and not p.name.startswith("_")}
    return sorted(set(definition["sensors"]) | built)


def _wanted(subjects: list[str] | str | None) -> list[str] | None:
    if subjects is None:
        return None
    if isinstance(subjects, str):
        subjects = [subjects]
    return [check_name("subject", s) for s in subjects]


def _text(bound: Bound) -> str | None:
    return bound.isoformat() if isinstance(bound, dt.date) else bound


def _as_date(bound: Bound) -> dt.date | None:
    if isinstance(bound, str) and len(bound) == 10:
        return dt.date.fromisoformat(bound)
    if isinstance(bound, dt.date) and not isinstance(bound, dt.datetime):
        return bound
    return None


def _clip(frame: pl.DataFrame, start: Bound, end: Bound) -> pl.DataFrame:
    """Rows of ``frame`` within whole local days ``start`` to ``end`` (when given as dates)."""
    low, high = _as_date(start), _as_date(end)
    if low is not None:
        frame = frame.filter(pl.col("day") >= low)
    if high is not None:
        frame = frame.filter(pl.col("day") <= high)
    return frame
