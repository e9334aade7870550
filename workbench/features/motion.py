"""Accelerometer and gyroscope features per local day, computed in a streaming way.

Records reduce to per-minute partials: the count, mean and sum of squared deviations (M2) of
the vector magnitude, and for the accelerometer the sum of |magnitude - g|. Partials of
separate chunks (the app's 6,000-record batches) combine exactly (Chan et al. 1979: the M2 of
the union adds each part's M2 and n times its mean's squared distance to the union's mean), so
memory grows with the minutes of a day, never with its records:

    minutes = combine([partial(chunk, gravity=G) for chunk in chunks])
    table = summarise_accelerometer(minutes, AccelerometerParams())
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from workbench.features.family import (
    FamilyResult,
    Feature,
    FeatureFamily,
    Frames,
    count_nulls,
    day_windows,
    empty_table,
)

G = 9.80665  # standard gravity, m/s^2
MINUTE_KEYS = ("subject", "day", "minute")
PARTIAL = {
    "subject": pl.String,
    "day": pl.Date,
    "minute": pl.Datetime("ms"),
    "n": pl.UInt32,
    "mean": pl.Float64,
    "m2": pl.Float64,
    "sum_dev": pl.Float64,
}


@dataclass(frozen=True)
class AccelerometerParams:
    """Parameters of the accelerometer features: an active minute's mean |magnitude - g|
    exceeds ``active_threshold_g`` (in g; 0.1 g = 100 mg)."""

    active_threshold_g: float = 0.1


@dataclass(frozen=True)
class GyroscopeParams:
    """The gyroscope features take no parameters."""


ACCELEROMETER = (
    Feature("accelerometer_magnitude_mean", pl.Float64, "m/s^2", "Mean vector magnitude."),
    Feature("accelerometer_magnitude_sd", pl.Float64, "m/s^2", "SD of the vector magnitude."),
    Feature(
        "accelerometer_active_minutes",
        pl.Float64,
        "min",
        "Minutes whose mean |magnitude - g| exceeds the threshold.",
    ),
)
GYROSCOPE = (
    Feature("gyroscope_magnitude_mean", pl.Float64, "rad/s", "Mean vector magnitude."),
    Feature("gyroscope_magnitude_sd", pl.Float64, "rad/s", "SD of the vector magnitude."),
)


def partial(frame: pl.DataFrame | pl.LazyFrame, *, gravity: float = 0.0) -> pl.DataFrame:
    """Per-minute partial sums of one chunk of x, y, z records (a local minute per row)."""
    magnitude = (pl.col("x") ** 2 + pl.col("y") ** 2 + pl.col("z") ** 2).sqrt()
    return (
        frame.lazy()
        .select(
            "subject",
            "day",
            # whole minutes by integer division: cheaper than truncating datetimes
            minute=(pl.col("local_time").dt.epoch("ms") // 60_000 * 60_000).cast(pl.Datetime("ms")),
            m=magnitude,
        )
        .group_by(MINUTE_KEYS)
        .agg(
            n=pl.len().cast(pl.UInt32),
            mean=pl.col("m").mean(),
            m2=(pl.col("m") - pl.col("m").mean()).pow(2).sum(),
            sum_dev=(pl.col("m") - gravity).abs().sum(),
        )
        .collect(engine="streaming")
        .cast(PARTIAL)
    )


def combine(partials: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """Per-minute sums of several chunks added together (a minute split across chunks counts once)."""
    frames = [p for p in partials if p.height]
    if not frames:
        return pl.DataFrame(schema=PARTIAL)
    return (
        pl.concat(frames)
        .group_by(MINUTE_KEYS)
        .agg(*_pooled(), sum_dev=pl.col("sum_dev").sum())
        .cast(PARTIAL)
    )


def _pooled() -> list[pl.Expr]:
    """Count, mean and M2 of the union of groups given by their own n, mean and m2."""
    n = pl.col("n").cast(pl.Float64)
    mean = (n * pl.col("mean")).sum() / n.sum()
    m2 = pl.col("m2").sum() + (n * (pl.col("mean") - mean) ** 2).sum()
    return [n.sum().alias("n"), mean.alias("mean"), m2.alias("m2")]


def _moments(prefix: str) -> list[pl.Expr]:
    n, mean, m2 = _pooled()
    return [
        mean.alias(f"{prefix}_magnitude_mean"),
        pl.when(n > 1).then((m2 / (n - 1)).sqrt()).alias(f"{prefix}_magnitude_sd"),
    ]


def summarise_accelerometer(minutes: pl.DataFrame, params: AccelerometerParams) -> FamilyResult:
    """Accelerometer day features from combined per-minute sums."""
    if not minutes.height:
        return FamilyResult(empty_table(ACCELEROMETER))
    active = pl.col("sum_dev") / pl.col("n").cast(pl.Float64) > params.active_threshold_g * G
    table = minutes.group_by("subject", "day").agg(
        *_moments("accelerometer"), accelerometer_active_minutes=active.sum().cast(pl.Float64)
    )
    reasons = count_nulls(table, {"accelerometer_magnitude_sd": "a single record"})
    return FamilyResult(table, Counter(reasons))


def summarise_gyroscope(minutes: pl.DataFrame, params: GyroscopeParams) -> FamilyResult:
    """Gyroscope day features from combined per-minute sums."""
    if not minutes.height:
        return FamilyResult(empty_table(GYROSCOPE))
    table = minutes.group_by("subject", "day").agg(*_moments("gyroscope"))
    reasons = count_nulls(table, {"gyroscope_magnitude_sd": "a single record"})
    return FamilyResult(table, Counter(reasons))


def _accelerometer(frames: Frames, params: AccelerometerParams) -> FamilyResult:
    frame = frames.get("accelerometer")
    minutes = (
        combine(partial(w, gravity=G) for w in day_windows(frame))
        if frame is not None
        else combine([])
    )
    return summarise_accelerometer(minutes, params)


def _gyroscope(frames: Frames, params: GyroscopeParams) -> FamilyResult:
    frame = frames.get("gyroscope")
    minutes = combine(partial(w) for w in day_windows(frame)) if frame is not None else combine([])
    return summarise_gyroscope(minutes, params)


ACCELEROMETER_FAMILY = FeatureFamily(
    name="accelerometer",
    sensors=("accelerometer",),
    params=AccelerometerParams,
    features=ACCELEROMETER,
    compute_table=_accelerometer,
    description="Vector magnitude and active minutes of the accelerometer.",
)
GYROSCOPE_FAMILY = FeatureFamily(
    name="gyroscope",
    sensors=("gyroscope",),
    params=GyroscopeParams,
    features=GYROSCOPE,
    compute_table=_gyroscope,
    description="Vector magnitude of the gyroscope.",
)
