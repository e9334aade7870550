"""Sensor tables: the build against a bare parse floor, incremental cost, loading and memory.

A synthetic study of real-shaped batches (``make_batch``, the shapes the JTrack app sends) is
written straight into a temporary home's pool and ledger, as the upload server files them
(``batch_row`` names and rows, files with the pool's modes; no HTTP): accelerometer batches of
6,000 records at 200 Hz, location, activity and application_usage batches of 100, some of
each resent with their first records repeating the end of the previous batch. By default 40
subjects over 14 local days in Europe/Berlin, at least 2 GB of raw JSON. Prints, in the same
run:

1. the floor (every batch file read and parsed with orjson, one process per core, nothing
   else; measured before and after the build, the mean is used, as the machine's load may
   drift) against the full build (``build_tables``), as seconds and MB/s; target: floor time
   / build time >= 0.5;
2. an incremental build after ``--new`` (1,000) more batches against parsing those alone;
   target: at most 2x;
3. one subject-week of accelerometer data (``sensor_data(..., subjects=[s], start, end)``)
   against a full scan of the sensor; target: at least 20x faster;
4. the build's peak memory: each build runs in a subprocess; the largest process (exact, from
   getrusage) and the whole process tree (sampled every 50 ms); target: at most 1 GiB.

Each figure is printed with its target and PASS or MISS; the exit status is 0 regardless
(figures, not a test). The ledger and the files are checked with ``workbench verify`` at the end.

    python bench/tables.py [--gb 2] [--subjects 40] [--days 14] [--new 1000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zoneinfo
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench.catalog import open_catalog, uploads  # noqa: E402
from workbench.config import init_home  # noqa: E402
from workbench.enrollment import enroll  # noqa: E402
from workbench.ingest import batch_row  # noqa: E402
from workbench.ledger import verify  # noqa: E402
from workbench.pool import DataPool, make_folders, open_new_file  # noqa: E402
from workbench.sensors.loading import sensor_data  # noqa: E402
from workbench.simulators.phones import make_batch  # noqa: E402
from workbench.studies import create_study, definition_from_options  # noqa: E402

STUDY = "tables"
ZONE = "Europe/Berlin"
FIRST_DAY = dt.date(2026, 3, 2)
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
ACCEL = "accelerometer"
ACCEL_RECORDS = 6000
ACCEL_STEP_MS = 5  # ~200 Hz: one batch is 30 s of recording
SMALL = {"location": 600_000, "activity": 300_000, "application_usage": 600_000}  # step, ms
SMALL_RECORDS = 100
SMALL_PER_DAY = 2  # batches of each small sensor per subject and day
OVERLAP_SHARE = 0.05  # batches resent with the end of the previous one repeated
ACCEL_BYTES = 1_030_000  # about one accelerometer batch of JSON (for planning only)
SMALL_BYTES = 22_000
GIB = 1024**3

BUILD = """
import json, resource, sys
from pathlib import Path
from workbench.config import load_config
from workbench.sensors.tables import build_tables
def cpu():
    own, workers = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime
config = load_config(Path(sys.argv[1]))
before = cpu()
summary = build_tables(config, sys.argv[2], progress=False)
print(json.dumps({
    "seconds": summary.seconds,
    "summary": summary.summary(),
    "rows": sum(s.rows for s in summary.sensors.values()),
    "repeated": sum(s.repeated for s in summary.sensors.values()),
    "quarantined": summary.quarantined,
    "cpu": cpu() - before,
    "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}))
"""


@dataclass(frozen=True)
class Planned:
    """One batch to store: whose, when, and how many records repeat the previous batch."""

    subject: str
    device: str
    sensor: str
    start: int  # ms of the first new record
    n: int
    repeat: int  # records at the front copied from the end of the previous batch
    received: int
    seed: int
    key: int  # unique in the plan
    after: int  # key of the batch whose end it repeats, or -1


def plan(subjects: list[str], days: int, accel_per_day: int, rng: random.Random) -> list[Planned]:
    """Every batch of the study, in the order the server receives them."""
    zone = zoneinfo.ZoneInfo(ZONE)
    batches: list[Planned] = []
    for subject in subjects:
        device = f"sim-{rng.getrandbits(48):012x}"
        previous: dict[str, Planned] = {}
        for day in range(days):
            date = FIRST_DAY + dt.timedelta(days=day)
            midnight = dt.datetime(date.year, date.month, date.day, tzinfo=zone)
            base = int(midnight.timestamp() * 1000)
            kinds = [(ACCEL, ACCEL_RECORDS, ACCEL_STEP_MS)] * accel_per_day
            for sensor, step in SMALL.items():
                kinds += [(sensor, SMALL_RECORDS, step)] * SMALL_PER_DAY
            slots = sorted(rng.sample(range(6 * 60, 23 * 60), len(kinds)))  # waking minutes
            for (sensor, n, step), minute in zip(kinds, slots, strict=True):
                start = base + minute * 60_000 + rng.randint(0, 59_999)
                repeat, after = 0, -1
                last = previous.get(sensor)
                if last is not None and rng.random() < OVERLAP_SHARE:
                    # a resend: starts inside the previous batch, its first records repeated
                    repeat, after = rng.randint(n // 10, n // 2), last.key
                    start = last.start + (last.n - last.repeat) * step
                span = (n - repeat) * step
                received = start + span + rng.randint(10_000, 20 * 60_000)
                if last is not None:
                    received = max(received, last.received + 1)
                batch = Planned(
                    subject,
                    device,
                    sensor,
                    start,
                    n,
                    repeat,
                    received,
                    rng.getrandbits(32),
                    len(batches),
                    after,
                )
                previous[sensor] = batch
                batches.append(batch)
    batches.sort(key=lambda b: b.received)
    return batches


def records_of(batch: Planned, tails: dict[int, list[dict]], wanted: set[int]) -> list[dict]:
    """The batch's records: the repeated end of the batch it follows, then new ones."""
    step = ACCEL_STEP_MS if batch.sensor == ACCEL else SMALL[batch.sensor]
    fresh = batch.n - batch.repeat
    records = make_batch(
        STUDY,
        batch.subject,
        batch.device,
        batch.sensor,
        batch.start,
        fresh * step,
        fresh,
        random.Random(batch.seed),
    )
    if batch.repeat:
        records = tails.pop(batch.after)[-batch.repeat :] + records
    if batch.key in wanted:
        tails[batch.key] = records
    return records


def store(
    config, batches: list[Planned], tails: dict, wanted: set[int], *, label: str
) -> tuple[list[str], int]:
    """Write the batches' files into the pool and their rows into the ledger, as the server
    does; return the files' pool-relative paths and their bytes."""
    pool = DataPool.of(config)
    catalog = open_catalog(config)
    paths, total, rows = [], 0, []
    folders: set[Path] = set()
    started = time.perf_counter()
    try:
        for i, batch in enumerate(batches, 1):
            records = records_of(batch, tails, wanted)
            body = orjson.dumps(records)
            stamps = [r["timestamp"] for r in records]
            row = batch_row(
                STUDY,
                batch.subject,
                batch.device,
                batch.sensor,
                body,
                hashlib.sha256(body).hexdigest(),
                len(records),
                min(stamps),
                max(stamps),
                received=batch.received,
            )
            path = pool.path(row["path"])
            if path.parent not in folders:
                make_folders(path.parent)
                folders.add(path.parent)
            fd = open_new_file(path)
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            rows.append(row)
            paths.append(row["path"])
            total += len(body)
            if len(rows) >= 2000 or i == len(batches):
                with catalog.writing() as conn:
                    conn.execute(uploads.insert(), rows)
                rows = []
            if i % 1000 == 0:
                print(
                    f"  {label}: {i}/{len(batches)} batches, {total / 1e9:.2f} GB,"
                    f" {time.perf_counter() - started:.0f} s",
                    flush=True,
                )
    finally:
        catalog.dispose()
    return paths, total


def parse_files(paths: list[str]) -> tuple[int, float]:
    """Read and parse files with orjson; return the number of records and the CPU seconds."""
    count, cpu = 0, time.process_time()
    for path in paths:
        with open(path, "rb") as handle:
            count += len(orjson.loads(handle.read()))
    return count, time.process_time() - cpu


def floor(root: Path, paths: list[str], sizes: list[int]) -> tuple[float, int, float]:
    """Seconds to read and parse ``paths`` with orjson, one process per core (started before
    the clock), the files dealt out so each process gets about the same bytes; return the
    seconds, the records and the CPU seconds of the processes."""
    workers = os.cpu_count() or 1
    shares: list[list[str]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for path, size in sorted(zip(paths, sizes, strict=True), key=lambda p: -p[1]):
        k = loads.index(min(loads))
        shares[k].append(str(root / path))
        loads[k] += size
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as executor:
        # started and warm before the clock starts: the floor is reading and parsing only
        list(executor.map(time.sleep, [0.5] * workers))
        started = time.perf_counter()
        done = list(executor.map(parse_files, shares))
        seconds = time.perf_counter() - started
    return seconds, sum(d[0] for d in done), sum(d[1] for d in done)


def run_build(home: Path) -> dict:
    """Build the tables in a subprocess while sampling the RSS of its process tree."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILD, str(home), STUDY],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peak = {"tree": 0}
    done = threading.Event()

    def sample() -> None:
        try:
            top = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            total = 0
            try:
                members = [top, *top.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for member in members:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += member.memory_info().rss
            peak["tree"] = max(peak["tree"], total)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"the build failed:\n{err.decode()[-3000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["tree_bytes"] = peak["tree"]
    return result


def median_seconds(action, repeat: int = 3) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        value = action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), value


def verdict(met: bool) -> str:
    return "PASS" if met else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gb", type=float, default=2.0, help="raw JSON of the study before --new (default 2)"
    )
    parser.add_argument("--subjects", type=int, default=40, help="subjects (default 40)")
    parser.add_argument(
        "--days", type=int, default=14, help="local days (default 14; fewer if --gb is small)"
    )
    parser.add_argument(
        "--new", type=int, default=1000, help="batches added for the incremental build"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--keep", type=Path, help="build the home in this new folder and keep it afterwards"
    )
    args = parser.parse_args()

    target = args.gb * 1e9
    small_day = len(SMALL) * SMALL_PER_DAY * SMALL_BYTES
    days = args.days
    accel_per_day = math.ceil((target / (args.subjects * days) - small_day) / ACCEL_BYTES)
    if (target / (args.subjects * days) - small_day) / ACCEL_BYTES < 0.75:
        accel_per_day = 1  # a small study: fewer days
        days = max(2, math.ceil(target / (args.subjects * (ACCEL_BYTES + small_day))))
    per_day = args.subjects * (accel_per_day + len(SMALL) * SMALL_PER_DAY)
    extra_days = math.ceil(args.new / per_day) + 1  # the new batches come after the study's

    if args.keep:
        if args.keep.exists() and any(args.keep.iterdir()):
            raise SystemExit(f"--keep {args.keep}: the folder is not empty")
        work = args.keep
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-tables-"))
    try:
        home = work / "home"
        config = init_home(home)
        catalog = open_catalog(config)
        try:
            definition = definition_from_options(
                STUDY, duration_days=days + extra_days, sensors=[ACCEL, *SMALL], timezone=ZONE
            )
            create_study(catalog, definition)
            subjects = [e.subject for e in enroll(catalog, STUDY, args.subjects)]
        finally:
            catalog.dispose()
        rng = random.Random(args.seed)
        batches = plan(subjects, days + extra_days, accel_per_day, rng)
        last = FIRST_DAY + dt.timedelta(days=days)
        cut = int(
            dt.datetime(last.year, last.month, last.day, tzinfo=zoneinfo.ZoneInfo(ZONE)).timestamp()
            * 1000
        )
        first = [b for b in batches if b.received < cut]
        later = [b for b in batches if b.received >= cut][: args.new]
        load = os.getloadavg()
        print(
            f"study: {args.subjects} subjects x {days} days ({ZONE}), per subject-day "
            f"{accel_per_day} accelerometer batches of {ACCEL_RECORDS} records (200 Hz) and "
            f"{SMALL_PER_DAY} each of {', '.join(SMALL)} of {SMALL_RECORDS}; "
            f"{OVERLAP_SHARE:.0%} resent with repeated records"
        )
        print(
            f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f}; pool {work}",
            flush=True,
        )
        tails: dict = {}
        wanted = {b.after for b in batches if b.after >= 0}
        started = time.perf_counter()
        paths, total = store(config, first, tails, wanted, label="writing")
        print(
            f"stored {len(paths)} batches, {total / 1e9:.2f} GB of raw JSON in "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        pool = DataPool.of(config)
        sizes = [os.path.getsize(pool.path(p)) for p in paths]

        print("\n1. full build against the parse floor", flush=True)
        before, records, cpu_before = floor(pool.root, paths, sizes)
        build = run_build(home)
        after, _, cpu_after = floor(pool.root, paths, sizes)
        floor_s, floor_cpu = (before + after) / 2, (cpu_before + cpu_after) / 2
        mb = total / 1e6
        ratio = floor_s / build["seconds"]
        print(
            f"   floor: orjson, {os.cpu_count()} processes: {floor_s:7.1f} s "
            f"{mb / floor_s:7.0f} MB/s  ({records} records; {before:.1f} s before the build, "
            f"{after:.1f} s after)"
        )
        print(
            f"   build_tables (full):          {build['seconds']:7.1f} s "
            f"{mb / build['seconds']:7.0f} MB/s  ({build['rows']} rows, "
            f"{build['repeated']} repeated, {build['quarantined']} quarantined)"
        )
        print(f"   floor/build = {ratio:.2f} (target >= 0.5: {verdict(ratio >= 0.5)})")
        print(
            f"   CPU seconds (all processes; what the machine's other load changes least): "
            f"floor {floor_cpu:.1f}, build {build['cpu']:.1f}, floor/build = "
            f"{floor_cpu / build['cpu']:.2f}"
        )
        print("   " + build["summary"].replace("\n", "\n   "), flush=True)

        print(f"\n2. incremental build after {len(later)} new batches", flush=True)
        new_paths, new_total = store(config, later, tails, wanted, label="adding")
        new_sizes = [os.path.getsize(pool.path(p)) for p in new_paths]
        before, new_records, cpu_before = floor(pool.root, new_paths, new_sizes)
        again = run_build(home)
        after, _, cpu_after = floor(pool.root, new_paths, new_sizes)
        new_floor_s, new_cpu = (before + after) / 2, (cpu_before + cpu_after) / 2
        slower = again["seconds"] / new_floor_s
        print(
            f"   floor: orjson, {os.cpu_count()} processes: {new_floor_s:7.2f} s "
            f"({len(new_paths)} batches, {new_total / 1e6:.0f} MB, {new_records} records; "
            f"{before:.2f} s before the build, {after:.2f} s after)"
        )
        print(f"   build_tables (incremental):   {again['seconds']:7.2f} s")
        print(f"   build/floor = {slower:.2f}x (target <= 2x: {verdict(slower <= 2)})")
        print(
            f"   CPU seconds: floor {new_cpu:.1f}, build {again['cpu']:.1f}, build/floor = "
            f"{again['cpu'] / new_cpu:.2f}x",
            flush=True,
        )

        print("\n3. one subject-week of accelerometer data against a full scan", flush=True)
        subject = subjects[len(subjects) // 2]
        start = FIRST_DAY + dt.timedelta(days=max(0, days // 2 - 3))
        end = start + dt.timedelta(days=6)
        week_s, week = median_seconds(
            lambda: sensor_data(
                config, STUDY, ACCEL, subjects=[subject], start=start, end=end
            ).collect()
        )
        scan_s, scan = median_seconds(lambda: sensor_data(config, STUDY, ACCEL).collect())
        faster = scan_s / week_s
        print(f"   subject-week ({subject}, {start} to {end}): {week_s:7.3f} s, {week.height} rows")
        print(f"   full scan:                    {scan_s:7.3f} s, {scan.height} rows (median of 3)")
        print(f"   full/week = {faster:.0f}x (target >= 20x: {verdict(faster >= 20)})", flush=True)
        del week, scan

        print("\n4. peak memory of the builds", flush=True)
        for name, result in (("full", build), ("incremental", again)):
            largest = max(result["self_kb"], result["children_kb"]) * 1024
            print(
                f"   {name:<12} largest process {largest / 2**20:6.0f} MiB (parent "
                f"{result['self_kb'] / 1024:.0f}, largest worker {result['children_kb'] / 1024:.0f}); "
                f"process tree {result['tree_bytes'] / 2**20:6.0f} MiB (sampled)"
            )
        peak = max(build["tree_bytes"], again["tree_bytes"])
        print(
            f"   peak of the build's process tree {peak / 2**20:.0f} MiB "
            f"(target <= 1024 MiB: {verdict(peak <= GIB)})",
            flush=True,
        )

        found = verify(config)
        print(
            f"\nworkbench verify: {len(found)} discrepancies"
            + "".join(f"\n  {d}" for d in found[:10])
        )
        load = os.getloadavg()
        print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
