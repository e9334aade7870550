"""Shared fixtures: a workbench home with a data pool in tmp_path, a study, enrolled
subjects, the WSGI app in-process and a real gunicorn server on loopback."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import update

from workbench import catalog as tables
from workbench.catalog import open_catalog
from workbench.config import init_home, load_config
from workbench.enrollment import enroll
from workbench.serving import serve_command, wait_for_server
from workbench.simulators.phones import make_batch
from workbench.simulators.study_server import generate_keypair
from workbench.studies import create_study, definition_from_options

REPO = Path(__file__).resolve().parent.parent
START_MS = 1_700_000_000_000


@pytest.fixture
def home(tmp_path):
    """An initialised workbench home (configuration and pool) in tmp_path."""
    return init_home(tmp_path / "home")


@pytest.fixture
def catalog(home):
    catalog = open_catalog(home)
    yield catalog
    catalog.dispose()


@pytest.fixture
def study(catalog):
    """An active study "demo" recording accelerometer and location, token auth."""
    return create_study(
        catalog,
        definition_from_options("demo", duration_days=14, sensors=["accelerometer", "location"]),
    )


@pytest.fixture
def subjects(catalog, study):
    """Three enrolled subjects of "demo"."""
    return enroll(catalog, "demo", 3)


@pytest.fixture
def app(home, study):
    from workbench_server.app import create_app

    application = create_app(home)
    yield application


@pytest.fixture
def client(app):
    """An HTTP client driving the WSGI app in-process."""
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://testserver") as c:
        yield c


class Phone:
    """A simulated participant's phone talking to the server through an httpx client."""

    def __init__(
        self, client: httpx.Client, enrollment, device: str = "dev-1", study: str = "demo"
    ):
        self.client = client
        self.subject = enrollment.subject
        self.token = enrollment.token
        self.device = device
        self.study = study
        self.sent = 0

    def headers(self, action: str, body: bytes, checksum: str | None = "md5") -> dict:
        headers = {"ACTION": action, "Authorization": f"Bearer {self.token}"}
        if checksum == "md5":
            headers["md5"] = hashlib.md5(body).hexdigest()
        elif checksum == "digest":
            digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
            headers["Content-Digest"] = f"sha-256=:{digest}:"
        return headers

    def post(
        self, action: str, body: bytes, *, checksum: str | None = "md5", headers: dict | None = None
    ):
        return self.client.post(
            "/", content=body, headers={**self.headers(action, body, checksum), **(headers or {})}
        )

    def register(self, **extra):
        message = {
            "studyId": self.study,
            "username": self.subject,
            "deviceid": self.device,
            "status": 0,
            **extra,
        }
        return self.post("add_user", orjson.dumps(message))

    def set_status(self, status: int, **extra):
        """Send update_user with a new status for this phone's device."""
        message = {
            "studyId": self.study,
            "username": self.subject,
            "deviceid": self.device,
            "status": status,
            **extra,
        }
        return self.post("update_user", orjson.dumps(message))

    def batch(
        self, sensor: str = "accelerometer", n: int = 20, start: int | None = None
    ) -> list[dict]:
        import random

        self.sent += 1
        begin = START_MS + self.sent * 60_000 if start is None else start
        return make_batch(
            self.study,
            self.subject,
            self.device,
            sensor,
            begin,
            60_000,
            n,
            random.Random(self.sent),
        )

    def upload(self, records=None, **kwargs):
        body = (
            records
            if isinstance(records, bytes)
            else orjson.dumps(records if records is not None else self.batch())
        )
        return self.post("write_data", body, **kwargs)


@pytest.fixture
def phone(client, subjects):
    """A registered phone of the first subject."""
    p = Phone(client, subjects[0])
    assert p.register().status_code == 200
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``workbench serve`` (gunicorn) running on 127.0.0.1 in its own process group."""

    def __init__(self, home_path: Path, *, workers: int = 2, threads: int = 4):
        self.home = home_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers, self.threads = workers, threads
        self.proc: subprocess.Popen | None = None
        self.log = home_path / f"server-{self.port}.log"

    def start(self) -> ServerProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                serve_command(
                    self.home, port=self.port, workers=self.workers, threads=self.threads
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                },
            )
        wait_for_server(self.url, process=self.proc, timeout=60)
        return self

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@pytest.fixture
def server(home, study):
    """A real gunicorn upload server for the home, stopped after the test."""
    running = ServerProcess(home.home).start()
    yield running
    running.stop()


# --- status scenarios: devices and ledger rows at chosen times -----------------------

HOUR = 3_600_000
DAY = 24 * HOUR
T0 = 1_700_000_000_000  # registration time of most devices below
NOW = T0 + 10 * DAY
LAG = 10 * 60_000  # a batch's last sample is taken this long before the server receives it


class Scenario:
    """Devices and ledger rows written straight into the catalog, at chosen times."""

    def __init__(self, catalog, people):
        self.catalog = catalog
        self.people = {p.subject: p for p in people}
        self.serial = 0

    def device(self, subject, device, *, registered=T0, status=0, time_left=None, app="main"):
        with self.catalog.writing() as conn:
            conn.execute(
                tables.devices.insert().values(
                    study_id="demo",
                    subject_id=subject,
                    app=app,
                    device_id=device,
                    status=status,
                    time_left=time_left,
                    registered_at=registered,
                    updated_at=registered,
                )
            )

    def batches(self, subject, device, sensor, received_times):
        rows = []
        for received in received_times:
            self.serial += 1
            rows.append(
                {
                    "study_id": "demo",
                    "subject_id": subject,
                    "device_id": device,
                    "sensor": sensor,
                    "received_at": received,
                    "path": f"studies/demo/{subject}/{device}/{sensor}/{self.serial}.json",
                    "bytes": 7000,
                    "sha256": f"{self.serial:064x}",
                    "n_records": 150,
                    "first_ts": received - 2 * LAG,
                    "last_ts": received - LAG,
                }
            )
        with self.catalog.writing() as conn:
            conn.execute(tables.uploads.insert(), rows)

    def enrolled_at(self, subject, when):
        with self.catalog.writing() as conn:
            conn.execute(
                update(tables.subjects)
                .where(tables.subjects.c.subject_id == subject)
                .values(enrolled_at=when)
            )


@pytest.fixture
def people(catalog, study):
    from workbench.enrollment import enroll

    return enroll(catalog, "demo", 7)


@pytest.fixture
def scenario(catalog, people):
    """Seven subjects of "demo" (14 days; accelerometer and location, 24 batches a day each),
    one per activity code, seen at NOW = registration + 10 days."""
    s = Scenario(catalog, people)
    a, b, c, d, e, f, g = (p.subject for p in people)
    for subject in (a, b, c, d, e, f, g):
        s.enrolled_at(subject, T0 - DAY)
    # a: sending; 120 accelerometer batches (50 % of 240), 240 location batches (100 %).
    s.device(a, "a1")
    s.batches(a, "a1", "accelerometer", [NOW - HOUR - i * 2 * HOUR for i in range(120)])
    s.batches(a, "a1", "location", [NOW - 2 * HOUR - i * HOUR for i in range(240)])
    # b: sent for three days, then nothing for seven.
    s.device(b, "b1")
    s.batches(b, "b1", "accelerometer", [T0 + i * HOUR for i in range(1, 73)])
    # c: left on day 5 (status 1, the app's time).
    s.device(c, "c1", status=1, time_left=T0 + 5 * DAY)
    s.batches(c, "c1", "location", [T0 + i * HOUR for i in range(1, 121)])
    # d: joined 20 days ago and left after 14 days and an hour: completed.
    s.device(d, "d1", registered=T0 - 20 * DAY, status=2, time_left=T0 - 6 * DAY + HOUR)
    # e: joined 15 days ago, still active, still sending.
    s.device(e, "e1", registered=T0 - 5 * DAY)
    s.batches(e, "e1", "location", [NOW - HOUR])
    # f: two active phones with the main app.
    s.device(f, "f1")
    s.device(f, "f2", registered=T0 + 2 * DAY)
    s.batches(f, "f2", "location", [NOW - HOUR])
    # g: enrolled, never registered a device.
    return s


# --- questionnaire export: keys and a source configured in the home ------------------


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder, bits=1024)
    return folder


def configure(home, keys, monkeypatch, **changes):
    (home.home / "keys").mkdir(exist_ok=True)
    shutil.copy(keys / "private_key.pem", home.home / "keys" / "private_key.pem")
    monkeypatch.setenv("MT_USER", "mt")
    monkeypatch.setenv("MT_PASSWORD", "secret")
    path = home.home / "workbench.toml"
    text = path.read_text()
    settings = {"timeout": "5", "retries": "2", "backoff": "0.01", **changes}
    for key, value in settings.items():
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key} =")]
        text = "\n".join(lines) + f"\n{key} = {value}\n"
    path.write_text(text)
    return load_config(home.home)


@pytest.fixture
def redis_url(tmp_path):
    """A real Redis server on a free loopback port (make test installs redis-server)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed; `make test` installs it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)


@contextlib.contextmanager
def scheduler_consumers(home, count: int, *, workers: int = 1):
    """``count`` `workbench scheduler` processes on ``home`` (as on hosts sharing its pool and
    Redis, with the environment's WORKBENCH_REDIS_URL); stopped with SIGTERM on exit."""
    command = [sys.executable, "-m", "workbench.cli", "--home", str(home), "scheduler"]
    consumers = [
        subprocess.Popen(
            [*command, "--workers", str(workers)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(count)
    ]
    try:
        yield consumers
    finally:
        for consumer in consumers:
            os.killpg(consumer.pid, signal.SIGTERM)
        for consumer in consumers:
            consumer.wait(timeout=60)
