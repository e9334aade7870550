"""Study status: who is sending data, who went silent and since when, how complete it is.

The status of a study is one row per subject x app x device (plus one row for each enrolled
subject with no device yet), computed from per-source aggregates of the upload ledger. The
aggregates live in the catalog (``status_sensors``) and :func:`fold_new_uploads` brings them up
to date from the ledger rows newer than its last run, so a refresh costs in proportion to what
arrived, never to what is stored. Only the refresh (:mod:`workbench.refresh`) folds and
writes the history; :func:`study_status` and the views built on it only read.

Example::

    from workbench import load_config, open_catalog, refresh_status
    from workbench.status import study_status

    config = load_config("demo-home")
    refresh_status(config)
    table = study_status(open_catalog(config), "demo")  # a polars DataFrame
"""

from __future__ import annotations

import datetime as dt
import os
import zoneinfo
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from sqlalchemy import Connection, case, delete, func, literal, select, true, tuple_, update

from workbench.catalog import (
    Catalog,
    devices,
    dialect_insert,
    fetch_tuples,
    state,
    status_current,
    status_history,
    status_sensors,
    subjects,
    table_builds,
    uploads,
)
from workbench.config import Config
from workbench.pool import DataPool
from workbench.sensors.schemas import sensor_schema
from workbench.sensors.yields import data_yield
from workbench.studies import Study, get_study
from workbench.subject_state import ACTIVITY_LABELS, LEFT_STATUSES, Activity, DeviceStatus
from workbench.subjects import study_zones
from workbench.times import DAY_MS, HOUR_MS, now_ms  # noqa: F401  (importable from here too)
from workbench.writers import write_parquet_atomically

# The columns of JTrack's status CSV, in its order; per sensor follow <sensor>_n_batches and
# <sensor>_last_time_received.
JTRACK_COLUMNS = [
    "app",
    "subject_name",
    "device_id",
    "date_registered",
    "date_left_study",
    "time_in_study",
    "status_code",
]

FOLDED = "status.last_upload_id"  # keys in the catalog's state table
GENERATION = "status.generation"
EMA_APP = "ema"  # the app of devices registered with deviceid_ema (workbench.ingest)
EMA_SENSOR = "ema"  # the one sensor the EMA app records
YIELD_DAYS = 7  # the status table's data yield: the last 7 complete local days
_TIME = pl.Datetime("ms", "UTC")


def jtrack_columns(sensors: list[str]) -> list[str]:
    """JTrack's status columns for a study recording ``sensors``, in JTrack's order."""
    per_sensor = [f"{s}_{part}" for s in sensors for part in ("n_batches", "last_time_received")]
    return JTRACK_COLUMNS + per_sensor


def extra_columns(sensors: list[str]) -> list[str]:
    """The columns the workbench adds after JTrack's."""
    per_sensor = [f"{s}_{part}" for s in sensors for part in ("last_sample", "completeness")]
    return [
        *per_sensor,
        *yield_columns(sensors),
        "last_data",
        "hours_since_last_data",
        "activity_code",
        "activity",
        "activity_since",
    ]


def yield_columns(sensors: list[str]) -> list[str]:
    """The status table's data yield columns, one per sensor: ``yield_7d_<sensor>``."""
    return [f"yield_{YIELD_DAYS}d_{s}" for s in sensors]


# ---------------------------------------------------------------------------- aggregates


@dataclass(frozen=True)
class Fold:
    """One fold: ledger ids ``mark < id <= top`` went into the aggregates; ``changed[study]``
    holds the new sums of the sources they touched."""

    rows: int
    generation: int  # bumped by each rebuild of the aggregates
    mark: int
    top: int
    changed: dict[str, pl.DataFrame]


def fold_new_uploads(catalog: Catalog) -> Fold:
    """Fold the ledger rows added since the last fold into the status aggregates and move
    the fold watermark; ``.rows`` says how many. Safe to run from several processes at once.
    Only the refresh (:mod:`workbench.refresh`) calls it: the views read what it left.

    Not fsynced: a power loss can only take back the last folds, together with their
    watermark, and the next refresh folds those rows again.
    """
    with catalog.writing(durable=False, serialize="status") as conn:
        return _fold(conn, catalog)


def rebuild_aggregates(catalog: Catalog, *, workers: int | None = None) -> int:
    """Recompute the status aggregates from the whole ledger; return the rows folded.

    The ledger is grouped in ``workers`` threads (default: one per core), each over a range
    of subjects on its own connection; SQLite and PostgreSQL both run them in parallel.
    """
    workers = workers or os.cpu_count() or 1
    with catalog.engine.connect() as conn:
        top = conn.execute(select(func.max(uploads.c.id))).scalar() or 0
        people = conn.execute(
            select(subjects.c.study_id, subjects.c.subject_id).order_by(
                subjects.c.study_id, subjects.c.subject_id
            )
        ).all()
    cuts = [tuple(people[len(people) * k // workers]) for k in range(1, workers)] if people else []
    bounds = list(zip([None, *cuts], [*cuts, None], strict=True))

    def group(bound):
        low, high = bound
        key = tuple_(uploads.c.study_id, uploads.c.subject_id)
        where = [uploads.c.id <= top]
        if low is not None:
            where.append(key >= tuple_(*map(literal, low)))
        if high is not None:
            where.append(key < tuple_(*map(literal, high)))
        query = _aggregate_query(*where)
        with catalog.engine.connect() as conn:
            return fetch_tuples(conn, query.with_only_columns(*query.selected_columns[:-1]))

    with ThreadPoolExecutor(len(bounds)) as threads:
        parts = list(threads.map(group, bounds))
    names = [c.name for c in status_sensors.columns]
    rows = [dict(zip(names, row, strict=True)) for part in parts for row in part]
    with catalog.writing() as conn:
        conn.execute(delete(status_sensors))
        if rows:
            conn.execute(status_sensors.insert(), rows)
        _set_state(conn, catalog, FOLDED, top)
        _set_state(conn, catalog, GENERATION, _state(conn, GENERATION) + 1)
    return sum(row["n_batches"] for row in rows)


def _fold(conn: Connection, catalog: Catalog) -> Fold:
    """One INSERT ... SELECT ... ON CONFLICT DO UPDATE ... RETURNING: the new ledger rows
    never leave the database, only the new sums of the sources they touched."""
    mark = conn.execute(
        select(state.c.value).where(state.c.key == FOLDED).with_for_update()
    ).scalar()
    mark = mark or 0
    generation = _state(conn, GENERATION)
    top = conn.execute(select(func.max(uploads.c.id))).scalar()
    if top is None or top <= mark:
        return Fold(0, generation, mark, mark, {})
    span = (uploads.c.id > mark, uploads.c.id <= top)
    folded = conn.execute(select(func.count()).select_from(uploads).where(*span)).scalar()
    # From scratch, grouping in index order beats selecting first.
    query = _aggregate_query(*span, new_only=mark > 0)
    names = [c.name for c in query.selected_columns][:-1]  # all but max_id
    grouped = query.with_only_columns(*query.selected_columns[:-1])
    insert = dialect_insert(catalog.engine, status_sensors)
    new = insert.excluded
    table = status_sensors.c
    upsert = (
        insert.from_select(names, grouped)
        .on_conflict_do_update(
            index_elements=["study_id", "subject_id", "device_id", "sensor"],
            set_={
                "n_batches": table.n_batches + new.n_batches,
                "n_records": table.n_records + new.n_records,
                "bytes": table.bytes + new.bytes,
                "first_received": _least(table.first_received, new.first_received),
                "last_received": _greatest(table.last_received, new.last_received),
                "first_sample": _least(table.first_sample, new.first_sample),
                "last_sample": _greatest(table.last_sample, new.last_sample),
            },
        )
        # the sources' new sums, for the cached copies of the sums
        .returning(
            table.study_id,
            table.subject_id,
            table.device_id,
            table.sensor,
            table.n_batches,
            table.last_received,
            table.last_sample,
        )
    )
    by_study: dict[str, list[tuple]] = {}
    for study_id, *row in fetch_tuples(conn, upsert):
        by_study.setdefault(study_id, []).append(tuple(row))
    _set_state(conn, catalog, FOLDED, top)
    changed = {study_id: _frame(rows, SUMS_SCHEMA) for study_id, rows in by_study.items()}
    return Fold(folded, generation, mark, top, changed)


def _state(conn: Connection, key: str) -> int:
    return conn.execute(select(state.c.value).where(state.c.key == key)).scalar() or 0


def _set_state(conn: Connection, catalog: Catalog, key: str, value: int) -> None:
    conn.execute(
        dialect_insert(catalog.engine, state)
        .values(key=key, value=value)
        .on_conflict_do_update(index_elements=["key"], set_={"value": value})
    )


def _aggregate_query(*where, new_only: bool = False):
    """Per-source sums of the ledger rows matching ``where``. With ``new_only`` the rows are
    selected first (by primary key) and grouped after: otherwise SQLite may walk the whole
    uq_batch index, in group order, to pick out a few new rows."""
    source = uploads
    if new_only:
        u = uploads.c
        columns = (u.id, u.study_id, u.subject_id, u.device_id, u.sensor, u.received_at)
        source = (
            select(*columns, u.bytes, u.n_records, u.first_ts, u.last_ts)
            .where(*where)
            .cte("new_uploads")
            .prefix_with("MATERIALIZED")
        )
        where = ()
    u = source.c
    return (
        select(
            u.study_id,
            u.subject_id,
            u.device_id,
            u.sensor,
            func.count().label("n_batches"),
            func.sum(u.n_records).label("n_records"),
            func.sum(u.bytes).label("bytes"),
            func.min(u.received_at).label("first_received"),
            func.max(u.received_at).label("last_received"),
            func.min(u.first_ts).label("first_sample"),
            func.max(u.last_ts).label("last_sample"),
            func.max(u.id).label("max_id"),
        )
        .select_from(source)
        .where(true(), *where)  # SQLite's INSERT ... SELECT ... ON CONFLICT needs a WHERE
        .group_by(u.study_id, u.subject_id, u.device_id, u.sensor)
    )


def _greatest(old, new):
    """The larger of two nullable values (SQLite's max() and PostgreSQL's GREATEST differ)."""
    return case((old.is_(None), new), (new > old, new), else_=old)


def _least(old, new):
    return case((old.is_(None), new), (new < old, new), else_=old)


# ---------------------------------------------------------------------------- the table


def study_status(
    catalog: Catalog,
    study_id: str,
    *,
    now: int | None = None,
    from_ledger: bool = False,
    pool: DataPool | None = None,
) -> pl.DataFrame:
    """The status table of one study: JTrack's columns, then the workbench's.

    ``now`` (ms since the epoch, default the current time) is the moment the table describes.
    A read: it uses the aggregates as the last refresh left them (uploads since then show at
    the next refresh) and writes nothing; ``from_ledger`` computes the aggregates from the
    whole ledger instead (the slow full computation, used to check the fast one). The data
    yield columns (``yield_7d_<sensor>``) come from what the last refresh kept in ``pool``
    (null without a pool, or when the study's sensor tables were never built).

    Example: ``study_status(catalog, "demo", pool=DataPool.of(config))``.
    """
    study = get_study(catalog, study_id)
    now = now_ms() if now is None else now
    with catalog.engine.connect() as conn:
        people, phones = read_people(conn, study_id)
        sums = _read_sums(conn, study_id, from_ledger=from_ledger)
    yields = read_recent_yield(pool, study_id) if pool is not None else None
    return compute_status(study, people, phones, sums, now=now, yields=yields)


SUMS_SCHEMA = {
    "subject_name": pl.String,
    "device_id": pl.String,
    "sensor": pl.String,
    "n_batches": pl.Int64,
    "last_received": pl.Int64,
    "last_sample": pl.Int64,
}


def read_people(conn: Connection, study_id: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A study's enrolled subjects and their devices."""
    enrolled = fetch_tuples(
        conn,
        select(subjects.c.subject_id, subjects.c.enrolled_at).where(
            subjects.c.study_id == study_id
        ),
    )
    d = devices.c
    attached = fetch_tuples(
        conn,
        select(
            d.subject_id,
            d.app,
            d.device_id,
            d.status,
            d.time_left,
            # JTrack's date_registered is the app's time of joining; the server's time of
            # registration stands in when the app sent none.
            func.coalesce(d.time_joined, d.registered_at),
        ).where(d.study_id == study_id),
    )
    people = _frame(enrolled, {"subject_name": pl.String, "enrolled_at": pl.Int64})
    phones = _frame(
        attached,
        {
            "subject_name": pl.String,
            "app": pl.String,
            "device_id": pl.String,
            "status_code": pl.Int64,
            "time_left": pl.Int64,
            "registered": pl.Int64,
        },
    )
    return people, phones


def _read_sums(conn: Connection, study_id: str, *, from_ledger: bool = False) -> pl.DataFrame:
    """Per-source sums of a study, from the aggregates or, with ``from_ledger``, from the
    ledger itself."""
    if from_ledger:
        query = _aggregate_query(uploads.c.study_id == study_id).subquery()
    else:
        c = status_sensors.c
        query = status_sensors.select().where(c.study_id == study_id).subquery()
    q = query.c
    rows = fetch_tuples(
        conn,
        select(q.subject_id, q.device_id, q.sensor, q.n_batches, q.last_received, q.last_sample),
    )
    return _frame(rows, SUMS_SCHEMA)


def sums_from_cache(catalog: Catalog, study_id: str, folded: Fold, cache: Path) -> pl.DataFrame:
    """A study's per-source sums, from the copy the last refresh left in ``cache`` plus the
    sources this fold changed; the whole set from the catalog when that copy is missing or
    from another fold. Either way the result equals :func:`_read_sums`."""
    name = f"{study_id}@{folded.generation}-{{}}.parquet"
    before, after = cache / name.format(folded.mark), cache / name.format(folded.top)
    sums = None
    if folded.mark and before.exists():
        try:
            sums = pl.read_parquet(before)
        except (OSError, pl.exceptions.PolarsError):  # a damaged copy is just not used
            sums = None
    fresh = folded.changed.get(study_id)
    if sums is None:
        with catalog.engine.connect() as conn:
            sums = _read_sums(conn, study_id)
    elif fresh is not None:
        keys = ["subject_name", "device_id", "sensor"]
        sums = pl.concat([sums.join(fresh.select(keys), on=keys, how="anti"), fresh])
    if after != before or not after.exists():
        write_parquet_atomically(sums, after, durable=False, compression="uncompressed")
    for old in cache.glob(f"{study_id}@*.parquet"):
        if old != after:
            old.unlink(missing_ok=True)
    return sums


def compute_status(
    study: Study,
    people: pl.DataFrame,
    phones: pl.DataFrame,
    sums: pl.DataFrame,
    *,
    now: int,
    yields: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The status table from a study's ``people`` (subject_name, enrolled_at), ``phones``
    (subject_name, app, device_id, status_code, time_left, registered), per-source
    ``sums`` (subject_name, device_id, sensor, n_batches, last_received, last_sample) and
    the subjects' daily data yield (:func:`recent_yield`; None: the yield columns are null)."""
    definition = study.definition
    sensors = list(definition["sensors"])
    duration = definition["duration_days"] * DAY_MS
    stale_after = definition["staleness_hours"] * HOUR_MS

    base = people.join(phones, on="subject_name", how="left")
    received = sums.filter(pl.col("sensor").is_in(sensors))
    measures = {
        "n_batches": "n_batches",
        "last_received": "last_time_received",
        "last_sample": "last_sample",
    }
    wide = received.pivot(on="sensor", index=["subject_name", "device_id"], values=list(measures))
    wide = wide.select(
        "subject_name",
        "device_id",
        *(
            (
                pl.col(f"{value}_{sensor}")
                if f"{value}_{sensor}" in wide.columns
                else pl.lit(None, dtype=pl.Int64)
            ).alias(f"{sensor}_{name}")
            for sensor in sensors
            for value, name in measures.items()
        ),
    )
    base = base.join(wide, on=["subject_name", "device_id"], how="left")

    left = pl.col("status_code").is_in(LEFT_STATUSES)
    end = pl.when(left & pl.col("time_left").is_not_null()).then(pl.col("time_left")).otherwise(now)
    window_end = pl.min_horizontal(end, pl.col("registered") + duration)
    window_days = ((window_end - pl.col("registered")).clip(lower_bound=0) / DAY_MS).alias(
        "_window_days"
    )
    active_here = (
        (pl.col("status_code") == DeviceStatus.ACTIVE)
        .sum()
        .over("subject_name", "app")
        .alias("_active")
    )
    newest_active = (
        pl.when(pl.col("status_code") == DeviceStatus.ACTIVE)
        .then(pl.col("registered"))
        .max()
        .over("subject_name", "app")
        .alias("_newest_active")
    )
    # From the data (the newest sample), not from when it arrived: a phone that uploads a
    # backlog after days offline was still silent for those days.
    last_data = pl.max_horizontal([pl.col(f"{s}_last_sample") for s in sensors]).alias("last_data")
    base = base.with_columns(
        window_days,
        active_here,
        newest_active,
        last_data,
        pl.when(left).then(pl.col("time_left")).alias("date_left_study"),
        ((end - pl.col("registered")) / DAY_MS).round(2).alias("time_in_study"),
    )

    start = pl.coalesce("registered", "enrolled_at")
    silent_since = pl.coalesce("last_data", start)
    code = (
        pl.when(left & (pl.col("date_left_study") - pl.col("registered") >= duration))
        .then(pl.lit(Activity.COMPLETED))
        .when(left)
        .then(pl.lit(Activity.LEFT_EARLY))
        .when(pl.col("_active") > 1)
        .then(pl.lit(Activity.SEVERAL_DEVICES))
        .when(now - pl.col("registered") >= duration)
        .then(pl.lit(Activity.OVER_NOT_LEFT))
        .when(now - silent_since >= stale_after)
        .then(pl.lit(Activity.NO_DATA))
        .otherwise(pl.lit(Activity.OK))
    )
    base = base.with_columns(code.alias("activity_code"))
    code_col = pl.col("activity_code")
    since = (
        pl.when(code_col.is_in([Activity.COMPLETED, Activity.LEFT_EARLY]))
        .then(pl.col("date_left_study"))
        .when(code_col == Activity.SEVERAL_DEVICES)
        .then(pl.col("_newest_active"))
        .when(code_col == Activity.OVER_NOT_LEFT)
        .then(pl.col("registered") + duration)
        .when(code_col == Activity.NO_DATA)
        .then(silent_since + stale_after)
        .otherwise(silent_since)
    )
    # Completeness: batches received / batches due over the device's time in the study. A
    # phone uploads a batch when it is full, so only whole batches are due while it takes
    # part; on leaving it sends the partial one too. A device counts only the sensors its
    # app records: the EMA app's only ema, the main app's all but ema. Never above 100 %.
    per_sensor = []
    for sensor in sensors:
        slots = definition["sensors"][sensor]["batches_per_day"] * pl.col("_window_days")
        expected = pl.when(left).then(slots.ceil()).otherwise(slots.floor())
        recorded = (pl.col("app") == EMA_APP) == (sensor == EMA_SENSOR)
        n = pl.col(f"{sensor}_n_batches").fill_null(0)
        per_sensor += [
            n.alias(f"{sensor}_n_batches"),
            pl.when(recorded & (expected > 0))
            .then((100 * n / expected).clip(upper_bound=100).round(1))
            .alias(f"{sensor}_completeness"),
        ]
    base = base.with_columns(
        *per_sensor,
        since.alias("activity_since"),
        ((now - pl.col("last_data")) / HOUR_MS).round(1).alias("hours_since_last_data"),
        code_col.replace_strict(ACTIVITY_LABELS, return_dtype=pl.String).alias("activity"),
        pl.col("registered").alias("date_registered"),
    )
    times = [
        "date_registered",
        "date_left_study",
        "last_data",
        "activity_since",
        *(f"{s}_last_time_received" for s in sensors),
        *(f"{s}_last_sample" for s in sensors),
    ]
    base = base.with_columns(pl.col(times).cast(_TIME))
    base = base.join(_yield_means(yields, sensors), on="subject_name", how="left")
    return base.sort("subject_name", "app", "device_id", nulls_last=False).select(
        jtrack_columns(sensors) + extra_columns(sensors)
    )


def _yield_means(yields: pl.DataFrame | None, sensors: list[str]) -> pl.DataFrame:
    """Per subject, the mean ``yield_pct`` of its days in the study among the last
    :data:`YIELD_DAYS` complete local days, one column per sensor (null: no such day)."""
    names = yield_columns(sensors)
    schema = {"subject_name": pl.String} | dict.fromkeys(names, pl.Float64)
    if yields is None or yields.is_empty():
        return pl.DataFrame(schema=schema)
    means = (
        yields.filter(pl.col("days_ago") <= YIELD_DAYS, pl.col("sensor").is_in(sensors))
        .group_by("subject", "sensor")
        .agg(pl.col("yield_pct").mean().round(1))
        .pivot(on="sensor", index="subject", values="yield_pct")
        .rename({"subject": "subject_name"})
    )
    return means.select(
        "subject_name",
        *(
            (pl.col(s) if s in means.columns else pl.lit(None)).cast(pl.Float64).alias(name)
            for s, name in zip(sensors, names, strict=True)
        ),
    )


def _frame(rows, schema: dict) -> pl.DataFrame:
    """A DataFrame from database rows, built column by column (much faster than by row)."""
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in schema]
    return pl.DataFrame(
        [
            pl.Series(name, values, dtype=dtype)
            for (name, dtype), values in zip(schema.items(), columns, strict=True)
        ]
    )


# ---------------------------------------------------------------------------- data yield

YIELD_SCHEMA = {
    "subject": pl.String,
    "sensor": pl.String,
    "day": pl.Date,
    "days_ago": pl.Int64,
    "day_start": pl.Int64,
    "in_study_hours": pl.Float64,
    "valid_hours": pl.Int64,
    "yield_pct": pl.Float64,
}


def sampled_sensors(study: Study) -> list[str]:
    """The study's sensors with a nominal sampling interval: those whose yield says whether
    the phone records (an EMA answer or a label is given, not sampled)."""
    return [s for s in study.sensors if sensor_schema(s).interval_s]


def tables_built(catalog: Catalog, study_id: str) -> bool:
    """Whether the study's sensor tables were ever built (``workbench tables build``)."""
    with catalog.engine.connect() as conn:
        found = conn.execute(
            select(table_builds.c.sensor).where(table_builds.c.study_id == study_id).limit(1)
        ).first()
    return found is not None


def subject_yield(
    config: Config,
    catalog: Catalog,
    study: Study,
    *,
    days: int,
    now: int,
    subjects: list[str] | None = None,
    today: bool = False,
) -> pl.DataFrame | None:
    """Per subject, sensor of the study and local day (in the subject's zone) of the last
    ``days`` complete days, and today too with ``today``: ``valid_hours`` and ``yield_pct``
    of the subject's best device that day, ``in_study_hours``, ``days_ago`` (1: yesterday)
    and ``day_start`` (the local midnight, ms). Days the subject was not in the study have
    no row; days in it without a record have zeros. None when the study's sensor tables
    were never built: yield is then unknown, not zero.

    Example: ``subject_yield(config, catalog, study, days=7, now=now_ms())``.
    """
    if not tables_built(catalog, study.id):
        return None
    default_zone, own = study_zones(catalog, study.id)
    first = dt.datetime.fromtimestamp(now / 1000, dt.UTC).date() - dt.timedelta(days=days + 1)
    daily = data_yield(config, study.id, subjects=subjects, start=first)
    daily = daily.filter(pl.col("sensor").is_in(list(study.sensors)), pl.col("in_study_hours") > 0)
    people = daily["subject"].unique().to_list()
    zones = {s: own.get(s, default_zone) for s in people}
    todays = pl.DataFrame(
        {
            "subject": people,
            "_today": [
                dt.datetime.fromtimestamp(now / 1000, zoneinfo.ZoneInfo(zones[s])).date()
                for s in people
            ],
            "_zone": [zones[s] for s in people],
        },
        schema={"subject": pl.String, "_today": pl.Date, "_zone": pl.String},
    )
    best = (
        daily.group_by("subject", "sensor", "day")
        .agg(
            pl.col("in_study_hours").max(),
            pl.col("valid_hours").max(),
            pl.col("yield_pct").max(),
        )
        .join(todays, on="subject")
        .with_columns(days_ago=(pl.col("_today") - pl.col("day")).dt.total_days())
        .filter(pl.col("days_ago") >= (0 if today else 1), pl.col("days_ago") <= days)
    )
    starts = [
        int(dt.datetime.combine(day, dt.time(), zoneinfo.ZoneInfo(zone)).timestamp() * 1000)
        for day, zone in best.select("day", "_zone").iter_rows()
    ]
    return (
        best.with_columns(day_start=pl.Series(starts, dtype=pl.Int64))
        .select([pl.col(name).cast(kind) for name, kind in YIELD_SCHEMA.items()])
        .sort("subject", "sensor", "day")
    )


def recent_yield(
    config: Config, catalog: Catalog, study: Study, *, now: int
) -> pl.DataFrame | None:
    """The daily data yield a refresh keeps (:func:`subject_yield`): enough complete days
    for the status table's :data:`YIELD_DAYS` and the study's ``yield_alert_days``."""
    days = max(YIELD_DAYS, int(study.definition.get("yield_alert_days", 3)))
    return subject_yield(config, catalog, study, days=days, now=now)


def recent_yield_path(pool: DataPool, study_id: str) -> Path:
    """Where :func:`refresh_status` keeps a study's recent daily data yield."""
    return pool.cache / "status" / "yield" / f"{study_id}.parquet"


def read_recent_yield(pool: DataPool, study_id: str) -> pl.DataFrame | None:
    """The daily data yield the last refresh kept; None when it kept none (no sensor tables)."""
    path = recent_yield_path(pool, study_id)
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError):  # none kept, or damaged: the next refresh
        return None


def keep_recent_yield(pool: DataPool, study_id: str, yields: pl.DataFrame | None) -> None:
    """Store (or, for None, forget) the daily data yield the status views read."""
    path = recent_yield_path(pool, study_id)
    if yields is None:
        path.unlink(missing_ok=True)
    else:  # rewritten at every refresh, derived from the tables: not worth an fsync
        write_parquet_atomically(yields, path, durable=False)


# ---------------------------------------------------------------------------- history


def status_csv_path(pool: DataPool, study_id: str) -> Path:
    """Where :func:`refresh_status` keeps a study's status CSV."""
    return pool.reports / study_id / "status.csv"


def record_changes(catalog: Catalog, study_id: str, table: pl.DataFrame, *, now: int) -> int:
    """Compare each row's activity code with the last refresh; write a history entry for each
    change; return how many there were."""
    keys = ["subject_name", "app", "device_id"]
    current = table.select(
        "subject_name",
        pl.col("app", "device_id").fill_null(""),
        "activity_code",
        pl.col("activity_since").cast(pl.Int64).fill_null(now).alias("at"),
    )
    c = status_current.c
    with catalog.writing(durable=False, serialize=f"status.{study_id}") as conn:
        before = _frame(
            fetch_tuples(
                conn,
                select(c.subject_id, c.app, c.device_id, c.activity_code).where(
                    c.study_id == study_id
                ),
            ),
            {
                "subject_name": pl.String,
                "app": pl.String,
                "device_id": pl.String,
                "from_code": pl.Int64,
            },
        )
        compared = current.join(before, on=keys, how="left")
        changed = compared.filter(
            pl.col("from_code").is_null() | (pl.col("from_code") != pl.col("activity_code"))
        )
        gone = before.join(current, on=keys, how="anti")  # e.g. a "no device yet" row
        history, inserts, updates = [], [], []
        for subject, app, device, code, at, old in changed.iter_rows():
            row = {"study_id": study_id, "subject_id": subject, "app": app, "device_id": device}
            history.append({**row, "from_code": old, "to_code": code, "at": at, "noticed_at": now})
            (inserts if old is None else updates).append(
                {**row, "activity_code": code, "since": at}
            )
        if inserts:
            conn.execute(status_current.insert(), inserts)
        for item in updates:
            conn.execute(
                update(status_current)
                .where(
                    c.study_id == study_id,
                    c.subject_id == item["subject_id"],
                    c.app == item["app"],
                    c.device_id == item["device_id"],
                )
                .values(activity_code=item["activity_code"], since=item["since"])
            )
        for subject, app, device, _code in gone.iter_rows():
            conn.execute(
                delete(status_current).where(
                    c.study_id == study_id,
                    c.subject_id == subject,
                    c.app == app,
                    c.device_id == device,
                )
            )
        if history:
            conn.execute(status_history.insert(), history)
    return len(history)


def status_history_table(
    catalog: Catalog, study_id: str, *, subject: str | None = None
) -> pl.DataFrame:
    """Every change of activity code in a study (or of one subject), oldest first.

    Example: ``status_history_table(catalog, "demo", subject="demo_00003")``.
    """
    get_study(catalog, study_id)
    h = status_history.c
    query = select(
        h.subject_id, h.app, h.device_id, h.from_code, h.to_code, h.at, h.noticed_at
    ).where(h.study_id == study_id)
    if subject is not None:
        query = query.where(h.subject_id == subject)
    with catalog.engine.connect() as conn:
        rows = conn.execute(query.order_by(h.id)).all()
    table = pl.DataFrame(
        [tuple(r) for r in rows],
        schema={
            "subject_name": pl.String,
            "app": pl.String,
            "device_id": pl.String,
            "from_code": pl.Int64,
            "to_code": pl.Int64,
            "at": pl.Int64,
            "noticed_at": pl.Int64,
        },
        orient="row",
    )
    return table.with_columns(
        pl.col("from_code")
        .replace_strict(ACTIVITY_LABELS, default=None, return_dtype=pl.String)
        .alias("from"),
        pl.col("to_code").replace_strict(ACTIVITY_LABELS, return_dtype=pl.String).alias("to"),
        pl.col("at", "noticed_at").cast(_TIME),
    ).select(
        "subject_name", "app", "device_id", "from_code", "from", "to_code", "to", "at", "noticed_at"
    )
