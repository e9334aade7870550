"""Questionnaire export, end to end, against its floor: RSA decryption alone on every core.

Builds a PHQ-9 table of 100,000 rows with one encrypted field each (participantRSA, RSA-2048,
PKCS#1 v1.5), serves it from the local study server in a separate process, and prints:

- the floor: decrypting the same ciphertexts in one process per core, nothing else;
- the export: fetch, raw snapshot (fsynced, hashed, recorded), decryption, decoding into
  per-day Parquet and CSV, high-water mark; rows/s end to end;
- the ratio (target: at least 0.7).

    python bench/export.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench.config import init_home, load_config  # noqa: E402
from workbench.decoded import combine_table  # noqa: E402
from workbench.export import decrypt_values, export_source  # noqa: E402
from workbench.simulators.study_server import StudyServer, demo_tables, generate_keypair, serve  # noqa: E402

_key = None


def _load(path: str) -> None:
    global _key
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    _key = load_pem_private_key(Path(path).read_bytes(), password=None)


def _decrypt(values: list[str]) -> int:
    return sum(v is not None for v in decrypt_values(_key, values, "pkcs1v15"))


def floor(private: Path, values: list[str], workers: int) -> float:
    """Seconds to decrypt ``values`` in ``workers`` processes, the key loaded once in each."""
    size = max(200, len(values) // (workers * 8))
    chunks = [values[i : i + size] for i in range(0, len(values), size)]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_load, initargs=(str(private),)
    ) as pool:
        list(pool.map(_decrypt, chunks[:workers]))  # processes started and keys loaded
        started = time.perf_counter()
        done = sum(pool.map(_decrypt, chunks[workers:])) + 0
        seconds = time.perf_counter() - started
    assert done == sum(len(c) for c in chunks[workers:]), "some values did not decrypt"
    return seconds * len(values) / sum(len(c) for c in chunks[workers:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        home = work / "home"
        init_home(home)
        private, public = generate_keypair(home / "keys", bits=2048)
        started = time.perf_counter()
        tables, deleteable = demo_tables(
            public, participants=500, days=30, rows_per_table=args.rows
        )
        tables = {"PHQ9": tables["PHQ9"]}
        values = [row["participantRSA"] for row in tables["PHQ9"]]
        print(
            f"table: PHQ9, {len(values)} rows, one RSA-2048 field each "
            f"(encrypted in {time.perf_counter() - started:.1f} s); {cores} cores"
        )

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = StudyServer(tables, deleteable={"PHQ9": True}, user="bench", password="bench")
        process = multiprocessing.get_context("fork").Process(
            target=serve, args=(server,), kwargs={"port": port}, daemon=True
        )
        process.start()
        path = home / "workbench.toml"
        path.write_text(
            path.read_text().replace("http://127.0.0.1:9000", f"http://127.0.0.1:{port}")
        )
        os.environ.update(MT_USER="bench", MT_PASSWORD="bench")
        config = load_config(home)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)

        floor_seconds = floor(private, values, cores)
        floor_rate = len(values) / floor_seconds
        print(f"floor: RSA decryption alone, {cores} processes: {floor_rate:8.0f} rows/s")

        started = time.perf_counter()
        report = export_source(config, "mindtrails")
        seconds = time.perf_counter() - started
        assert report.ok, report.summary()
        stored = combine_table(config, "mindtrails", "PHQ9")
        assert stored.height == len(values) and not stored["participant_undecryptable"].any()
        rate = len(values) / seconds
        print(f"export end to end:                     {rate:8.0f} rows/s  ({seconds:.1f} s)")
        ratio = rate / floor_rate
        print(
            f"ratio export/floor: {ratio:.2f} (target >= 0.70: {'met' if ratio >= 0.7 else 'not met'})"
        )
        process.terminate()
        process.join()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
