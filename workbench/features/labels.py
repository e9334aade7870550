"""Active-labelling features per local day: labelled minutes and labels, in total and per task.

A label belongs to the local day on which it started; its minutes run from ``startTimestamp`` to
``endTimestamp`` (the ``duration`` field when the end is missing or before the start). Labels of
different tasks may overlap: their minutes add up, so the total can exceed the time labelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from workbench.features.family import (
    MS_PER_MINUTE,
    FamilyResult,
    Feature,
    FeatureFamily,
    Frames,
    empty_table,
    local_day,
    sensor_frame,
)


@dataclass(frozen=True)
class LabelsParams:
    """The labelling features take no parameters."""


FEATURES = (
    Feature("labels_minutes_total", pl.Float64, "min", "Minutes labelled, all tasks together."),
    Feature("labels_count", pl.Int64, "count", "Labels started that day."),
)
TASK_TABLE = {
    "subject": pl.String,
    "day": pl.Date,
    "task": pl.String,
    "minutes": pl.Float64,
    "labels": pl.Int64,
}


def _labels(frames: Frames) -> pl.DataFrame | None:
    columns = [
        "subject", "time", "local_time", "taskName", "startTimestamp", "endTimestamp", "duration"
    ]  # fmt: skip
    frame = sensor_frame(frames, "active_labeling", columns)
    if frame is None:
        return None
    span = (pl.col("endTimestamp") - pl.col("startTimestamp")) / MS_PER_MINUTE
    minutes = pl.when(span >= 0).then(span).otherwise(pl.col("duration") / 60)
    return (
        frame.unique(["subject", "taskName", "startTimestamp", "endTimestamp"])
        .with_columns(day=local_day("startTimestamp"), minutes=minutes.cast(pl.Float64))
        .select("subject", "day", task="taskName", minutes="minutes")
    )


def task_minutes(frames: Frames) -> pl.DataFrame:
    """Per subject, local day and task: labelled minutes and number of labels."""
    labels = _labels(frames)
    if labels is None:
        return pl.DataFrame(schema=TASK_TABLE)
    return (
        labels.group_by("subject", "day", "task")
        .agg(pl.col("minutes").sum(), labels=pl.len().cast(pl.Int64))
        .sort("subject", "day", "task")
    )


def compute(frames: Frames, params: LabelsParams) -> FamilyResult:
    """Labelling features per subject and local day."""
    labels = _labels(frames)
    if labels is None:
        return FamilyResult(empty_table(FEATURES))
    table = labels.group_by("subject", "day").agg(
        labels_minutes_total=pl.col("minutes").sum(), labels_count=pl.len()
    )
    return FamilyResult(table)


FAMILY = FeatureFamily(
    name="labels",
    sensors=("active_labeling",),
    params=LabelsParams,
    features=FEATURES,
    compute_table=compute,
    description="Minutes and number of labels from active labelling.",
)
