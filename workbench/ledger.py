"""The upload ledger: what was stored, and proof that the ledger and the files agree."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from tqdm import tqdm

from workbench.catalog import (
    Catalog,
    Prepared,
    dialect_insert,
    export_raw,
    rejections,
    sync_raw,
    uploads,
)
from workbench.config import Config
from workbench.pool import DataPool, sync_folders

log = logging.getLogger("workbench.ledger")


@dataclass(frozen=True)
class Discrepancy:
    """One way in which the ledger and the files disagree."""

    kind: str  # missing | size | hash | unrecorded | temporary
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind:<10} {self.path}  {self.detail}"


def verify(
    config: Config, *, check_hashes: bool = True, progress: bool = False, settle: float = 1.0
) -> list[Discrepancy]:
    """Check that every ledger row's file exists with its size and hash, that no stored file
    lacks a row, and that no temporary file is left; return every discrepancy found.

    The ledgers are the upload ledger, the rejections kept in junk (less what
    ``workbench junk prune`` removed), the sync ledger (each
    window fetched from a third-party API, under ``sync/<provider>/raw/``) and the raw
    questionnaire snapshots (``questionnaires/<source>/raw/``, both ways: a row without its
    file and a file without its row). A raw sync file without a row is not reported: a sync
    interrupted between the two fetches the window again.

    Safe beside a running server: what an upload in flight shows for an instant (a row whose
    file is being linked, an incoming file not yet recorded) is looked at again after
    ``settle`` seconds, and only what is still wrong then is reported.

    Example: ``assert verify(load_config()) == []``.
    """
    found = _verify_once(config, check_hashes=check_hashes, progress=progress)
    if found and settle > 0:
        time.sleep(settle)
        again = set(_verify_once(config, check_hashes=check_hashes, progress=False))
        found = [d for d in found if d in again]
    return found


def _verify_once(config: Config, *, check_hashes: bool, progress: bool) -> list[Discrepancy]:
    pool = DataPool.of(config)
    found: list[Discrepancy] = []
    # Files first, rows second: a row is committed before its file is linked, so every file
    # seen here has its row in the query below.
    stored = []
    for top in (pool.studies, pool.junk, *sorted(pool.questionnaires.glob("*/raw"))):
        for folder, _dirs, files in os.walk(top):
            stored.extend(os.path.relpath(os.path.join(folder, n), pool.root) for n in files)
    incoming = pool.incoming_files(all_hosts=True)
    recorded: set[str] = set()
    recorded_ids: set[tuple[int, int]] = set()
    catalog = Catalog(config.catalog_url)
    catalog.upgrade()
    try:
        with catalog.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(uploads)).scalar_one()
            kept = rejections.c.path.is_not(None) & rejections.c.pruned_at.is_(None)
            total += conn.execute(
                select(func.count()).select_from(rejections).where(kept)
            ).scalar_one()
            total += conn.execute(select(func.count()).select_from(sync_raw)).scalar_one()
            total += conn.execute(select(func.count()).select_from(export_raw)).scalar_one()
            rows = conn.execute(
                select(uploads.c.path, uploads.c.bytes, uploads.c.sha256).union_all(
                    select(rejections.c.path, rejections.c.bytes, rejections.c.sha256).where(kept),
                    select(sync_raw.c.path, sync_raw.c.bytes, sync_raw.c.sha256),
                    select(export_raw.c.path, export_raw.c.bytes, export_raw.c.sha256),
                )
            )
            bar = tqdm(rows, total=total, unit="file", desc="ledger", disable=not progress)
            for path, size, sha in bar:
                recorded.add(path)
                found.extend(_check_file(pool, path, size, sha, check_hashes, recorded_ids))
    finally:
        catalog.dispose()
    for relative in stored:
        name = os.path.basename(relative)
        if name.endswith((".part", ".tmp")) or name.startswith("."):
            found.append(Discrepancy("temporary", relative, "a temporary file is visible"))
        elif relative not in recorded:
            found.append(Discrepancy("unrecorded", relative, "stored file has no ledger row"))
    for path in incoming:
        if not _awaiting_sync(path, recorded_ids):
            found.append(
                Discrepancy(
                    "temporary",
                    os.path.relpath(path, pool.root),
                    "an interrupted write awaits recovery (`workbench recover`, "
                    "`--all-hosts` for another host's folder)",
                )
            )
    return found


def _awaiting_sync(path: Path, inodes: set[tuple[int, int]]) -> bool:
    """True for an incoming name a running server keeps until its next background sync:
    a second name of a file that is recorded in the ledger."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return True  # synced and removed while we looked
    return st.st_nlink > 1 and (st.st_dev, st.st_ino) in inodes


def _check_file(pool: DataPool, path: str, size: int, sha: str | None, check_hashes: bool, inodes):
    full = pool.root / path
    try:
        st = full.stat()
    except FileNotFoundError:
        return [Discrepancy("missing", path, "ledger row without a file")]
    except OSError as exc:
        return [Discrepancy("missing", path, f"cannot read the file: {exc.strerror}")]
    inodes.add((st.st_dev, st.st_ino))
    actual = st.st_size
    if actual != size:
        return [Discrepancy("size", path, f"{actual} bytes on disk, {size} in the ledger")]
    if check_hashes and sha:
        digest = hashlib.sha256()
        with open(full, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha:
            return [Discrepancy("hash", path, "SHA-256 on disk differs from the ledger")]
    return []


def ledger_counts(catalog: Catalog, study_id: str | None = None) -> dict[str, int]:
    """Number of stored batches, records and bytes (optionally for one study)."""
    query = select(
        func.count(),
        func.coalesce(func.sum(uploads.c.n_records), 0),
        func.coalesce(func.sum(uploads.c.bytes), 0),
    )
    if study_id:
        query = query.where(uploads.c.study_id == study_id)
    with catalog.engine.connect() as conn:
        batches, records, size = conn.execute(query).one()
    return {"batches": int(batches), "records": int(records), "bytes": int(size)}


def insert_ignore(catalog: Catalog):
    """INSERT of an upload row that does nothing (and returns no id) if the batch is there."""
    return dialect_insert(catalog.engine, uploads).on_conflict_do_nothing().returning(uploads.c.id)


class LedgerWriter:
    """Records upload rows for many threads at once: group commit, deferred durability.

    A thread that hands its row to :meth:`record` while no commit is running commits it
    itself, together with every row that queued up meanwhile; rows arriving during a commit
    wait and go in the next one. So concurrent uploads share one transaction, and a lone
    upload pays no hand-over between threads.

    A row's batch file is already fsynced in the pool's incoming folder when it is recorded,
    and that incoming name is kept until the background sync has made the catalog and the
    final name durable (:meth:`Catalog.sync` and a syncfs of the pool): after a power loss, recovery
    rebuilds a lost row or link from it. The answer 200 thus waits for one fsync of its own
    (the batch file) and shares the rest.
    """

    def __init__(self, catalog: Catalog, *, sync_interval: float = 0.5) -> None:
        self.catalog = catalog
        self.sync_interval = sync_interval
        self._insert = Prepared(
            catalog.engine,
            insert_ignore(catalog),
            column_keys=[c.name for c in uploads.columns if c.name != "id"],
        )
        self._queue: list[_Pending] = []
        self._committing = False
        self._unsynced: list[tuple[Path, Path]] = []
        self._mutex = threading.Lock()
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name="ledger-sync", daemon=True)
        self._syncer.start()

    def record(self, row: dict) -> int | None:
        """Insert ``row`` into the ledger; its id, or None if the same batch is there already."""
        pending = _Pending(row)
        with self._mutex:
            if self._committing:
                # Wait to be woken, by the commit that contained the row or to lead the next.
                pending.wake = threading.Lock()
                pending.wake.acquire()
                self._queue.append(pending)
            else:
                self._committing = True
        if pending.wake is not None:
            pending.wake.acquire()
        if not pending.finished:
            self._lead(pending)
        if pending.error is not None:
            raise pending.error
        return pending.row_id

    def _lead(self, leader: _Pending) -> None:
        """Commit the leader's row with every row queued meanwhile, then wake their threads and
        hand the lead to the first row that queued during the commit (waking no other)."""
        with self._mutex:
            batch, self._queue = [leader, *self._queue], []
        try:
            self._commit(batch)
        except BaseException as exc:  # e.g. SystemExit: no row of this batch is reported stored
            for item in batch:
                item.row_id, item.error = None, exc
            raise
        finally:
            with self._mutex:
                for item in batch:
                    item.finished = True
                if self._queue:
                    successor = self._queue.pop(0)
                else:
                    successor, self._committing = None, False
            for item in batch[1:]:
                item.wake.release()
            if successor is not None:
                successor.wake.release()

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            with self.catalog.raw_writing() as cursor:
                for item in batch:
                    item.row_id = self._insert.scalar(cursor, item.row)
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
        # One bad row must not fail the uploads it shared a commit with: one by one.
        for item in batch:
            item.row_id = None
            self._commit([item])

    def published(self, incoming: Path, final: Path) -> None:
        """Note a batch linked under its final name; its incoming name goes once durable."""
        with self._mutex:
            self._unsynced.append((incoming, final.parent))

    def sync(self) -> int:
        """Make all recorded rows and links durable now and drop their incoming names."""
        with self._sync_lock:
            with self._mutex:
                batch, self._unsynced = self._unsynced, []
            if not batch:
                return 0
            try:
                self.catalog.sync()
                sync_folders({folder for _incoming, folder in batch})
            except BaseException:
                with self._mutex:
                    self._unsynced[:0] = batch  # keep the names until a sync succeeds
                raise
            for incoming, _folder in batch:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(incoming)
            return len(batch)

    def close(self) -> None:
        """Stop the background sync after a last one."""
        self._stop.set()
        self._syncer.join(timeout=10)
        self.sync()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_interval):
            try:
                self.sync()
            except Exception as exc:  # logged and retried next round; the names stay
                log.error("ledger sync failed: %s", exc)


@dataclass(slots=True)
class _Pending:
    row: dict
    row_id: int | None = None
    error: BaseException | None = None
    finished: bool = False
    wake: threading.Lock | None = None  # held until this thread is to go on
