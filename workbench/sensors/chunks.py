"""Build one chunk of a sensor table: a subject's consecutive batches of one sensor, read,
checked against their hashes, decoded against the sensor's schema and written as Parquet parts
(one per local day) and a quarantine part.

This is what the build's worker processes and the scheduler's consumers run, so it imports
only what that needs (polars, msgspec, the schemas and the pool's writers), not the catalog.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from workbench.pool import make_folders
from workbench.sensors.parts import part_name, partition_folder, parts_of, quarantine_folder
from workbench.sensors.schemas import BATCH_COLUMN, decode_batch, sensor_schema
from workbench.writers import write_parquet_atomically

CHUNK_BYTES = 64 * 1024 * 1024  # raw JSON per chunk: bounds a worker's memory
COMPACT_PARTS = 8  # a partition with more live parts than this is merged into one
COMPACT_BYTES = 256 * 1024 * 1024  # ... while their files stay under this size
# New parts are written fast (lz4, ~3x faster than zstd); merged parts small (zstd).
FRESH_COMPRESSION = "lz4"
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
    """The rows without repeats (the first of each kept, in batch order). Rows whose time
    occurs once cannot repeat another: only the others are compared whole."""
    shared = rows["time"].is_duplicated()
    if not shared.any():
        return rows
    candidates = rows.filter(shared)
    kept = candidates.filter(pl.struct(content).is_first_distinct())
    return pl.concat([rows.filter(~shared), kept])


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
