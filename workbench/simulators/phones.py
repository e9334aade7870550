"""Simulated participants' phones: register a device and upload JTrack-shaped batches over HTTP.

Used by ``make run``, the tests and the benchmarks. Each simulated subject is enrolled anew (so
its token is known), registers one device with ``add_user`` and uploads its batches in time
order, with md5 or Content-Digest checksums. Some subjects go silent part-way, some leave with
``update_user``, and some batches are sent twice, as a phone does when an answer is lost.
:class:`IngestPhones` (in process, through the server's ingest path) and :class:`HttpPhones`
deliver the batches of :mod:`workbench.simulators.days`.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import orjson
from tqdm import tqdm

from workbench.catalog import open_catalog
from workbench.config import Config
from workbench.enrollment import Enrollment, enroll
from workbench.errors import WorkbenchError
from workbench.ingest import Ingest, Upload
from workbench.studies import get_study
from workbench.times import DAY_MS, now_ms

SILENT_SHARE = 0.15
LEAVING_SHARE = 0.15
RETRY_SHARE = 0.05
EMA_QUESTIONS = 3  # an ema batch is one answered prompt of this many questions


@dataclass
class SubjectPlan:
    """What one simulated phone will do."""

    enrollment: Enrollment
    device: str
    joined_ms: int
    last_day: float  # days of data it sends before going silent or leaving
    fate: str  # active | silent | leaves


@dataclass
class SimulationReport:
    """Counts of what the simulation sent and how the server answered."""

    subjects: int = 0
    sent: int = 0
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    statuses: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    fates: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        fates = ", ".join(f"{n} {fate}" for fate, n in sorted(self.fates.items()))
        return (
            f"{self.subjects} subjects ({fates}): {self.sent} uploads in {self.seconds:.1f} s "
            f"({rate:.0f}/s), {self.stored} stored, {self.duplicates} retried duplicates, "
            f"{self.failed} failed"
        )


def make_batch(
    study: str,
    subject: str,
    device: str,
    sensor: str,
    start_ms: int,
    span_ms: int,
    n: int,
    rng: random.Random,
) -> list[dict]:
    """One batch of ``n`` records of ``sensor`` spread over ``span_ms`` from ``start_ms``, in
    the shapes the JTrack app sends (``data_templates/sensors``): no record carries the app's
    row ``id`` except Garmin's."""
    step = max(1, span_ms // n)
    usage: dict[str, int] = {}  # application_usage: foreground ms per app since midnight
    records = []
    for i in range(n):
        ts = start_ms + i * step
        record = {
            "studyId": study,
            "username": subject,
            "deviceid": device,
            "sensorname": sensor,
            "timestamp": ts,
        }
        if sensor == "ema":  # the EMA app: one record per answered question of one prompt
            record.update(_ema_fields(subject, i, start_ms, span_ms, rng))
        elif sensor == "application_usage":
            record.update(_usage_fields(ts, step, usage, rng))
        elif sensor == "garmin":
            record.update(_garmin_fields(ts, i, rng))
        else:
            record.update(_sensor_fields(sensor, ts, rng))
        records.append(record)
    return records


def _ema_fields(subject: str, question: int, opened: int, span_ms: int, rng: random.Random):
    answer = rng.randint(1, 5)
    return {
        "subjectId": subject,
        "freeText": "",
        "questionId": question + 1,
        "answerId": answer,
        "surveyVersion": 1,
        "databaseId": 1,
        "startTime": str(opened),
        "endTime": str(opened + min(span_ms, 300_000)),
        "answerText": str(answer),
        "answer": None,
    }


APPS = ("WhatsApp", "Chrome", "Instagram", "Gmail")


def _usage_fields(ts: int, step: int, usage: dict[str, int], rng: random.Random) -> dict:
    """An hourly UsageStats snapshot of one app: foreground time cumulative from midnight."""
    midnight = ts - ts % DAY_MS
    if usage.get("_day") != midnight:  # a new day: the counts start again
        usage.clear()
        usage["_day"] = midnight
    app = rng.choice(APPS)
    usage[app] = min(usage.get(app, 0) + rng.randint(0, step), ts - midnight)
    return {
        "appName": app,
        "beginTimeStamp": midnight,
        "endTimeStamp": ts,
        "lastTimeUsed": max(midnight, ts - rng.randint(0, step)),
        "totalTimeinForeground": usage[app],
    }


def _garmin_fields(ts: int, i: int, rng: random.Random) -> dict:
    return {
        "wearable_sensor": "heart_rate",
        "deviceName": "Garmin Vivosmart 4",
        "frequency": "1/60 Hz",
        "value": float(rng.randint(55, 110)),
        "id": i,
        "timestamp_start": ts,
        "timestamp_end": ts + 60_000,
    }


def _sensor_fields(sensor: str, ts: int, rng: random.Random) -> dict:
    # barometer, gravity, magnetic, rotation vector, lockUnlock: no public schema, so the
    # generic shape takes whatever fields they carry
    if sensor in (
        "accelerometer",
        "gyroscope",
        "gravity_sensor",
        "linear_acceleration",
        "magnetic_sensor",
        "rotation_vector",
    ):
        g = 9.81 if sensor in ("accelerometer", "gravity_sensor") else 0.0
        return {
            "x": round(rng.gauss(0, 0.4), 5),
            "y": round(rng.gauss(0, 0.4), 5),
            "z": round(g + rng.gauss(0, 0.4), 5),
        }
    if sensor == "location":
        lat = round(50.9 + rng.gauss(0, 0.01), 6)
        return {
            "lat": lat,
            "lon": round(6.4 + rng.gauss(0, 0.01), 6),
            "alt": lat,  # the app's defect: the true latitude in alt
            "accuracy": round(rng.uniform(3, 30), 1),
            "provider": rng.choice(["fused", "gps", "network"]),
        }
    if sensor == "activity":
        return {
            "activityType": rng.choice([0, 1, 2, 3, 3, 3, 4, 5, 7, 8]),
            "confidence": float(rng.randint(70, 100)),
        }
    if sensor == "active_labeling":
        minutes = rng.randint(5, 60)
        return {
            "taskName": rng.choice(["walking", "cooking", "reading"]),
            "startTimestamp": ts - minutes * 60_000,
            "endTimestamp": ts,
            "duration": float(minutes * 60),
            "voiceId": None,
        }
    if sensor == "barometer":
        return {"pressure": round(1013 + rng.gauss(0, 3), 2)}
    if sensor == "lockUnlock":
        return {"locked": rng.random() < 0.5}
    hour = (ts // 3_600_000) % 24
    return {"value": round(math.sin(hour / 24 * 2 * math.pi) + rng.gauss(0, 0.1), 4)}


def plan_subjects(
    enrollments: list[Enrollment], *, days: int, now: int, rng: random.Random
) -> list[SubjectPlan]:
    """Decide each subject's device, join time and fate: 15 % go silent part-way and 15 %
    leave (at least one of each from three subjects on), the rest stay active."""
    n = len(enrollments)
    silent = round(n * SILENT_SHARE) or (1 if n >= 3 else 0)
    leaving = round(n * LEAVING_SHARE) or (1 if n >= 3 else 0)
    fates = ["silent"] * silent + ["leaves"] * leaving
    fates += ["active"] * (n - len(fates))
    rng.shuffle(fates)
    plans = []
    for e, fate in zip(enrollments, fates, strict=True):
        if fate == "silent":
            last_day = rng.uniform(0.3, 0.8) * days
        elif fate == "leaves":
            last_day = rng.uniform(0.4, 0.9) * days
        else:
            last_day = float(days)
        device = f"sim-{rng.getrandbits(48):012x}"
        plans.append(SubjectPlan(e, device, now - days * DAY_MS, last_day, fate))
    return plans


def simulate(
    config: Config,
    study_id: str,
    *,
    subjects: int = 10,
    days: int = 3,
    url: str,
    batches_per_day: int | None = None,
    records_per_batch: int = 150,
    clients: int = 4,
    seed: int = 0,
    progress: bool = False,
    timeout: float = 30.0,
) -> SimulationReport:
    """Enroll ``subjects`` new subjects in ``study_id`` and upload ``days`` of data for each.

    Example: ``simulate(load_config(), "demo", subjects=5, days=2, url="http://127.0.0.1:8080")``.
    """
    check_server(url)
    catalog = open_catalog(config)
    study = get_study(catalog, study_id)
    enrollments = enroll(catalog, study_id, subjects)
    catalog.dispose()
    rng = random.Random(seed)
    now = now_ms()
    plans = plan_subjects(enrollments, days=days, now=now, rng=rng)
    per_day = {
        sensor: max(1, min(int(spec.get("batches_per_day", 24)), batches_per_day or 24))
        for sensor, spec in study.sensors.items()
    }
    total = sum(sum(math.ceil(p.last_day * n) for n in per_day.values()) for p in plans)
    report = SimulationReport(subjects=len(plans), fates=Counter(p.fate for p in plans))
    lock = threading.Lock()
    bar = tqdm(total=total, unit="batch", desc="uploading", disable=not progress)
    started = time.perf_counter()

    def run(plan: SubjectPlan, seed_offset: int) -> None:
        local = random.Random(seed * 100_003 + seed_offset)
        auth = {"Authorization": f"Bearer {plan.enrollment.token}"}
        with httpx.Client(base_url=url, timeout=timeout, headers=auth) as client:
            _send(
                client,
                "add_user",
                {
                    "studyId": study_id,
                    "username": plan.enrollment.subject,
                    "deviceid": plan.device,
                    "status": 0,
                    "time_joined": plan.joined_ms,
                    "time_left": None,
                },
                report,
                lock,
                checksum="md5",
            )
            events = []
            for sensor, n in per_day.items():
                span = DAY_MS // n
                for k in range(math.ceil(plan.last_day * n)):
                    events.append((plan.joined_ms + k * span, sensor, span))
            events.sort()
            for start, sensor, span in events:
                records = make_batch(
                    study_id,
                    plan.enrollment.subject,
                    plan.device,
                    sensor,
                    start,
                    span,
                    EMA_QUESTIONS if sensor == "ema" else records_per_batch,
                    local,
                )
                body = orjson.dumps(records)
                checksum = "md5" if local.random() < 0.5 else "digest"
                post_action(client, "write_data", body, report, lock, checksum=checksum)
                if local.random() < RETRY_SHARE:
                    post_action(client, "write_data", body, report, lock, checksum=checksum)
                bar.update(1)
            if plan.fate == "leaves":
                _send(
                    client,
                    "update_user",
                    {
                        "studyId": study_id,
                        "username": plan.enrollment.subject,
                        "deviceid": plan.device,
                        "status": 1,
                        "time_left": int(plan.joined_ms + plan.last_day * DAY_MS),
                    },
                    report,
                    lock,
                    checksum="md5",
                )

    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(run, plan, i) for i, plan in enumerate(plans)]:
            future.result()
    bar.close()
    report.seconds = time.perf_counter() - started
    return report


def check_server(url: str) -> None:
    """Stop with a clear message unless an upload server answers ``/health`` at ``url``."""
    try:
        answer = httpx.get(f"{url.rstrip('/')}/health", timeout=5.0)
    except httpx.HTTPError as exc:
        raise WorkbenchError(f"no upload server answers at {url}: {exc}") from exc
    if answer.status_code != 200:
        raise WorkbenchError(
            f"the upload server at {url} is not healthy: {answer.status_code} {answer.text[:200]}"
        )


def _send(client, action, message, report, lock, *, checksum) -> None:
    post_action(client, action, orjson.dumps(message), report, lock, checksum=checksum)


def post_action(
    client: httpx.Client, action: str, body: bytes, report, lock, *, checksum: str
) -> None:
    """Send one JTrack action with an md5 or Content-Digest checksum, retrying a failed
    connection as a phone does, and count the answer in ``report``."""
    headers = {"ACTION": action, "Content-Type": "application/json"}
    if checksum == "md5":
        headers["md5"] = hashlib.md5(body).hexdigest()
    else:
        headers["Content-Digest"] = (
            "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"
        )
    answer = None
    for attempt in range(4):  # a phone retries when the connection fails
        try:
            answer = client.post("/", content=body, headers=headers)
            break
        except httpx.TransportError as exc:
            error = f"{action}: {exc!r}"
            if attempt < 3:
                time.sleep(0.2 * 2**attempt)
    with lock:
        if action == "write_data":
            report.sent += 1
        if answer is None:
            report.failed += 1
            report.errors.append(error)
            return
        report.statuses[answer.status_code] += 1
        if answer.status_code != 200:
            report.failed += 1
            report.errors.append(f"{action}: {answer.status_code} {answer.text[:200]}")
        elif action == "write_data":
            if answer.json().get("duplicate"):
                report.duplicates += 1
            else:
                report.stored += 1


class IngestPhones:
    """Phones whose uploads go through :class:`workbench.ingest.Ingest` in this process: the
    code path the server runs, without HTTP. A refusal raises."""

    def __init__(self, config: Config) -> None:
        self.ingest = Ingest(config)
        self.report = SimulationReport()

    def register(self, study: str, subject: str, device: str, token: str, *, joined: int):
        self.ingest.add_user(self._upload(device_message(study, subject, device, joined), token))

    def send(self, body: bytes, token: str) -> None:
        receipt = self.ingest.write_data(self._upload(body, token))
        self.report.sent += 1
        if receipt.body.get("duplicate"):
            self.report.duplicates += 1
        else:
            self.report.stored += 1

    @staticmethod
    def _upload(body: bytes, token: str) -> Upload:
        return Upload(body=body, md5=hashlib.md5(body).hexdigest(), authorization=f"Bearer {token}")

    def close(self) -> None:
        self.ingest.close()


class HttpPhones:
    """Phones uploading to a running server with md5 checksums; answers are counted in
    ``report`` (failures too, with their message)."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=60.0)
        self.report = SimulationReport()
        self.lock = threading.Lock()

    def register(self, study: str, subject: str, device: str, token: str, *, joined: int):
        self._post("add_user", device_message(study, subject, device, joined), token)

    def send(self, body: bytes, token: str) -> None:
        self._post("write_data", body, token)

    def _post(self, action: str, body: bytes, token: str) -> None:
        self.client.headers["Authorization"] = f"Bearer {token}"
        post_action(self.client, action, body, self.report, self.lock, checksum="md5")

    def close(self) -> None:
        self.client.close()


def device_message(study: str, subject: str, device: str, joined: int) -> bytes:
    """The body of ``add_user`` for an active device that joined at ``joined``."""
    message = {"studyId": study, "username": subject, "deviceid": device, "status": 0,
               "time_joined": joined, "time_left": None}  # fmt: skip
    return orjson.dumps(message)
