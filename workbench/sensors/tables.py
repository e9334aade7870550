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

import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
from sqlalchemy import and_, func, select

from workbench import scheduler
from workbench.catalog import Catalog, open_catalog, table_builds, uploads
from workbench.config import Config
from workbench.errors import TablesError
from workbench.identifiers import check_name
from workbench.pool import DataPool, sync_folders
from workbench.sensors.chunks import (
    CHUNK_BYTES,
    QUARANTINE_COLUMNS,
    Chunk,
    ChunkResult,
    build_chunk,
)
from workbench.sensors.parts import (
    QUARANTINE,
    parts_of,
    sensor_folder,
)
from workbench.sensors.schemas import sensor_schema
from workbench.studies import get_study
from workbench.subjects import study_zones
from workbench.times import now_ms
from workbench.workers import worker_pool

INLINE_BYTES = 2 * CHUNK_BYTES  # less raw JSON than this is built without worker processes
# On PostgreSQL ledger ids may commit out of order: a build leaves the newest seconds alone.
SETTLE_MS = 30_000


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
            # A process costs about a second to start (imports): small builds run here.
            if workers <= 1 or sum(c.size for c in chunks) < INLINE_BYTES:
                for chunk in chunks:
                    results.append(build_chunk(root, chunk))
                    bar.update(chunk.size)
            else:
                with worker_pool(workers) as executor:
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
