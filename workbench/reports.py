"""Data-quality reports and attrition.

- :func:`questionnaire_report`: per decoded questionnaire table and column, the share of blank
  answers, special codes, out-of-range answers and invalid choices (against the instrument
  whose items the table holds).
- :func:`reliability_report`: Cronbach's alpha and corrected item-total correlations per
  instrument, scale and session; :func:`change_report`: per participant, first-to-last change,
  response, remission and the reliable change index; :func:`questionnaire_methods`: the
  methods paragraph naming the rules applied and their sources.
- :func:`participant_report`: per participant, the questionnaires and sessions missing against
  the study schedule (``schedule`` of the source, else every session seen in each table).
- :func:`attrition`: one disposition per participant (enrolled, started, active, completed,
  withdrawn, lost to follow-up) from a sensing study's status or a questionnaire source's
  session completion, CONSORT counts, Kaplan-Meier retention with 95 % confidence bands,
  dropout by study week, the usage half-life and, for studies with EMA, compliance per subject.

Every report is a polars DataFrame (or several) and :func:`write_report` writes CSV, Parquet and
a readable HTML page into the pool's ``reports/`` folder.

Example::

    result = attrition(load_config("demo-home"), "demo")
    result.consort, result.retention, result.half_life_days
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from workbench.catalog import open_catalog
from workbench.config import Config
from workbench.errors import InvalidName, WorkbenchError
from workbench.instruments import Instrument, instrument, last_per_session, list_instruments
from workbench.pool import DataPool
from workbench.subject_state import DROPPED, LEFT_STATUSES, Disposition
from workbench.times import DAY_MS, HOUR_MS, now_ms
from workbench.writers import write_report

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval
COMPLIANCE_TARGET = 80.0  # % of expected EMA prompts answered, the usual threshold
LOST_AFTER_DAYS = 14  # without session_days, a participant silent this long is lost
DATE_FORMATS = ("%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d")
log = logging.getLogger("workbench.reports")
STUDY_OR_SOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
DISPOSITIONS = [d.value for d in Disposition]


# ---------------------------------------------------------------------------- questionnaires


def _tables(config: Config, source: str | None) -> dict[tuple[str, str], pl.DataFrame]:
    from workbench.decoded import combine_table, source_folder

    chosen = [config.source(source)] if source else list(config.sources)
    found = {}
    for src in chosen:
        folder = source_folder(config, src.name) / "decoded"
        if not folder.is_dir():
            continue
        for table in sorted(p.name for p in folder.iterdir() if p.is_dir()):
            found[(src.name, table)] = combine_table(config, src.name, table)
    if not found:
        raise WorkbenchError("no decoded questionnaire tables; run `workbench export` first")
    return found


def instrument_for(table: pl.DataFrame, *, config: Config | None = None) -> Instrument | None:
    """The instrument whose item columns the table holds (the largest such, e.g. PHQ-9 over
    PHQ-8 and PHQ-2; ties to the first id), or None. ``config`` adds the home's instruments."""
    best = None
    for name in list_instruments(config=config):
        inst = instrument(name, config=config)
        if set(inst.items) <= set(table.columns) and (
            best is None or len(inst.items) > len(best.items)
        ):
            best = inst
    return best


def questionnaire_report(config: Config, source: str | None = None) -> pl.DataFrame:
    """Per table and column: rows, % blank, special codes, out of range, invalid choices.

    Example: ``questionnaire_report(config, "mindtrails").filter(pl.col("pct_blank") > 5)``.
    """
    rows = []
    for (src, table), frame in _tables(config, source).items():
        inst = instrument_for(frame, config=config)
        items = set(inst.items) if inst else set()
        for column in frame.columns:
            values = frame[column]
            blank = values.is_null() | (values.cast(pl.String) == "")
            entry = {
                "source": src,
                "table": table,
                "instrument": inst.id if inst and column in items else None,
                "column": column,
                "rows": frame.height,
                "pct_blank": round(100 * blank.sum() / max(frame.height, 1), 2),
                "special_codes": None,
                "out_of_range": None,
                "invalid_choices": None,
            }
            if inst and column in items:
                number = values.cast(pl.Float64, strict=False)
                special = number.is_in(inst.missing_codes)
                known = ~blank & ~special
                entry["special_codes"] = int(special.sum())
                entry["invalid_choices"] = int(
                    (known & (number.is_null() | (number != number.floor()))).sum()
                )
                entry["out_of_range"] = int(
                    (
                        known
                        & number.is_not_null()
                        & (number == number.floor())
                        & ~number.is_between(inst.minimum, inst.maximum)
                    ).sum()
                )
            rows.append(entry)
    return pl.DataFrame(rows, infer_schema_length=None)


def _instrument_tables(
    config: Config, source: str | None
) -> list[tuple[str, str, Instrument, pl.DataFrame]]:
    """(source, table, instrument, rows) for each decoded table that holds an instrument."""
    found = []
    for (src, table), frame in _tables(config, source).items():
        inst = instrument_for(frame, config=config)
        if inst is not None:
            found.append((src, table, inst, frame))
    return found


def reliability_report(config: Config, source: str | None = None) -> dict[str, pl.DataFrame]:
    """Cronbach's alpha (``reliability``) and corrected item-total correlations
    (``item_total``) per questionnaire table, instrument scale and session, on each
    participant's last answer per session; answers as scored (reverse-keyed, invalid dropped).

    Example: ``reliability_report(config, "mindtrails")["reliability"]``.
    """
    from workbench.psychometrics import (
        ITEM_TOTAL_SCHEMA,
        RELIABILITY_SCHEMA,
        item_total,
        reliability,
    )

    head = {"source": pl.String, "table": pl.String, "instrument": pl.String}
    alphas, items = [], []
    for src, table, inst, frame in _instrument_tables(config, source):
        rows = _one_per_session(frame)
        tag = [pl.lit(src).alias("source"), pl.lit(table).alias("table")]
        tag.append(pl.lit(inst.id).alias("instrument"))
        alphas.append(reliability(rows, inst).select(*tag, pl.all()))
        items.append(item_total(rows, inst).select(*tag, pl.all()))
    return {
        "reliability": pl.concat(alphas)
        if alphas
        else pl.DataFrame(schema=head | RELIABILITY_SCHEMA),
        "item_total": pl.concat(items) if items else pl.DataFrame(schema=head | ITEM_TOTAL_SCHEMA),
    }


def _one_per_session(frame: pl.DataFrame) -> pl.DataFrame:
    if {"participant", "session"} <= set(frame.columns):
        order = "date" if "date" in frame.columns else "id" if "id" in frame.columns else None
        if order:
            return last_per_session(frame, order=order)
    return frame


def change_report(config: Config, source: str | None = None) -> pl.DataFrame:
    """Per questionnaire table with an instrument total and participant: first-to-last change,
    response, remission and reliable change (see :func:`workbench.change_over_time`).

    Example: ``change_report(config).filter(pl.col("reliable_change") == "improved")``.
    """
    from workbench.psychometrics import CHANGE_SCHEMA, change_over_time

    frames = []
    for src, table, inst, frame in _instrument_tables(config, source):
        if not inst.has_total or "participant" not in frame.columns:
            continue
        order = "date" if "date" in frame.columns else "id"
        change = change_over_time(frame, inst, order=order)
        frames.append(
            change.select(
                pl.lit(src).alias("source"),
                pl.lit(table).alias("table"),
                pl.lit(inst.id).alias("instrument"),
                pl.all(),
            )
        )
    head = {"source": pl.String, "table": pl.String, "instrument": pl.String}
    return pl.concat(frames) if frames else pl.DataFrame(schema=head | CHANGE_SCHEMA)


def questionnaire_methods(instruments: list[Instrument]) -> str:
    """A methods paragraph, ready to paste into a paper, naming the scoring, proration, band,
    reliability and change rules applied to ``instruments`` and their sources; paragraphs are
    separated by blank lines, references numbered at the end.

    Example: ``questionnaire_methods([instrument("phq9"), instrument("gad7")])``.
    """
    references: list[str] = []

    def cite(text: str) -> str:
        if text not in references:
            references.append(text)
        return f"[{references.index(text) + 1}]"

    parts = []
    for inst in instruments:
        rule = inst.definition["scoring"]
        n = len(inst.items)
        factor = rule.get("multiplier", 1)
        what = f"The {inst.name} {cite(inst.definition['citation'])}"
        scales = ", ".join(
            f"{'total' if s.id == 'total' else s.id} "
            f"{inst.score_range(s)[0]:g}-{inst.score_range(s)[1]:g}"
            for s in inst.scales
        )
        sentence = (
            f"{what} was scored from {n} items answered {inst.minimum}-{inst.maximum}"
            + (f" ({', '.join(sorted(inst.reverse))} reverse-keyed)" if inst.reverse else "")
            + (f", each scale's item sum multiplied by {factor:g}" if factor != 1 else "")
            + f" (range: {scales}). "
        )
        rules = sorted({(s.min_answered, len(s.columns)) for s in inst.scales})
        if rule.get("proration", "mean") == "mean" and any(m < k for m, k in rules):
            sentence += (
                "A scale with at least "
                + " or ".join(f"{m} of its {k}" for m, k in rules)
                + " items answered was prorated as the mean of the answered items times the "
                "number of items"
                + (", rounded half up" if rule.get("round", True) else "")
                + "; with fewer it was not scored (the workbench's rule, not part of the "
                "published scoring). "
            )
        elif any(m < k for m, k in rules):
            sentence += (
                "A scale with at least "
                + " or ".join(f"{m} of its {k}" for m, k in rules)
                + " items answered was scored as the sum of the answered items; with fewer it "
                "was not scored. "
            )
        else:
            sentence += "A scale was scored only with all its items answered. "
        sentence += (
            "Blank answers, 'prefer not to answer' codes and answers outside the response "
            "range counted as missing. "
        )
        for s in inst.scales:
            if s.bands:
                bands = "; ".join(
                    f"{label} {lo:g} to {'' if closed else 'below '}{up:g}"
                    for lo, up, closed, label in s.band_intervals()
                )
                name = "Bands" if s.id == "total" else f"Bands of {s.id}"
                sentence += f"{name}: {bands}. "
        change = inst.change
        if change.get("reliability") and change.get("sd"):
            r, sd = change["reliability"], change["sd"]
            sentence += (
                f"Reliable change used SD = {sd['value']:g} {cite(sd['source'])} and "
                f"{r['kind']} reliability r = {r['value']:g} {cite(r['source'])}. "
            )
        if "remission_below" in change:
            source = change.get("remission_source")
            sentence += f"Remission: last score below {change['remission_below']:g}" + (
                f" {cite(source)}. " if source else ". "
            )
        if "response_drop_pct" in change:
            sentence += (
                f"Response: an improvement of at least {change['response_drop_pct']:g} % "
                "of the first score. "
            )
        parts.append(sentence.strip())
    general = (
        "Internal consistency was estimated with Cronbach's alpha "
        f"{cite('Cronbach LJ. Coefficient alpha and the internal structure of tests. Psychometrika. 1951;16(3):297-334. doi:10.1007/BF02310555')}"
        " on complete cases per instrument scale and session, using each participant's last "
        "answer per session; corrected item-total correlations are the Pearson correlation of "
        "each item with the sum of the other items of its scale. Change was taken from each "
        "participant's first to last valid score; the reliable change index "
        f"{cite('Jacobson NS, Truax P. Clinical significance: a statistical approach to defining meaningful change in psychotherapy research. Journal of Consulting and Clinical Psychology. 1991;59(1):12-19. doi:10.1037/0022-006X.59.1.12')}"
        " is RCI = (last - first) / S_diff with S_diff = sqrt(2) * SD * sqrt(1 - r), and "
        "|RCI| > 1.96 counts as reliable improvement or deterioration."
    )
    listed = "\n".join(f"[{i}] {text}" for i, text in enumerate(references, 1))
    return "\n\n".join([*parts, general, "References:\n" + listed])


def participant_report(
    config: Config,
    source: str | None = None,
    *,
    participant: str = "participant",
    session: str = "session",
) -> pl.DataFrame:
    """Per participant: the (table, session) pairs the schedule expects that are missing.

    The schedule is the source's ``schedule`` in workbench.toml (``{table = [sessions]}``); a
    table it does not name expects every session seen in that table.

    Example: ``participant_report(config).filter(pl.col("missing") > 0)``.
    """
    tables = _tables(config, source)
    people: set[str] = set()
    seen: dict[tuple[str, str], set[tuple[str, str]]] = {}
    expected: dict[tuple[str, str], list[str]] = {}
    for (src, table), frame in tables.items():
        if participant not in frame.columns:
            continue
        people.update(p for p in frame[participant].drop_nulls().to_list())
        if session not in frame.columns:
            continue
        schedule = config.source(src).schedule.get(table) if config.source(src).schedule else None
        sessions = schedule or sorted(frame[session].drop_nulls().unique().to_list())
        expected[(src, table)] = list(sessions)
        seen[(src, table)] = set(frame.select(participant, session).drop_nulls().iter_rows())
    rows = []
    for person in sorted(people):
        missing = [
            f"{table}:{s}"
            for (src, table), sessions in expected.items()
            for s in sessions
            if (person, s) not in seen[(src, table)]
        ]
        total = sum(len(s) for s in expected.values())
        rows.append(
            {
                "participant": person,
                "expected": total,
                "missing": len(missing),
                "pct_complete": round(100 * (total - len(missing)) / total, 1) if total else None,
                "missing_items": ", ".join(missing),
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "participant": pl.String,
            "expected": pl.Int64,
            "missing": pl.Int64,
            "pct_complete": pl.Float64,
            "missing_items": pl.String,
        },
    )


# ---------------------------------------------------------------------------- survival


def kaplan_meier(durations: list[float], events: list[bool]) -> pl.DataFrame:
    """Kaplan-Meier estimate with 95 % exponential-Greenwood (log-log) confidence bands, at 0
    and at every distinct duration: columns time, at_risk, events, censored, survival, lower,
    upper.

    Example: ``kaplan_meier([3, 5, 5, 8], [True, False, True, True])``.
    """
    frame = pl.DataFrame(
        {"time": [float(d) for d in durations], "event": [bool(e) for e in events]}
    )
    table = (
        frame.group_by("time")
        .agg(pl.col("event").sum().alias("events"), pl.len().alias("removed"))
        .sort("time")
    )
    n = len(durations)
    times, at_risk, deaths, censored, survival, lower, upper = (
        [0.0],
        [n],
        [0],
        [0],
        [1.0],
        [1.0],
        [1.0],
    )
    s, greenwood, remaining = 1.0, 0.0, n
    for t, d, removed in table.iter_rows():
        if t == 0:
            (
                times.pop(),
                at_risk.pop(),
                deaths.pop(),
                censored.pop(),
                survival.pop(),
                lower.pop(),
                upper.pop(),
            )
        if d:
            s *= 1 - d / remaining
            if remaining > d:
                greenwood += d / (remaining * (remaining - d))
        times.append(t)
        at_risk.append(remaining)
        deaths.append(d)
        censored.append(removed - d)
        survival.append(s)
        low, high = _log_log_band(s, greenwood)
        lower.append(low)
        upper.append(high)
        remaining -= removed
    return pl.DataFrame(
        {
            "time": times,
            "at_risk": at_risk,
            "events": deaths,
            "censored": censored,
            "survival": survival,
            "lower": lower,
            "upper": upper,
        }
    )


def _log_log_band(s: float, greenwood: float) -> tuple[float, float]:
    if s >= 1.0 or greenwood == 0:
        return (1.0, 1.0) if s >= 1.0 else (s, s)
    if s <= 0.0:
        return 0.0, 0.0
    v = math.log(s)
    spread = Z95 * math.sqrt(greenwood) / v
    return math.exp(-math.exp(math.log(-v) - spread)), math.exp(-math.exp(math.log(-v) + spread))


def median_survival(curve: pl.DataFrame) -> float | None:
    """The first time the survival falls to one half or below (None if it never does)."""
    below = curve.filter(pl.col("survival") <= 0.5)
    return None if below.is_empty() else float(below["time"][0])


# ---------------------------------------------------------------------------- attrition


@dataclass
class Attrition:
    """The attrition of one study or questionnaire source."""

    name: str
    kind: str  # "sensing" or "questionnaire"
    dispositions: pl.DataFrame  # one row per participant
    consort: pl.DataFrame  # stage, n
    retention: pl.DataFrame  # Kaplan-Meier curve
    dropout_by_week: pl.DataFrame  # week, at_risk, dropped
    half_life_days: float | None
    compliance: pl.DataFrame = field(default_factory=pl.DataFrame)  # EMA, per subject

    def tables(self) -> dict[str, pl.DataFrame]:
        out = {
            "dispositions": self.dispositions,
            "consort": self.consort,
            "retention": self.retention,
            "dropout_by_week": self.dropout_by_week,
        }
        if not self.compliance.is_empty():
            out["ema_compliance"] = self.compliance
        return out


def attrition(config: Config, name: str, *, now: int | None = None) -> Attrition:
    """Attrition of a sensing study (by its id) or a questionnaire source (by its name).

    Dispositions follow the data and the schedule, not the report date: a subject whose
    outcome is settled (completed, withdrawn, lost) keeps it whatever ``now`` is; only those
    still inside their protocol period are active, censored at ``now`` (docs/outcomes.md).
    A read: a sensing study's status is taken as the last refresh left it.

    Example: ``attrition(config, "demo").consort``.
    """
    if not STUDY_OR_SOURCE.fullmatch(name):  # the name becomes the report's file name
        raise InvalidName(
            f"invalid study or source name {name[:80]!r}: use letters, digits, '_' and '-' "
            f"(pattern {STUDY_OR_SOURCE.pattern})"
        )
    now = now_ms() if now is None else now
    if any(s.name == name for s in config.sources):
        return _questionnaire_attrition(config, name, now=now)
    from workbench.status import study_status
    from workbench.studies import get_study

    catalog = open_catalog(config)
    try:
        study = get_study(catalog, name)
        status = study_status(catalog, name, now=now)
        prompts = answered_prompts(config, catalog, name) if ema_prompts_per_day(study) else None
    finally:
        catalog.dispose()
    return _sensing_attrition(study, status, now=now, prompts=prompts)


def sensing_dispositions(
    status: pl.DataFrame, *, duration_days: float, staleness_hours: float, now: int
) -> pl.DataFrame:
    """One row per subject of a study status table: participant, disposition, days (to the
    event or censoring), dropped (an event for Kaplan-Meier), start, end (ms).

    - not started: no data from any device;
    - completed: the newest data reached the end of the protocol period (start + duration)
      less the staleness allowance;
    - withdrawn: every device left before the end of the period, at the latest ``time_left``;
    - lost to follow-up: silent for the staleness allowance or longer, at the newest data;
    - active: none of these yet (inside the protocol period), censored at ``now``.

    Example: ``sensing_dispositions(status, duration_days=28, staleness_hours=48, now=now)``.
    """
    duration = duration_days * DAY_MS
    allowance = staleness_hours * HOUR_MS
    t = status.with_columns(
        pl.col("date_registered", "date_left_study", "last_data").cast(pl.Int64)
    )
    per = t.group_by("subject_name").agg(
        pl.col("date_registered").min().alias("start"),
        pl.col("last_data").max().alias("last_data"),
        pl.col("date_left_study").max().alias("left"),
        (
            pl.col("status_code").is_not_null().any()
            & pl.col("status_code").is_in(LEFT_STATUSES).all()
        ).alias("all_left"),
    )
    period_end = pl.col("start") + duration
    d = Disposition
    disposition = (
        pl.when(pl.col("last_data").is_null() | pl.col("start").is_null())
        .then(pl.lit(d.NOT_STARTED.value))
        .when(pl.col("last_data") >= period_end - allowance)
        .then(pl.lit(d.COMPLETED.value))
        .when(pl.col("all_left") & (pl.coalesce("left", "last_data") < period_end))
        .then(pl.lit(d.WITHDRAWN.value))
        .when(now - pl.col("last_data") >= allowance)
        .then(pl.lit(d.LOST.value))
        .otherwise(pl.lit(d.ACTIVE.value))
    )
    end = (
        pl.when(pl.col("disposition") == d.WITHDRAWN.value)
        .then(pl.coalesce("left", "last_data"))
        .when(pl.col("disposition") == d.LOST.value)
        .then(pl.col("last_data"))
        .when(pl.col("disposition") == d.COMPLETED.value)
        .then(period_end)
        .when(pl.col("disposition") == d.ACTIVE.value)
        .then(pl.min_horizontal(pl.lit(now), period_end))
    )
    return (
        per.with_columns(disposition.alias("disposition"))
        .with_columns(end.alias("end"))
        .with_columns(
            ((pl.col("end") - pl.col("start")) / DAY_MS)
            .clip(lower_bound=0, upper_bound=duration_days)
            .alias("days"),
            pl.col("disposition").is_in([x.value for x in DROPPED]).alias("dropped"),
        )
        .select(
            pl.col("subject_name").alias("participant"),
            "disposition",
            "days",
            "dropped",
            "start",
            "end",
        )
        .sort("participant")
    )


def _sensing_attrition(
    study, status: pl.DataFrame, *, now: int, prompts: pl.DataFrame | None = None
) -> Attrition:
    definition = study.definition
    people = sensing_dispositions(
        status,
        duration_days=definition["duration_days"],
        staleness_hours=definition["staleness_hours"],
        now=now,
    )
    compliance = pl.DataFrame()
    per_day = ema_prompts_per_day(study)
    if per_day and prompts is not None:
        compliance = ema_compliance(people, prompts, prompts_per_day=per_day)
    return _summarise(study.id, "sensing", people.drop("end"), compliance)


# ---------------------------------------------------------------------------- EMA compliance


def ema_prompts_per_day(study) -> float | None:
    """The EMA prompts a subject of ``study`` is given per day: ``ema_prompts_per_day`` of
    the definition, else the ``ema`` sensor's ``batches_per_day``; None without EMA."""
    definition = study.definition
    if definition.get("ema_prompts_per_day"):
        return float(definition["ema_prompts_per_day"])
    if "ema" in definition["sensors"]:
        return float(definition["sensors"]["ema"]["batches_per_day"])
    return None


def prompt_key(record: dict) -> tuple[str, int] | None:
    """The answered prompt an ``ema`` record belongs to: (survey version, start time in ms).

    The EMA app uploads one record per answered question; the records of one prompt share
    the survey (``surveyVersion``) and the moment the prompt was opened (``startTime``,
    epoch ms as a string). A record without ``startTime`` is a prompt of its own, at its
    ``timestamp``. None for a record with neither.
    """
    start = record.get("startTime")
    try:
        at = int(start) if start not in (None, "") else int(record["timestamp"])
    except (KeyError, TypeError, ValueError):
        return None
    survey = record.get("surveyVersion") if start not in (None, "") else "record"
    return str(survey), at


def answered_prompts(config: Config, catalog, study_id: str) -> pl.DataFrame:
    """Every answered EMA prompt of a study, from the stored ``ema`` batches of all the
    subjects' devices (both apps), once each: columns participant, survey, at (ms).

    Example: ``answered_prompts(config, catalog, "demo").group_by("participant").len()``.
    """
    import orjson
    from sqlalchemy import select

    from workbench.catalog import uploads

    u = uploads.c
    with catalog.engine.connect() as conn:
        stored = conn.execute(
            select(u.subject_id, u.path)
            .where(u.study_id == study_id, u.sensor == "ema")
            .order_by(u.id)
        ).all()
    found: set[tuple[str, str, int]] = set()
    for subject, path in stored:
        try:
            records = orjson.loads(DataPool.of(config).path(path).read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("EMA batch %s left out of compliance: %s", path, exc)
            continue
        for record in records if isinstance(records, list) else ():
            key = prompt_key(record) if isinstance(record, dict) else None
            if key is not None:
                found.add((subject, *key))
    return pl.DataFrame(
        sorted(found),
        schema={"participant": pl.String, "survey": pl.String, "at": pl.Int64},
        orient="row",
    )


def ema_compliance(
    people: pl.DataFrame, prompts: pl.DataFrame, *, prompts_per_day: float
) -> pl.DataFrame:
    """EMA compliance per subject: answered prompts / prompts due, in %, capped at 100.

    ``people`` has participant, disposition, start and end (ms; from
    :func:`sensing_dispositions`), ``prompts`` participant and at (ms; from
    :func:`answered_prompts`). Prompts due are ``prompts_per_day`` times the whole days
    (24 h from the start) in the study up to ``end``; answered are the distinct prompts
    opened between start and end. Subjects who never started get no percentage
    (``started`` false): they are counted apart, not as 0 %.

    Example: ``ema_compliance(people, prompts, prompts_per_day=5)``.
    """
    window = people.select("participant", "disposition", "start", "end")
    answered = (
        prompts.join(window, on="participant", how="inner")
        .filter((pl.col("at") >= pl.col("start")) & (pl.col("at") < pl.col("end")))
        .group_by("participant")
        .agg(pl.len().cast(pl.Int64).alias("prompts_answered"))
    )
    started = pl.col("disposition") != "not started"
    whole_days = ((pl.col("end") - pl.col("start")) // DAY_MS).clip(lower_bound=0)
    due = (prompts_per_day * pl.col("days_in_study")).floor().cast(pl.Int64)
    return (
        window.join(answered, on="participant", how="left")
        .with_columns(
            started.alias("started"),
            pl.when(started).then(whole_days).cast(pl.Int64).alias("days_in_study"),
            pl.col("prompts_answered").fill_null(0),
        )
        .with_columns(due.alias("prompts_due"))
        .with_columns(
            pl.when(pl.col("prompts_due") > 0)
            .then(
                (100 * pl.col("prompts_answered") / pl.col("prompts_due"))
                .clip(upper_bound=100)
                .round(1)
            )
            .alias("compliance_pct")
        )
        .with_columns((pl.col("compliance_pct") < COMPLIANCE_TARGET).alias("below_80_pct"))
        .select(
            "participant",
            "started",
            "days_in_study",
            "prompts_due",
            "prompts_answered",
            "compliance_pct",
            "below_80_pct",
        )
        .sort("participant")
    )


# ---------------------------------------------------------------------------- questionnaires


def questionnaire_dispositions(
    visits: pl.DataFrame,
    *,
    now: int,
    session_days: dict[str, float] | None = None,
    grace_days: float = 7.0,
    final: str | None = None,
) -> pl.DataFrame:
    """One row per participant of ``visits`` (participant, session, at in ms): participant,
    disposition, days, dropped, start.

    With ``session_days`` (each session's due day from the participant's first answer):
    completed = the last scheduled session answered; lost to follow-up = a scheduled session
    unanswered more than ``grace_days`` after it was due (the event at the last answer);
    active = waiting for the next session (censored at ``now``). Without it: completed =
    ``final`` answered, lost = silent for more than 14 days.

    Example: ``questionnaire_dispositions(visits, now=now, session_days={"PRE": 0, "POST": 56})``.
    """
    rows = []
    grace = grace_days * DAY_MS
    ordered = sorted((session_days or {}).items(), key=lambda item: (item[1], item[0]))
    last_session = ordered[-1][0] if ordered else final
    per = visits.group_by("participant").agg(
        pl.col("at").min().alias("start"),
        pl.col("at").max().alias("last"),
        pl.col("session").drop_nulls().unique().alias("sessions"),
    )
    for person, start, last, sessions in per.sort("participant").iter_rows():
        done = set(sessions)
        if last_session is not None and last_session in done:
            disposition, end = "completed", last
        elif ordered:
            missed = any(s not in done and start + day * DAY_MS + grace < now for s, day in ordered)
            disposition, end = ("lost to follow-up", last) if missed else ("active", now)
        else:
            silent = last < now - LOST_AFTER_DAYS * DAY_MS
            disposition, end = ("lost to follow-up", last) if silent else ("active", now)
        rows.append(
            {
                "participant": person,
                "disposition": disposition,
                "days": max(end - start, 0) / DAY_MS,
                "dropped": disposition == "lost to follow-up",
                "start": start,
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "participant": pl.String,
            "disposition": pl.String,
            "days": pl.Float64,
            "dropped": pl.Boolean,
            "start": pl.Int64,
        },
    )


def _final_session(schedule: dict, seen: list[str]) -> str | None:
    """Without due days: the session the schedule lists last (in its longest list), else
    "POST" when answers hold one."""
    lists = [v for v in schedule.values() if v]
    if lists:
        return max(lists, key=len)[-1]
    return "POST" if "POST" in seen else None


def _questionnaire_attrition(config: Config, source: str, *, now: int) -> Attrition:
    tables = _tables(config, source)
    rows = []
    for (_src, _table), frame in tables.items():
        if {"participant", "date"} <= set(frame.columns):
            columns = [
                pl.col("participant"),
                pl.col("date").cast(pl.String).alias("date"),
            ]
            columns.append(
                pl.col("session").cast(pl.String)
                if "session" in frame.columns
                else pl.lit(None, dtype=pl.String).alias("session")
            )
            rows.append(frame.select(columns))
    if not rows:
        raise WorkbenchError(f"source {source!r} has no tables with participant and date")
    text = pl.col("date").str.replace("T", " ").str.replace("Z", "")
    at = pl.coalesce(
        [text.str.to_datetime(f, strict=False, time_zone="UTC") for f in DATE_FORMATS]
    ).dt.epoch("ms")
    visits = pl.concat(rows).drop_nulls("participant").with_columns(at.alias("at"))
    undated = visits.filter(pl.col("at").is_null()).height
    if undated:
        log.warning("%s: %d answers without a readable date are left out", source, undated)
    visits = visits.drop_nulls("at")
    settings = config.source(source)
    if not settings.session_days:
        log.info(
            "%s: no session_days in workbench.toml; lost to follow-up means %d days silent",
            source,
            LOST_AFTER_DAYS,
        )
    people = questionnaire_dispositions(
        visits,
        now=now,
        session_days=settings.session_days,
        grace_days=settings.grace_days,
        final=_final_session(settings.schedule, visits["session"].drop_nulls().to_list()),
    )
    return _summarise(source, "questionnaire", people, pl.DataFrame())


def attrition_methods(config: Config, result: Attrition) -> str:
    """The methods paragraph of an attrition report (rules applied, with their sources), from
    the study's definition or the source's schedule, ready to paste into a paper.

    Example: ``write_report(..., methods=attrition_methods(config, result))``.
    """
    if result.kind == "questionnaire":
        source = config.source(result.name)
        return methods_text(result, session_days=source.session_days, grace_days=source.grace_days)
    from workbench.studies import get_study

    catalog = open_catalog(config)
    try:
        study = get_study(catalog, result.name)
    finally:
        catalog.dispose()
    return methods_text(
        result,
        duration_days=study.definition["duration_days"],
        staleness_hours=study.definition["staleness_hours"],
        prompts_per_day=ema_prompts_per_day(study) if not result.compliance.is_empty() else None,
    )


def methods_text(
    result: Attrition,
    *,
    duration_days: float | None = None,
    staleness_hours: float | None = None,
    session_days: dict[str, float] | None = None,
    grace_days: float | None = None,
    prompts_per_day: float | None = None,
) -> str:
    """A methods paragraph for an attrition report: the rules applied, with their sources,
    ready to paste into a paper.

    Example: ``methods_text(result, duration_days=28, staleness_hours=48)``.
    """
    if result.kind == "sensing":
        rules = (
            f"Each participant's disposition was derived from the uploaded data: withdrawn at "
            f"the time every device left the study; completed when data reached the end of the "
            f"{duration_days:g}-day protocol period, counted from the participant's first "
            f"device registration, less a staleness allowance of {staleness_hours:g} hours; "
            f"otherwise lost to follow-up at the time of the last data once no data had "
            f"arrived for the staleness allowance. Participants still inside their protocol "
            f"period were active and censored at the report date; participants who never sent "
            f"data were counted as not started."
        )
    elif session_days:
        listed = ", ".join(
            f"{s} on day {d:g}" for s, d in sorted(session_days.items(), key=lambda x: x[1])
        )
        rules = (
            f"Each participant's disposition followed the assessment schedule ({listed}, from "
            f"the participant's first answer): completed when the last scheduled session was "
            f"answered; lost to follow-up, at the last answer, when a scheduled session was "
            f"missed by more than {grace_days:g} days of grace; otherwise active and censored "
            f"at the report date."
        )
    else:
        rules = (
            "Each participant's disposition followed the questionnaire answers: completed when "
            "the last scheduled session was answered; lost to follow-up, at the last answer, "
            f"after {LOST_AFTER_DAYS} days without an answer; otherwise active and censored at "
            "the report date."
        )
    text = (
        f"{rules} Participant flow is reported following CONSORT 2010 (Schulz, Altman & Moher, "
        "2010). Retention was estimated with the Kaplan-Meier product-limit estimator (Kaplan "
        "& Meier, 1958), withdrawal and loss to follow-up being events and other participants "
        "censored, with 95 % confidence bands from Greenwood's variance (Greenwood, 1926) on "
        "the log(-log) scale (Kalbfleisch & Prentice, 2002); the usage half-life is the "
        "median retention time."
    )
    if prompts_per_day:
        text += (
            f" EMA compliance was the number of distinct prompts answered (records grouped by "
            f"survey and prompt start time) divided by the prompts due, {prompts_per_day:g} per "
            f"day over each participant's whole days in the study, capped at 100 %; "
            f"participants who never sent data were reported apart; {COMPLIANCE_TARGET:g} % is "
            f"the usual threshold (Jones et al., 2019; Wrzus & Neubauer, 2023)."
        )
    return text


def cohort_of(start: pl.Expr) -> pl.Expr:
    """The cohort of a participant: the calendar month (UTC) they started, e.g. "2026-11"."""
    return pl.from_epoch(start, time_unit="ms").dt.strftime("%Y-%m")


def subset_attrition(
    result: Attrition,
    *,
    cohort: str | None = None,
    since: int | None = None,
    until: int | None = None,
) -> Attrition:
    """The attrition of the participants of ``result`` who started in ``cohort`` (a month,
    see :func:`cohort_of`) and between ``since`` and ``until`` (ms, inclusive).

    Example: ``subset_attrition(attrition(config, "demo"), cohort="2026-11")``.
    """
    people = result.dispositions
    keep = pl.lit(True)
    if cohort:
        keep &= cohort_of(pl.col("start")) == cohort
    if since is not None:
        keep &= pl.col("start") >= since
    if until is not None:
        keep &= pl.col("start") <= until
    people = people.filter(keep)
    compliance = result.compliance
    if not compliance.is_empty():
        compliance = compliance.join(people.select("participant"), on="participant", how="semi")
    return _summarise(result.name, result.kind, people, compliance)


def completion_by_session(config: Config, source: str) -> pl.DataFrame:
    """Per session and questionnaire of a source: how many participants answered it and what
    share of the source's participants that is.

    Example: ``completion_by_session(config, "mindtrails").filter(pl.col("session") == "PRE")``.
    """
    frames = []
    for (_src, table), frame in _tables(config, source).items():
        if {"participant", "session"} <= set(frame.columns):
            frames.append(
                frame.select(
                    pl.col("participant").cast(pl.String),
                    pl.col("session").cast(pl.String),
                    pl.lit(table).alias("questionnaire"),
                ).drop_nulls()
            )
    schema = {
        "session": pl.String,
        "questionnaire": pl.String,
        "participants": pl.UInt32,
        "pct": pl.Float64,
    }
    if not frames:
        return pl.DataFrame(schema=schema)
    answers = pl.concat(frames)
    everyone = answers["participant"].n_unique()
    return (
        answers.group_by("session", "questionnaire")
        .agg(pl.col("participant").n_unique().alias("participants"))
        .with_columns((100 * pl.col("participants") / everyone).round(1).alias("pct"))
        .sort("session", "questionnaire")
        .cast(schema)
    )


def _summarise(name: str, kind: str, people: pl.DataFrame, compliance: pl.DataFrame) -> Attrition:
    counts = dict(people.group_by("disposition").len().iter_rows())
    enrolled = people.height
    started = enrolled - counts.get("not started", 0)
    consort = pl.DataFrame(
        {
            "stage": [
                "enrolled",
                "started",
                "active",
                "completed",
                "withdrawn",
                "lost to follow-up",
                "not started",
            ],
            "n": [enrolled, started] + [counts.get(d, 0) for d in DISPOSITIONS],
        }
    )
    began = people.filter(pl.col("disposition") != "not started")
    curve = kaplan_meier(began["days"].to_list(), began["dropped"].to_list())
    weeks = (
        began.with_columns((pl.col("days") // 7).cast(pl.Int64).alias("week"))
        .group_by("week")
        .agg(pl.col("dropped").sum().alias("dropped"), pl.len().alias("ended"))
        .sort("week")
    )
    at_risk, rows = began.height, []
    for week, dropped, ended in weeks.iter_rows():
        rows.append({"week": week, "at_risk": at_risk, "dropped": dropped})
        at_risk -= ended
    dropout = pl.DataFrame(
        rows, schema={"week": pl.Int64, "at_risk": pl.Int64, "dropped": pl.Int64}
    )
    return Attrition(
        name=name,
        kind=kind,
        dispositions=people,
        consort=consort,
        retention=curve,
        dropout_by_week=dropout,
        half_life_days=median_survival(curve),
        compliance=compliance,
    )


# ---------------------------------------------------------------------------- output


@dataclass(frozen=True)
class WrittenReport:
    """A report written to the pool: its files (the HTML page last) and summary lines."""

    paths: list[Path]
    lines: list[str]

    @property
    def page(self) -> Path:
        return self.paths[-1]


def write_questionnaire_report(config: Config, source: str | None = None) -> WrittenReport:
    """Write the questionnaire data-quality report of ``source`` (or all): column checks,
    reliability per instrument and session, change over time, and its methods paragraph.

    Example: ``write_questionnaire_report(config, "mindtrails").page``.
    """
    from workbench.instruments import instrument

    table = questionnaire_report(config, source)
    psychometrics = reliability_report(config, source)
    change = change_report(config, source)
    used = sorted(set(table["instrument"].drop_nulls().to_list()))
    instruments = [instrument(name, config=config) for name in used]
    paths = write_report(
        DataPool.of(config).reports / "questionnaires",
        f"quality_{source or 'all'}",
        {"columns": table, **psychometrics, "change": change},
        title=f"Questionnaire data quality: {source or 'all sources'}",
        methods=questionnaire_methods(instruments) if instruments else None,
    )
    flagged = table.filter(
        (pl.col("pct_blank") > 0)
        | (pl.col("special_codes").fill_null(0) > 0)
        | (pl.col("out_of_range").fill_null(0) > 0)
        | (pl.col("invalid_choices").fill_null(0) > 0)
    )
    reliability = psychometrics["reliability"]
    low = reliability.filter(pl.col("alpha") < 0.7)
    return WrittenReport(
        paths,
        [
            f"{table.height} columns checked, {flagged.height} with blanks, codes or invalid answers",
            f"{reliability.height} scale-sessions, {low.height} with alpha below 0.7",
        ],
    )


def write_participant_report(config: Config, source: str | None = None) -> WrittenReport:
    """Write the report of questionnaires and sessions each participant is missing.

    Example: ``write_participant_report(config, "mindtrails").page``.
    """
    table = participant_report(config, source)
    paths = write_report(
        DataPool.of(config).reports / "questionnaires",
        f"participants_{source or 'all'}",
        {"participants": table},
        title=f"Missing questionnaires per participant: {source or 'all sources'}",
    )
    incomplete = table.filter(pl.col("missing") > 0).height
    return WrittenReport(
        paths,
        [f"{table.height} participants, {incomplete} with missing questionnaires or sessions"],
    )


def write_attrition_report(
    config: Config, name: str, *, now: int | None = None
) -> tuple[Attrition, WrittenReport]:
    """Write the attrition report of a sensing study or questionnaire source (dispositions,
    CONSORT counts, retention, dropout, compliance) with its methods paragraph.

    Example: ``result, written = write_attrition_report(config, "demo")``.
    """
    result = attrition(config, name, now=now)
    half = "not reached" if result.half_life_days is None else f"{result.half_life_days:.1f} days"
    notes = [f"{result.kind} study; usage half-life (median retention): {half}"]
    if not result.compliance.is_empty():
        started = result.compliance.filter("started")
        below = int(started["below_80_pct"].sum())
        notes.append(
            f"EMA compliance below 80 %: {below} of {started.height} subjects who started "
            f"({result.compliance.height - started.height} never started, counted apart)"
        )
    paths = write_report(
        DataPool.of(config).reports / "attrition",
        name,
        result.tables(),
        title=f"Attrition: {name}",
        notes=notes,
        methods=attrition_methods(config, result),
    )
    return result, WrittenReport(paths, notes)
