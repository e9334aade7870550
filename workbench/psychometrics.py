"""Reliability of an instrument in a sample, and change over time per participant.

- :func:`cronbach_alpha` and :func:`corrected_item_total`: internal consistency of a set of
  item columns, on the complete rows (Cronbach 1951); the corrected item-total correlation of
  an item is its Pearson correlation with the sum of the *other* items.
- :func:`reliability` and :func:`item_total`: those per scale of an instrument and session,
  from the answers as scored (reverse-keyed; blank, coded missing or invalid answers dropped).
- :func:`change_over_time`: per participant, first-to-last change of a score, response,
  remission and the reliable change index of Jacobson & Truax (1991), with the reliability and
  SD the instrument's definition cites (``change`` in its JSON; docs/instruments.md).

Example::

    scored = score(table, "phq9")
    change_over_time(scored, "phq9").filter(pl.col("reliable_change") == "improved")
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from workbench.instruments import Instrument, instrument, last_per_session, score, usable_answers

if TYPE_CHECKING:
    from workbench.config import Config

Z95 = 1.959963984540054  # |RCI| above this is reliable change at p < .05 (two-sided)
RELIABILITY_SCHEMA = {
    "scale": pl.String,
    "session": pl.String,
    "items": pl.Int64,
    "n_complete": pl.Int64,
    "alpha": pl.Float64,
}
ITEM_TOTAL_SCHEMA = {
    "scale": pl.String,
    "session": pl.String,
    "item": pl.String,
    "n_complete": pl.Int64,
    "corrected_item_total_r": pl.Float64,
}
CHANGE_SCHEMA = {
    "participant": pl.String,
    "scores": pl.Int64,
    "first_session": pl.String,
    "last_session": pl.String,
    "first": pl.Float64,
    "last": pl.Float64,
    "change": pl.Float64,
    "pct_change": pl.Float64,
    "response": pl.Boolean,
    "remission": pl.Boolean,
    "rci": pl.Float64,
    "reliable_change": pl.String,
}


def _complete(items: pl.DataFrame) -> np.ndarray:
    return items.drop_nulls().cast(pl.Float64).to_numpy()


def cronbach_alpha(items: pl.DataFrame) -> float | None:
    """Cronbach's alpha of the columns of ``items`` on its complete rows:
    k / (k - 1) * (1 - sum of item variances / variance of the row sums). None with fewer than
    two items or two complete rows, or when the row sums do not vary.

    Example: ``cronbach_alpha(pl.DataFrame({"a": [1, 2, 3], "b": [1, 3, 3]}))``.
    """
    data = _complete(items)
    n, k = data.shape if data.ndim == 2 else (0, 0)
    if k < 2 or n < 2:
        return None
    total = data.sum(axis=1).var(ddof=1)
    if total == 0:
        return None
    return float(k / (k - 1) * (1 - data.var(axis=0, ddof=1).sum() / total))


def corrected_item_total(items: pl.DataFrame) -> dict[str, float | None]:
    """Per column of ``items``: its Pearson correlation with the sum of the other columns, on
    the complete rows (None where either side does not vary).

    Example: ``corrected_item_total(answers)["interest"]``.
    """
    data = _complete(items)
    out: dict[str, float | None] = {}
    for i, column in enumerate(items.columns):
        if data.shape[0] < 2 or len(items.columns) < 2:
            out[column] = None
            continue
        item, rest = data[:, i], data.sum(axis=1) - data[:, i]
        if item.std() == 0 or rest.std() == 0:
            out[column] = None
            continue
        out[column] = float(np.corrcoef(item, rest)[0, 1])
    return out


def _groups(table: pl.DataFrame, inst: Instrument, session: str):
    """(session label, usable answers) per session, or one group when there are none."""
    answers = usable_answers(table, inst)
    if session not in table.columns:
        yield None, answers
        return
    labels = table[session].cast(pl.String)
    for label in sorted(labels.unique().to_list(), key=lambda v: (v is None, v)):
        keep = labels.is_null() if label is None else (labels == label).fill_null(False)
        yield label, answers.filter(keep)


def reliability(
    table: pl.DataFrame,
    name: str | Instrument,
    *,
    session: str = "session",
    config: Config | None = None,
) -> pl.DataFrame:
    """Cronbach's alpha per scale of the instrument and session of ``table``: columns scale,
    session, items, n_complete, alpha.

    Example: ``reliability(combine_table(config, "mindtrails", "PHQ9"), "phq9")``.
    """
    inst = name if isinstance(name, Instrument) else instrument(name, config=config)
    rows = []
    for label, answers in _groups(table, inst, session):
        for scale in inst.scales:
            part = answers.select(scale.columns)
            rows.append(
                {
                    "scale": scale.id,
                    "session": label,
                    "items": len(scale.columns),
                    "n_complete": part.drop_nulls().height,
                    "alpha": cronbach_alpha(part),
                }
            )
    return pl.DataFrame(rows, schema=RELIABILITY_SCHEMA)


def item_total(
    table: pl.DataFrame,
    name: str | Instrument,
    *,
    session: str = "session",
    config: Config | None = None,
) -> pl.DataFrame:
    """Corrected item-total correlations per scale, session and item: columns scale, session,
    item, n_complete, corrected_item_total_r.

    Example: ``item_total(phq9_table, "phq9").filter(pl.col("corrected_item_total_r") < 0.3)``.
    """
    inst = name if isinstance(name, Instrument) else instrument(name, config=config)
    rows = []
    for label, answers in _groups(table, inst, session):
        for scale in inst.scales:
            part = answers.select(scale.columns)
            n = part.drop_nulls().height
            for item, r in corrected_item_total(part).items():
                rows.append(
                    {
                        "scale": scale.id,
                        "session": label,
                        "item": item,
                        "n_complete": n,
                        "corrected_item_total_r": r,
                    }
                )
    return pl.DataFrame(rows, schema=ITEM_TOTAL_SCHEMA)


def reliable_change_sd(inst: Instrument) -> float | None:
    """S_diff = sqrt(2) * SD * sqrt(1 - r) from the instrument's cited SD and reliability, or
    None when it cites neither (Jacobson & Truax 1991)."""
    change = inst.change
    if "reliability" not in change or "sd" not in change:
        return None
    se = change["sd"]["value"] * math.sqrt(1 - change["reliability"]["value"])
    return math.sqrt(2) * se


def change_over_time(
    scored: pl.DataFrame,
    name: str | Instrument,
    *,
    scale: str = "total",
    participant: str = "participant",
    session: str = "session",
    order: str = "date",
    config: Config | None = None,
) -> pl.DataFrame:
    """Per participant, from their first to their last valid score (by ``order``, then
    session): the change, % change, response, remission and the reliable change index.

    - response: improvement of at least the instrument's ``response_drop_pct`` % of the first
      score (PHQ-9: the last at most half the first); null when the first is 0;
    - remission: the last score below ``remission_below`` (PHQ-9: < 5);
    - rci = (last - first) / S_diff, S_diff = sqrt(2) * SD * sqrt(1 - r) with the instrument's
      cited SD and reliability r; ``reliable_change`` is "improved" or "deteriorated" when
      |rci| > 1.96, else "no reliable change".

    Each is null when the participant has one valid score or the instrument does not define
    it. ``scored`` may be the answers (they are scored) or :func:`~workbench.score` output;
    with several answers per session the last one counts.

    Example: ``change_over_time(score(phq9, "phq9"), "phq9")``.
    """
    inst = name if isinstance(name, Instrument) else instrument(name, config=config)
    inst.scale(scale)  # a scale the instrument has
    column = f"{inst.id}_{scale}"
    if column not in scored.columns:
        scored = score(scored, inst)
    if session in scored.columns:
        scored = last_per_session(scored, participant=participant, session=session, order=order)
    keys = [c for c in (order, session) if c in scored.columns]
    table = (
        scored.select(
            pl.col(participant).cast(pl.String).alias("participant"),
            (pl.col(session).cast(pl.String) if session in scored.columns else pl.lit(None))
            .cast(pl.String)
            .alias("session"),
            pl.col(column).cast(pl.Float64).alias("score"),
            *[pl.col(k).alias(f"__key_{i}") for i, k in enumerate(keys)],
        )
        .with_row_index("__row")
        .drop_nulls(["participant", "score"])
        .sort([f"__key_{i}" for i in range(len(keys))] + ["__row"], nulls_last=False)
    )
    per = table.group_by("participant", maintain_order=True).agg(
        pl.len().cast(pl.Int64).alias("scores"),
        pl.col("session").first().alias("first_session"),
        pl.col("session").last().alias("last_session"),
        pl.col("score").first().alias("first"),
        pl.col("score").last().alias("last"),
    )
    rule = inst.change
    lower = rule.get("better", "lower") == "lower"
    two = pl.col("scores") >= 2
    change = pl.when(two).then(pl.col("last") - pl.col("first"))
    improvement = (-change) if lower else change
    response = pl.lit(None, dtype=pl.Boolean)
    if "response_drop_pct" in rule:
        response = (
            pl.when(two & (pl.col("first") != 0))
            .then(improvement >= rule["response_drop_pct"] / 100 * pl.col("first").abs())
            .otherwise(None)
        )
    remission = pl.lit(None, dtype=pl.Boolean)
    if "remission_below" in rule:
        remission = pl.when(two).then(pl.col("last") < rule["remission_below"])
    s_diff = reliable_change_sd(inst) if scale == "total" else None
    rci = pl.lit(None, dtype=pl.Float64) if s_diff is None else change / s_diff
    better = rci < -Z95 if lower else rci > Z95
    worse = rci > Z95 if lower else rci < -Z95
    verdict = (
        pl.when(rci.is_null())
        .then(None)
        .when(better)
        .then(pl.lit("improved"))
        .when(worse)
        .then(pl.lit("deteriorated"))
        .otherwise(pl.lit("no reliable change"))
    )
    out = per.with_columns(
        change.alias("change"),
        pl.when(two & (pl.col("first") != 0))
        .then(100 * change / pl.col("first"))
        .alias("pct_change"),
        response.alias("response"),
        remission.alias("remission"),
        rci.alias("rci"),
    ).with_columns(
        verdict.alias("reliable_change")
        if s_diff is not None
        else pl.lit(None, dtype=pl.String).alias("reliable_change")
    )
    return out.select(list(CHANGE_SCHEMA)).cast(CHANGE_SCHEMA).sort("participant")
