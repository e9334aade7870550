"""EMA features per local day: prompts and questions answered (one record per answer).

A prompt is a distinct ``startTime``; it belongs to the local day on which it was opened.
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
    local_day,
    sensor_frame,
)


@dataclass(frozen=True)
class EmaParams:
    """The EMA features take no parameters."""


FEATURES = (
    Feature("ema_prompts_answered", pl.Int64, "count", "Prompts with at least one answer."),
    Feature("ema_questions_answered", pl.Int64, "count", "Distinct questions answered."),
)


def compute(frames: Frames, params: EmaParams) -> FamilyResult:
    """EMA features per subject and local day."""
    columns = ["subject", "time", "local_time", "startTime", "questionId"]
    frame = sensor_frame(frames, "ema", columns)
    if frame is None:
        return FamilyResult(empty_table(FEATURES))
    table = (
        frame.with_columns(day=local_day("startTime"))
        .group_by("subject", "day")
        .agg(
            ema_prompts_answered=pl.col("startTime").n_unique(),
            ema_questions_answered=pl.struct("startTime", "questionId").n_unique(),
        )
    )
    return FamilyResult(table)


FAMILY = FeatureFamily(
    name="ema",
    sensors=("ema",),
    params=EmaParams,
    features=FEATURES,
    compute_table=compute,
    description="Prompts and questions answered in the EMA app.",
)
