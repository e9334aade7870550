"""A synthetic study written straight into a catalog: enrolled subjects, their phones and
ledger rows (no batch files behind them), for the dashboards' benchmark and browser tests.

Subjects are drawn into known groups relative to ``now``: never started (no phone), left
early, completed, stale (silent for 3 to 10 days) and active (data until the last hours), so
every state of the status dashboard is present and none sits on a boundary.

    from bench.synthetic import synthetic_study
    synthetic_study(config, "big", subjects=10_000, days=14)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from workbench.catalog import open_catalog
from workbench.enrollment import enroll
from workbench.refresh import refresh_status
from workbench.studies import create_study, definition_from_options
from workbench.times import now_ms

DAY = 86_400_000
HOUR = 3_600_000
SENSORS = ["accelerometer", "activity", "location", "ema"]
UPLOAD = (
    "INSERT INTO uploads (study_id, subject_id, device_id, sensor, received_at, path, bytes,"
    " sha256, n_records, first_ts, last_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
DEVICE = (
    "INSERT INTO devices (study_id, subject_id, app, device_id, status, time_joined, time_left,"
    " registered_at, updated_at) VALUES (?, ?, 'main', ?, ?, ?, ?, ?, ?)"
)
SHARES = {"never started": 0.08, "left": 0.12, "completed": 0.10, "stale": 0.15}


@dataclass
class Synthetic:
    study: str
    groups: dict[str, list[str]] = field(default_factory=dict)  # intended state -> subjects
    uploads: int = 0


def synthetic_study(
    config,
    study: str,
    *,
    subjects: int,
    days: int = 14,
    duration_days: int = 28,
    seed: int = 1,
    now: int | None = None,
    chunk: int = 50_000,
) -> Synthetic:
    """Create ``study`` with ``subjects`` subjects and up to ``days`` days of one batch per
    sensor and day, then refresh the status (which opens the alerts)."""
    rng = random.Random(seed)
    now = now_ms() if now is None else now
    catalog = open_catalog(config)
    result = Synthetic(study)
    try:
        definition = definition_from_options(study, duration_days=duration_days, sensors=SENSORS)
        for sensor in definition["sensors"].values():
            sensor["batches_per_day"] = 1
        create_study(catalog, {**definition, "name": f"Synthetic study {study}"})
        people = [p.subject for p in enroll(catalog, study, subjects)]
        devices, rows, serial = [], [], 0
        for subject in people:
            draw, group, edge = rng.random(), "active", 0.0
            for name, share in SHARES.items():
                edge += share
                if draw < edge:
                    group = name
                    break
            result.groups.setdefault(group, []).append(subject)
            if group == "never started":
                continue
            device = f"{subject}-phone"
            if group == "completed":
                registered = now - (duration_days + rng.randint(2, 10)) * DAY
                left = registered + duration_days * DAY + HOUR
                status, last = 2, left
            elif group == "left":
                registered = now - rng.randint(8, 20) * DAY
                left = registered + rng.randint(2, 6) * DAY
                status, last = 1, left
            elif group == "stale":
                registered = now - rng.randint(12, 20) * DAY
                left, status = None, 0
                last = now - rng.randint(3, 10) * DAY
            else:
                registered = now - rng.randint(2, duration_days - 4) * DAY
                left, status = None, 0
                last = now - rng.randint(1, 6) * HOUR
            devices.append(
                (study, subject, device, status, registered, left, registered, registered)
            )
            first = max(registered, last - days * DAY)
            for day in range((last - first) // DAY + 1):
                received = last - day * DAY
                for sensor in SENSORS:
                    serial += 1
                    rows.append(
                        (study, subject, device, sensor, received,
                         f"studies/{study}/{subject}/{device}/{sensor}/{serial}.json",
                         7000, f"{seed:08x}{serial:056x}", 1, received - HOUR, received - 60_000)
                    )  # fmt: skip
            if len(rows) >= chunk:
                _insert(catalog, UPLOAD, rows)
                result.uploads += len(rows)
                rows = []
        _insert(catalog, DEVICE, devices)
        _insert(catalog, UPLOAD, rows)
        result.uploads += len(rows)
    finally:
        catalog.dispose()
    refresh_status(config, studies=[study], mail=False)
    return result


def _insert(catalog, statement: str, rows: list[tuple]) -> None:
    if rows:
        with catalog.writing() as conn:
            conn.exec_driver_sql(statement, rows)
