"""App usage per local day from Android's cumulative UsageStats snapshots.

Each hourly snapshot holds an app's foreground time since the previous local midnight, so the
day's time for an app is the largest of its snapshots that day: duplicates and overlapping
snapshots count once, and nothing is summed raw.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import polars as pl

from workbench.features.family import (
    MS_PER_MINUTE,
    FamilyResult,
    Feature,
    FeatureFamily,
    Frames,
    count_nulls,
    empty_table,
    sensor_frame,
)


@dataclass(frozen=True)
class AppUsageParams:
    """Parameters of the app-usage features (an app counts from ``min_minutes``)."""

    min_minutes: float = 0.0


FEATURES = (
    Feature("app_minutes_total", pl.Float64, "min", "Foreground time of all apps."),
    Feature("app_count", pl.Int64, "count", "Apps used (foreground time above the minimum)."),
    Feature("app_entropy", pl.Float64, "nat", "Entropy of the foreground time over apps."),
)
APP_TABLE = {"subject": pl.String, "day": pl.Date, "app": pl.String, "minutes": pl.Float64}


def app_minutes(frames: Frames, params: AppUsageParams | None = None) -> pl.DataFrame:
    """Per subject, local day and app: foreground minutes (the day's largest snapshot).

    Example: snapshots of 10, 10 and 25 minutes for one app on one day give 25.
    """
    params = params or AppUsageParams()
    columns = ["subject", "day", "appName", "totalTimeinForeground"]
    frame = sensor_frame(frames, "application_usage", columns)
    if frame is None:
        return pl.DataFrame(schema=APP_TABLE)
    return (
        frame.group_by("subject", "day", "appName")
        .agg(minutes=pl.col("totalTimeinForeground").max() / MS_PER_MINUTE)
        .filter(pl.col("minutes") > params.min_minutes)
        .select("subject", "day", app="appName", minutes=pl.col("minutes").cast(pl.Float64))
        .sort("subject", "day", "app")
    )


def compute(frames: Frames, params: AppUsageParams) -> FamilyResult:
    """App-usage features per subject and local day."""
    frame = sensor_frame(frames, "application_usage", ["subject", "day"])
    if frame is None:
        return FamilyResult(empty_table(FEATURES))
    p = pl.col("minutes") / pl.col("minutes").sum()
    per_day = (
        app_minutes(frames, params)
        .group_by("subject", "day")
        .agg(
            app_minutes_total=pl.col("minutes").sum(),
            app_count=pl.len(),
            app_entropy=-(p * p.log()).sum(),
        )
    )
    table = (
        frame.unique()
        .join(per_day, on=["subject", "day"], how="left")
        .with_columns(
            app_minutes_total=pl.col("app_minutes_total").fill_null(0.0),
            app_count=pl.col("app_count").fill_null(0),
        )
    )
    reasons = Counter(count_nulls(table, {"app_entropy": "no app in the foreground"}))
    return FamilyResult(table, reasons)


FAMILY = FeatureFamily(
    name="app_usage",
    sensors=("application_usage",),
    params=AppUsageParams,
    features=FEATURES,
    compute_table=compute,
    description="Foreground minutes, apps used and their entropy, from cumulative snapshots.",
)
