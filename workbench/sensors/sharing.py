"""Share the sensor tables: a folder with one file per sensor, subject and local day, a data
dictionary made from the sensor schemas and a manifest of every file's SHA-256.

The folder an operator names is checked before anything is written: it must be new, empty or
a previous export (a ``.workbench-export`` marker), never a file, never inside the pool or
holding it, and the sub-folders the export writes to must not be symbolic links. Each file is
written atomically; the manifest is written last, after the files are on disk, and the old one
is removed first, so a folder without ``manifest.json`` is an export that did not finish. Only
files the export itself names (``<sensor>/<subject>/<sensor>_<subject>_<day>.csv|parquet`` in
a folder marked as an export) are ever removed, and only inside the folder.

Example::

    done = export_tables(config, "demo", Path("/srv/share/demo"), fmt="csv",
                         subjects=["demo_00001"], start="2026-03-02", end="2026-03-08")
    print(done.summary())
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import io
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import polars as pl
from sqlalchemy import select

from workbench.catalog import open_catalog
from workbench.catalog import subjects as subjects_table
from workbench.config import Config
from workbench.errors import NoSensorTable, OutputRefused, UnknownSubject
from workbench.identifiers import check_name, is_identifier
from workbench.pool import DataPool, make_folders, sync_folders, write_file_atomically
from workbench.sensors.parts import day_of_folder, live_parts, sensor_folder
from workbench.sensors.schemas import sensor_schema
from workbench.studies import get_study
from workbench.times import format_ms, now_ms
from workbench.writers import csv_bytes

FORMATS = ("parquet", "csv")
MARKER = ".workbench-export"
MANIFEST = "manifest.json"
DICTIONARY = "data_dictionary.csv"
EXPORT_FORMAT = "workbench-tables-export"
UTC_TIME = "%Y-%m-%dT%H:%M:%S%.3fZ"  # ISO 8601 with milliseconds: time (UTC)
LOCAL_TIME = "%Y-%m-%dT%H:%M:%S%.3f"  # ISO 8601 without zone: local_time
_DAY_FILE = re.compile(r"^(?P<stem>.+)_(?P<day>\d{4}-\d{2}-\d{2})\.(?:csv|parquet)$")
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.\d+\.\d+\.tmp$")  # left by a killed atomic write


@dataclass(frozen=True)
class _Partition:
    sensor: str
    subject: str
    day: dt.date
    parts: list[Path]

    def relative(self, fmt: str) -> str:
        return f"{self.sensor}/{self.subject}/{self.sensor}_{self.subject}_{self.day}.{fmt}"


@dataclass
class TablesExport:
    """What an export wrote: its folder, and per file its path, rows, bytes and SHA-256."""

    study: str
    folder: Path
    format: str
    files: list[dict] = field(default_factory=list)
    sensors: list[str] = field(default_factory=list)
    removed: int = 0
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(f["rows"] for f in self.files)

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files)

    def summary(self) -> str:
        """One paragraph for a terminal or a notebook."""
        subjects = len({f["subject"] for f in self.files})
        lines = [
            f"{self.study}: exported {len(self.files)} {self.format} files, {self.rows:,} rows "
            f"({self.bytes / 1e6:.1f} MB) of {len(self.sensors)} sensors and {subjects} subjects "
            f"to {self.folder} in {self.seconds:.1f} s",
            f"  data dictionary: {self.folder / DICTIONARY}",
            f"  manifest (SHA-256 of every file): {self.folder / MANIFEST}",
        ]
        if self.removed:
            lines.append(f"  {self.removed} files of the previous export removed")
        return "\n".join(lines)


def export_tables(
    config: Config,
    study: str,
    out: Path | str,
    *,
    fmt: str = "parquet",
    subjects: list[str] | None = None,
    sensors: list[str] | None = None,
    start: dt.date | str | None = None,
    end: dt.date | str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> TablesExport:
    """Write ``study``'s sensor tables to the folder ``out``, one file per sensor, subject and
    local day (``start`` to ``end``, both included, in the study's or subject's zone), with
    ``data_dictionary.csv`` and ``manifest.json``; return what was written.

    Refuses (:class:`OutputRefused`, nothing written) a folder that is not empty and holds no
    previous export unless ``overwrite`` (files of its own are then left alone).

    Example: ``export_tables(config, "demo", "share/demo", fmt="csv", start="2026-03-02")``.
    """
    began = now_ms()
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    study = check_name("study", study)
    first, last = _date(start, "start"), _date(end, "end")
    if first and last and first > last:
        raise ValueError(f"start {first} is after end {last}")
    tables = DataPool.of(config).tables
    chosen, wanted, zone = _selection(config, study, tables, sensors, subjects)
    folder = _checked_folder(config, out, overwrite=overwrite)
    partitions = [
        p for sensor in chosen for p in _partitions(tables, study, sensor, wanted, first, last)
    ]
    ours = _is_export(folder)
    _check_targets(folder, partitions, fmt)

    # Writing starts here: the marker, then the data, the dictionary, and the manifest last.
    make_folders(folder)
    write_file_atomically(
        folder / MARKER,
        orjson.dumps({"format": EXPORT_FORMAT, "study": study}) + b"\n",
        durable=False,
    )
    previous = folder / MANIFEST
    if ours and previous.is_file() and not previous.is_symlink():
        previous.unlink()  # until the new one is written, the folder reads as unfinished
    result = TablesExport(study=study, folder=folder, format=fmt)
    from tqdm import tqdm

    written: set[str] = set()
    exported: list[str] = []
    for partition in tqdm(partitions, unit="file", desc="export", disable=not progress):
        frame = _read(partition)
        data = _encode(frame, fmt)
        relative = partition.relative(fmt)
        write_file_atomically(folder / relative, data, durable=False)
        written.add(relative)
        if partition.sensor not in exported:
            exported.append(partition.sensor)
        result.files.append(
            {
                **_digest(relative, data, frame.height),
                "sensor": partition.sensor,
                "subject": partition.subject,
                "day": partition.day.isoformat(),
            }
        )
    result.sensors = exported
    dictionary = pl.DataFrame(
        [row for sensor in exported for row in sensor_schema(sensor).dictionary()],
        schema={c: pl.String for c in ("sensor", "column", "type", "unit", "description")},
    )
    dictionary_bytes = csv_bytes(dictionary)
    write_file_atomically(folder / DICTIONARY, dictionary_bytes, durable=False)
    if ours:
        result.removed = _remove_stale(folder, written)
    sync_folders({folder})  # every file on disk before the manifest names it
    result.seconds = (now_ms() - began) / 1000
    manifest = {
        "format": EXPORT_FORMAT,
        "study": study,
        "created": format_ms(now_ms()),
        "workbench_version": workbench_version(),
        "file_format": fmt,
        "timezone": zone,
        "sensors": exported,
        "filters": {
            "subjects": wanted,
            "sensors": chosen if sensors else None,
            "start": first.isoformat() if first else None,
            "end": last.isoformat() if last else None,
        },
        "dictionary": _digest(DICTIONARY, dictionary_bytes, dictionary.height),
        "files": result.files,
    }
    write_file_atomically(
        folder / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n"
    )
    return result


def workbench_version() -> str:
    """The installed workbench's version (``unknown`` when it runs from a source tree only)."""
    try:
        return importlib.metadata.version("workbench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------- what to export


def _date(value: dt.date | str | None, what: str) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        raise ValueError(f"{what} takes a date (whole local days are exported), not a time")
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a date such as 2026-03-02") from None


def _selection(
    config: Config,
    study: str,
    tables: Path,
    sensors: list[str] | None,
    subjects: list[str] | None,
) -> tuple[list[str], list[str] | None, str]:
    """The sensors to export, the subjects (all: None) and the study's time zone."""
    catalog = open_catalog(config)
    try:
        definition = get_study(catalog, study).definition
        with catalog.engine.connect() as conn:
            enrolled = set(
                conn.execute(
                    select(subjects_table.c.subject_id).where(subjects_table.c.study_id == study)
                ).scalars()
            )
    finally:
        catalog.dispose()
    built = _folders(tables / study)
    if sensors:
        chosen = []
        for name in sensors:
            name = check_name("sensor", name)
            if name not in definition["sensors"] and name not in built:
                raise NoSensorTable(
                    f"study {study!r} has no sensor {name!r}: it records "
                    f"{', '.join(sorted(definition['sensors']))}"
                )
            if name not in chosen:
                chosen.append(name)
    else:
        chosen = sorted(built)
    wanted = None
    if subjects:
        wanted = []
        for name in subjects:
            name = check_name("subject", name)
            if name not in enrolled:
                raise UnknownSubject(f"no subject {name!r} is enrolled in study {study!r}")
            if name not in wanted:
                wanted.append(name)
    return chosen, wanted, definition.get("timezone") or "UTC"


def _folders(folder: Path) -> set[str]:
    """The sensor tables of a study folder (not the quarantine)."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return set()
    return {e.name for e in entries if e.is_dir() and is_identifier("sensor", e.name)}


def _partitions(
    tables: Path,
    study: str,
    sensor: str,
    wanted: list[str] | None,
    first: dt.date | None,
    last: dt.date | None,
) -> list[_Partition]:
    """The subject-days of a sensor's table, in order: the same live parts as ``sensor_data``
    reads for those days."""
    base = sensor_folder(tables, study, sensor)
    try:
        days = sorted(e.name for e in os.scandir(base) if e.is_dir())
    except FileNotFoundError:
        return []
    allowed = set(wanted) if wanted is not None else None
    found = []
    for name in days:
        day = day_of_folder(name)
        if day is None or (first and day < first) or (last and day > last):
            continue
        for entry in sorted(os.scandir(base / name), key=lambda e: e.name):
            subject = entry.name.removeprefix("subject=")
            if entry.name == subject or not is_identifier("subject", subject):
                continue
            if allowed is not None and subject not in allowed:
                continue
            parts = live_parts(Path(entry.path))
            if parts:
                found.append(_Partition(sensor, subject, day, parts))
    found.sort(key=lambda p: (p.sensor, p.subject, p.day))
    return found


# ---------------------------------------------------------------------------- the output folder


def _checked_folder(config: Config, out: Path | str, *, overwrite: bool) -> Path:
    """``out`` resolved, if the export may write to it; else :class:`OutputRefused`."""
    if out is None or str(out).strip() == "":
        raise OutputRefused("name the folder to export to (--out DIR)")
    folder = Path(out).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise OutputRefused(f"--out {out} is a file, not a folder: name a new or empty folder")
    pool = Path(config.pool).resolve()
    if folder == pool or pool in folder.parents:
        raise OutputRefused(f"--out {out} is inside the data pool ({pool}): export outside it")
    for guarded, what in ((pool, "the data pool"), (Path(config.home).resolve(), "the home")):
        if folder == guarded or folder in guarded.parents:
            raise OutputRefused(
                f"--out {out} holds {what} ({guarded}): export to a folder of its own"
            )
    if folder.is_dir() and not overwrite and not _is_export(folder) and any(os.scandir(folder)):
        raise OutputRefused(
            f"--out {out} is not empty and holds no workbench export: name a new or empty "
            "folder, or add --overwrite to write into it (its other files are left alone)"
        )
    return folder


def _is_export(folder: Path) -> bool:
    """True if ``folder`` holds a previous export's marker."""
    marker = folder / MARKER
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return False
        return orjson.loads(marker.read_bytes()).get("format") == EXPORT_FORMAT
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return False


def _check_targets(folder: Path, partitions: list[_Partition], fmt: str) -> None:
    """Refuse before writing if a folder the export writes into, or a file it replaces, is
    not what it seems: a link (out of ``folder``) or a folder where a file goes."""
    seen: set[Path] = set()
    names = [Path(p.relative(fmt)) for p in partitions]
    names += [Path(MARKER), Path(MANIFEST), Path(DICTIONARY)]
    for relative in names:
        for depth in range(1, len(relative.parts)):
            sub = folder.joinpath(*relative.parts[:depth])
            if sub in seen:
                continue
            seen.add(sub)
            try:
                info = os.lstat(sub)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise OutputRefused(
                    f"{sub} is a link or a file where the export needs a folder of its own: "
                    "remove it or export elsewhere"
                )
        target = folder / relative
        if target.is_dir() and not target.is_symlink():
            raise OutputRefused(f"{target} is a folder where the export writes a file")


def _remove_stale(folder: Path, written: set[str]) -> int:
    """Remove the day files of a previous export into ``folder`` that this one did not write
    (and temporary files of a killed one): only files named as the export names them, in real
    sub-folders of ``folder``. Return how many."""
    removed = 0
    for sensor in os.scandir(folder):
        if not sensor.is_dir(follow_symlinks=False) or not is_identifier("sensor", sensor.name):
            continue
        for subject in os.scandir(sensor.path):
            if not subject.is_dir(follow_symlinks=False):
                continue
            prefix = f"{sensor.name}_{subject.name}"
            for entry in os.scandir(subject.path):
                name = entry.name
                temporary = _TEMPORARY.match(name)
                if temporary:
                    name = temporary["name"]
                match = _DAY_FILE.match(name)
                if not match or match["stem"] != prefix or not entry.is_file(follow_symlinks=False):
                    continue
                if temporary or f"{sensor.name}/{subject.name}/{entry.name}" not in written:
                    os.unlink(entry.path)
                    removed += 0 if temporary else 1
            _remove_if_empty(Path(subject.path))
        _remove_if_empty(Path(sensor.path))
    return removed


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: files of this export, or of someone else
        folder.rmdir()


# ---------------------------------------------------------------------------- files


def _read(partition: _Partition) -> pl.DataFrame:
    columns = sensor_schema(partition.sensor).columns()
    return (
        pl.scan_parquet(partition.parts, schema=columns, hive_partitioning=False)
        .sort("time", "device", maintain_order=True)
        .collect()
    )


def _encode(frame: pl.DataFrame, fmt: str) -> bytes:
    """A day's rows as Parquet, or as CSV with times in ISO 8601 and formula-like text
    neutralised."""
    if fmt == "parquet":
        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        return buffer.getvalue()
    return csv_bytes(
        frame.with_columns(
            pl.col("time").dt.strftime(UTC_TIME),
            pl.col("local_time").dt.strftime(LOCAL_TIME),
        )
    )


def _digest(relative: str, data: bytes, rows: int) -> dict:
    return {
        "path": relative,
        "rows": rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
