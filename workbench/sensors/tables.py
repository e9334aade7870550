"""Build the sensor tables: stored batches compacted into a typed, partitioned Parquet dataset.

A build takes the ledger rows of a study stored since the last build (a watermark per study
and sensor in the catalog), splits them by subject into chunks of bounded size, and turns each
chunk into Parquet parts, one per local day (see :mod:`workbench.sensors.parts` for the
layout and why a kill at any point loses and repeats nothing). Records repeated across
overlapping batches (same device, timestamp and content) are kept once, from the earliest
batch. Records that fail their sensor's schema go to the quarantine table with the reason;
a batch whose file fails its hash or cannot be parsed is skipped whole and quarantined as a
batch. Fields that identify a person (location's ``alt``) never leave the raw files.

Chunks run in one process per core, or on the scheduler's consumers (``queue=True``), which
with Redis may be on several hosts sharing the pool.

Example::

    summary = build_tables(load_config(), "demo", progress=True)
    print(summary.summary())
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
from sqlalchemy import and_, func, select

from workbench import scheduler
from workbench.catalog import Catalog, open_catalog, table_builds, uploads
from workbench.config import Config
from workbench.errors import TablesError
from workbench.identifiers import check_name
from workbench.pool import DataPool, make_folders, sync_folders
from workbench.sensors.parts import (
    QUARANTINE,
    part_name,
    partition_folder,
    parts_of,
    quarantine_folder,
    sensor_folder,
)
from workbench.sensors.schemas import BATCH_COLUMN, decode_batch, sensor_schema
from workbench.studies import get_study
from workbench.subjects import study_zones
from workbench.times import now_ms
from workbench.writers import write_parquet_atomically

CHUNK_BYTES = 64 * 1024 * 1024  # raw JSON per chunk: bounds a worker's memory
COMPACT_PARTS = 8  # a partition with more live parts than this is merged into one
COMPACT_BYTES = 256 * 1024 * 1024  # ... while their files stay under this size
# New parts are written fast (lz4, ~3x faster than zstd); merged parts small (zstd).
FRESH_COMPRESSION = "lz4"
# On PostgreSQL ledger ids may commit out of order: a build leaves the newest seconds alone.
SETTLE_MS = 30_000
QUARANTINE_COLUMNS = {
    "subject": pl.String,
    "device": pl.String,
    "sensor": pl.String,
    "batch": pl.Int64,
    "record": pl.Int64,  # index of the record in its batch; null when the whole batch failed
    "reason": pl.String,
    "content": pl.String,  # the record as JSON, without identifying fields
}


@dataclass(frozen=True)
class Chunk:
    """A subject's consecutive batches of one sensor, built together."""

    study: str
    sensor: str
    subject: str
    zone: str
    batches: tuple[tuple[int, str, str, int, str], ...]  # (id, device, path, bytes, sha256)

    @property
    def lo(self) -> int:
        return self.batches[0][0]

    @property
    def hi(self) -> int:
        return self.batches[-1][0]

    @property
    def size(self) -> int:
        return sum(b[3] for b in self.batches)


@dataclass
class ChunkResult:
    """What building one chunk did."""

    sensor: str
    batches: int = 0
    records: int = 0  # records read from good batches
    rows: int = 0  # rows written to the table
    repeated: int = 0  # records already in the table or repeated within the chunk
    quarantined: int = 0  # records refused by the schema
    skipped: list[str] = field(default_factory=list)  # batches skipped whole, with the reason
    partitions: int = 0
    worker: str = ""  # host:pid of the process that built it


@dataclass
class SensorSummary:
    """One sensor's totals in a build."""

    batches: int = 0
    records: int = 0
    rows: int = 0
    repeated: int = 0
    quarantined: int = 0
    skipped: list[str] = field(default_factory=list)
    partitions: int = 0
    generic: bool = False
    rebuilt: str | None = None  # why the sensor's table was rebuilt from raw, if it was

    def add(self, result: ChunkResult) -> None:
        self.batches += result.batches
        self.records += result.records
        self.rows += result.rows
        self.repeated += result.repeated
        self.quarantined += result.quarantined
        self.skipped.extend(result.skipped)
        self.partitions += result.partitions


@dataclass
class BuildSummary:
    """What a build did, per sensor."""

    study: str
    sensors: dict[str, SensorSummary] = field(default_factory=dict)
    watermark: int = 0
    seconds: float = 0.0
    workers: set[str] = field(default_factory=set)  # host:pid of the processes that built

    @property
    def generic(self) -> list[str]:
        """Sensors without a schema of their own, built with the generic shape."""
        return sorted(name for name, s in self.sensors.items() if s.generic)

    @property
    def quarantined(self) -> int:
        return sum(s.quarantined for s in self.sensors.values())

    @property
    def skipped(self) -> list[str]:
        return [reason for s in self.sensors.values() for reason in s.skipped]

    def summary(self) -> str:
        """A few lines for a terminal or a pipeline's log."""
        if not any(s.batches or s.rebuilt for s in self.sensors.values()):
            return f"{self.study}: sensor tables up to date (ledger id {self.watermark})"
        lines = [f"{self.study}: sensor tables built to ledger id {self.watermark}"]
        lines[0] += f" in {self.seconds:.1f} s"
        for name, s in sorted(self.sensors.items()):
            if not s.batches and not s.rebuilt:
                continue
            line = (
                f"  {name}: {s.batches} batches, {s.records} records, {s.rows} rows written, "
                f"{s.repeated} repeated, {s.quarantined} quarantined"
            )
            if s.skipped:
                line += f", {len(s.skipped)} batches skipped"
            if s.generic:
                line += " (no schema: generic shape)"
            if s.rebuilt:
                line += f" (rebuilt: {s.rebuilt})"
            lines.append(line)
        for reason in self.skipped[:20]:
            lines.append(f"  skipped {reason}")
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more skipped batches")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "study": self.study,
            "watermark": self.watermark,
            "seconds": round(self.seconds, 3),
            "workers": sorted(self.workers),
            "sensors": {name: asdict(s) for name, s in self.sensors.items()},
        }


def build_tables(
    config: Config,
    study: str,
    *,
    sensor: str | None = None,
    rebuild: bool = False,
    progress: bool = False,
    processes: int | None = None,
    queue: bool = False,
    catalog: Catalog | None = None,
) -> BuildSummary:
    """Compact ``study``'s batches stored since the last build into its sensor tables.

    ``sensor`` builds one sensor only; ``rebuild`` builds from raw anew. ``processes`` (default:
    one per core) build subjects in parallel; ``queue`` hands the chunks to the scheduler's
    consumers instead (with Redis, on any host that shares the pool) and waits for them.

    Example: ``build_tables(load_config(), "demo", sensor="location").summary()``.
    """
    study = check_name("study", study)
    if sensor is not None:
        sensor = check_name("sensor", sensor)
    owned = catalog is None
    catalog = catalog or open_catalog(config)
    started = time.perf_counter()
    try:
        definition = get_study(catalog, study).definition
        default_zone, own_zones = study_zones(catalog, study)
        zones_key = json.dumps({"study": default_zone, "subjects": own_zones}, sort_keys=True)
        pool = DataPool.of(config)
        summary = BuildSummary(study)
        with catalog.lock(f"tables.{study}"):
            names = [sensor] if sensor else _sensors_of(catalog, study, definition)
            marks = _watermarks(catalog, study)
            for name in names:
                reason = "--rebuild" if rebuild else None
                if name in marks and marks[name][1] != zones_key:
                    reason = "a time zone changed"
                summary.sensors[name] = SensorSummary(generic=not sensor_schema(name).known)
                if reason and (name in marks or rebuild):
                    _reset(catalog, pool, study, name, zones_key)
                    marks[name] = (0, zones_key)
                    summary.sensors[name].rebuilt = reason
            top = _top(catalog, study)
            chunks = _chunks(
                catalog,
                study,
                {name: marks.get(name, (0, ""))[0] for name in names},
                top,
                default_zone,
                own_zones,
            )
            results = _run(
                config, pool, chunks, processes=processes, queue=queue, progress=progress
            )
            for result in results:
                summary.sensors[result.sensor].add(result)
                summary.workers.add(result.worker)
            sync_folders({pool.tables} if pool.tables.exists() else set())
            _advance(catalog, study, names, top, zones_key)
            summary.watermark = top
    finally:
        if owned:
            catalog.dispose()
    summary.seconds = time.perf_counter() - started
    return summary


def _sensors_of(catalog: Catalog, study: str, definition: dict) -> list[str]:
    with catalog.engine.connect() as conn:
        stored = conn.execute(
            select(uploads.c.sensor).where(uploads.c.study_id == study).distinct()
        ).scalars()
        return sorted(set(definition["sensors"]) | set(stored))


def _watermarks(catalog: Catalog, study: str) -> dict[str, tuple[int, str]]:
    with catalog.engine.connect() as conn:
        rows = conn.execute(
            select(table_builds.c.sensor, table_builds.c.watermark, table_builds.c.zones).where(
                table_builds.c.study_id == study
            )
        ).all()
    return {row.sensor: (row.watermark, row.zones) for row in rows}


def _reset(catalog: Catalog, pool: DataPool, study: str, sensor: str, zones_key: str) -> None:
    """Forget a sensor's table: the watermark first (so a kill here rebuilds), then its files."""
    _set_watermark(catalog, study, sensor, 0, zones_key)
    shutil.rmtree(sensor_folder(pool.tables, study, sensor), ignore_errors=True)
    shutil.rmtree(pool.tables / study / QUARANTINE / sensor, ignore_errors=True)


def _set_watermark(catalog: Catalog, study: str, sensor: str, mark: int, zones_key: str) -> None:
    with catalog.writing() as conn:
        conn.execute(
            table_builds.delete().where(
                (table_builds.c.study_id == study) & (table_builds.c.sensor == sensor)
            )
        )
        conn.execute(
            table_builds.insert().values(
                study_id=study, sensor=sensor, watermark=mark, zones=zones_key, built_at=now_ms()
            )
        )


def _advance(catalog: Catalog, study: str, names: list[str], top: int, zones_key: str) -> None:
    for name in names:
        _set_watermark(catalog, study, name, top, zones_key)


def _top(catalog: Catalog, study: str) -> int:
    """The newest ledger id of the study a build may take (settled ids on PostgreSQL)."""
    condition = uploads.c.study_id == study
    if not catalog.is_sqlite:
        condition = and_(condition, uploads.c.received_at <= now_ms() - SETTLE_MS)
    with catalog.engine.connect() as conn:
        return conn.execute(select(func.max(uploads.c.id)).where(condition)).scalar() or 0


def _chunks(
    catalog: Catalog,
    study: str,
    marks: dict[str, int],
    top: int,
    default_zone: str,
    own_zones: dict[str, str],
) -> list[Chunk]:
    if not marks:
        return []
    lowest = min(marks.values())
    query = (
        select(
            uploads.c.id,
            uploads.c.sensor,
            uploads.c.subject_id,
            uploads.c.device_id,
            uploads.c.path,
            uploads.c.bytes,
            uploads.c.sha256,
        )
        .where(
            (uploads.c.study_id == study)
            & (uploads.c.id > lowest)
            & (uploads.c.id <= top)
            & uploads.c.sensor.in_(list(marks))
        )
        .order_by(uploads.c.id)
    )
    grouped: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    with catalog.engine.connect() as conn:
        for row in conn.execute(query):
            if row.id > marks[row.sensor]:
                grouped[(row.sensor, row.subject_id)].append(
                    (row.id, row.device_id, row.path, row.bytes, row.sha256)
                )
    chunks = []
    for (name, subject), batches in sorted(grouped.items()):
        zone = own_zones.get(subject, default_zone)
        for part in _split(batches):
            chunks.append(Chunk(study, name, subject, zone, tuple(part)))
    return chunks


def _split(batches: list[tuple]) -> Iterable[list[tuple]]:
    """Consecutive runs of batches of at most CHUNK_BYTES (at least one batch each): the same
    batches always split the same way, so a build run again after a kill names its parts as
    the killed one did."""
    current: list[tuple] = []
    size = 0
    for batch in batches:
        if current and size + batch[3] > CHUNK_BYTES:
            yield current
            current, size = [], 0
        current.append(batch)
        size += batch[3]
    if current:
        yield current


def _run(
    config: Config,
    pool: DataPool,
    chunks: list[Chunk],
    *,
    processes: int | None,
    queue: bool,
    progress: bool,
) -> list[ChunkResult]:
    if not chunks:
        return []
    from tqdm import tqdm

    bar = tqdm(
        total=sum(c.size for c in chunks),
        unit="B",
        unit_scale=True,
        desc="tables",
        disable=not progress,
    )
    results = []
    try:
        if queue:
            results = _run_on_queue(config, chunks, bar)
        else:
            workers = min(processes or os.cpu_count() or 1, len(chunks))
            root = str(pool.root)
            if workers <= 1:
                for chunk in chunks:
                    results.append(build_chunk(root, chunk))
                    bar.update(chunk.size)
            else:
                # spawn: forking a process that holds polars' thread pool can deadlock
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(workers, mp_context=context) as executor:
                    # largest first, so one big subject does not run alone at the end
                    ordered = sorted(chunks, key=lambda c: -c.size)
                    futures = [executor.submit(build_chunk, root, c) for c in ordered]
                    for chunk, future in zip(ordered, futures, strict=True):
                        results.append(future.result())
                        bar.update(chunk.size)
    finally:
        bar.close()
    return results


def _run_on_queue(config: Config, chunks: list[Chunk], bar) -> list[ChunkResult]:
    queue = scheduler.open_queue(config)
    handles = [(c, queue.enqueue("build_table_chunk", asdict(c))) for c in chunks]
    results = []
    for chunk, handle in handles:
        try:
            value = handle.get(blocking=True, timeout=3600)
        except Exception as exc:  # huey's TaskException carries the worker's error
            raise TablesError(
                f"building {chunk.sensor} of {chunk.subject} failed on a consumer: {exc}"
            ) from None
        if value is None:
            raise TablesError(
                f"no consumer built {chunk.sensor} of {chunk.subject} within an hour: "
                "is `workbench scheduler` running on a host that shares the pool?"
            )
        results.append(ChunkResult(**value))
        bar.update(chunk.size)
    return results


@scheduler.task("build_table_chunk")
def build_chunk_task(home: str, chunk: dict) -> dict:
    """The scheduler task of one chunk: build it in this consumer's pool."""
    from workbench.config import load_config

    config = load_config(Path(home))
    batches = tuple(tuple(b) for b in chunk.pop("batches"))
    result = build_chunk(str(DataPool.of(config).root), Chunk(**chunk, batches=batches))
    return asdict(result)


def build_chunk(root: str, chunk: Chunk) -> ChunkResult:
    """Turn one chunk's batches into parts of the sensor's table (and of its quarantine)."""
    schema = sensor_schema(chunk.sensor)
    columns = schema.columns()
    content = [c for c in columns if c not in ("subject", "local_time", "day", BATCH_COLUMN)]
    result = ChunkResult(chunk.sensor, worker=f"{os.uname().nodename}:{os.getpid()}")
    refused: list[dict] = []
    types = {
        name: columns[name]
        for name in columns
        if name not in ("subject", "time", "local_time", "day", "device", BATCH_COLUMN)
    }
    values: dict[str, list] = {name: [] for name in ["timestamp", *types]}
    devices: list[str] = []
    batches: list[int] = []
    for batch_id, device, path, size, sha in chunk.batches:
        body, problem = _read(root, path, size, sha)
        if body is not None:
            try:
                decoded = decode_batch(chunk.sensor, body)
            except ValueError as exc:  # msgspec's and orjson's decode errors are ValueErrors
                problem = f"cannot be parsed: {str(exc)[:200]}"
        if problem is not None:
            result.skipped.append(f"batch {batch_id} ({path}): {problem}")
            refused.append(_refusal(chunk, device, batch_id, None, f"batch {problem}", None))
            continue
        result.batches += 1
        for index, reason, record in decoded.refused:
            refused.append(_refusal(chunk, device, batch_id, index, reason, record))
        result.quarantined += len(decoded.refused)
        for name, column in values.items():
            column.extend(decoded.columns[name])
        devices.extend([device] * decoded.count)
        batches.extend([batch_id] * decoded.count)
        result.records += decoded.count + len(decoded.refused)
    tables = Path(root) / "tables"
    if devices:
        frame = pl.DataFrame(
            {**values, "device": devices, "batch": batches},
            schema={"timestamp": pl.Int64, **types, "device": pl.String, "batch": pl.Int64},
        )
        rows = _typed(frame, chunk, columns)
        unique = _unique(rows, content)
        result.repeated += rows.height - unique.height
        for (day,), part in unique.partition_by("day", as_dict=True, maintain_order=True).items():
            folder = partition_folder(tables, chunk.study, chunk.sensor, day, chunk.subject)
            written = _write_partition(folder, part, chunk, content)
            result.repeated += part.height - written
            result.rows += written
            result.partitions += 1
    if refused:
        folder = quarantine_folder(tables, chunk.study, chunk.sensor, chunk.subject)
        frame = pl.DataFrame(refused, schema=QUARANTINE_COLUMNS)
        make_folders(folder)
        write_parquet_atomically(frame, folder / part_name(chunk.lo, chunk.hi), durable=False)
        _delete_superseded(folder)
    return result


def _unique(rows: pl.DataFrame, content: list[str]) -> pl.DataFrame:
    """The rows without repeats (the first of each kept, in batch order). Rows with distinct
    times cannot repeat one another: the common case costs one pass over the times."""
    if rows["time"].n_unique() == rows.height:
        return rows
    return rows.unique(subset=content, keep="first", maintain_order=True)


def _read(root: str, path: str, size: int, sha: str) -> tuple[bytes | None, str | None]:
    try:
        with open(os.path.join(root, path), "rb") as handle:
            body = handle.read()
    except FileNotFoundError:
        return None, "missing from the pool"
    except OSError as exc:
        return None, f"unreadable: {exc.strerror}"
    if len(body) != size or hashlib.sha256(body).hexdigest() != sha:
        return None, "fails its hash: the file no longer matches the SHA-256 recorded at upload"
    return body, None


def _refusal(chunk: Chunk, device, batch, index, reason, record) -> dict:
    return {
        "subject": chunk.subject,
        "device": device,
        "sensor": chunk.sensor,
        "batch": batch,
        "record": index,
        "reason": reason,
        "content": record,
    }


def _typed(frame: pl.DataFrame, chunk: Chunk, columns: dict) -> pl.DataFrame:
    time_ = pl.from_epoch(pl.col("timestamp"), time_unit="ms").dt.replace_time_zone("UTC")
    local = time_.dt.convert_time_zone(chunk.zone).dt.replace_time_zone(None)
    return (
        frame.with_columns(subject=pl.lit(chunk.subject), time=time_, local_time=local)
        .with_columns(day=pl.col("local_time").dt.date())
        .select([pl.col(name).cast(kind) for name, kind in columns.items()])
    )


def _write_partition(folder: Path, rows: pl.DataFrame, chunk: Chunk, content: list[str]) -> int:
    """Write the rows of one partition that it does not hold yet; return how many."""
    live, _superseded = parts_of(folder)
    others = [path for lo, hi, path in live if not (lo >= chunk.lo and hi <= chunk.hi)]
    if others:
        low, high = rows["time"].min(), rows["time"].max()
        present = (
            pl.scan_parquet(others, hive_partitioning=False)
            .filter(pl.col("time").is_between(low, high))
            .select(content)
            .collect()
        )
        if present.height:
            rows = rows.join(present, on=content, how="anti", nulls_equal=True)
    if rows.height:
        make_folders(folder)
        write_parquet_atomically(
            rows.sort("device", "time"),
            folder / part_name(chunk.lo, chunk.hi),
            durable=False,
            compression=FRESH_COMPRESSION,
        )
    _compact(folder)
    return rows.height


def _compact(folder: Path) -> None:
    """Merge a partition's parts into one when it has many (and delete superseded ones)."""
    live, _superseded = parts_of(folder)
    if len(live) > COMPACT_PARTS and sum(p.stat().st_size for *_, p in live) < COMPACT_BYTES:
        merged = pl.read_parquet([p for *_, p in live], hive_partitioning=False)
        lo, hi = min(r[0] for r in live), max(r[1] for r in live)
        write_parquet_atomically(
            merged.sort("device", "time"), folder / part_name(lo, hi), durable=False
        )
    _delete_superseded(folder)


def _delete_superseded(folder: Path) -> None:
    for path in parts_of(folder)[1]:
        path.unlink(missing_ok=True)


def quarantine_table(config: Config, study: str, sensor: str | None = None) -> pl.DataFrame:
    """The refused records (and skipped batches) of a study's sensor tables.

    Example: ``quarantine_table(load_config(), "demo", "location").group_by("reason").len()``.
    """
    study = check_name("study", study)
    base = DataPool.of(config).tables / study / "_quarantine"
    folders = [base / check_name("sensor", sensor)] if sensor else sorted(base.glob("*"))
    files = [
        path
        for folder in folders
        for subject in sorted(folder.glob("subject=*"))
        for path in _live(subject)
    ]
    if not files:
        return pl.DataFrame(schema=QUARANTINE_COLUMNS)
    return pl.read_parquet(files, hive_partitioning=False)


def _live(folder: Path) -> list[Path]:
    return [path for *_, path in parts_of(folder)[0]]
