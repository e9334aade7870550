"""What a feature family is: the sensors it reads, its parameters, its output columns, and a
``compute`` that turns sensor tables into one row per subject and local day.

Input contract: ``frames`` maps a sensor name to its table (a polars ``DataFrame`` or
``LazyFrame``) with ``subject``, ``device``, ``time`` (UTC), ``local_time`` (naive, the
subject's zone), ``day`` (the local day), the sensor's fields and ``batch``; rows are
de-duplicated. A family never reads files: it works on the frames it is given.

Output contract: one row per (subject, day) present in the family's input, with ``subject``,
``day`` and the family's features. A feature that cannot be computed for a subject-day is null,
never zero, and the reason is counted in :attr:`FamilyResult.reasons`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl

Frames = Mapping[str, pl.DataFrame | pl.LazyFrame]
KEYS = ("subject", "day")
MS_PER_MINUTE = 60_000


@dataclass(frozen=True)
class Feature:
    """One output column of a family, for the data dictionary and the docs."""

    name: str
    dtype: type[pl.DataType]
    unit: str
    description: str


@dataclass
class FamilyResult:
    """A family's day table and how many subject-days got a null feature, by reason."""

    table: pl.DataFrame
    reasons: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class FeatureFamily:
    """A registered family: its sensors, parameters (a frozen dataclass) and features."""

    name: str
    sensors: tuple[str, ...]
    params: type
    features: tuple[Feature, ...]
    compute_table: Callable[[Frames, Any], FamilyResult]
    description: str

    @property
    def columns(self) -> list[str]:
        """The family's feature columns, in order."""
        return [f.name for f in self.features]

    def compute(self, frames: Frames, params: Any = None) -> FamilyResult:
        """The family's day table from ``frames`` (default parameters when ``params`` is None)."""
        params = self.params() if params is None else params
        if not isinstance(params, self.params):
            raise TypeError(f"{self.name}: parameters must be {self.params.__name__}")
        result = self.compute_table(frames, params)
        result.table = conform(result.table, self.features)
        return result

    def dictionary(self) -> list[dict]:
        """Rows of the data dictionary: family, column, unit, description."""
        return [
            {"family": self.name, "column": f.name, "unit": f.unit, "description": f.description}
            for f in self.features
        ]


def sensor_frame(frames: Frames, sensor: str, columns: list[str]) -> pl.DataFrame | None:
    """The columns of one sensor's table, collected; None when the sensor is absent or empty."""
    frame = frames.get(sensor)
    if frame is None:
        return None
    frame = frame.lazy().select(*columns).collect()
    return frame if frame.height else None


def conform(table: pl.DataFrame, features: tuple[Feature, ...]) -> pl.DataFrame:
    """``table`` with exactly subject, day and the features, typed and sorted."""
    columns = [pl.col("subject").cast(pl.String), pl.col("day").cast(pl.Date)]
    for f in features:
        if f.name in table.columns:
            columns.append(pl.col(f.name).cast(f.dtype))
        else:
            columns.append(pl.lit(None, dtype=f.dtype).alias(f.name))
    return table.select(columns).sort(KEYS)


def empty_table(features: tuple[Feature, ...]) -> pl.DataFrame:
    """A day table without rows."""
    schema = {"subject": pl.String, "day": pl.Date} | {f.name: f.dtype for f in features}
    return pl.DataFrame(schema=schema)


def count_nulls(table: pl.DataFrame, reasons: Mapping[str, str]) -> Counter[str]:
    """Subject-days with a null ``column``, keyed ``"column: reason"``, for each column given."""
    counts: Counter[str] = Counter()
    for column, reason in reasons.items():
        n = table.get_column(column).null_count()
        if n:
            counts[f"{column}: {reason}"] += n
    return counts


def local_day(column: str) -> pl.Expr:
    """The local day of an epoch-millisecond ``column``, using the row's own UTC offset."""
    offset = pl.col("local_time") - pl.col("time").dt.replace_time_zone(None)
    return (pl.from_epoch(pl.col(column), time_unit="ms") + offset).dt.date()


def day_windows(frame: pl.LazyFrame | pl.DataFrame, days: int = 7) -> list[pl.LazyFrame]:
    """A table split into runs of ``days`` local days, scanned one after the other: for motion
    sensors, whose month is a million rows, memory then holds a week at most.

    Example: ``combine(partial(w) for w in day_windows(frames["accelerometer"]))``.
    """
    lazy = frame.lazy()
    found = lazy.select(pl.col("day").unique().sort()).collect().get_column("day").to_list()
    return [
        lazy.filter(pl.col("day").is_in(found[first : first + days]))
        for first in range(0, len(found), days)
    ]
