"""Safety items of questionnaires: newly decoded rows checked, alerts opened and mailed at once.

A source maps its tables to instruments (``[[sources]] instruments = {PHQ9 = "phq9"}``). Each
export (and each rebuild) checks the rows it decodes of those tables against the instrument's
safety items (PHQ-9: item 9 at 1 or more): a positive or missing safety item opens one
``safety`` alert per participant and session (:func:`workbench.alerts.open_safety_alerts`),
mailed at once, on its own, to the source's ``safety_contacts`` (else the ``[smtp]``
recipients). In the alerts table a safety alert has the source as its study, the participant
id as its subject and the session as its device.

Neither alerts, mails nor logs carry an answer or a score: only the source, participant,
session, instrument, which safety rule and what to do (see ``docs/safety.md``).

Example::

    opened = check_new_rows(catalog, config.source("mindtrails"), "PHQ9", decoded)
    mail_pending(config, catalog, config.source("mindtrails"))
"""

from __future__ import annotations

import dataclasses
import datetime
import logging

import polars as pl

from workbench.alerts import (
    Alert,
    mail_safety_alert,
    open_safety_alerts,
    pending_safety_alerts,
)
from workbench.catalog import Catalog
from workbench.config import Config, SourceConfig
from workbench.errors import MailError, WorkbenchError
from workbench.instruments import Instrument, instrument, score
from workbench.times import now_ms

log = logging.getLogger("workbench.safety")

PARTICIPANT = "participant"
SESSION = "session"


def source_instruments(
    source: SourceConfig, *, config: Config | None = None
) -> dict[str, Instrument]:
    """The instruments the source's tables hold, loaded (an unknown one is an error now); with
    ``config``, the home's own instruments come first."""
    return {table: instrument(name, config=config) for table, name in source.instruments.items()}


def safety_findings(
    frame: pl.DataFrame, inst: Instrument, table: str, *, now: int | None = None
) -> list[dict]:
    """One finding per participant and session of ``frame`` with a safety item at or above its
    threshold or missing: ``subject``, ``session``, ``since`` (the earliest such row's date),
    ``detail`` (the instrument, table and rules, never an answer) and ``action``.

    Example: ``safety_findings(decoded, instrument("phq9"), "PHQ9")``.
    """
    if not inst.safety or frame.is_empty():
        return []
    now = now_ms() if now is None else now
    flags = []
    for n, rule in enumerate(inst.definition["safety"]):  # each rule on its own, for the detail
        single = dataclasses.replace(inst, definition={**inst.definition, "safety": [rule]})
        flags.append(score(frame, single)[f"{inst.id}_safety"].alias(f"rule{n}"))
    keys = frame.select(
        (
            pl.col(PARTICIPANT).cast(pl.String)
            if PARTICIPANT in frame.columns
            else pl.lit(None, dtype=pl.String)
        ).alias("subject"),
        (
            pl.col(SESSION).cast(pl.String)
            if SESSION in frame.columns
            else pl.lit(None, dtype=pl.String)
        ).alias("session"),
        (pl.col("date").cast(pl.String) if "date" in frame.columns else pl.lit(None)).alias("date"),
        (pl.col("id") if "id" in frame.columns else pl.int_range(pl.len())).alias("row"),
    ).with_columns(flags)
    found: dict[tuple[str, str], dict] = {}
    rules = inst.safety
    for row in keys.iter_rows(named=True):
        states = [row[f"rule{n}"] for n in range(len(rules))]
        if all(state is False for state in states):
            continue
        subject = row["subject"] or f"unknown (row {row['row']})"
        key = (subject, row["session"] or "")
        entry = found.setdefault(
            key, {"since": None, "positive": set(), "missing": set(), "rows": 0}
        )
        since = _ms(row["date"])
        if since is not None and (entry["since"] is None or since < entry["since"]):
            entry["since"] = since
        for n, state in enumerate(states):
            if state is True:
                entry["positive"].add(n)
            elif state is None:
                entry["missing"].add(n)
    out = []
    for (subject, session), entry in found.items():
        parts = [
            f"{rules[n].label}: at or above the threshold" for n in sorted(entry["positive"])
        ] + [
            f"item '{rules[n].item}' not answered, so {rules[n].label} cannot be ruled out"
            for n in sorted(entry["missing"] - entry["positive"])
        ]
        chosen = sorted(entry["positive"]) or sorted(entry["missing"])
        out.append(
            {
                "subject": subject,
                "session": session,
                "since": entry["since"] if entry["since"] is not None else now,
                "detail": f"{inst.name} (table {table}, session {session or 'none'}): "
                + "; ".join(parts),
                "action": " / ".join(dict.fromkeys(rules[n].action for n in chosen)),
            }
        )
    return out


def _ms(text: str | None) -> int | None:
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


def check_new_rows(
    catalog: Catalog,
    source: SourceConfig,
    table: str,
    frame: pl.DataFrame,
    *,
    config: Config | None = None,
) -> list[Alert]:
    """Check newly decoded rows of one table against its instrument's safety items and open
    the safety alerts they call for; return the alerts opened now (none twice).

    Example: ``check_new_rows(catalog, config.source("mindtrails"), "PHQ9", decoded)``.
    """
    name = source.instruments.get(table)
    if name is None:
        return []
    inst = instrument(name, config=config)
    if not inst.safety:
        return []
    try:
        findings = safety_findings(frame, inst, table)
    except WorkbenchError as exc:  # e.g. the table is not the instrument's
        log.critical(
            "%s/%s: safety items of %s could not be checked: %s",
            source.name,
            table,
            inst.id,
            exc.message,
        )
        return []
    opened = open_safety_alerts(catalog, source.name, findings)
    for alert in opened:
        log.warning(
            "safety alert %d opened: source %s, participant %s, session %s, %s",
            alert.id,
            alert.study,
            alert.subject,
            alert.device or "none",
            inst.name,
        )
    return opened


def mail_pending(config: Config, catalog: Catalog, source: SourceConfig) -> int:
    """Mail each safety alert of the source not mailed yet, one mail each, to its safety
    contacts (else the [smtp] recipients); return how many were mailed. A mail that fails is
    logged and tried again at the next export."""
    pending = pending_safety_alerts(catalog, source.name)
    if not pending:
        return 0
    if config.smtp is None:
        log.error(
            "%s: %d safety alert(s) not mailed: [smtp] is off (ids %s); see `workbench alerts`",
            source.name,
            len(pending),
            ", ".join(str(a.id) for a in pending),
        )
        return 0
    to = list(source.safety_contacts) or list(config.smtp.recipients)
    mailed = 0
    for alert in pending:
        try:
            mail_safety_alert(catalog, config.smtp, alert, to=to)
        except MailError as exc:
            log.error(
                "safety alert %d could not be mailed (tried again next export): %s",
                alert.id,
                exc.message,
            )
            continue
        mailed += 1
        log.info("safety alert %d mailed to %s", alert.id, ", ".join(to))
    return mailed
