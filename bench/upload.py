"""Upload throughput: the full write_data path against a bare parse-and-fsync floor, and the
serving stack of `workbench serve` against gunicorn's thread workers.

Each round starts gunicorn (2 workers) on 127.0.0.1 three times: with the workbench upload
server as `workbench serve` runs it (workbench_server.worker.BufferingWorker: requests read whole on an
event loop, then run in --threads threads), with bench/floor_app.py on the same stack (a bare
Bottle endpoint that only parses the JSON body and fsync-writes it to a new file), and with the
upload server under gunicorn's gthread workers (the stack before BufferingWorker, which slow
clients can hold). Client processes send unique JTrack accelerometer batches (150 records
each, --records) over keep-alive connections; every answer must be 200. Prints durable
uploads/s, p50/p99 latency and the server's CPU time per upload for each, then the ratios.
Rounds alternate and the medians are reported.

    python bench/upload.py [--uploads 5000] [--rounds 3] [--clients 2] [--connections 8]
"""

from __future__ import annotations

import argparse
import hashlib
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
import threading
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench.catalog import open_catalog  # noqa: E402
from workbench.config import init_home  # noqa: E402
from workbench.enrollment import enroll  # noqa: E402
from workbench.serving import serve_command  # noqa: E402
from workbench.simulators.phones import make_batch  # noqa: E402
from workbench.studies import create_study, definition_from_options  # noqa: E402

WORKERS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_bytes(action: str, body: bytes, token: str) -> bytes:
    """A complete HTTP/1.1 request, built once so the client spends no time on it."""
    head = (
        f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nACTION: {action}\r\n"
        f"Content-Type: application/json\r\nmd5: {hashlib.md5(body).hexdigest()}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def exchange(sock: socket.socket, request: bytes, buffer: bytearray) -> int:
    """Send one request and read its response; return the status code."""
    sock.sendall(request)
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            while len(buffer) < end + 4 + length:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed mid-response")
                buffer.extend(chunk)
            del buffer[: end + 4 + length]
            return int(head.split(" ", 2)[1])
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer.extend(chunk)


def client(port: int, requests: list[bytes], connections: int, queue) -> None:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def run(chunk: list[bytes]) -> None:
        mine: list[float] = []
        sock, buffer = None, bytearray()
        for request in chunk:
            for _attempt in range(3):
                try:
                    if sock is None:
                        sock = socket.create_connection(("127.0.0.1", port))
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        buffer = bytearray()
                    t0 = time.perf_counter()
                    status = exchange(sock, request, buffer)
                    mine.append(time.perf_counter() - t0)
                    if status != 200:
                        errors.append(f"status {status}")
                    break
                except OSError:
                    if sock is not None:
                        sock.close()
                    sock = None
            else:
                errors.append("connection failed 3 times")
        if sock is not None:
            sock.close()
        with lock:
            latencies.extend(mine)

    threads = [
        threading.Thread(target=run, args=(requests[i::connections],)) for i in range(connections)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put((latencies, errors))


class LoadFailed(Exception):
    pass


def load(port: int, requests: list[bytes], clients: int, connections: int) -> dict:
    queue = mp.Queue()
    procs = [
        mp.Process(target=client, args=(port, requests[i::clients], connections, queue))
        for i in range(clients)
    ]
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
        raise LoadFailed(f"{len(errors)} uploads failed, first: {errors[0]}")
    return {
        "rate": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "n": len(latencies),
    }


def group_cpu_seconds(pgid: int) -> tuple[float, float]:
    """CPU time (user, system) of every live process in a process group."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            user += int(fields[11])
            system += int(fields[12])
    return user / tick, system / tick


def wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--uploads", type=int, default=5000, help="measured uploads per run (default 5000)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; medians are reported"
    )
    parser.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    parser.add_argument(
        "--connections", type=int, default=8, help="keep-alive connections per client"
    )
    parser.add_argument(
        "--threads", type=int, default=8, help="gunicorn threads per worker (default 8)"
    )
    parser.add_argument(
        "--records",
        type=int,
        default=150,
        help="records per batch (default 150; full JTrack records, about 160 bytes each)",
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
        people = enroll(catalog, "bench", 32)
        catalog.dispose()
        subjects = [(e.subject, e.token, f"dev{i:03d}") for i, e in enumerate(people)]
        warmup = 300
        per_round = args.uploads + warmup
        total = per_round * args.rounds * 2  # the gthread runs get batches of their own
        rng = random.Random(1)
        requests = []
        sizes = []
        for i in range(total):
            subject, token, device = subjects[i % len(subjects)]
            body = orjson.dumps(
                make_batch(
                    "bench",
                    subject,
                    device,
                    "accelerometer",
                    1_700_000_000_000 + i * 3000,
                    3000,
                    args.records,
                    rng,
                )
            )
            sizes.append(len(body))
            requests.append(request_bytes("write_data", body, token))
        registrations = [
            request_bytes(
                "add_user",
                orjson.dumps({"studyId": "bench", "username": s, "deviceid": d, "status": 0}),
                t,
            )
            for s, t, d in subjects
        ]
        print(
            f"batches: {args.records} accelerometer records, "
            f"{statistics.mean(sizes) / 1024:.1f} KiB on average"
        )
        print(
            f"servers: gunicorn, {WORKERS} workers x {args.threads} threads "
            f"(BufferingWorker; gthread for comparison); clients: "
            f"{args.clients} processes x {args.connections} keep-alive connections; {os.cpu_count()} cores"
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
            str(args.threads),
            "--no-control-socket",
            "--chdir",
            str(ROOT / "bench"),
        ]
        servers = {
            "floor": lambda port: [
                *gunicorn,
                "--worker-class",
                "workbench_server.worker.BufferingWorker",
                "--bind",
                f"127.0.0.1:{port}",
                "floor_app:app",
            ],
            "full": lambda port: serve_command(
                home, port=port, workers=WORKERS, threads=args.threads
            ),
            "gthread": lambda port: [
                *gunicorn,
                "--worker-class",
                "gthread",
                "--header-map",
                "dangerous",
                "--bind",
                f"127.0.0.1:{port}",
                "workbench_server.wsgi:app",
            ],
        }
        results: dict[str, list[dict]] = {name: [] for name in servers}
        offset = 0
        for round_no in range(1, args.rounds + 1):
            for name, command in servers.items():
                start = offset + (args.rounds * per_round if name == "gthread" else 0)
                port = free_port()
                proc = subprocess.Popen(
                    command(port),
                    env=env,
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                try:
                    wait_port(port, proc)
                    if name == "full" and round_no == 1:
                        load(port, registrations, 1, 1)
                    load(port, requests[start : start + warmup], args.clients, args.connections)
                    cpu = group_cpu_seconds(proc.pid)
                    result = load(
                        port,
                        requests[start + warmup : start + per_round],
                        args.clients,
                        args.connections,
                    )
                    user, system = (
                        (after - before) / result["n"] * 1000
                        for after, before in zip(group_cpu_seconds(proc.pid), cpu, strict=True)
                    )
                    result["cpu"] = user + system
                    result["sys"] = system
                    results[name].append(result)
                    print(
                        f"round {round_no} {name:<7} {result['rate']:7.0f} uploads/s   p50 {result['p50']:6.2f} ms"
                        f"   p99 {result['p99']:6.2f} ms   server CPU {result['cpu']:.2f} ms/upload"
                        f" ({result['sys']:.2f} system)",
                        flush=True,
                    )
                except LoadFailed as exc:
                    os.killpg(proc.pid, signal.SIGTERM)
                    log = proc.stderr.read().decode(errors="replace")
                    raise SystemExit(f"{name}: {exc}\nserver log (end):\n{log[-3000:]}") from None
                finally:
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)
            offset += per_round
            shutil.rmtree(work / "floor", ignore_errors=True)

        def median(name: str, key: str) -> float:
            return statistics.median(r[key] for r in results[name])

        print()
        print(
            f"{'median of ' + str(args.rounds) + ' rounds':<30}{'uploads/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms':>8}"
        )
        for name, label in (
            ("floor", "floor: parse + fsync"),
            ("full", "write_data: full path"),
            ("gthread", "write_data: gthread"),
        ):
            print(
                f"{label:<30}{median(name, 'rate'):>10.0f}{median(name, 'p50'):>9.2f}"
                f"{median(name, 'p99'):>9.2f}{median(name, 'cpu'):>8.2f}"
            )
        ratio = median("full", "rate") / median("floor", "rate")
        rate = median("full", "rate")
        print(
            f"ratio full/floor: {ratio:.2f} (target >= 0.80: {'met' if ratio >= 0.8 else 'not met'})"
        )
        print(
            f"full path: {rate:.0f} uploads/s (target >= 1000: {'met' if rate >= 1000 else 'not met'})"
        )
        stack = rate / median("gthread", "rate")
        print(
            f"serving stack: {rate:.0f} uploads/s (BufferingWorker) vs "
            f"{median('gthread', 'rate'):.0f} (gthread), ratio {stack:.2f} "
            f"(target >= 0.90: {'met' if stack >= 0.9 else 'not met'})"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
