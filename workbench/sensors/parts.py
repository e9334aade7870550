"""How the sensor tables are laid out on disk, and which of their files are live.

``tables/<study>/<sensor>/day=<YYYY-MM-DD>/subject=<id>/part-<lo>-<hi>.parquet`` holds the
rows one build took from the ledger ids ``lo`` to ``hi`` of that subject. Parts of different
builds never share a row (a build drops rows already present) and their ranges are disjoint.
A part whose range lies inside another's is superseded: it was written by a build that was
killed and run again over a longer range, or merged into a bigger part by compaction. Readers
skip superseded parts and builds delete them, so a kill at any point leaves a readable table
that holds every row once.

Refused records of a sensor go to ``tables/<study>/_quarantine/<sensor>/subject=<id>/``,
with the same naming.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

PART = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
QUARANTINE = "_quarantine"


def part_name(lo: int, hi: int) -> str:
    """The file name of the part holding ledger ids ``lo`` to ``hi``."""
    return f"part-{lo:012d}-{hi:012d}.parquet"


def part_range(name: str) -> tuple[int, int] | None:
    """The ledger range of a part's file name, or None for any other file."""
    match = PART.match(name)
    return (int(match[1]), int(match[2])) if match else None


def sensor_folder(tables: Path, study: str, sensor: str) -> Path:
    """The folder of one sensor's table in a study."""
    return tables / study / sensor


def partition_folder(tables: Path, study: str, sensor: str, day: dt.date, subject: str) -> Path:
    """The folder of one subject's local day in a sensor's table."""
    return sensor_folder(tables, study, sensor) / f"day={day.isoformat()}" / f"subject={subject}"


def quarantine_folder(tables: Path, study: str, sensor: str, subject: str) -> Path:
    """The folder of one subject's refused records of a sensor."""
    return tables / study / QUARANTINE / sensor / f"subject={subject}"


def parts_of(folder: Path) -> tuple[list[tuple[int, int, Path]], list[Path]]:
    """The live parts of a partition folder as (lo, hi, path), oldest first, and the
    superseded ones."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return [], []
    ranges = sorted((r[0], -r[1], name) for name in names if (r := part_range(name)) is not None)
    live: list[tuple[int, int, Path]] = []
    superseded: list[Path] = []
    for lo, neg_hi, name in ranges:  # by lo, the widest first: a covered part follows its cover
        hi = -neg_hi
        if live and lo >= live[-1][0] and hi <= live[-1][1]:
            superseded.append(folder / name)
        else:
            live.append((lo, hi, folder / name))
    return live, superseded


def live_parts(folder: Path) -> list[Path]:
    """The files of a partition a reader should read."""
    return [path for _lo, _hi, path in parts_of(folder)[0]]


def day_of_folder(name: str) -> dt.date | None:
    """The local day of a ``day=YYYY-MM-DD`` folder name."""
    if not name.startswith("day="):
        return None
    try:
        return dt.date.fromisoformat(name[4:])
    except ValueError:
        return None
