"""The data pool on disk: where raw uploads, junk and reports live, and how files get there.

Every file enters the pool the same way: written to this host's incoming folder and fsynced,
then hard-linked under its final name (which fails rather than overwrite). The new name is made
durable at once for junk (:meth:`DataPool.publish`) or by the upload server's background sync
for batches; the incoming name goes only after that. Raw files are never modified or deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import io
import itertools
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from workbench.errors import WorkbenchError

INCOMING = ".incoming"
PART_SUFFIX = ".part"


class DataPool:
    """A data pool rooted at a local folder.

    Example: ``pool = DataPool(Path("pool")); pool.create()``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.studies = self.root / "studies"
        self.junk = self.root / "junk"
        self.reports = self.root / "reports"
        self.enrollment = self.root / "enrollment"
        self.resources = self.root / "resources"
        # Derived data that can always be rebuilt from the catalog (e.g. status sums).
        self.cache = self.root / ".cache"
        # One incoming folder per host, so recovery on one host never touches another's writes.
        self.incoming = self.root / INCOMING / _host_name()

    def create(self) -> None:
        """Create the pool's folders (idempotent)."""
        for folder in (
            self.studies,
            self.junk,
            self.reports,
            self.enrollment,
            self.resources,
            self.incoming,
        ):
            folder.mkdir(parents=True, exist_ok=True)

    def write_incoming(self, data: bytes, *, tag: str) -> Path:
        """Write ``data`` to a new private file in the incoming folder and fsync it.

        ``tag`` starts the file name, so recovery can find the ledger row (e.g. ``b<sha256>``).
        """
        path = self.incoming / f"{tag}-{os.getpid()}.{next(_sequence)}{PART_SUFFIX}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileNotFoundError:
            self.incoming.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def link(self, incoming: Path, relative: str) -> Path:
        """Give an fsynced incoming file its final pool-relative name as well; return it.

        Raises ``FileExistsError`` if the name is taken: nothing is ever overwritten. The new
        name is not yet durable: see :meth:`publish` or ``LedgerWriter.published``.
        """
        final = self.root / relative
        try:
            os.link(incoming, final)
        except FileNotFoundError:
            make_dirs_durably(final.parent)
            os.link(incoming, final)
        return final

    def publish(self, incoming: Path, relative: str) -> Path:
        """Move an fsynced incoming file to its final name durably (link, fsync, unlink)."""
        final = self.link(incoming, relative)
        fsync_dir(final.parent)
        os.unlink(incoming)
        return final

    def incoming_files(self, *, all_hosts: bool = False) -> list[Path]:
        """Files in this host's incoming folder (or every host's): a running server's pending
        ones, or what a crash left."""
        folders = sorted((self.root / INCOMING).glob("*")) if all_hosts else [self.incoming]
        return sorted(
            p
            for folder in folders
            if folder.is_dir()
            for p in folder.iterdir()
            if p.name.endswith(PART_SUFFIX)
        )

    def hold_incoming(self) -> int:
        """Take a shared lock that tells recovery a writer on this host is alive; the lock
        lasts as long as the returned descriptor stays open (a server keeps it for its life)."""
        fd = self._incoming_lock()
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

    @contextlib.contextmanager
    def exclusive_incoming(self) -> Iterator[None]:
        """Hold the incoming folder alone, or fail at once if a server on this host writes."""
        fd = self._incoming_lock()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkbenchError(
                    "a server on this host is writing to the pool; stop it before recovering"
                ) from None
            yield
        finally:
            os.close(fd)

    def _incoming_lock(self) -> int:
        self.incoming.mkdir(parents=True, exist_ok=True)
        return os.open(
            self.root / INCOMING / f"{self.incoming.name}.lock", os.O_RDWR | os.O_CREAT, 0o640
        )


def incoming_tag(path: Path) -> str:
    """The tag an incoming file was written with (the part of its name before the last '-')."""
    return path.name.rsplit("-", 1)[0]


_sequence = itertools.count()


def sync_folders(folders: set[Path]) -> None:
    """Make new names in ``folders`` durable: one ``syncfs`` of their filesystem on Linux
    (one journal commit for all of them), else an fsync of each folder."""
    if not folders:
        return
    if _syncfs is not None:
        for device_folder in {f.stat().st_dev: f for f in folders}.values():
            fd = os.open(device_folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _syncfs(fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"syncfs failed: {os.strerror(err)}")
            finally:
                os.close(fd)
        return
    for folder in folders:
        fsync_dir(folder)


def _load_syncfs():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True).syncfs if name else None
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


def _host_name() -> str:
    name = socket.gethostname() or "localhost"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "host"


def write_file_atomically(path: Path, data: bytes, *, durable: bool = True) -> Path:
    """Replace ``path`` by ``data`` so that a reader sees the old file or the new one, never a
    part: a temporary file in the same folder, renamed over it. ``durable`` fsyncs the file
    before and its folder after, so the new content also survives a power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{next(_sequence)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_parquet_atomically(frame, path: Path, *, durable: bool = True, **options) -> Path:
    """Write a polars DataFrame as Parquet the way :func:`write_file_atomically` writes bytes."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer, **options)
    return write_file_atomically(path, buffer.getvalue(), durable=durable)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(folder: Path) -> None:
    """Create ``folder`` and its missing parents, fsyncing each parent that gained an entry."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:  # pragma: no cover - disk full or permissions
            if exc.errno != errno.EEXIST:
                raise
        fsync_dir(path.parent)
