"""Crash safety, proven by killing a real gunicorn server with SIGKILL in the middle of a burst."""

from __future__ import annotations

import hashlib
import threading
import time

import httpx
import orjson
import pytest
from sqlalchemy import select

from tests.conftest import ServerProcess
from workbench.catalog import uploads
from workbench.enrollment import enroll
from workbench.ledger import verify
from workbench.pool import DataPool
from workbench.simulators.phones import make_batch

pytestmark = pytest.mark.slow


def test_sigkill_mid_burst_loses_no_acknowledged_upload(home, catalog, study):
    people = enroll(catalog, "demo", 6)
    server = ServerProcess(home.home).start()
    acked: dict[str, tuple[str, str]] = {}  # sha256 -> (subject, device)
    answered_other = []
    stop = threading.Event()
    lock = threading.Lock()

    def phone(index: int) -> None:
        person = people[index]
        device = f"dev-{index}"
        import random

        rng = random.Random(index)
        with httpx.Client(base_url=server.url, timeout=30) as client:  # a loaded machine
            auth = {"Authorization": f"Bearer {person.token}"}
            message = {
                "studyId": "demo",
                "username": person.subject,
                "deviceid": device,
                "status": 0,
            }
            assert (
                client.post(
                    "/", content=orjson.dumps(message), headers={"ACTION": "add_user", **auth}
                ).status_code
                == 200
            )
            n = 0
            while not stop.is_set():
                n += 1
                body = orjson.dumps(
                    make_batch(
                        "demo",
                        person.subject,
                        device,
                        "accelerometer",
                        1_700_000_000_000 + n * 60_000,
                        60_000,
                        150,
                        rng,
                    )
                )
                headers = {"ACTION": "write_data", "md5": hashlib.md5(body).hexdigest(), **auth}
                try:
                    answer = client.post("/", content=body, headers=headers)
                except httpx.TransportError:
                    continue  # killed mid-request: not acknowledged
                with lock:
                    if answer.status_code == 200:
                        acked[hashlib.sha256(body).hexdigest()] = (person.subject, device)
                    else:
                        answered_other.append(answer.status_code)

    threads = [threading.Thread(target=phone, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120  # a loaded machine acknowledges slowly
    while len(acked) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL to the master and every worker, mid-burst
    killed_at = len(acked)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert killed_at >= 300, "the burst was too slow to reach the kill point"
    assert answered_other == []

    restarted = ServerProcess(home.home).start()  # recovery runs before serving
    try:
        with catalog.engine.connect() as conn:
            rows = {r.sha256: r for r in conn.execute(select(uploads)).all()}
        missing = [sha for sha in acked if sha not in rows]
        assert missing == [], f"{len(missing)} acknowledged uploads lost"
        for sha in acked:
            data = (home.pool / rows[sha].path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sha
        assert verify(home) == []
        # recovery finished or discarded every write the kill interrupted
        assert DataPool(home.pool).incoming_files() == []
    finally:
        restarted.stop()
    assert verify(home) == []
