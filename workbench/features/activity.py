"""Activity features per local day, from Google's Activity Recognition (DetectedActivity codes).

Records sharing a timestamp are one detection (the app keeps every type with confidence of at
least 70): the most confident type is taken, the lower code on a tie. Each detection lasts until
the next one, at most ``max_detection_minutes``, and is split at local midnight.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from workbench.features.family import (
    FamilyResult,
    Feature,
    FeatureFamily,
    Frames,
    empty_table,
    sensor_frame,
)
from workbench.features.timeline import spans

# DetectedActivity code -> feature; ON_FOOT (2) and WALKING (7) both count as walking.
KINDS = {
    0: "vehicle",
    1: "bicycle",
    2: "walking",
    3: "still",
    4: "unknown",
    5: "tilting",
    7: "walking",
    8: "running",
}
ORDER = ("still", "walking", "running", "bicycle", "vehicle", "tilting", "unknown")
CODES = {
    "still": "STILL",
    "walking": "WALKING or ON_FOOT",
    "running": "RUNNING",
    "bicycle": "ON_BICYCLE",
    "vehicle": "IN_VEHICLE",
    "tilting": "TILTING",
    "unknown": "UNKNOWN",
}


@dataclass(frozen=True)
class ActivityParams:
    """Parameters of the activity features."""

    max_detection_minutes: float = 5.0


FEATURES = tuple(
    Feature(f"activity_{kind}_minutes", pl.Float64, "min", f"Time detected as {CODES[kind]}.")
    for kind in ORDER
) + (
    Feature(
        "activity_transitions", pl.Int64, "count", "Changes of type between detections in a day."
    ),
)


def detections(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per detection (subject and timestamp): the most confident type, as a kind."""
    return (
        frame.sort(
            ["subject", "time", "confidence", "activityType"],
            descending=[False, False, True, False],
        )
        .unique(["subject", "time"], keep="first", maintain_order=True)
        .with_columns(kind=pl.col("activityType").replace_strict(KINDS, default="unknown"))
    )


def compute(frames: Frames, params: ActivityParams) -> FamilyResult:
    """Activity features per subject and local day."""
    columns = ["subject", "time", "local_time", "day", "activityType", "confidence"]
    frame = sensor_frame(frames, "activity", columns)
    if frame is None:
        return FamilyResult(empty_table(FEATURES))
    found = detections(frame)
    cap = params.max_detection_minutes
    pieces = spans(found, cap_minutes=cap, last_minutes=cap)
    minutes = pieces.group_by("subject", "day").agg(
        pl.col("minutes").filter(pl.col("kind") == kind).sum().alias(f"activity_{kind}_minutes")
        for kind in ORDER
    )
    changed = pl.col("kind") != pl.col("kind").shift(1).over("subject", "day")
    transitions = (
        found.sort("subject", "time")
        .group_by("subject", "day")
        .agg(activity_transitions=changed.fill_null(False).sum())
    )
    days = frame.select("subject", "day").unique()
    table = days.join(minutes, on=["subject", "day"], how="left").join(
        transitions, on=["subject", "day"], how="left"
    )
    return FamilyResult(table)


FAMILY = FeatureFamily(
    name="activity",
    sensors=("activity",),
    params=ActivityParams,
    features=FEATURES,
    compute_table=compute,
    description="Minutes per detected activity type and changes of type.",
)
