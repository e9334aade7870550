"""Upload throughput: the full write_data path against a bare parse-and-fsync floor.

Starts gunicorn (2 workers, gthread) on 127.0.0.1 twice per round: once with the workbench
upload server, once with bench/floor_app.py, which only parses the JSON and fsync-writes the
body. Concurrent client processes send unique JTrack accelerometer batches (150 records) and
every answer must be 200. Prints durable uploads/s, p50/p99 latency and the ratio.

    python bench/upload.py [--uploads 6000] [--clients 2] [--threads 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench.catalog import open_catalog  # noqa: E402
from workbench.config import init_home  # noqa: E402
from workbench.demo import wait_for_server  # noqa: E402
from workbench.enrollment import enroll  # noqa: E402
from workbench.simulator import make_batch  # noqa: E402
from workbench.studies import create_study, definition_from_options  # noqa: E402

WORKERS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bodies(subjects, n: int, seed: int) -> list[tuple[bytes, dict]]:
    rng = random.Random(seed)
    out = []
    start = 1_700_000_000_000
    for i in range(n):
        subject, token, device = subjects[i % len(subjects)]
        records = make_batch(
            "bench", subject, device, "accelerometer", start + i * 3000, 3000, 150, rng
        )
        body = orjson.dumps(records)
        headers = {
            "ACTION": "write_data",
            "Content-Type": "application/json",
            "md5": hashlib.md5(body).hexdigest(),
            "Authorization": f"Bearer {token}",
        }
        out.append((body, headers))
    return out


def client(port: int, jobs: list, threads: int, queue) -> None:
    import threading

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    chunks = [jobs[i::threads] for i in range(threads)]

    def run(chunk):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for body, headers in chunk:
            t0 = time.perf_counter()
            for _attempt in range(3):
                try:
                    conn.request("POST", "/", body, headers)
                    answer = conn.getresponse()
                    data = answer.read()
                    break
                except (http.client.HTTPException, OSError):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            else:
                errors.append("connection failed 3 times")
                continue
            mine.append(time.perf_counter() - t0)
            if answer.status != 200:
                errors.append(f"{answer.status} {data[:200]!r}")
        conn.close()
        with lock:
            latencies.extend(mine)

    ts = [threading.Thread(target=run, args=(c,)) for c in chunks]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    queue.put((latencies, errors))


def load(port: int, bodies, clients: int, threads: int) -> dict:
    queue = mp.Queue()
    parts = [bodies[i::clients] for i in range(clients)]
    procs = [mp.Process(target=client, args=(port, p, threads, queue)) for p in parts]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    latencies = sorted(x for r in results for x in r[0])
    errors = [e for r in results for e in r[1]]
    if errors:
        raise SystemExit(f"{len(errors)} uploads failed, first: {errors[0]}")
    return {
        "rate": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "n": len(latencies),
    }


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) of every live process in a process group."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: process group
            total += int(fields[11]) + int(fields[12])
    return total / tick


def start(cmd, env) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uploads", type=int, default=6000, help="measured uploads per run")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument(
        "--threads", type=int, default=8, help="threads (connections) per client process"
    )
    parser.add_argument("--server-threads", type=int, default=4, help="gunicorn threads per worker")
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds; the median is reported"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    try:
        home = work / "home"
        config = init_home(home)
        catalog = open_catalog(config)
        create_study(
            catalog, definition_from_options("bench", duration_days=28, sensors=["accelerometer"])
        )
        made = enroll(catalog, "bench", 32)
        catalog.dispose()
        subjects = [(e.subject, e.token, f"dev{i:03d}") for i, e in enumerate(made)]
        total = args.uploads * args.rounds + 400
        print(f"preparing {total} unique batches ...", flush=True)
        bodies = make_bodies(subjects, total, seed=1)
        size = statistics.mean(len(b) for b, _ in bodies)
        print(f"batch: 150 accelerometer records, {size / 1024:.1f} KiB on average")
        print(
            f"server: gunicorn, {WORKERS} workers x {args.server_threads} threads (gthread); "
            f"clients: {args.clients} processes x {args.threads} connections; {os.cpu_count()} cores"
        )

        env = {
            **os.environ,
            "WORKBENCH_HOME": str(home),
            "FLOOR_DIR": str(work / "floor"),
            "PYTHONPATH": str(ROOT),
        }
        gunicorn = [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(WORKERS),
            "--threads",
            str(args.server_threads),
            "--worker-class",
            "gthread",
            "--no-control-socket",
        ]
        full, floor = [], []
        offset = 0
        for round_no in range(args.rounds):
            for name, results, cmd in (
                ("floor", floor, [*gunicorn, "--chdir", str(ROOT / "bench"), "floor_app:app"]),
                (
                    "full",
                    full,
                    [
                        sys.executable,
                        "-m",
                        "workbench.cli",
                        "--home",
                        str(home),
                        "serve",
                        "--threads",
                        str(args.server_threads),
                        "--workers",
                        str(WORKERS),
                    ],
                ),
            ):
                port = free_port()
                if name == "floor":
                    cmd = [*cmd, "--bind", f"127.0.0.1:{port}"]
                else:
                    cmd = [*cmd, "--port", str(port), "--host", "127.0.0.1"]
                proc = start(cmd, env)
                try:
                    if name == "full":
                        wait_for_server(f"http://127.0.0.1:{port}", process=proc)
                        # register the devices (not timed)
                        for subject, token, device in subjects:
                            c = http.client.HTTPConnection("127.0.0.1", port)
                            c.request(
                                "POST",
                                "/",
                                orjson.dumps(
                                    {
                                        "studyId": "bench",
                                        "username": subject,
                                        "deviceid": device,
                                        "status": 0,
                                    }
                                ),
                                {"ACTION": "add_user", "Authorization": f"Bearer {token}"},
                            )
                            assert c.getresponse().status == 200
                            c.close()
                    else:
                        _wait_port(port, proc)
                    load(port, bodies[offset : offset + 200], args.clients, args.threads)  # warm-up
                    result = load(
                        port,
                        bodies[offset + 200 : offset + 200 + args.uploads],
                        args.clients,
                        args.threads,
                    )
                    results.append(result)
                    print(
                        f"round {round_no + 1} {name:<5}: {result['rate']:7.0f} uploads/s  "
                        f"p50 {result['p50']:6.2f} ms  p99 {result['p99']:6.2f} ms  ({result['n']} uploads)",
                        flush=True,
                    )
                finally:
                    stop(proc)
            offset += args.uploads
            shutil.rmtree(work / "floor", ignore_errors=True)

        def med(rs, key):
            return statistics.median(r[key] for r in rs)

        print()
        print(f"{'':<28}{'uploads/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
        print(
            f"{'floor (parse + fsync)':<28}{med(floor, 'rate'):>10.0f}{med(floor, 'p50'):>9.2f}{med(floor, 'p99'):>9.2f}"
        )
        print(
            f"{'write_data (full path)':<28}{med(full, 'rate'):>10.0f}{med(full, 'p50'):>9.2f}{med(full, 'p99'):>9.2f}"
        )
        ratio = med(full, "rate") / med(floor, "rate")
        print(
            f"ratio full/floor: {ratio:.2f}  (target >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'}); "
            f"full path {med(full, 'rate'):.0f}/s (target >= 1000: {'met' if med(full, 'rate') >= 1000 else 'NOT met'})"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(proc.stderr.read().decode())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("floor server did not start")


if __name__ == "__main__":
    main()
