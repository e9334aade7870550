"""A subject's standing in a study, as the coordinator sets it.

Removal by the investigator (JTrack's status 3) is final for the subject: every device of
theirs is marked removed, no new device can be attached and no upload is stored, until the
coordinator restores them. The app itself may only send statuses 0, 1 and 2. The count of devices
a subject may attach (the study's ``max_devices``) includes every device ever attached, unless the
coordinator resets it (e.g. after a lost phone).

Example::

    remove_subject(catalog, "demo", "demo_00001_1", by="coordinator")
    restore_subject(catalog, "demo", "demo_00001_1")
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass

from sqlalchemy import func, select

from workbench.catalog import Catalog, devices, subjects
from workbench.errors import UnknownSubject
from workbench.identifiers import check_name
from workbench.studies import get_study
from workbench.subject_state import DeviceStatus
from workbench.times import check_timezone, now_ms

REMOVED = DeviceStatus.REMOVED
ACTIVE = DeviceStatus.ACTIVE


@dataclass(frozen=True)
class SubjectStanding:
    """What the coordinator's action left: the subject, whether removed, and device counts."""

    study: str
    subject: str
    removed_at: int | None
    removed_by: str | None
    devices: int
    devices_changed: int


def remove_subject(
    catalog: Catalog, study: str, subject: str, *, by: str | None = None
) -> SubjectStanding:
    """Remove ``subject`` from ``study`` (status 3): their devices are marked removed and
    nothing more of theirs is accepted until :func:`restore_subject`.

    Example: ``remove_subject(catalog, "demo", "demo_00001_1", by="alice")``.
    """
    study, subject = _checked(catalog, study, subject)
    now, who = now_ms(), by or _operator()
    with catalog.writing() as conn:
        _require(conn, study, subject)
        conn.execute(
            subjects.update()
            .where(_subject_key(study, subject) & subjects.c.removed_at.is_(None))
            .values(removed_at=now, removed_by=who[:128])
        )
        changed = conn.execute(
            devices.update()
            .where(_device_key(study, subject) & (devices.c.status != REMOVED))
            .values(
                status=REMOVED,
                time_left=func.coalesce(devices.c.time_left, now),
                updated_at=now,
            )
        ).rowcount
    return _standing(catalog, study, subject, changed)


def restore_subject(catalog: Catalog, study: str, subject: str) -> SubjectStanding:
    """Lift a removal: the subject's removed devices become active again and uploads are
    accepted as before.

    Example: ``restore_subject(catalog, "demo", "demo_00001_1")``.
    """
    study, subject = _checked(catalog, study, subject)
    now = now_ms()
    with catalog.writing() as conn:
        _require(conn, study, subject)
        conn.execute(
            subjects.update()
            .where(_subject_key(study, subject))
            .values(removed_at=None, removed_by=None)
        )
        changed = conn.execute(
            devices.update()
            .where(_device_key(study, subject) & (devices.c.status == REMOVED))
            .values(status=ACTIVE, time_left=None, updated_at=now)
        ).rowcount
    return _standing(catalog, study, subject, changed)


def reset_devices(catalog: Catalog, study: str, subject: str) -> SubjectStanding:
    """Let ``subject`` attach devices again up to the study's ``max_devices``: devices attached
    before now count only while still active.

    Example: ``reset_devices(catalog, "demo", "demo_00001_1")``.
    """
    study, subject = _checked(catalog, study, subject)
    with catalog.writing() as conn:
        _require(conn, study, subject)
        conn.execute(
            subjects.update().where(_subject_key(study, subject)).values(devices_reset_at=now_ms())
        )
    return _standing(catalog, study, subject, 0)


def set_timezone(catalog: Catalog, study: str, subject: str, zone: str | None) -> str:
    """Give ``subject`` a time zone of its own (an IANA name), or None for the study's; return
    the zone now in force. Sensor tables, yield and features cut local days in it; the next
    ``tables build`` rebuilds what the change moves.

    Example: ``set_timezone(catalog, "demo", "demo_00001_1", "America/New_York")``.
    """
    study, subject = _checked(catalog, study, subject)
    if zone is not None:
        zone = check_timezone(zone)
    with catalog.writing() as conn:
        _require(conn, study, subject)
        conn.execute(subjects.update().where(_subject_key(study, subject)).values(timezone=zone))
    return zone or get_study(catalog, study).definition.get("timezone", "UTC")


def study_zones(catalog: Catalog, study: str) -> tuple[str, dict[str, str]]:
    """The study's time zone and the subjects' own zones (only those that have one).

    Example: ``default, own = study_zones(catalog, "demo")``.
    """
    default = get_study(catalog, study).definition.get("timezone") or "UTC"
    with catalog.engine.connect() as conn:
        rows = conn.execute(
            select(subjects.c.subject_id, subjects.c.timezone).where(
                (subjects.c.study_id == study) & subjects.c.timezone.is_not(None)
            )
        ).all()
    return default, {row.subject_id: row.timezone for row in rows}


def _checked(catalog: Catalog, study: str, subject: str) -> tuple[str, str]:
    study = check_name("study", study)
    subject = check_name("subject", subject)
    get_study(catalog, study)  # UnknownStudy with a hint
    return study, subject


def _require(conn, study: str, subject: str) -> None:
    found = conn.execute(select(subjects.c.subject_id).where(_subject_key(study, subject))).scalar()
    if found is None:
        raise UnknownSubject(f"no subject {subject!r} is enrolled in study {study!r}")


def _standing(catalog: Catalog, study: str, subject: str, changed: int) -> SubjectStanding:
    with catalog.engine.connect() as conn:
        row = conn.execute(
            select(subjects.c.removed_at, subjects.c.removed_by).where(_subject_key(study, subject))
        ).one()
        count = conn.execute(
            select(func.count()).select_from(devices).where(_device_key(study, subject))
        ).scalar()
    return SubjectStanding(study, subject, row.removed_at, row.removed_by, count, changed)


def _subject_key(study: str, subject: str):
    return (subjects.c.study_id == study) & (subjects.c.subject_id == subject)


def _device_key(study: str, subject: str):
    return (devices.c.study_id == study) & (devices.c.subject_id == subject)


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
