"""Study status and sanity check: how fast, against a JTrack-style rescan.

Builds a study of 1,000 subjects x 10 sensors with 1,000,000 ledger rows (inserted straight into
the catalog), then prints:

- the full status computation (aggregates rebuilt from the whole ledger, then the table);
- a refresh after 1,000 new rows (fold, table, history, alerts, CSV), median of 15;
- the baseline in the same run: a JTrack-style rescan (walk the tree, count files, parse the
  times from the names) of a 200,000-file tree of the same shape;
- the sanity check of 7 KB batch files, with one process and with one per core.

    python bench/status.py [--subjects 1000] [--rows 1000000] [--files 200000] [--sanity-files 20000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench.catalog import open_catalog  # noqa: E402
from workbench.config import init_home  # noqa: E402
from workbench.enrollment import enroll  # noqa: E402
from workbench.refresh import refresh_status  # noqa: E402
from workbench.sanity import sanity_check  # noqa: E402
from workbench.simulators.phones import make_batch  # noqa: E402
from workbench.status import rebuild_aggregates, study_status  # noqa: E402
from workbench.studies import JTRACK_SENSORS, create_study, definition_from_options  # noqa: E402
from workbench.times import now_ms  # noqa: E402

SENSORS = list(JTRACK_SENSORS[:10])  # the ten sensors of the issue: the JTrack list up to EMA
DAY = 86_400_000
REFRESHES = 15
INSERT = (
    "INSERT INTO uploads (study_id, subject_id, device_id, sensor, received_at, path, bytes,"
    " sha256, n_records, first_ts, last_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def timed(action):
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def ledger_rows(study, people, count, start_serial, now, rng):
    """``count`` ledger rows spread over the subjects and sensors, received over 30 days."""
    rows = []
    for k in range(count):
        serial = start_serial + k
        subject = people[serial % len(people)]
        sensor = SENSORS[(serial // len(people)) % len(SENSORS)]
        received = now - rng.randrange(30 * DAY)
        rows.append(
            (
                study,
                subject,
                f"{subject}-phone",
                sensor,
                received,
                f"studies/{study}/{subject}/{subject}-phone/{sensor}/{serial}.json",
                7000,
                f"{serial:064x}",
                45,
                received - 60_000,
                received - 1_000,
            )
        )
    return rows


def insert_rows(catalog, rows):
    with catalog.writing() as conn:
        conn.exec_driver_sql(INSERT, rows)


def add_devices(catalog, study, people, registered):
    with catalog.writing() as conn:
        conn.exec_driver_sql(
            "INSERT INTO devices (study_id, subject_id, app, device_id, status, registered_at,"
            " updated_at) VALUES (?, ?, 'main', ?, 0, ?, ?)",
            [(study, p, f"{p}-phone", registered, registered) for p in people],
        )


def jtrack_rescan(root: Path) -> tuple[int, int]:
    """What JTrack's status cron did each run: walk every file of the study, count the files
    per sensor folder and take the last time received from the newest file name."""
    counts = {}
    for directory, _dirs, files in os.walk(root):
        if not files:
            continue
        newest = max(name.rsplit("_", 1)[-1].removesuffix(".json") for name in files)
        counts[directory] = (len(files), newest)
    return len(counts), sum(n for n, _ in counts.values())


def build_tree(root: Path, subjects: int, per_folder: int) -> int:
    made = 0
    for s in range(subjects):
        subject = f"bench_{s + 1:05d}"
        for sensor in SENSORS:
            folder = root / subject / f"{subject}-phone" / sensor
            folder.mkdir(parents=True)
            for k in range(per_folder):
                stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime(1_700_000_000 + k * 3600))
                (folder / f"bench_{subject}_{subject}-phone_{sensor}_{stamp}.json").touch()
                made += 1
    return made


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1_000_000, help="ledger rows")
    parser.add_argument("--new-rows", type=int, default=1000, help="rows per refresh")
    parser.add_argument("--files", type=int, default=200_000, help="files in the rescanned tree")
    parser.add_argument("--sanity-files", type=int, default=20_000, help="7 KB batch files")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-status-"))
    try:
        config = init_home(work / "home")
        catalog = open_catalog(config)
        create_study(catalog, definition_from_options("bench", duration_days=60, sensors=SENSORS))
        people = [e.subject for e in enroll(catalog, "bench", args.subjects)]
        now = now_ms()
        add_devices(catalog, "bench", people, now - 30 * DAY)
        rng = random.Random(1)
        started = time.perf_counter()
        step = 100_000
        for offset in range(0, args.rows, step):
            insert_rows(
                catalog,
                ledger_rows("bench", people, min(step, args.rows - offset), offset, now, rng),
            )
        print(
            f"ledger: {args.rows} rows for {args.subjects} subjects x {len(SENSORS)} sensors "
            f"(inserted in {time.perf_counter() - started:.1f} s)"
        )
        os.sync()  # the kernel's writeback of the setup must not run during the timings

        def full():
            rebuild_aggregates(catalog)
            return study_status(catalog, "bench")

        full_seconds, table = timed(full)
        print(
            f"full status computation:        {full_seconds * 1000:8.0f} ms  ({table.height} rows)"
        )
        seconds, _ = timed(lambda: study_status(catalog, "bench", from_ledger=True))
        print(f"  (table straight from ledger): {seconds * 1000:8.0f} ms")
        refresh_status(config, catalog=catalog)  # history, alerts and CSV in place
        refreshes = []
        serial = args.rows
        for _ in range(REFRESHES):
            insert_rows(catalog, ledger_rows("bench", people, args.new_rows, serial, now_ms(), rng))
            serial += args.new_rows
            seconds, report = timed(lambda: refresh_status(config, catalog=catalog))
            assert report.folded == args.new_rows, report.summary()
            refreshes.append(seconds)
        refresh = statistics.median(refreshes)
        print(
            f"refresh after {args.new_rows} new rows:     {refresh * 1000:8.1f} ms  (median of {REFRESHES};"
            f" fold, table, history, alerts, CSV)"
        )

        tree = work / "tree" / "studies" / "bench"
        per_folder = max(1, args.files // (args.subjects * len(SENSORS)))
        made = build_tree(tree, args.subjects, per_folder)
        os.sync()
        rescan, (folders, counted) = timed(lambda: jtrack_rescan(tree))
        assert counted == made
        print(
            f"baseline JTrack rescan:         {rescan * 1000:8.0f} ms  ({made} files in"
            f" {folders} folders, every run)"
        )
        print(f"refresh is {rescan / refresh:.0f}x faster than the rescan it replaces")
        print(
            f"targets: refresh < 100 ms: {'met' if refresh < 0.1 else 'not met'}; full at"
            f" {args.rows} rows < 2 s: {'met' if full_seconds < 2 else 'not met'}"
        )

        sanity_bench(config, catalog, args.sanity_files, rng)
        catalog.dispose()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def sanity_bench(config, catalog, count, rng) -> None:
    study = "sanity"
    create_study(
        catalog, definition_from_options(study, duration_days=60, sensors=["accelerometer"])
    )
    people = [e.subject for e in enroll(catalog, study, 50)]
    rows = []
    sizes = []
    for k in range(count):
        subject = people[k % len(people)]
        device = f"{subject}-phone"
        records = make_batch(
            study, subject, device, "accelerometer", 1_700_000_000_000 + k * 60_000, 60_000, 45, rng
        )
        body = orjson.dumps(records)
        sizes.append(len(body))
        relative = f"studies/{study}/{subject}/{device}/accelerometer/{k}.json"
        path = config.pool / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        stamps = [r["timestamp"] for r in records]
        rows.append(
            (
                study,
                subject,
                device,
                "accelerometer",
                now_ms(),
                relative,
                len(body),
                hashlib.sha256(body).hexdigest(),
                len(records),
                min(stamps),
                max(stamps),
            )
        )
    insert_rows(catalog, rows)
    os.sync()
    print(f"sanity: {count} batch files of {statistics.mean(sizes) / 1024:.1f} KiB on average")
    cores = os.cpu_count() or 1
    rates = {}
    for workers, full in ((1, False), (cores, False), (cores, True)):
        with catalog.writing() as conn:  # forget what was checked: every file is read again
            conn.exec_driver_sql("DELETE FROM state WHERE key LIKE 'sanity.%'")
        # settle=0: the rows were stored a moment ago, and a run leaves rows younger than the
        # settle time for the next one; the bench measures reading, so every row is checked
        report = sanity_check(
            config, study=study, full=full, workers=workers, catalog=catalog, settle=0
        )
        assert report.ok and report.checked == count, report.summary()
        rates[workers, full] = rate = report.checked / report.seconds
        what = "--full, also walking the tree for unrecorded files" if full else "new files"
        print(f"  {workers} process{'es' if workers > 1 else '  '}, {what}: {rate:8.0f} files/s")
    best = rates[cores, False]
    print(
        f"target: at least 5,000 files/s with {cores} processes: "
        f"{'met' if best >= 5000 else 'not met'} ({best / rates[1, False]:.1f}x one process)"
    )


if __name__ == "__main__":
    main()
