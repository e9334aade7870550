"""The decoded questionnaire store: per-table, per-day Parquet files (with a CSV twin) under
``questionnaires/<source>/decoded/<table>/`` in the pool, written by the export and by sync,
read by reports and notebooks.

Example::

    phq9 = combine_table(config, "mindtrails", "PHQ9")   # every day of one table, by id
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from workbench.config import Config
from workbench.errors import InvalidName, WorkbenchError
from workbench.pool import DataPool, fsync_dir, make_folders, write_file_atomically
from workbench.writers import csv_bytes, write_parquet_atomically

TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # as workbench.toml requires
UNDATED = "undated"


def check_name(kind: str, value: object) -> str:
    """``value`` if it is a valid ``kind`` ("source" or "table") name, else :class:`InvalidName`.

    Example: ``check_name("table", "PHQ9")``; ``check_name("table", "../raw")`` raises.
    """
    pattern = SOURCE_NAME if kind == "source" else TABLE_NAME
    if not isinstance(value, str) or not pattern.fullmatch(value):
        shown = value if isinstance(value, str) else type(value).__name__
        raise InvalidName(
            f"invalid {kind} name {str(shown)[:80]!r}: use letters, digits, '_', '-'"
            + (" and '.'" if kind == "table" else "")
            + f", starting with a letter or digit (pattern {pattern.pattern})"
        )
    return value


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, checked to resolve to a direct child of ``folder``."""
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise InvalidName(f"{name!r} does not resolve inside {folder.name}/")
    return path


def source_folder(config: Config, source: str) -> Path:
    """Where a source's raw snapshots and decoded tables live (the name checked first)."""
    return _inside(DataPool.of(config).questionnaires, check_name("source", source))


def table_folder(config: Config, source: str, table: str, kind: str) -> Path:
    """A table's ``raw`` or ``decoded`` folder, its names checked and resolved inside the
    source's folder before any file in it is read, written or deleted.

    Example: ``table_folder(config, "mindtrails", "PHQ9", "decoded")``.
    """
    if kind not in ("raw", "decoded"):
        raise ValueError(f"kind must be raw or decoded, not {kind!r}")
    return _inside(source_folder(config, source) / kind, check_name("table", table))


def day_column(frame: pl.DataFrame) -> pl.Expr:
    """The day a decoded row is filed under: its ``date`` (YYYY-MM-DD), else ``undated``."""
    if "date" not in frame.columns:
        return pl.lit(UNDATED)
    text = pl.col("date").cast(pl.String)
    return (
        pl.when(text.str.contains(r"^\d{4}-\d{2}-\d{2}"))
        .then(text.str.slice(0, 10))
        .otherwise(pl.lit(UNDATED))
    )


def merge_decoded(folder: Path, table: str, frame: pl.DataFrame) -> list[str]:
    """Merge decoded rows into ``folder/<table>_<date>.parquet`` (and ``.csv``), one file per
    day, keeping one row per id (the latest); return the days written."""
    if frame.is_empty():
        return []
    make_folders(folder)
    days = sorted(frame["_date"].unique().to_list())
    for day in days:
        part = frame.filter(pl.col("_date") == day).drop("_date")
        target = folder / f"{table}_{day}.parquet"
        if target.exists():
            part = pl.concat([pl.read_parquet(target), part], how="diagonal_relaxed")
        part = part.unique(subset="id", keep="last", maintain_order=True).sort("id")
        write_parquet_atomically(part, target)
        write_file_atomically(folder / f"{table}_{day}.csv", _csv(part))
    fsync_dir(folder)
    return days


def _csv(frame: pl.DataFrame) -> bytes:
    return csv_bytes(frame)  # nested values were turned into JSON text by decode_rows


def decoded_ids(config: Config, source: str, table: str) -> set[int]:
    """Row ids present in a table's decoded files."""
    files = sorted(table_folder(config, source, table, "decoded").glob(f"{table}_*.parquet"))
    ids: set[int] = set()
    for path in files:
        if _day_of(path, table) is not None:
            ids.update(pl.read_parquet(path, columns=["id"])["id"].to_list())
    return ids


def _day_of(path: Path, table: str) -> str | None:
    """The day of ``<table>_<day>.parquet`` (exact table name, never a prefix)."""
    match = re.fullmatch(
        re.escape(table) + r"_(\d{4}-\d{2}-\d{2}|" + UNDATED + r")\.parquet", path.name
    )
    return match.group(1) if match else None


def combine_table(config: Config, source: str, table: str) -> pl.DataFrame:
    """All days of one decoded table in one frame, by id (the exact table, never a prefix).

    Example: ``combine_table(config, "mindtrails", "PHQ9").height``.
    """
    config.source(check_name("source", source))
    folder = table_folder(config, source, table, "decoded")
    files = sorted(p for p in folder.glob(f"{table}_*.parquet") if _day_of(p, table) is not None)
    if not files:
        raise WorkbenchError(
            f"no decoded table {table!r} for source {source!r}; run `workbench export` first"
        )
    frames = [pl.read_parquet(p) for p in files]
    return pl.concat(frames, how="diagonal_relaxed").sort("id")
