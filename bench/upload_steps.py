"""Where the CPU of one upload goes: each step of the full write_data path against the floor's.

Runs in one process and one thread, without HTTP, so the figures are the steps' own costs.
In each pass, half the batches go through the workbench's Ingest.write_data with its steps
wrapped in timers (thread CPU time), the other half without timers for the whole path; the
floor's two steps (parse the JSON, fsync-write the body) run on the same batches. Passes
alternate which side goes first; medians per upload are printed, in microseconds. HTTP,
gunicorn and Bottle cost both servers the same and are not included, nor is the ledger's
background sync thread (the write-ahead log's fsync, one syncfs and the unlinks, twice a second).

    python bench/upload_steps.py [--uploads 3000] [--passes 5] [--records 150]
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
import types
from collections import defaultdict
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import workbench.ingest as ingest_module  # noqa: E402
from workbench.catalog import open_catalog  # noqa: E402
from workbench.config import init_home  # noqa: E402
from workbench.enrollment import enroll  # noqa: E402
from workbench.ingest import Ingest, Upload  # noqa: E402
from workbench.simulators.phones import make_batch  # noqa: E402
from workbench.studies import create_study, definition_from_options  # noqa: E402

SUBJECTS = 32


class Timers:
    """Thread CPU time per named step, summed over one pass."""

    def __init__(self) -> None:
        self.spent: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, function):
        clock = time.thread_time_ns
        spent = self.spent

        def timed(*args, **kwargs):
            start = clock()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += clock() - start

        return timed


FULL_STEPS = {
    "md5 check": "the md5 header against the body",
    "decode (known source)": "parse + validate, one source checked while parsing",
    "decode (general)": "parse + validate for a source not seen before",
    "catalog lookup": "study, subject, token hash and device in one query",
    "token check": "SHA-256 of the bearer token against the stored hash",
    "sample span (general)": "one-source check and first/last sample time",
    "SHA-256 of body": "the batch's identity in the ledger",
    "write + fsync": "the body to the incoming folder, fsynced",
    "ledger commit": "the ledger row inserted and committed",
    "link final name": "the incoming file linked under its final name",
}


def instrument(ingest: Ingest, timers: Timers) -> None:
    """Wrap the steps of ``ingest.write_data`` in timers (the path itself is unchanged)."""
    ingest_module._verify_checksum = timers.wrap("md5 check", ingest_module._verify_checksum)
    ingest._sources.decode = timers.wrap("decode (known source)", ingest._sources.decode)
    ingest_module.parse_batch = timers.wrap("decode (general)", ingest_module.parse_batch)
    ingest._lookup_device.all = timers.wrap("catalog lookup", ingest._lookup_device.all)
    ingest._authenticate = timers.wrap("token check", ingest._authenticate)
    ingest_module.span_of_batch = timers.wrap("sample span (general)", ingest_module.span_of_batch)
    ingest_module.hashlib = types.SimpleNamespace(
        md5=hashlib.md5, sha256=timers.wrap("SHA-256 of body", hashlib.sha256)
    )
    ingest.pool.write_incoming = timers.wrap("write + fsync", ingest.pool.write_incoming)
    ingest.ledger.record = timers.wrap("ledger commit", ingest.ledger.record)
    ingest._place = timers.wrap("link final name", ingest._place)


MODULE_STEPS = ("_verify_checksum", "parse_batch", "span_of_batch", "hashlib")
ORIGINALS = {name: getattr(ingest_module, name) for name in MODULE_STEPS}


def uninstrument(ingest: Ingest) -> None:
    """Put the real functions back."""
    for name in MODULE_STEPS:
        setattr(ingest_module, name, ORIGINALS[name])
    for owner, name in (
        (ingest._sources, "decode"),
        (ingest._lookup_device, "all"),
        (ingest, "_authenticate"),
        (ingest.pool, "write_incoming"),
        (ingest.ledger, "record"),
        (ingest, "_place"),
    ):
        vars(owner).pop(name)


def store(ingest: Ingest, uploads: list[Upload]) -> None:
    for upload in uploads:
        receipt = ingest.write_data(upload)
        if receipt.status != 200:
            raise SystemExit(f"upload refused: {receipt.body}")


def floor_upload(folder: Path, body: bytes, timers: Timers) -> None:
    """What bench/floor_app.py does with a body, step by step."""
    clock = time.thread_time_ns
    start = clock()
    orjson.loads(body)
    parsed = clock()
    fd = os.open(folder / f"{os.urandom(16).hex()}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    timers.spent["floor: parse JSON"] += parsed - start
    timers.spent["floor: write + fsync"] += clock() - parsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uploads", type=int, default=3000, help="uploads per pass")
    parser.add_argument("--passes", type=int, default=5, help="alternating passes (medians)")
    parser.add_argument("--records", type=int, default=150, help="records per batch")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-steps-"))
    try:
        config = init_home(work / "home")
        catalog = open_catalog(config)
        create_study(
            catalog, definition_from_options("bench", duration_days=28, sensors=["accelerometer"])
        )
        people = enroll(catalog, "bench", SUBJECTS)
        catalog.dispose()
        ingest = Ingest(config)
        for i, person in enumerate(people):
            body = orjson.dumps(
                {
                    "studyId": "bench",
                    "username": person.subject,
                    "deviceid": f"dev{i:03d}",
                    "status": 0,
                }
            )
            ingest.add_user(Upload(body=body, authorization=f"Bearer {person.token}"))
        rng = random.Random(1)
        floor_folder = work / "floor"
        floor_folder.mkdir()
        per_pass: dict[str, list[float]] = defaultdict(list)
        total = 0
        for number in range(args.passes):
            uploads = []
            for _ in range(args.uploads):
                i = total % SUBJECTS
                body = orjson.dumps(
                    make_batch(
                        "bench",
                        people[i].subject,
                        f"dev{i:03d}",
                        "accelerometer",
                        1_700_000_000_000 + total * 3000,
                        3000,
                        args.records,
                        rng,
                    )
                )
                uploads.append(
                    Upload(
                        body=body,
                        md5=hashlib.md5(body).hexdigest(),
                        authorization=f"Bearer {people[i].token}",
                    )
                )
                total += 1
            # Alternate which side runs first, so neither always finds a warmer machine.
            sides = ["floor", "full"] if number % 2 == 0 else ["full", "floor"]
            for side in sides:
                timers = Timers()
                if side == "full":
                    # Half the uploads with the steps timed, half without timers for the whole
                    # (the timers themselves cost about a microsecond each).
                    half = len(uploads) // 2
                    instrument(ingest, timers)
                    start = time.thread_time_ns()
                    try:
                        store(ingest, uploads[:half])
                    finally:
                        uninstrument(ingest)
                    timers.spent["full: whole, steps timed"] = time.thread_time_ns() - start
                    start = time.thread_time_ns()
                    store(ingest, uploads[half:])
                    per_upload = {name: spent / half for name, spent in timers.spent.items()}
                    whole = time.thread_time_ns() - start
                    per_upload["full: whole write_data"] = whole / (len(uploads) - half)
                else:
                    start = time.thread_time_ns()
                    for upload in uploads:
                        floor_upload(floor_folder, upload.body, timers)
                    timers.spent["floor: whole"] = time.thread_time_ns() - start
                    per_upload = {n: spent / len(uploads) for n, spent in timers.spent.items()}
                for name, nanoseconds in per_upload.items():
                    per_pass[name].append(nanoseconds / 1000)
        ingest.close()

        def median(name: str) -> float:
            return statistics.median(per_pass[name]) if per_pass[name] else 0.0

        print(
            f"{args.records}-record batches, {args.passes} passes of {args.uploads} uploads, one "
            "thread, no HTTP; thread CPU per upload, median of the passes (microseconds)"
        )
        print(f"{'floor: parse JSON':<28}{median('floor: parse JSON'):8.1f}")
        print(f"{'floor: write + fsync':<28}{median('floor: write + fsync'):8.1f}")
        floor = median("floor: whole")
        print(f"{'floor: whole':<28}{floor:8.1f}")
        print()
        steps = 0.0
        for name, what in FULL_STEPS.items():
            value = median(name)
            steps += value
            print(f"{name:<28}{value:8.1f}   {what}")
        timed = median("full: whole, steps timed")
        print(f"{'other (checks, row, answer)':<28}{timed - steps:8.1f}   with the timers' cost")
        whole = median("full: whole write_data")
        print(f"{'full: whole write_data':<28}{whole:8.1f}   on the other half, without timers")
        print()
        print(
            f"the full path's steps cost {whole / floor:.2f} times the floor's "
            f"({whole - floor:.0f} us more per upload)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
