"""Alerts: what a study's coordinator should act on, opened and closed by each status refresh.

An alert opens when its condition first holds for a subject (or one of its devices) and closes
by itself when the condition ends (data resumes, the subject leaves, ...). Each is mailed once,
in a digest, when it opens; a coordinator acknowledges it with :func:`ack_alert`.

Kinds, from a study's status table (:mod:`workbench.status`):

    stale             a device that sent data has sent nothing for the staleness threshold
    never_sent        enrolled (or registered a device) and never sent data, past the threshold
    over_not_left     the study's duration is over but the device has not left
    several_devices   more than one device of the same app is active for the subject
    low_completeness  an active device's completeness is below the study's target
    low_yield         an active subject's data yield stayed under the study's target, in every
                      sampled sensor, for the study's number of complete local days

and from sync (:mod:`workbench.sync`), with the provider in place of the device:

    sync_revoked      a provider refused an account's token (expired or revoked)

and from the questionnaire export (:mod:`workbench.safety`), with the source in place of the
study, the participant in place of the subject and the session in place of the device:

    safety            a safety item (PHQ-9 item 9) at or above its threshold, or not answered

A safety alert is different: it is mailed at once, alone, to the source's safety contacts (not
in the digest); it is listed before every other alert; and it is closed only by an
acknowledgement with a note (who and when are recorded), never by itself. Only one is ever
opened per source, participant and session (a unique index in the catalog).

Example::

    for alert in list_alerts(catalog, "demo"):
        print(alert.id, alert.subject, alert.kind, alert.action)
    ack_alert(catalog, 7, by="coordinator", note="called, phone was off")
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass

import polars as pl
from sqlalchemy import case, select, update

from workbench.catalog import Catalog, alerts, dialect_insert
from workbench.config import SmtpConfig
from workbench.errors import AlreadyAcknowledged, MailError, NoteRequired, UnknownAlert
from workbench.mail import send_mail
from workbench.status import sampled_sensors
from workbench.studies import Study
from workbench.subject_state import Activity, DeviceStatus
from workbench.times import HOUR_MS, iso_or_none, now_ms

__all__ = [
    "ACTIONS",
    "Alert",
    "MailError",
    "ack_alert",
    "list_alerts",
    "list_safety_alerts",
    "mail_new_alerts",
    "mail_safety_alert",
    "open_safety_alerts",
    "update_alerts",
]

# What to do about each kind: shown with every alert and in the mail.
ACTIONS = {
    "stale": "contact the subject: check the app still runs and has its permissions",
    "never_sent": "check the subject installed the app and scanned the enrollment QR code",
    "over_not_left": "the study period is over: ask the subject to end the study in the app",
    "several_devices": "confirm which device is in use and ask the subject to leave on the others",
    "low_completeness": "check the phone's battery optimisation and sensor permissions",
    "low_yield": "check the app keeps recording: battery optimisation off, sensor and location "
    "permissions granted, phone charged and carried",
    "sync_revoked": "ask the subject to link the provider again: workbench sync link STUDY SUBJECT PROVIDER",
    "safety": "follow the study's safety protocol, then acknowledge with a note of what was done",
}
SAFETY = "safety"
# The kinds a status refresh opens and closes; others (sync) are closed by their own module.
STATUS_KINDS = (
    "stale",
    "never_sent",
    "over_not_left",
    "several_devices",
    "low_completeness",
    "low_yield",
)


@dataclass(frozen=True)
class Alert:
    """One alert, open or closed."""

    id: int
    study: str
    subject: str
    device: str
    kind: str
    since: int
    detail: str
    opened_at: int
    closed_at: int | None
    mailed_at: int | None
    acked_at: int | None
    acked_by: str | None
    note: str | None
    instruction: str | None = None  # what to do, when the alert says it itself (safety)

    @property
    def action(self) -> str:
        return self.instruction or ACTIONS[self.kind]

    @property
    def is_safety(self) -> bool:
        return self.kind == SAFETY

    @property
    def is_open(self) -> bool:
        return self.closed_at is None

    def as_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        del out["instruction"]
        for name in ("since", "opened_at", "closed_at", "mailed_at", "acked_at"):
            out[name] = iso_or_none(out[name])
        out["action"] = self.action
        return out


def alert_conditions(
    study: Study, table: pl.DataFrame, *, now: int, yields: pl.DataFrame | None = None
) -> dict:
    """The alerts a status table (and the subjects' daily data yield, when the study has
    sensor tables) calls for: ``{(subject, device, kind): (since, detail)}``."""
    definition = study.definition
    target = definition["completeness_target_pct"]
    hours = definition["staleness_hours"]
    sensors = list(definition["sensors"])
    t = table.with_columns(
        pl.col("last_data", "date_registered", "activity_since").cast(pl.Int64),
        pl.col("device_id").fill_null(""),
    )
    code = pl.col("activity_code")
    found: dict[tuple[str, str, str], tuple[int, str]] = {}

    for r in t.filter((code == Activity.NO_DATA) & pl.col("last_data").is_not_null()).iter_rows(
        named=True
    ):
        found[(r["subject_name"], r["device_id"], "stale")] = (
            r["last_data"],
            f"no data from {r['device_id']} for over {hours:g} h (last at {iso_or_none(r['last_data'])})",
        )
    for r in t.filter((code == Activity.NO_DATA) & pl.col("last_data").is_null()).iter_rows(
        named=True
    ):
        device = r["device_id"]
        what = f"device {device}" if device else "no device registered"
        found[(r["subject_name"], device, "never_sent")] = (
            r["activity_since"] - int(hours * HOUR_MS),
            f"no data ever received ({what})",
        )
    for r in t.filter(code == Activity.OVER_NOT_LEFT).iter_rows(named=True):
        found[(r["subject_name"], r["device_id"], "over_not_left")] = (
            r["activity_since"],
            f"{definition['duration_days']} days are over; {r['device_id']} is still active",
        )
    several = (
        t.filter(
            (code == Activity.SEVERAL_DEVICES) & (pl.col("status_code") == DeviceStatus.ACTIVE)
        )
        .group_by("subject_name", "app")
        .agg(pl.col("device_id").sort(), pl.col("activity_since").max())
    )
    for r in several.iter_rows(named=True):
        found[(r["subject_name"], "", "several_devices")] = (
            r["activity_since"],
            f"{len(r['device_id'])} active {r['app']} devices: {', '.join(r['device_id'])}",
        )
    completeness = [f"{s}_completeness" for s in sensors]
    low = t.filter(
        (pl.col("status_code") == DeviceStatus.ACTIVE)
        & (pl.col("time_in_study") >= 1)
        & pl.any_horizontal(pl.col(completeness) < target)
    )
    for r in low.select("subject_name", "device_id", *completeness).iter_rows(named=True):
        below = [
            f"{s} {r[c]:g}%"
            for s, c in zip(sensors, completeness, strict=True)
            if r[c] is not None and r[c] < target
        ]
        found[(r["subject_name"], r["device_id"], "low_completeness")] = (
            now,
            f"completeness below {target:g}%: {', '.join(below)}",
        )
    if yields is not None:
        found.update(low_yield(study, t, yields))
    return found


def low_yield(study: Study, table: pl.DataFrame, yields: pl.DataFrame) -> dict:
    """The ``low_yield`` alerts: a subject with an active device that sends data (activity ok
    or several devices; a silent one has its ``stale`` alert) whose best sampled sensor's
    ``yield_pct`` was under ``yield_target_pct`` on each of the last ``yield_alert_days``
    complete local days, all of them in the study. Sensors without a nominal sampling
    interval (EMA, labels) are left out: their yield says nothing of whether the phone
    records. ``yields`` is :func:`workbench.status.subject_yield`'s frame."""
    definition = study.definition
    target = float(definition.get("yield_target_pct", 50))
    days = int(definition.get("yield_alert_days", 3))
    sampled = sampled_sensors(study)
    eligible = (
        table.filter(
            (pl.col("status_code") == DeviceStatus.ACTIVE)
            & pl.col("activity_code").is_in([Activity.OK, Activity.SEVERAL_DEVICES])
        )["subject_name"]
        .unique()
        .to_list()
    )
    best = (
        yields.filter(
            pl.col("subject").is_in(eligible),
            pl.col("sensor").is_in(sampled),
            pl.col("yield_pct").is_not_null(),
        )
        .sort("yield_pct", "sensor", descending=[True, False])
        .group_by("subject", "days_ago", maintain_order=True)
        .agg(pl.col("day", "day_start", "sensor", "yield_pct").first())
        .sort("subject", "days_ago")
    )
    found: dict[tuple[str, str, str], tuple[int, str]] = {}
    for (subject,), rows in best.group_by("subject", maintain_order=True):
        run = []  # the low days from yesterday back, while they follow one another
        for r in rows.iter_rows(named=True):
            if r["days_ago"] != len(run) + 1 or r["yield_pct"] >= target:
                break
            run.append(r)
        if len(run) < days:
            continue
        first, last = run[-1], run[0]
        shown = ", ".join(f"{r['day']} {r['sensor']} {r['yield_pct']:g}%" for r in run[:days])
        found[(subject, "", "low_yield")] = (
            first["day_start"],
            f"data yield under {target:g}% in every sensor on {len(run)} days in a row "
            f"({first['day']} to {last['day']}); best sensor each day: {shown}",
        )
    return found


def update_alerts(
    catalog: Catalog,
    study: Study,
    table: pl.DataFrame,
    *,
    now: int,
    yields: pl.DataFrame | None = None,
) -> tuple[int, int]:
    """Open the alerts the status table (and the daily data yield) calls for and close those
    it no longer does; return (opened, closed)."""
    wanted = alert_conditions(study, table, now=now, yields=yields)
    c = alerts.c
    with catalog.writing(durable=False, serialize=f"alerts.{study.id}") as conn:
        open_now = {
            (r.subject_id, r.device_id, r.kind): r.id
            for r in conn.execute(
                select(c.id, c.subject_id, c.device_id, c.kind).where(
                    c.study_id == study.id, c.closed_at.is_(None), c.kind.in_(STATUS_KINDS)
                )
            )
        }
        new = [
            {
                "study_id": study.id,
                "subject_id": subject,
                "device_id": device,
                "kind": kind,
                "since": since,
                "detail": detail,
                "opened_at": now,
            }
            for (subject, device, kind), (since, detail) in wanted.items()
            if (subject, device, kind) not in open_now
        ]
        if new:
            conn.execute(alerts.insert(), new)
        ended = [alert_id for key, alert_id in open_now.items() if key not in wanted]
        if ended:
            conn.execute(update(alerts).where(c.id.in_(ended)).values(closed_at=now))
    return len(new), len(ended)


def list_alerts(
    catalog: Catalog, study: str | None = None, *, include_closed: bool = False
) -> list[Alert]:
    """Open alerts (all alerts with ``include_closed``): safety alerts first, then oldest first.

    Example: ``[a.detail for a in list_alerts(catalog, "demo")]``.
    """
    c = alerts.c
    query = select(alerts).order_by(_safety_first(), c.study_id, c.since, c.id)
    if study is not None:
        query = query.where(c.study_id == study)
    if not include_closed:
        query = query.where(c.closed_at.is_(None))
    with catalog.engine.connect() as conn:
        return [_alert(r) for r in conn.execute(query)]


def list_safety_alerts(catalog: Catalog, sources: list[str]) -> list[Alert]:
    """The open safety alerts of these questionnaire sources, oldest first.

    Example: ``list_safety_alerts(catalog, [s.name for s in config.sources])``.
    """
    c = alerts.c
    query = (
        select(alerts)
        .where(c.kind == SAFETY, c.closed_at.is_(None), c.study_id.in_(sources))
        .order_by(c.since, c.id)
    )
    with catalog.engine.connect() as conn:
        return [_alert(r) for r in conn.execute(query)]


def _safety_first():
    return case((alerts.c.kind == SAFETY, 0), else_=1)


def ack_alert(
    catalog: Catalog, alert_id: int, *, by: str | None = None, note: str | None = None
) -> Alert:
    """Record who handled an alert (default: the logged-in user), with an optional note.

    A safety alert needs a note, is closed by the acknowledgement, and is acknowledged once:
    a second acknowledgement is refused (:class:`AlreadyAcknowledged`), so the record of who
    acted and when stays as written.

    Example: ``ack_alert(catalog, 3, by="ana", note="new phone, device removed")``.
    """
    by = by or getpass.getuser()
    c = alerts.c
    now = now_ms()
    with catalog.writing() as conn:
        row = conn.execute(select(c.kind, c.acked_at).where(c.id == alert_id)).first()
        if row is None:
            raise UnknownAlert(f"no alert {alert_id}; see `workbench alerts --all`")
        values = {"acked_at": now, "acked_by": by, "note": note}
        statement = update(alerts).where(c.id == alert_id)
        if row.kind == SAFETY:
            if not (note or "").strip():
                raise NoteRequired(
                    f"alert {alert_id} is a safety alert: acknowledge it with a note of what "
                    f'was done, e.g. workbench alerts ack {alert_id} --note "called; safe"'
                )
            if row.acked_at is not None:
                raise AlreadyAcknowledged(
                    f"safety alert {alert_id} was acknowledged already; its record is kept"
                )
            values["closed_at"] = now
            statement = statement.where(c.acked_at.is_(None))
        if not conn.execute(statement.values(**values)).rowcount:
            raise AlreadyAcknowledged(
                f"safety alert {alert_id} was acknowledged already; its record is kept"
            )
    with catalog.engine.connect() as conn:
        return _alert(conn.execute(select(alerts).where(c.id == alert_id)).one())


def open_safety_alerts(
    catalog: Catalog, source: str, findings: list[dict], *, now: int | None = None
) -> list[Alert]:
    """Open a safety alert for each finding (``subject``, ``session``, ``since``, ``detail``,
    ``action``) that has none yet for its source, participant and session; return the new ones.

    Never a second alert for the same participant and session, whether the first is open,
    acknowledged or closed.

    Example: ``open_safety_alerts(catalog, "mindtrails", [{"subject": "P0001", ...}])``.
    """
    now = now_ms() if now is None else now
    c = alerts.c
    opened = []
    with catalog.writing() as conn:
        for finding in findings:
            new_id = conn.execute(
                dialect_insert(catalog.engine, alerts)
                .values(
                    study_id=source,
                    subject_id=finding["subject"],
                    device_id=finding["session"],
                    kind=SAFETY,
                    since=finding["since"],
                    detail=finding["detail"],
                    action=finding["action"],
                    opened_at=now,
                )
                .on_conflict_do_nothing(
                    index_elements=[c.study_id, c.subject_id, c.device_id],
                    index_where=c.kind == SAFETY,
                )
                .returning(c.id)
            ).scalar()
            if new_id is not None:
                opened.append(new_id)
    if not opened:
        return []
    with catalog.engine.connect() as conn:
        return [_alert(r) for r in conn.execute(select(alerts).where(c.id.in_(opened)))]


def pending_safety_alerts(catalog: Catalog, source: str) -> list[Alert]:
    """Safety alerts of ``source`` not mailed yet, oldest first."""
    c = alerts.c
    query = (
        select(alerts)
        .where(c.kind == SAFETY, c.study_id == source, c.mailed_at.is_(None))
        .order_by(c.id)
    )
    with catalog.engine.connect() as conn:
        return [_alert(r) for r in conn.execute(query)]


def safety_mail(alert: Alert) -> tuple[str, str]:
    """The subject and body of a safety alert's mail: who, which rule, what to do; never the
    answers themselves."""
    session = alert.device or "(none)"
    subject = (
        f"[workbench] SAFETY alert #{alert.id}: {alert.study} participant {alert.subject}, "
        f"session {session}"
    )
    body = "\n".join(
        [
            f"Safety alert #{alert.id} needs action now.",
            "",
            f"Source:       {alert.study}",
            f"Participant:  {alert.subject}",
            f"Session:      {session}",
            f"Since:        {iso_or_none(alert.since)}",
            f"What:         {alert.detail}",
            f"To do:        {alert.action}",
            "",
            "When it is done, acknowledge it with a note (who and when are recorded):",
            f'    workbench alerts ack {alert.id} --note "what was done"',
            "or with Acknowledge on the status dashboard. It stays open until then.",
            "The answers themselves are not in this mail.",
        ]
    )
    return subject, body + "\n"


def mail_safety_alert(
    catalog: Catalog, smtp: SmtpConfig, alert: Alert, *, to: list[str] | None = None
) -> None:
    """Mail one safety alert on its own to ``to`` (default: the [smtp] recipients) and mark it
    mailed. Raises :class:`MailError` (and marks nothing) when sending fails."""
    subject, body = safety_mail(alert)
    send_mail(smtp, subject, body, to=to)
    with catalog.writing() as conn:
        conn.execute(update(alerts).where(alerts.c.id == alert.id).values(mailed_at=now_ms()))


def mail_new_alerts(catalog: Catalog, smtp: SmtpConfig, *, now: int | None = None) -> int:
    """Mail one digest of the open alerts not mailed yet and mark them mailed; return how
    many it listed. Safety alerts are mailed on their own (:func:`mail_safety_alert`). Raises :class:`MailError` (and marks nothing) when sending fails."""
    c = alerts.c
    with catalog.engine.connect() as conn:
        pending = [
            _alert(r)
            for r in conn.execute(
                select(alerts)
                .where(c.mailed_at.is_(None), c.closed_at.is_(None), c.kind != SAFETY)
                .order_by(c.study_id, c.id)
            )
        ]
    if not pending:
        return 0
    lines = [f"{len(pending)} new alert(s) need attention:", ""]
    for alert in pending:
        where = f"{alert.subject}" + (f" / {alert.device}" if alert.device else "")
        lines += [
            f"#{alert.id} [{alert.study}] {where}: {alert.kind} since {iso_or_none(alert.since)}",
            f"    {alert.detail}",
            f"    to do: {alert.action}",
        ]
    lines += ["", "Acknowledge with: workbench alerts ack ID --note TEXT"]
    studies = sorted({a.study for a in pending})
    send_mail(
        smtp,
        f"[workbench] {len(pending)} new alert(s) in {', '.join(studies)}",
        "\n".join(lines) + "\n",
    )
    stamp = now_ms() if now is None else now
    with catalog.writing() as conn:
        conn.execute(
            update(alerts).where(c.id.in_([a.id for a in pending])).values(mailed_at=stamp)
        )
    return len(pending)


def alerts_table(items: list[Alert]) -> pl.DataFrame:
    """Alerts as a polars DataFrame (times as UTC datetimes), for display and export."""
    schema = {
        "id": pl.Int64,
        "study": pl.String,
        "subject": pl.String,
        "device": pl.String,
        "kind": pl.String,
        "since": pl.Int64,
        "detail": pl.String,
        "action": pl.String,
        "opened_at": pl.Int64,
        "closed_at": pl.Int64,
        "acked_at": pl.Int64,
        "acked_by": pl.String,
        "note": pl.String,
    }
    rows = [tuple(getattr(a, name) for name in schema) for a in items]
    table = pl.DataFrame(rows, schema=schema, orient="row")
    return table.with_columns(
        pl.col("since", "opened_at", "closed_at", "acked_at").cast(pl.Datetime("ms", "UTC"))
    )


def _alert(row) -> Alert:
    return Alert(
        id=row.id,
        study=row.study_id,
        subject=row.subject_id,
        device=row.device_id,
        kind=row.kind,
        since=row.since,
        detail=row.detail,
        opened_at=row.opened_at,
        closed_at=row.closed_at,
        mailed_at=row.mailed_at,
        acked_at=row.acked_at,
        acked_by=row.acked_by,
        note=row.note,
        instruction=row.action,
    )
