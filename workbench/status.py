"""Study status: who is sending data, who went silent and since when, how complete it is.

The status of a study is one row per subject x app x device (plus one row for each enrolled
subject with no device yet), computed from per-source aggregates of the upload ledger. The
aggregates live in the catalog (``status_sensors``) and :func:`fold_new_uploads` brings them up
to date from the ledger rows newer than its last run, so a refresh costs in proportion to what
arrived, never to what is stored. :func:`refresh_status` runs the whole cycle: fold, compute
each active study's table, record changes of activity code in the history, open and close
alerts, write each study's CSV atomically into the pool's reports folder, and mail new alerts.

Example::

    from workbench import load_config, open_catalog
    from workbench.status import refresh_status, study_status

    config = load_config("demo-home")
    refresh_status(config)
    table = study_status(open_catalog(config), "demo")  # a polars DataFrame
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from sqlalchemy import Connection, case, delete, func, select, update

from workbench.catalog import (
    Catalog,
    devices,
    dialect_insert,
    now_ms,
    state,
    status_current,
    status_history,
    status_sensors,
    subjects,
    uploads,
)
from workbench.config import Config
from workbench.errors import MailError
from workbench.pool import DataPool, write_file_atomically
from workbench.studies import Study, get_study, list_studies

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

# Activity codes: 0-4 are JTrack's dashboard codes; 5 means none of them applies.
NO_DATA, LEFT_EARLY, OVER_NOT_LEFT, COMPLETED, SEVERAL_DEVICES, OK = range(6)
ACTIVITY = {
    NO_DATA: "no data",
    LEFT_EARLY: "left early",
    OVER_NOT_LEFT: "duration over, not left",
    COMPLETED: "completed",
    SEVERAL_DEVICES: "several devices active",
    OK: "ok",
}

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

FOLDED = "status.last_upload_id"  # key in the catalog's state table
LEFT_STATUSES = (1, 2, 3)
ACTIVE_DEVICE = 0
_TIME = pl.Datetime("ms", "UTC")
CSV_TIME = "%Y-%m-%dT%H:%M:%SZ"


def jtrack_columns(sensors: list[str]) -> list[str]:
    """JTrack's status columns for a study recording ``sensors``, in JTrack's order."""
    per_sensor = [f"{s}_{part}" for s in sensors for part in ("n_batches", "last_time_received")]
    return JTRACK_COLUMNS + per_sensor


def extra_columns(sensors: list[str]) -> list[str]:
    """The columns the workbench adds after JTrack's."""
    per_sensor = [f"{s}_{part}" for s in sensors for part in ("last_sample", "completeness")]
    return [
        *per_sensor,
        "last_data",
        "hours_since_last_data",
        "activity_code",
        "activity",
        "activity_since",
    ]


# ---------------------------------------------------------------------------- aggregates


def fold_new_uploads(catalog: Catalog) -> int:
    """Fold the ledger rows added since the last fold into the status aggregates; return
    how many rows were folded. Safe to run from several processes at once."""
    with catalog.writing() as conn:
        return _fold(conn, catalog)


def rebuild_aggregates(catalog: Catalog) -> int:
    """Recompute the status aggregates from the whole ledger; return the rows folded."""
    with catalog.writing() as conn:
        conn.execute(delete(status_sensors))
        conn.execute(delete(state).where(state.c.key == FOLDED))
        return _fold(conn, catalog)


def _fold(conn: Connection, catalog: Catalog) -> int:
    mark = conn.execute(
        select(state.c.value).where(state.c.key == FOLDED).with_for_update()
    ).scalar()
    mark = mark or 0
    rows = conn.execute(_aggregate_query(uploads.c.id > mark)).all()
    if not rows:
        return 0
    insert = dialect_insert(catalog.engine, status_sensors)
    new = insert.excluded
    table = status_sensors.c
    conn.execute(
        insert.on_conflict_do_update(
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
        ),
        [{k: v for k, v in row._mapping.items() if k != "max_id"} for row in rows],
    )
    top = max(row.max_id for row in rows)
    conn.execute(
        dialect_insert(catalog.engine, state)
        .values(key=FOLDED, value=top)
        .on_conflict_do_update(index_elements=["key"], set_={"value": top})
    )
    return sum(row.n_batches for row in rows)


def _aggregate_query(*where):
    u = uploads.c
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
        .where(*where)
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
    fold: bool = True,
    from_ledger: bool = False,
) -> pl.DataFrame:
    """The status table of one study: JTrack's columns, then the workbench's.

    ``now`` (ms since the epoch, default the current time) is the moment the table describes.
    By default new ledger rows are folded in first; ``from_ledger`` computes the aggregates
    from the whole ledger instead (the slow full computation, used to check the fast one).

    Example: ``study_status(catalog, "demo").filter(pl.col("activity_code") == 0)``.
    """
    study = get_study(catalog, study_id)
    if fold and not from_ledger:
        fold_new_uploads(catalog)
    now = now_ms() if now is None else now
    with catalog.engine.connect() as conn:
        enrolled = conn.execute(
            select(subjects.c.subject_id, subjects.c.enrolled_at).where(
                subjects.c.study_id == study_id
            )
        ).all()
        attached = conn.execute(
            select(
                devices.c.subject_id,
                devices.c.app,
                devices.c.device_id,
                devices.c.status,
                devices.c.time_left,
                devices.c.registered_at,
            ).where(devices.c.study_id == study_id)
        ).all()
        if from_ledger:
            sums = conn.execute(_aggregate_query(uploads.c.study_id == study_id)).all()
        else:
            c = status_sensors.c
            sums = conn.execute(
                select(
                    c.subject_id, c.device_id, c.sensor, c.n_batches, c.last_received, c.last_sample
                ).where(c.study_id == study_id)
            ).all()
    return compute_status(study, enrolled, attached, sums, now=now)


def compute_status(study: Study, enrolled, attached, sums, *, now: int) -> pl.DataFrame:
    """The status table from catalog rows: ``enrolled`` (subject_id, enrolled_at),
    ``attached`` devices (subject_id, app, device_id, status, time_left, registered_at) and
    per-source ``sums`` (subject_id, device_id, sensor, n_batches, last_received, last_sample)."""
    definition = study.definition
    sensors = list(definition["sensors"])
    duration = definition["duration_days"] * DAY_MS
    stale_after = definition["staleness_hours"] * HOUR_MS

    people = pl.DataFrame(
        [(r.subject_id, r.enrolled_at) for r in enrolled],
        schema={"subject_name": pl.String, "enrolled_at": pl.Int64},
        orient="row",
    )
    phones = pl.DataFrame(
        [
            (r.subject_id, r.app, r.device_id, r.status, r.time_left, r.registered_at)
            for r in attached
        ],
        schema={
            "subject_name": pl.String,
            "app": pl.String,
            "device_id": pl.String,
            "status_code": pl.Int64,
            "time_left": pl.Int64,
            "registered": pl.Int64,
        },
        orient="row",
    )
    base = people.join(phones, on="subject_name", how="left").sort(
        "subject_name", "app", "device_id", nulls_last=False
    )
    received = pl.DataFrame(
        [
            (r.subject_id, r.device_id, r.sensor, r.n_batches, r.last_received, r.last_sample)
            for r in sums
        ],
        schema={
            "subject_name": pl.String,
            "device_id": pl.String,
            "sensor": pl.String,
            "n_batches": pl.Int64,
            "last_received": pl.Int64,
            "last_sample": pl.Int64,
        },
        orient="row",
    )
    for sensor in sensors:
        part = received.filter(pl.col("sensor") == sensor).select(
            "subject_name",
            "device_id",
            pl.col("n_batches").alias(f"{sensor}_n_batches"),
            pl.col("last_received").alias(f"{sensor}_last_time_received"),
            pl.col("last_sample").alias(f"{sensor}_last_sample"),
        )
        base = base.join(part, on=["subject_name", "device_id"], how="left")

    left = pl.col("status_code").is_in(LEFT_STATUSES)
    end = pl.when(left & pl.col("time_left").is_not_null()).then(pl.col("time_left")).otherwise(now)
    window_end = pl.min_horizontal(end, pl.col("registered") + duration)
    window_days = ((window_end - pl.col("registered")).clip(lower_bound=0) / DAY_MS).alias(
        "_window_days"
    )
    active_here = (
        (pl.col("status_code") == ACTIVE_DEVICE).sum().over("subject_name", "app").alias("_active")
    )
    newest_active = (
        pl.when(pl.col("status_code") == ACTIVE_DEVICE)
        .then(pl.col("registered"))
        .max()
        .over("subject_name", "app")
        .alias("_newest_active")
    )
    last_data = pl.max_horizontal([pl.col(f"{s}_last_time_received") for s in sensors]).alias(
        "last_data"
    )
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
        .then(pl.lit(COMPLETED))
        .when(left)
        .then(pl.lit(LEFT_EARLY))
        .when(pl.col("_active") > 1)
        .then(pl.lit(SEVERAL_DEVICES))
        .when(now - pl.col("registered") >= duration)
        .then(pl.lit(OVER_NOT_LEFT))
        .when(now - silent_since >= stale_after)
        .then(pl.lit(NO_DATA))
        .otherwise(pl.lit(OK))
    )
    base = base.with_columns(code.alias("activity_code"))
    code_col = pl.col("activity_code")
    since = (
        pl.when(code_col.is_in([COMPLETED, LEFT_EARLY]))
        .then(pl.col("date_left_study"))
        .when(code_col == SEVERAL_DEVICES)
        .then(pl.col("_newest_active"))
        .when(code_col == OVER_NOT_LEFT)
        .then(pl.col("registered") + duration)
        .when(code_col == NO_DATA)
        .then(silent_since + stale_after)
        .otherwise(silent_since)
    )
    per_sensor = []
    for sensor in sensors:
        expected = definition["sensors"][sensor]["batches_per_day"] * pl.col("_window_days")
        n = pl.col(f"{sensor}_n_batches").fill_null(0)
        per_sensor += [
            n.alias(f"{sensor}_n_batches"),
            pl.when(expected > 0)
            .then((100 * n / expected).round(1))
            .alias(f"{sensor}_completeness"),
        ]
    base = base.with_columns(
        *per_sensor,
        since.alias("activity_since"),
        ((now - pl.col("last_data")) / HOUR_MS).round(1).alias("hours_since_last_data"),
        code_col.replace_strict(ACTIVITY, return_dtype=pl.String).alias("activity"),
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
    return base.select(jtrack_columns(sensors) + extra_columns(sensors))


# ---------------------------------------------------------------------------- refresh


@dataclass
class RefreshReport:
    """What one :func:`refresh_status` did."""

    folded: int = 0
    studies: list[str] = field(default_factory=list)
    changes: int = 0
    opened: int = 0
    closed: int = 0
    mailed: int = 0
    mail_error: str | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        line = (
            f"folded {self.folded} new uploads; {len(self.studies)} studies; "
            f"{self.changes} status changes; alerts: {self.opened} opened, {self.closed} closed, "
            f"{self.mailed} mailed"
        )
        if self.mail_error:
            line += f" (mail failed: {self.mail_error}; retried at the next refresh)"
        return f"{line}; {self.seconds * 1000:.0f} ms"


def refresh_status(
    config: Config,
    *,
    catalog: Catalog | None = None,
    now: int | None = None,
    studies: list[str] | None = None,
    mail: bool = True,
) -> RefreshReport:
    """Fold new uploads, recompute every active study's status (or those in ``studies``),
    record status changes, open and close alerts, write the status CSVs, mail new alerts.

    Example: ``refresh_status(load_config("demo-home")).summary()``.
    """
    from workbench import alerts
    from workbench.catalog import open_catalog

    started = time.perf_counter()
    own = catalog is None
    catalog = catalog or open_catalog(config)
    try:
        report = RefreshReport()
        report.folded = fold_new_uploads(catalog)
        now = now_ms() if now is None else now
        chosen = (
            [get_study(catalog, s) for s in studies]
            if studies
            else [s for s in list_studies(catalog) if s.active]
        )
        pool = DataPool(config.pool)
        for study in chosen:
            table = study_status(catalog, study.id, now=now, fold=False)
            report.changes += record_changes(catalog, study.id, table, now=now)
            opened, closed = alerts.update_alerts(catalog, study, table, now=now)
            report.opened += opened
            report.closed += closed
            write_csv_atomically(
                table.select(
                    jtrack_columns(list(study.sensors)) + extra_columns(list(study.sensors))
                ),
                status_csv_path(pool, study.id),
            )
            report.studies.append(study.id)
        if mail and config.smtp is not None:
            try:
                report.mailed = alerts.mail_new_alerts(catalog, config.smtp, now=now)
            except MailError as exc:
                report.mail_error = str(exc)
        report.seconds = time.perf_counter() - started
        return report
    finally:
        if own:
            catalog.dispose()


def status_csv_path(pool: DataPool, study_id: str) -> Path:
    """Where :func:`refresh_status` keeps a study's status CSV."""
    return pool.reports / study_id / "status.csv"


def record_changes(catalog: Catalog, study_id: str, table: pl.DataFrame, *, now: int) -> int:
    """Compare each row's activity code with the last refresh; write a history entry for each
    change; return how many there were."""
    current = {
        (r["subject_name"], r["app"] or "", r["device_id"] or ""): (
            r["activity_code"],
            r["activity_since"],
        )
        for r in table.select(
            "subject_name",
            "app",
            "device_id",
            "activity_code",
            pl.col("activity_since").cast(pl.Int64),
        ).iter_rows(named=True)
    }
    c = status_current.c
    with catalog.writing() as conn:
        before = {
            (r.subject_id, r.app, r.device_id): r.activity_code
            for r in conn.execute(
                select(c.subject_id, c.app, c.device_id, c.activity_code).where(
                    c.study_id == study_id
                )
            )
        }
        history, inserts, updates = [], [], []
        for key, (code, since) in current.items():
            old = before.get(key)
            if old == code:
                continue
            subject, app, device = key
            at = since if since is not None else now
            row = {"study_id": study_id, "subject_id": subject, "app": app, "device_id": device}
            history.append({**row, "from_code": old, "to_code": code, "at": at, "noticed_at": now})
            (updates if key in before else inserts).append(
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
        for gone in set(before) - set(current):  # e.g. a subject's "no device yet" row
            conn.execute(
                delete(status_current).where(
                    c.study_id == study_id,
                    c.subject_id == gone[0],
                    c.app == gone[1],
                    c.device_id == gone[2],
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
        .replace_strict(ACTIVITY, default=None, return_dtype=pl.String)
        .alias("from"),
        pl.col("to_code").replace_strict(ACTIVITY, return_dtype=pl.String).alias("to"),
        pl.col("at", "noticed_at").cast(_TIME),
    ).select(
        "subject_name", "app", "device_id", "from_code", "from", "to_code", "to", "at", "noticed_at"
    )


# ---------------------------------------------------------------------------- outputs


def write_csv_atomically(table: pl.DataFrame, path: Path) -> Path:
    """Write ``table`` as CSV so that a reader sees the old file or the new one, never a part."""
    return write_file_atomically(path, table.write_csv(datetime_format=CSV_TIME).encode())


def render(table: pl.DataFrame, fmt: str) -> bytes:
    """A status (or history) table as ``csv``, ``json`` (a list of objects) or ``table``
    (readable text for a terminal)."""
    if fmt == "csv":
        return table.write_csv(datetime_format=CSV_TIME).encode()
    if fmt == "json":
        import orjson

        plain = table.with_columns(pl.col(_TIME).dt.strftime(CSV_TIME))
        return orjson.dumps(plain.to_dicts(), option=orjson.OPT_INDENT_2) + b"\n"
    if fmt == "table":
        return (_terminal_table(table) + "\n").encode()
    raise ValueError(f"unknown format {fmt!r}")


def _terminal_table(table: pl.DataFrame) -> str:
    if "activity" in table.columns:  # a status table: the columns a coordinator scans
        completeness = [c for c in table.columns if c.endswith("_completeness")]
        view = table.select(
            *(["study"] if "study" in table.columns else []),
            pl.col("subject_name").alias("subject"),
            "app",
            pl.col("device_id").alias("device"),
            pl.col("date_registered").dt.strftime("%Y-%m-%d").alias("registered"),
            pl.col("time_in_study").alias("days"),
            pl.col("status_code").alias("status"),
            "activity",
            pl.col("hours_since_last_data").alias("hours silent"),
            *(pl.col(c).alias(c.removesuffix("_completeness") + " %") for c in completeness),
        )
    else:
        view = table.with_columns(pl.col(_TIME).dt.strftime("%Y-%m-%d %H:%M"))
    with pl.Config(
        tbl_rows=-1,
        tbl_cols=-1,
        tbl_width_chars=1000,
        fmt_str_lengths=60,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        tbl_formatting="ASCII_MARKDOWN",
    ):
        return str(view)
