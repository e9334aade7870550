"""The sanity check: is every stored batch file sound?

Each file recorded in the upload ledger is read and checked against its row and the batch
JSON Schema: the file exists with the recorded size and SHA-256, parses, every record is valid,
every record names the row's study, subject, device and sensor, the record count and sample
span match, and every record fits its sensor's schema (``data_templates/sensors``; a sensor
without one takes the generic shape). ``full`` also walks the pool for batch files that have
no ledger row.

By default only files not checked before are read (a watermark per study in the catalog), so a
daily run costs what arrived that day. Files are checked by a pool of processes, one per core.
Failing files are written to a report (CSV and JSON) in the pool's ``reports/sanity/`` folder.

Example::

    report = sanity_check(load_config("demo-home"), study="demo", full=True)
    report.failures  # [Failure(upload_id=..., path=..., reason=...), ...]
"""

from __future__ import annotations

import datetime
import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
import polars as pl
from sqlalchemy import select
from tqdm import tqdm

from workbench.catalog import Catalog, borrowed_catalog, dialect_insert, state, uploads
from workbench.config import Config
from workbench.errors import UploadRejected
from workbench.ingest import parse_batch, span_of_batch
from workbench.json_limits import check_json
from workbench.pool import DataPool, write_file_atomically
from workbench.sensors.schemas import check_batch
from workbench.studies import get_study, list_studies
from workbench.times import now_ms
from workbench.writers import write_csv_atomically

SETTLE_MS = 60_000  # rows younger than this wait for the next incremental run
CHUNK = 512  # files per task handed to a worker process
IN_PROCESS_BELOW = 2000  # fewer files than this are checked without starting processes


@dataclass(frozen=True)
class Failure:
    """A stored file that failed the check, and why."""

    upload_id: int | None  # None: a file with no ledger row
    study: str
    path: str
    reason: str


@dataclass
class SanityReport:
    """What one :func:`sanity_check` found."""

    checked: int = 0
    failures: list[Failure] = field(default_factory=list)
    unrecorded_scanned: bool = False
    seconds: float = 0.0
    report_csv: Path | None = None
    report_json: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        rate = self.checked / self.seconds if self.seconds else 0.0
        line = (
            f"checked {self.checked} files in {self.seconds:.1f} s ({rate:.0f} files/s): "
            f"{len(self.failures)} failed"
        )
        if self.report_csv is not None:
            line += f"; report {self.report_csv}"
        return line


def sanity_check(
    config: Config,
    *,
    study: str | None = None,
    full: bool = False,
    workers: int | None = None,
    progress: bool = False,
    catalog: Catalog | None = None,
    settle: float = SETTLE_MS / 1000,
) -> SanityReport:
    """Check the stored batch files of one study (or all) not checked before, or all with
    ``full`` (which also looks for files without a ledger row); write a report of failures.
    Without ``full``, rows younger than ``settle`` seconds wait for the next run.

    Example: ``sanity_check(config, full=True).ok``.
    """
    started = time.perf_counter()
    with borrowed_catalog(config, catalog) as catalog:
        chosen = [get_study(catalog, study).id] if study else [s.id for s in list_studies(catalog)]
        report = SanityReport(unrecorded_scanned=full)
        pool = DataPool.of(config)
        for study_id in chosen:
            rows, top = _rows_to_check(catalog, study_id, full=full, settle_ms=int(settle * 1000))
            report.checked += len(rows)
            report.failures += _check_rows(
                str(pool.root), rows, workers=workers, progress=progress, label=study_id
            )
            if full:
                report.failures += _unrecorded_files(catalog, pool, study_id)
            if top is not None:
                _set_watermark(catalog, study_id, top)
        report.seconds = time.perf_counter() - started
        if report.checked or report.failures:
            report.report_csv, report.report_json = _write_report(pool, report)
        return report


def _watermark_key(study_id: str) -> str:
    # hashed: two long study ids must not share a watermark (keys hold 64 characters)
    return f"sanity.{hashlib.sha256(study_id.encode()).hexdigest()[:40]}"


def _rows_to_check(
    catalog: Catalog, study_id: str, *, full: bool, settle_ms: int = SETTLE_MS
) -> tuple[list[tuple], int | None]:
    u = uploads.c
    query = select(
        u.id,
        u.path,
        u.bytes,
        u.sha256,
        u.n_records,
        u.first_ts,
        u.last_ts,
        u.study_id,
        u.subject_id,
        u.device_id,
        u.sensor,
    ).where(u.study_id == study_id)
    with catalog.engine.connect() as conn:
        if not full:
            # an upload commits its row a moment before its file is linked: leave the last
            # minute's rows to the next run rather than call their files missing
            query = query.where(u.received_at <= now_ms() - settle_ms)
            mark = conn.execute(
                select(state.c.value).where(state.c.key == _watermark_key(study_id))
            ).scalar()
            if mark:
                query = query.where(u.id > mark)
        rows = [tuple(r) for r in conn.execute(query.order_by(u.id))]
    return rows, (rows[-1][0] if rows else None)


def _set_watermark(catalog: Catalog, study_id: str, top: int) -> None:
    key = _watermark_key(study_id)
    with catalog.writing() as conn:
        conn.execute(
            dialect_insert(catalog.engine, state)
            .values(key=key, value=top)
            .on_conflict_do_update(index_elements=["key"], set_={"value": top})
        )


def _check_rows(
    root: str, rows: list[tuple], *, workers: int | None, progress: bool, label: str
) -> list[Failure]:
    failures: list[Failure] = []
    chunks = [rows[i : i + CHUNK] for i in range(0, len(rows), CHUNK)]
    bar = tqdm(total=len(rows), unit="file", desc=f"sanity {label}", disable=not progress)
    workers = workers or os.cpu_count() or 1
    try:
        if workers == 1 or len(rows) < IN_PROCESS_BELOW:
            for chunk in chunks:
                failures += check_files(root, chunk)
                bar.update(len(chunk))
        else:
            # fork starts at once and needs no importable __main__ (scripts, notebooks); the
            # children only read files and hash them, so no lock they inherit is ever taken
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            with context.Pool(workers) as processes:
                for found, done in processes.imap_unordered(
                    _check_chunk, [(root, chunk) for chunk in chunks]
                ):
                    failures += found
                    bar.update(done)
    finally:
        bar.close()
    return failures


def _check_chunk(task: tuple[str, list[tuple]]) -> tuple[list[Failure], int]:
    root, rows = task
    return check_files(root, rows), len(rows)


def check_files(root: str, rows: list[tuple]) -> list[Failure]:
    """Check ledger ``rows`` (id, path, bytes, sha256, n_records, first_ts, last_ts, study,
    subject, device, sensor) against their files under the pool ``root``."""
    failures = []
    for row in rows:
        reason = _check_one(root, row)
        if reason is not None:
            failures.append(Failure(upload_id=row[0], study=row[7], path=row[1], reason=reason))
    return failures


def _check_one(root: str, row: tuple) -> str | None:
    _id, path, size, sha, n_records, first_ts, last_ts, study, subject, device, sensor = row
    try:
        with open(os.path.join(root, path), "rb") as handle:
            body = handle.read()
    except FileNotFoundError:
        return "missing: the ledger records this file but it is not in the pool"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    if len(body) != size:
        return f"size: {len(body)} bytes, the ledger recorded {size}"
    if hashlib.sha256(body).hexdigest() != sha:
        return "hash: the content no longer matches the SHA-256 recorded at upload"
    try:
        check_json(body)
        records = parse_batch(body)
    except UploadRejected as exc:
        return f"schema: {exc.message}"
    try:
        json.loads(body)  # every stored file must be readable by the standard library too
    except (ValueError, RecursionError) as exc:
        return f"json: the standard json module cannot read it ({str(exc)[:200]})"
    try:
        span = span_of_batch(records, study, subject, device, sensor)
    except UploadRejected:
        return "identifiers: a record names another study, subject, device or sensor than the ledger row"
    if len(records) != n_records:
        return f"count: {len(records)} records, the ledger recorded {n_records}"
    if span != (first_ts, last_ts):
        return (
            f"span: samples from {span[0]} to {span[1]}, the ledger recorded "
            f"{first_ts} to {last_ts}"
        )
    problem = check_batch(sensor, body)
    if problem is not None:
        return f"schema: {sensor} {problem}"
    return None


def _unrecorded_files(catalog: Catalog, pool: DataPool, study_id: str) -> list[Failure]:
    """Files under the study's folder that no ledger row names."""
    folder = pool.studies / study_id
    if not folder.is_dir():
        return []
    with catalog.engine.connect() as conn:
        known = set(
            conn.execute(select(uploads.c.path).where(uploads.c.study_id == study_id)).scalars()
        )
    found = []
    root = str(pool.root)
    for directory, _dirs, files in os.walk(folder):
        for name in files:
            relative = os.path.relpath(os.path.join(directory, name), root)
            if relative not in known:
                found.append(
                    Failure(
                        upload_id=None,
                        study=study_id,
                        path=relative,
                        reason="unrecorded: no ledger row names this file",
                    )
                )
    return found


def _write_report(pool: DataPool, report: SanityReport) -> tuple[Path, Path]:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = pool.reports / "sanity"
    rows = [asdict(f) for f in report.failures]
    table = pl.DataFrame(
        rows,
        schema={"upload_id": pl.Int64, "study": pl.String, "path": pl.String, "reason": pl.String},
    )
    csv_path = write_csv_atomically(table, folder / f"sanity-{stamp}.csv")
    summary = {
        "checked": report.checked,
        "failed": len(report.failures),
        "unrecorded_scanned": report.unrecorded_scanned,
        "seconds": round(report.seconds, 3),
        "failures": rows,
    }
    json_path = write_file_atomically(
        folder / f"sanity-{stamp}.json", orjson.dumps(summary, option=orjson.OPT_INDENT_2)
    )
    return csv_path, json_path
