"""The catalog: studies, subjects, devices, the upload ledger and rejections, and what the
status and sanity checks derive from them, via SQLAlchemy 2.

The same code runs on a SQLite file (WAL mode, the embedded default) and on PostgreSQL: the
URL decides. Times are integers, milliseconds since the Unix epoch (UTC), as the phone apps
send them. The schema carries a version in ``schema_info`` and upgrades itself on open.
"""

from __future__ import annotations

import contextlib
import fcntl
import operator
import os
import re
import threading
import zlib
from collections import namedtuple
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from workbench.errors import CatalogError
from workbench.pool import create_private_file, make_folders, open_new_file, secure_file
from workbench.times import DAY_MS, now_ms  # noqa: F401  (importable from here too)

SCHEMA_VERSION = 9

# A migration upgrades the catalog from version N-1 to N; it is keyed by N.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}

metadata = MetaData()

# Autoincrementing 64-bit keys; SQLite only makes INTEGER PRIMARY KEY an alias of the rowid.
Id = BigInteger().with_variant(Integer, "sqlite")

schema_info = Table(
    "schema_info",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

studies = Table(
    "studies",
    metadata,
    Column("study_id", String(64), primary_key=True),
    Column("definition", Text, nullable=False),  # JSON, validated by study.schema.json
    Column("status", String(16), nullable=False, default="active"),  # active | archived
    Column("revision", Integer, nullable=False, default=1),
    Column("created_at", BigInteger, nullable=False),
    Column("archived_at", BigInteger),
)

subjects = Table(
    "subjects",
    metadata,
    Column("study_id", String(64), primary_key=True),
    Column("subject_id", String(128), primary_key=True),
    Column("token_hash", String(64), nullable=False),  # sha256 hex of the secret token
    Column("enrolled_at", BigInteger, nullable=False),
    # Version 6: removal by the investigator (status 3), final until the coordinator restores,
    # and when the coordinator last reset the count of devices the subject attached.
    Column("removed_at", BigInteger),
    Column("removed_by", String(128)),
    Column("devices_reset_at", BigInteger),
    # Version 9: the subject's own IANA time zone, overriding the study's (null: the study's).
    Column("timezone", String(64)),
    Index("ix_subjects_token_hash", "token_hash"),
)

devices = Table(
    "devices",
    metadata,
    Column("study_id", String(64), primary_key=True),
    Column("subject_id", String(128), primary_key=True),
    Column("app", String(16), primary_key=True),  # main | ema
    Column("device_id", String(128), primary_key=True),
    Column("status", Integer, nullable=False, default=0),  # 0 active, 1/2 left, 3 removed
    Column("time_joined", BigInteger),
    Column("time_left", BigInteger),
    Column("registered_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

uploads = Table(
    "uploads",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("study_id", String(64), nullable=False),
    Column("subject_id", String(128), nullable=False),
    Column("device_id", String(128), nullable=False),
    Column("sensor", String(64), nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("path", String(1024), nullable=False, unique=True),
    Column("bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("n_records", Integer, nullable=False),
    Column("first_ts", BigInteger),
    Column("last_ts", BigInteger),
    UniqueConstraint("study_id", "subject_id", "device_id", "sensor", "sha256", name="uq_batch"),
    Index("ix_uploads_sha256", "sha256"),
    Index("ix_uploads_study_id", "study_id", "id"),
)

rejections = Table(
    "rejections",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("received_at", BigInteger, nullable=False),
    Column("action", String(32), nullable=False),
    Column("status", Integer, nullable=False),
    Column("reason", String(64), nullable=False),
    Column("message", Text, nullable=False),
    Column("study_id", String(128)),  # as claimed by the sender, possibly invalid
    Column("subject_id", String(128)),
    Column("device_id", String(128)),
    Column("sensor", String(128)),
    Column("bytes", BigInteger),
    Column("sha256", String(64)),
    Column("path", String(1024)),  # the body kept under junk/, when it was kept
    Column("remote_addr", String(64)),
    Column("pruned_at", BigInteger),  # version 6: its junk file was pruned by the operator
    Index("ix_rejections_study_id", "study_id", "id"),
)


# --- version 2: study status, alerts, sanity --------------------------------------------

# Counters and watermarks, e.g. the last ledger id folded into the status aggregates.
state = Table(
    "state",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# Per source (study, subject, device, sensor): the ledger rows folded in so far.
status_sensors = Table(
    "status_sensors",
    metadata,
    Column("study_id", String(64), primary_key=True),
    Column("subject_id", String(128), primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("sensor", String(64), primary_key=True),
    Column("n_batches", BigInteger, nullable=False),
    Column("n_records", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("first_received", BigInteger, nullable=False),
    Column("last_received", BigInteger, nullable=False),
    Column("first_sample", BigInteger),
    Column("last_sample", BigInteger),
)

# The activity code each status row had at the last refresh ('' for "no device yet").
status_current = Table(
    "status_current",
    metadata,
    Column("study_id", String(64), primary_key=True),
    Column("subject_id", String(128), primary_key=True),
    Column("app", String(16), primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("activity_code", Integer, nullable=False),
    Column("since", BigInteger, nullable=False),
)

# Every change of activity code: when it happened (``at``) and when a refresh noticed it.
status_history = Table(
    "status_history",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("study_id", String(64), nullable=False),
    Column("subject_id", String(128), nullable=False),
    Column("app", String(16), nullable=False),
    Column("device_id", String(128), nullable=False),
    Column("from_code", Integer),  # None: the row's first appearance
    Column("to_code", Integer, nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("noticed_at", BigInteger, nullable=False),
    Index("ix_status_history_subject", "study_id", "subject_id", "id"),
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("study_id", String(64), nullable=False),
    Column("subject_id", String(128), nullable=False),
    Column("device_id", String(128), nullable=False),  # '' when not about one device
    Column("kind", String(32), nullable=False),
    Column("since", BigInteger, nullable=False),  # when the condition began
    Column("detail", Text, nullable=False),
    Column("opened_at", BigInteger, nullable=False),
    Column("closed_at", BigInteger),
    Column("mailed_at", BigInteger),
    Column("acked_at", BigInteger),
    Column("acked_by", String(128)),
    Column("note", Text),
    # version 7: what to do, when the alert says it itself (a safety item's action)
    Column("action", Text),
    Index("ix_alerts_open", "study_id", "closed_at"),
)


def _add_status_tables(conn: Connection) -> None:
    metadata.create_all(
        conn, tables=[state, status_sensors, status_current, status_history, alerts]
    )


MIGRATIONS[2] = _add_status_tables


# --- version 3: questionnaire export -----------------------------------------------------

# Every raw snapshot fetched from a source: immutable, hashed, in fetch order.
export_raw = Table(
    "export_raw",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("source", String(64), nullable=False),
    Column("table_name", String(128), nullable=False),
    Column("fetched_at", BigInteger, nullable=False),
    Column("path", String(1024), nullable=False, unique=True),
    Column("sha256", String(64), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("n_rows", Integer, nullable=False),
    Column("min_row", BigInteger),
    Column("max_row", BigInteger),
    Column("decoded_at", BigInteger),  # set once its rows are in the decoded tables
    Column("deleted_at", BigInteger),  # set once its rows are deleted on the server
    Index("ix_export_raw_table", "source", "table_name", "id"),
)

# The high-water mark of each exported table: the largest row id stored and decoded.
export_marks = Table(
    "export_marks",
    metadata,
    Column("source", String(64), primary_key=True),
    Column("table_name", String(128), primary_key=True),
    Column("high_water", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# Rows deleted on a server, each after it was verified in raw and decoded tables.
export_deletions = Table(
    "export_deletions",
    metadata,
    Column("source", String(64), primary_key=True),
    Column("table_name", String(128), primary_key=True),
    Column("row_id", BigInteger, primary_key=True),
    Column("raw_id", BigInteger, nullable=False),
    Column("deleted_at", BigInteger, nullable=False),
)


def _add_export_tables(conn: Connection) -> None:
    metadata.create_all(conn, tables=[export_raw, export_marks, export_deletions])


MIGRATIONS[3] = _add_export_tables


# --- version 4: pipeline runs and job tracking ------------------------------------------

# One row per run of a pipeline (a notebook executed by papermill).
pipeline_runs = Table(
    "pipeline_runs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("pipeline", String(64), nullable=False),
    Column("trigger", String(16), nullable=False),  # schedule | manual
    Column("parameters", Text, nullable=False),  # JSON
    Column("params_hash", String(16), nullable=False),
    Column("notebook", String(1024)),  # pool-relative path of the executed notebook
    Column("status", String(16), nullable=False),  # running | succeeded | failed | timeout
    Column("attempt", Integer, nullable=False, default=1),
    Column("started_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger),
    Column("duration_ms", BigInteger),
    Column("failing_cell", Integer),
    Column("error", Text),
    Column("code_version", String(64)),
    Column("papermill_version", String(32)),
    Column("kernel", String(64)),
    Column("provider_job_id", String(128)),
    Index("ix_pipeline_runs_pipeline", "pipeline", "id"),
)

# Job tracking (the trackerapi model): configurations, jobs, their events, API keys.
job_configurations = Table(
    "job_configurations",
    metadata,
    Column("tag", String(128), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("steps", Text, nullable=False),  # JSON list of {name, tag, points}
    Column("total_points", Integer, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("version", String(128)),  # version 7: the tag's current version (None: unversioned)
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("provider_job_id", String(128), nullable=False, unique=True),
    Column("customer_id", String(128)),
    Column("tag", String(128), nullable=False),
    Column("status", String(16), nullable=False),  # running | complete | error
    Column("points_done", Integer, nullable=False, default=0),
    Column("points_total", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("config_version", String(128)),  # version 7: the configuration's version it runs
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("provider_job_id", String(128), nullable=False),
    Column("event_id", String(128), nullable=False),  # the client's id: a resent event is ignored
    Column("kind", String(16), nullable=False),  # step | complete | error
    Column("tag", String(128)),
    Column("metadata", Text),  # JSON
    Column("points", Integer, nullable=False, default=0),
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("provider_job_id", "event_id", name="uq_job_event"),
    Index("ix_job_events_job", "provider_job_id", "id"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column(
        "key_hash", String(64), nullable=False, unique=True
    ),  # sha256 hex; the key is shown once
    Column("customer_id", String(128)),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger),
)


def _add_pipeline_and_job_tables(conn: Connection) -> None:
    metadata.create_all(
        conn, tables=[pipeline_runs, job_configurations, jobs, job_events, api_keys]
    )


MIGRATIONS[4] = _add_pipeline_and_job_tables


# --- version 5: sync with third-party APIs ----------------------------------------------

# A subject's link to a provider (a wearable or data-donation platform).
sync_accounts = Table(
    "sync_accounts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("study_id", String(64), nullable=False),
    Column("subject_id", String(128), nullable=False),
    Column("provider", String(64), nullable=False),
    # pending (link started) | active | revoked | expired
    Column("status", String(16), nullable=False),
    Column("external_id", String(256)),  # the provider's id of the member, when it has one
    Column("created_at", BigInteger, nullable=False),
    Column("linked_at", BigInteger),
    Column("last_synced_at", BigInteger),  # the last run that reached today
    Column("last_attempt_at", BigInteger),
    Column("error", Text),
    UniqueConstraint("study_id", "subject_id", "provider", name="uq_sync_account"),
)

# OAuth2 tokens, encrypted (Fernet); ``generation`` grows with every stored pair.
sync_tokens = Table(
    "sync_tokens",
    metadata,
    Column("account_id", BigInteger, primary_key=True),
    Column("access_token", Text, nullable=False),
    Column("refresh_token", Text),
    Column("expires_at", BigInteger),
    Column("scope", Text),
    Column("generation", Integer, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# Authorization requests waiting for the provider's callback (the OAuth2 ``state``).
sync_auth_states = Table(
    "sync_auth_states",
    metadata,
    Column("state", String(64), primary_key=True),
    Column("account_id", BigInteger, nullable=False),
    Column("redirect_uri", String(1024), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

# Per account and stream: windows before ``next_start`` (ISO date) are complete and stored.
sync_checkpoints = Table(
    "sync_checkpoints",
    metadata,
    Column("account_id", BigInteger, primary_key=True),
    Column("stream", String(64), primary_key=True),
    Column("next_start", String(10), nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# Every window fetched: the raw response as stored in the pool, hashed (the sync ledger).
sync_raw = Table(
    "sync_raw",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("account_id", BigInteger, nullable=False),
    Column("provider", String(64), nullable=False),
    Column("stream", String(64), nullable=False),
    Column("window_start", String(10), nullable=False),
    Column("window_end", String(10), nullable=False),
    Column("complete", Integer, nullable=False),  # 0: the window reaches today (re-fetched)
    Column("fetched_at", BigInteger, nullable=False),
    Column("path", String(1024), nullable=False, unique=True),
    Column("sha256", String(64), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("n_records", Integer, nullable=False),
    Index("ix_sync_raw_account", "account_id", "stream", "window_start"),
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("account_id", BigInteger, nullable=False),
    Column("trigger", String(16), nullable=False),
    # running | succeeded | limited | failed | skipped | revoked | interrupted
    Column("status", String(16), nullable=False),
    Column("started_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger),
    Column("requests", Integer, nullable=False, default=0),
    Column("windows", Integer, nullable=False, default=0),
    Column("records", Integer, nullable=False, default=0),
    Column("resume_at", BigInteger),  # limited: when the limit resets and the run is requeued
    Column("error", Text),
    Column("provider_job_id", String(128)),
    Index("ix_sync_runs_account", "account_id", "id"),
)

# A limit the provider announced (429, Retry-After, rate-limit headers): no request before.
sync_limits = Table(
    "sync_limits",
    metadata,
    Column("key", String(256), primary_key=True),
    Column("blocked_until", BigInteger, nullable=False),
    Column("reason", String(256), nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# Files this workbench keeps on a destination (e.g. Open Humans), by name, for safe replace.
sync_remote_files = Table(
    "sync_remote_files",
    metadata,
    Column("account_id", BigInteger, primary_key=True),
    Column("name", String(256), primary_key=True),
    Column("remote_id", String(128), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("uploaded_at", BigInteger, nullable=False),
)

# Activities of the polling bridge: progress read from a source account is written to a
# destination account while the activity runs.
sync_activities = Table(
    "sync_activities",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("source_account", BigInteger, nullable=False),
    Column("destination_account", BigInteger, nullable=False),
    Column("stream", String(64), nullable=False),
    Column("goal", BigInteger, nullable=False),  # the value that makes 100 %
    Column("starts_at", BigInteger, nullable=False),
    Column("ends_at", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

sync_poll_log = Table(
    "sync_poll_log",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("activity_id", BigInteger, nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("progress", BigInteger),  # the value read from the source
    Column("value", String(64)),  # what was written to the destination
    Column("status", String(16), nullable=False),  # written | failed
    Column("detail", Text),
    Index("ix_sync_poll_log_activity", "activity_id", "id"),
)

SYNC_TABLES = [
    sync_accounts,
    sync_tokens,
    sync_auth_states,
    sync_checkpoints,
    sync_raw,
    sync_runs,
    sync_limits,
    sync_remote_files,
    sync_activities,
    sync_poll_log,
]


def _add_sync_tables(conn: Connection) -> None:
    metadata.create_all(conn, tables=SYNC_TABLES)


MIGRATIONS[5] = _add_sync_tables


# --- version 6: hardening ---------------------------------------------------------------

# Bytes of unauthenticated junk kept per UTC day and client address ("*" is the day's total),
# so that nobody without a token can fill the disk.
junk_usage = Table(
    "junk_usage",
    metadata,
    Column("day", Integer, primary_key=True),  # days since the epoch, UTC
    Column("address", String(64), primary_key=True),
    Column("bytes", BigInteger, nullable=False),
)


def _add_hardening(conn: Connection) -> None:
    metadata.create_all(conn, tables=[junk_usage])
    inspector = inspect(conn)
    for table, column, kind in (
        ("subjects", "removed_at", "BIGINT"),
        ("subjects", "removed_by", "VARCHAR(128)"),
        ("subjects", "devices_reset_at", "BIGINT"),
        ("rejections", "pruned_at", "BIGINT"),
    ):
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    # Devices an investigator removed (status 3) made their subject removed.
    conn.exec_driver_sql(
        "UPDATE subjects SET removed_at = (SELECT MAX(d.updated_at) FROM devices d "
        "WHERE d.study_id = subjects.study_id AND d.subject_id = subjects.subject_id "
        "AND d.status = 3) WHERE EXISTS (SELECT 1 FROM devices d WHERE d.study_id = "
        "subjects.study_id AND d.subject_id = subjects.subject_id AND d.status = 3)"
    )


MIGRATIONS[6] = _add_hardening


# --- version 7: versioned job configurations -------------------------------------------

# Every version of a configuration ever registered: a (tag, version) never changes, and a job
# created under a version keeps its steps when a newer version becomes the tag's current one.
job_config_versions = Table(
    "job_config_versions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("tag", String(128), nullable=False),
    Column("version", String(128), nullable=False),
    Column("name", String(256), nullable=False),
    Column("steps", Text, nullable=False),  # JSON list of {name, tag, points}
    Column("total_points", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("tag", "version", name="uq_job_config_version"),
)


def _add_job_config_versions(conn: Connection) -> None:
    metadata.create_all(conn, tables=[job_config_versions])
    inspector = inspect(conn)
    for table, column in (("job_configurations", "version"), ("jobs", "config_version")):
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} VARCHAR(128)")


MIGRATIONS[7] = _add_job_config_versions


# --- version 8: safety alerts -----------------------------------------------------------

# One safety alert per source, participant and session, whatever happens later (closed,
# acknowledged, rows decoded again): the index makes a second one impossible.
safety_alerts_unique = Index(
    "ux_alerts_safety",
    alerts.c.study_id,
    alerts.c.subject_id,
    alerts.c.device_id,
    unique=True,
    sqlite_where=alerts.c.kind == "safety",
    postgresql_where=alerts.c.kind == "safety",
)


def _add_safety(conn: Connection) -> None:
    inspector = inspect(conn)
    if "action" not in {c["name"] for c in inspector.get_columns("alerts")}:
        conn.exec_driver_sql("ALTER TABLE alerts ADD COLUMN action TEXT")
    if "ux_alerts_safety" not in {i["name"] for i in inspector.get_indexes("alerts")}:
        safety_alerts_unique.create(conn)


MIGRATIONS[8] = _add_safety


# --- version 9: sensor tables -----------------------------------------------------------

# Per study and sensor: the last ledger id compacted into the sensor tables, and the time
# zones the tables' local days were cut in (a change of zone rebuilds them).
table_builds = Table(
    "table_builds",
    metadata,
    Column("study_id", String(64), primary_key=True),
    Column("sensor", String(64), primary_key=True),
    Column("watermark", BigInteger, nullable=False),
    Column("zones", Text, nullable=False),
    Column("built_at", BigInteger, nullable=False),
)


def _add_sensor_tables(conn: Connection) -> None:
    metadata.create_all(conn, tables=[table_builds])
    if "timezone" not in {c["name"] for c in inspect(conn).get_columns("subjects")}:
        conn.exec_driver_sql("ALTER TABLE subjects ADD COLUMN timezone VARCHAR(64)")


MIGRATIONS[9] = _add_sensor_tables


def dialect_insert(engine: Engine, table: Table):
    """An INSERT of ``table`` that knows ON CONFLICT (SQLite and PostgreSQL spell it alike)."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        raise CatalogError(f"unsupported catalog database {dialect!r}")
    return insert(table)


class Prepared:
    """A SQLAlchemy statement compiled once for the catalog's driver and run on a DBAPI
    cursor: the same SQL on SQLite and PostgreSQL, without per-call statement overhead.

    Example: ``q = Prepared(engine, select(studies).where(studies.c.study_id == bindparam("s")))``
    then ``q.all(cursor, {"s": "demo"})``.
    """

    def __init__(self, engine: Engine, statement, *, column_keys: list[str] | None = None) -> None:
        compiled = statement.compile(dialect=engine.dialect, column_keys=column_keys)
        self.sql = str(compiled)
        self._order = compiled.positiontup if engine.dialect.positional else None
        # The driver's parameters from a dict: a tuple in bind order for positional drivers
        # (itemgetter runs in C), the dict itself for named ones.
        if self._order is None:
            self._pick = _same
        elif len(self._order) == 1:
            key = self._order[0]
            self._pick = lambda values: (values[key],)
        else:
            self._pick = operator.itemgetter(*self._order)
        names = getattr(statement, "selected_columns", None)
        if names is None:
            names = getattr(statement, "_returning", ())
        self.row = namedtuple("Row", [c.key for c in names]) if names else None

    def params(self, values: dict):
        """The parameters in the form the driver wants."""
        return self._pick(values)

    def all(self, cursor, values: dict) -> list:
        """Execute and return every row as a named tuple."""
        cursor.execute(self.sql, self._pick(values))
        return list(map(self.row._make, cursor.fetchall()))

    def scalar(self, cursor, values: dict):
        """Execute and return the first column of the first row, or None."""
        cursor.execute(self.sql, self._pick(values))
        first = cursor.fetchone()
        return None if first is None else first[0]


def _same(values):
    return values


def fetch_tuples(conn: Connection, statement) -> list[tuple]:
    """Run a SELECT on the connection's DBAPI cursor and return plain tuples: for reads of
    many rows, where building SQLAlchemy rows would cost more than the query itself."""
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    params = compiled.params
    if conn.dialect.positional:
        params = tuple(params[name] for name in compiled.positiontup)
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        cursor.execute(str(compiled), params)
        return cursor.fetchall()
    finally:
        cursor.close()


def _create_private_database(path: Path) -> None:
    """Create the SQLite file with the pool's file mode before SQLite opens it (SQLite gives
    its -wal and -shm files the mode of the database), and set that mode on files an older
    workbench made."""
    make_folders(path.parent)
    create_private_file(path)
    for suffix in ("-wal", "-shm", "-journal", ".lock"):
        secure_file(path.with_name(path.name + suffix))


class Catalog:
    """A connection to the catalog database.

    Example: ``catalog = Catalog("sqlite:///pool/catalog.sqlite"); catalog.upgrade()``.

    ``checkpoint_pages`` sets how long SQLite's write-ahead log grows before a commit
    checkpoints it (``PRAGMA wal_autocheckpoint``; SQLite's default when None).
    """

    def __init__(self, url: str, *, checkpoint_pages: int | None = None) -> None:
        try:
            parsed = make_url(url)
        except SQLAlchemyError as exc:
            raise CatalogError(f"bad catalog URL: {exc}") from exc
        self.url = parsed
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite and parsed.database and parsed.database != ":memory:":
            _create_private_database(Path(parsed.database))
        try:
            # SQLite connections are cheap and keep a warm page cache: pool enough of them for
            # every server thread, so none is opened and closed per request.
            pooling = (
                {"pool_size": 64, "max_overflow": 64} if self.is_sqlite else {"pool_pre_ping": True}
            )
            self.engine: Engine = create_engine(parsed, **pooling)
        except (SQLAlchemyError, ImportError) as exc:
            raise CatalogError(f"cannot open catalog {parsed!r}: {exc}") from exc
        self._lock_path = None
        self._lock_fd: int | None = None
        self._lock_pid = 0
        self._thread_lock = threading.Lock()
        self._local = threading.local()
        if self.is_sqlite:
            _configure_sqlite(self.engine, checkpoint_pages)
            if parsed.database and parsed.database != ":memory:":
                self._lock_path = f"{parsed.database}.lock"

    def upgrade(self) -> int:
        """Create the schema or upgrade it to :data:`SCHEMA_VERSION`; return the version."""
        try:
            with self.writing() as conn:
                metadata.create_all(conn, tables=[schema_info])
                row = conn.execute(
                    select(schema_info.c.value).where(schema_info.c.key == "version")
                ).first()
                if row is None:
                    metadata.create_all(conn)
                    conn.execute(
                        schema_info.insert().values(key="version", value=str(SCHEMA_VERSION))
                    )
                    return SCHEMA_VERSION
                version = int(row.value)
                if version > SCHEMA_VERSION:
                    raise CatalogError(
                        f"the catalog has schema version {version}, newer than this workbench "
                        f"({SCHEMA_VERSION}); upgrade the workbench"
                    )
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[target](conn)
                    conn.execute(
                        schema_info.update()
                        .where(schema_info.c.key == "version")
                        .values(value=str(target))
                    )
                return SCHEMA_VERSION
        except SQLAlchemyError as exc:
            raise CatalogError(f"cannot open or upgrade the catalog: {exc}") from exc

    @contextlib.contextmanager
    def writing(
        self, *, durable: bool = True, serialize: str | None = None
    ) -> Iterator[Connection]:
        """A write transaction, made durable against power loss on exit unless ``durable``
        is False (the caller then calls :meth:`sync` itself).

        On SQLite, writers queue on a file lock rather than on SQLite's busy handler, which
        sleeps and retries and so stalls under load: every write transaction runs alone. On
        PostgreSQL, transactions naming the same ``serialize`` key run one after the other
        (an advisory lock held until the transaction ends), for read-then-write work.
        """
        with self._write_lock(), self.engine.begin() as conn:
            if serialize and not self.is_sqlite:
                key = zlib.crc32(serialize.encode())
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield conn
        if durable:
            self.sync()

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        if self._lock_path is None:
            yield
            return
        with self._thread_lock:
            if self._lock_fd is None or self._lock_pid != os.getpid():
                self._lock_fd = open_new_file(Path(self._lock_path), os.O_RDWR | os.O_CREAT)
                self._lock_pid = os.getpid()
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def lock(self, name: str, *, blocking: bool = True) -> Iterator[bool]:
        """A named lock held across processes while the block runs; yields whether it was
        taken (always True when ``blocking``).

        On PostgreSQL a session advisory lock (so across hosts); on SQLite an exclusive flock
        on ``<database>.locks/<name>.lock`` beside the database file (a process-wide lock for
        an in-memory database). Example: ``with catalog.lock("sync.run-3") as taken: ...``.
        """
        if not LOCK_NAME.fullmatch(name):
            raise ValueError(f"lock name {name!r} is not of letters, digits, '.', '_' or '-'")
        if not self.is_sqlite:
            key = zlib.crc32(f"workbench.{name}".encode())
            with self.engine.connect() as conn:
                if blocking:
                    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                    taken = True
                else:
                    taken = bool(
                        conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
                    )
                try:
                    yield taken
                finally:
                    if taken:
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
            return
        if self._lock_path is None:
            with self._thread_lock:
                held = _MEMORY_LOCKS.setdefault(name, threading.Lock())
            taken = held.acquire(blocking)
            try:
                yield taken
            finally:
                if taken:
                    held.release()
            return
        folder = make_folders(Path(f"{self._lock_path}s"))
        fd = open_new_file(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken = True
            except BlockingIOError:
                taken = False
            yield taken
        finally:
            os.close(fd)  # releases the flock

    def sync(self) -> None:
        """Make every committed transaction durable against power loss.

        SQLite runs with ``synchronous=NORMAL``: a commit is in the OS, not yet on the disk.
        One small commit with ``synchronous=FULL`` fsyncs the write-ahead log, and with it
        every commit before. (Opening and closing the database file here instead would drop
        SQLite's POSIX locks for the whole process.) Servers such as PostgreSQL make each
        commit durable themselves, so this does nothing for them.
        """
        if not self.is_sqlite:
            return
        with self._write_lock(), self.engine.connect() as conn:
            # pysqlite opens a transaction only before a data change, so the pragmas run
            # outside it and the commit in between is the one made with FULL.
            conn.exec_driver_sql("PRAGMA synchronous = FULL")
            try:
                stamp = {"value": str(now_ms())}
                if not conn.execute(
                    schema_info.update().where(schema_info.c.key == "synced_at"), stamp
                ).rowcount:
                    conn.execute(schema_info.insert(), {"key": "synced_at", **stamp})
                conn.commit()
            finally:
                conn.exec_driver_sql("PRAGMA synchronous = NORMAL")
                conn.commit()

    @contextlib.contextmanager
    def raw(self) -> Iterator:
        """A DBAPI connection for :class:`Prepared` statements on the hot path.

        On SQLite each thread keeps its own (pooled) connection, skipping the pool's check-out
        and reset on every request; elsewhere one is checked out and returned each time.
        """
        if not self.is_sqlite:
            conn = self.engine.raw_connection()
            try:
                yield conn
            finally:
                conn.close()  # back to the pool
            return
        yield self._thread_connection()[0]

    @contextlib.contextmanager
    def raw_cursor(self) -> Iterator:
        """A DBAPI cursor for :class:`Prepared` reads on the hot path (see :meth:`raw`); on
        SQLite each thread reuses one cursor of its own connection."""
        if not self.is_sqlite:
            with self.raw() as conn:
                cursor = conn.cursor()
                try:
                    yield cursor
                finally:
                    cursor.close()
            return
        yield self._thread_connection()[1]

    def _thread_connection(self) -> tuple:
        """This thread's pooled SQLite connection and a cursor kept open on it."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            conn = self.engine.raw_connection()
            local.conn, local.cursor, local.pid = conn, conn.cursor(), os.getpid()
        return local.conn, local.cursor

    @contextlib.contextmanager
    def raw_writing(self) -> Iterator:
        """A write transaction on a DBAPI cursor (see :meth:`writing`); commits on exit."""
        if not self.is_sqlite:
            with self._write_lock(), self.raw() as conn:
                try:
                    yield conn.cursor()
                    conn.commit()
                except BaseException:
                    conn.rollback()
                    raise
            return
        with self._write_lock():
            conn, cursor = self._thread_connection()
            try:
                yield cursor
                conn.commit()
            except BaseException:
                conn.rollback()
                raise

    def version(self) -> int:
        """The schema version stored in the catalog."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(schema_info.c.value).where(schema_info.c.key == "version")
                ).scalar_one()
            )

    def dispose(self) -> None:
        """Close all pooled connections and the write-lock file."""
        self.engine.dispose()
        if self._lock_fd is not None and self._lock_pid == os.getpid():
            os.close(self._lock_fd)
            self._lock_fd = None


def _configure_sqlite(engine: Engine, checkpoint_pages: int | None = None) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
        # Commits reach the OS at once (safe against a process crash); :meth:`Catalog.sync`
        # makes them safe against power loss, after each write or, for the upload ledger,
        # in the background (see workbench.ledger.LedgerWriter).
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA cache_size = -8192")  # 8 MiB: the hot part of the ledger's indexes
        if checkpoint_pages is not None:
            # A commit that finds the write-ahead log this long copies it into the database
            # file (with two fsyncs) while every writer waits; SQLite's default is 1,000 pages.
            cursor.execute(f"PRAGMA wal_autocheckpoint = {int(checkpoint_pages)}")
        cursor.close()


LOCK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_MEMORY_LOCKS: dict[str, threading.Lock] = {}


def open_catalog(config) -> Catalog:
    """Open (and create or upgrade) the catalog named by a :class:`~workbench.config.Config`."""
    catalog = Catalog(config.catalog_url)
    catalog.upgrade()
    return catalog


@contextlib.contextmanager
def borrowed_catalog(config, catalog: Catalog | None = None) -> Iterator[Catalog]:
    """``catalog`` if the caller has one open, else the configuration's, opened for the block
    and disposed of after it.

    Example: ``with borrowed_catalog(config, catalog) as catalog: list_studies(catalog)``.
    """
    if catalog is not None:
        yield catalog
        return
    opened = open_catalog(config)
    try:
        yield opened
    finally:
        opened.dispose()
