"""Records that stand for a span of time: each lasts until the next record of its subject, at
most a cap, and is split at local midnight so that every minute belongs to one local day."""

from __future__ import annotations

import polars as pl

from workbench.features.family import MS_PER_MINUTE


def spans(frame: pl.DataFrame, *, cap_minutes: float, last_minutes: float) -> pl.DataFrame:
    """``frame``'s records with ``start``, ``end`` (local) and ``minutes``, one row per piece.

    A record lasts until the next record of its subject, at most ``cap_minutes``; the subject's
    last record lasts ``last_minutes`` (at most the cap). A span that crosses local midnight is
    cut in two, and pieces falling on a day absent from ``frame`` are left out.
    Example: records at 10:00 and 10:12 with a cap of 5 give 5 minutes each.
    """
    days = frame.select("subject", "day").unique()
    cap_ms = cap_minutes * MS_PER_MINUTE
    last_ms = min(last_minutes, cap_minutes) * MS_PER_MINUTE
    gap_ms = (pl.col("time").shift(-1).over("subject") - pl.col("time")).dt.total_milliseconds()
    lasting = (
        frame.sort("subject", "time")
        .with_columns(
            _ms=pl.min_horizontal(gap_ms.cast(pl.Float64).fill_null(last_ms), pl.lit(cap_ms)),
            _midnight=(pl.col("day") + pl.duration(days=1)).cast(pl.Datetime("ms")),
        )
        .with_columns(
            start=pl.col("local_time"),
            end=pl.col("local_time")
            + pl.duration(milliseconds=pl.col("_ms").round().cast(pl.Int64)),
        )
    )
    first = lasting.with_columns(end=pl.min_horizontal("end", "_midnight"))
    second = lasting.filter(pl.col("end") > pl.col("_midnight")).with_columns(
        start=pl.col("_midnight"), day=pl.col("day") + pl.duration(days=1)
    )
    pieces = pl.concat([first, second]).join(days, on=["subject", "day"], how="semi")
    minutes = (pl.col("end") - pl.col("start")).dt.total_milliseconds() / MS_PER_MINUTE
    return pieces.with_columns(minutes=minutes).drop("_ms", "_midnight")
