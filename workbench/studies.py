"""Study definitions: create, import from JTrack, list and archive studies."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from workbench.catalog import Catalog, studies
from workbench.errors import (
    InvalidDefinition,
    InvalidTimezone,
    StudyArchived,
    StudyExists,
    UnknownStudy,
)
from workbench.identifiers import check_name
from workbench.templates import load_schema, schema_validator
from workbench.times import check_timezone, now_ms

# The sensors the JTrack app knows, used when a study names none.
JTRACK_SENSORS = (
    "accelerometer",
    "activity",
    "application_usage",
    "barometer",
    "gravity_sensor",
    "gyroscope",
    "location",
    "magnetic_sensor",
    "rotation_vector",
    "linear_acceleration",
    "ema",
    "active_labeling",
    "lockUnlock",
)
DEFAULT_SENSORS = ("accelerometer", "activity", "location")
DEFAULT_BATCHES_PER_DAY = 24


@dataclass(frozen=True)
class Study:
    """A study as stored in the catalog."""

    id: str
    definition: dict
    status: str
    revision: int
    created_at: int
    archived_at: int | None

    @property
    def active(self) -> bool:
        return self.status == "active"

    @property
    def sensors(self) -> dict:
        return self.definition["sensors"]


def validate_definition(definition: dict) -> dict:
    """Validate a study definition against its schema and return it with defaults filled in.

    Example: ``validate_definition({"id": "demo", "duration_days": 28, "sensors": {"accelerometer": {}}})``.
    """
    schema = load_schema("study")
    validator = schema_validator(schema)
    errors = sorted(validator.iter_errors(definition), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors]
        raise InvalidDefinition("invalid study definition:\n  " + "\n  ".join(lines))
    resources = definition.get("resources")
    if resources is not None and (Path(resources).is_absolute() or ".." in Path(resources).parts):
        raise InvalidDefinition(
            f"invalid study definition:\n  resources: {resources!r} must be a folder inside "
            "the workbench home, given relative to it"
        )
    if "timezone" in definition:
        try:
            check_timezone(definition["timezone"])
        except InvalidTimezone as exc:
            raise InvalidDefinition(f"invalid study definition:\n  timezone: {exc}") from None
    return with_defaults(definition)


def with_defaults(definition: dict) -> dict:
    """A copy of a valid definition with every unset key at its schema default (definitions
    stored by an older version lack the keys added since)."""
    filled = copy.deepcopy(definition)
    for key, spec in load_schema("study")["properties"].items():
        if "default" in spec and key not in filled:
            filled[key] = copy.deepcopy(spec["default"])
    for sensor in filled["sensors"].values():
        sensor.setdefault("batches_per_day", DEFAULT_BATCHES_PER_DAY)
    return filled


def definition_from_options(
    study_id: str,
    *,
    duration_days: int = 28,
    sensors: list[str] | None = None,
    auth: str = "token",
    timezone: str = "UTC",
) -> dict:
    """A study definition from the few options of ``workbench study create``."""
    names = sensors or list(DEFAULT_SENSORS)
    return {
        "id": study_id,
        "duration_days": duration_days,
        "sensors": {name: {"batches_per_day": DEFAULT_BATCHES_PER_DAY} for name in names},
        "auth": auth,
        "timezone": timezone,
    }


def is_jtrack_definition(raw: dict) -> bool:
    """True if ``raw`` looks like a JTrack study JSON rather than a workbench definition."""
    return "sensor_list" in raw or ("duration" in raw and "duration_days" not in raw)


def definition_from_jtrack(raw: dict, study_id: str) -> dict:
    """Translate a JTrack study JSON (``duration``, ``frequency``, ``sensor_list``, …).

    JTrack's ``sensor_list`` becomes the sensors (``sensor_list_limited`` if it is the only list),
    ``frequency`` becomes each sensor's sampling rate, ``survey``/``images`` turn on the EMA app
    and ``task_list`` the tasks. Subjects are not imported: enroll them anew so each gets a token.
    """
    names = raw.get("sensor_list") or raw.get("sensor_list_limited") or list(DEFAULT_SENSORS)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidDefinition("JTrack sensor_list must be a list of sensor names")
    sensor = {"batches_per_day": DEFAULT_BATCHES_PER_DAY}
    frequency = raw.get("frequency")
    if isinstance(frequency, int | float) and not isinstance(frequency, bool) and frequency > 0:
        sensor["frequency_hz"] = frequency
    survey = raw.get("survey")
    images = raw.get("images")
    tasks = raw.get("task_list") or []
    definition = {
        "id": study_id,
        "duration_days": _int(raw.get("duration"), "duration"),
        "sensors": {name: dict(sensor) for name in names},
        "ema": bool(survey or images),
        "survey": bool(survey),
        "active_labeling": bool(raw.get("active_labeling")),
        "tasks": [str(t) for t in tasks] if isinstance(tasks, list) else [],
        # JTrack had no authentication: keep that explicitly, never silently.
        "auth": "legacy",
        "imported_from": raw,
    }
    return definition


def _int(value: object, name: str) -> int:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise InvalidDefinition(
            f"JTrack {name} must be a whole number of days, not {value!r}"
        ) from exc


def load_definition_file(path: str | Path, study_id: str | None = None) -> dict:
    """Read a study definition or a JTrack study JSON from ``path``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidDefinition(f"cannot read study definition {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidDefinition(f"{path} must hold a JSON object")
    if is_jtrack_definition(raw):
        return definition_from_jtrack(raw, study_id or raw.get("name") or path.stem)
    if study_id:
        raw["id"] = study_id
    return raw


def create_study(catalog: Catalog, definition: dict) -> Study:
    """Validate ``definition`` and store it as a new active study.

    Example: ``create_study(catalog, definition_from_options("demo"))``.
    """
    check_name("study", definition.get("id"))
    filled = validate_definition(definition)
    created = now_ms()
    try:
        with catalog.writing() as conn:
            conn.execute(
                studies.insert().values(
                    study_id=filled["id"],
                    definition=json.dumps(filled, sort_keys=True),
                    status="active",
                    revision=1,
                    created_at=created,
                )
            )
    except IntegrityError as exc:
        raise StudyExists(f"study {filled['id']!r} exists already") from exc
    return Study(filled["id"], filled, "active", 1, created, None)


def get_study(catalog: Catalog, study_id: str) -> Study:
    """The study ``study_id``, or :class:`UnknownStudy`."""
    check_name("study", study_id)
    with catalog.engine.connect() as conn:
        row = conn.execute(select(studies).where(studies.c.study_id == study_id)).first()
    if row is None:
        raise UnknownStudy(f"no study {study_id!r}; see `workbench study list`")
    return _study(row)


def list_studies(catalog: Catalog) -> list[Study]:
    """All studies, active and archived, by id."""
    with catalog.engine.connect() as conn:
        rows = conn.execute(select(studies).order_by(studies.c.study_id)).all()
    return [_study(row) for row in rows]


def archive_study(catalog: Catalog, study_id: str) -> Study:
    """Archive a study: it stops taking data (uploads go to junk with 409); nothing is deleted."""
    study = get_study(catalog, study_id)
    if not study.active:
        raise StudyArchived(f"study {study_id!r} is archived already")
    with catalog.writing() as conn:
        conn.execute(
            studies.update()
            .where(studies.c.study_id == study_id)
            .values(status="archived", archived_at=now_ms(), revision=studies.c.revision + 1)
        )
    return get_study(catalog, study_id)


def _study(row) -> Study:
    return Study(
        id=row.study_id,
        definition=with_defaults(json.loads(row.definition)),
        status=row.status,
        revision=row.revision,
        created_at=row.created_at,
        archived_at=row.archived_at,
    )
