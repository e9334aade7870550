"""The data pool on disk: where raw uploads, junk and reports live, and how files get there.

Every file enters the pool the same way: written to this host's incoming folder and fsynced,
then hard-linked under its final name (which fails rather than overwrite). The new name is made
durable at once for junk (:meth:`DataPool.publish`), questionnaire snapshots and sync windows
(:meth:`DataPool.store`), or by the upload server's background sync for batches; the incoming
name goes only after that. Raw files are never modified or deleted.

Every file and folder the workbench makes is private to its user whatever the umask: files
0600, folders 0700. With ``[pool] group`` the pool is shared read-only with that group: files
0640, folders 0750 owned by the group and setgid, so new entries inherit it. A new entry takes
the policy of the folder it is made in (:func:`modes_in`), so a writer needs only its path;
:meth:`DataPool.create` sets the policy on the pool's root from the configuration.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import grp
import itertools
import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.errors import ConfigError, WorkbenchError

if TYPE_CHECKING:
    from workbench.config import Config

INCOMING = ".incoming"
PART_SUFFIX = ".part"
RAW_TAG = "r"  # incoming files of DataPool.store: never recorded before they are linked


@dataclass(frozen=True)
class Modes:
    """The modes of new files and folders, their group (None: the user's own) and the umask
    that gives the same to files made by other programs."""

    file: int
    folder: int
    gid: int | None
    umask: int


PRIVATE = Modes(file=0o600, folder=0o700, gid=None, umask=0o077)


def group_modes(group: str | None) -> Modes:
    """The modes of a pool shared with ``group`` (private when None), or :class:`ConfigError`.

    Example: ``group_modes("lab").file == 0o640``.
    """
    if not group:
        return PRIVATE
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"[pool] group {group!r} does not exist on this host") from None
    return Modes(file=0o640, folder=0o2750, gid=gid, umask=0o027)


def modes_in(folder: Path) -> Modes:
    """The modes a new entry of ``folder`` gets: shared when the folder is a shared pool's
    (setgid, group-readable, nothing for others), else private."""
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        return PRIVATE
    return _modes_of(info)


def _modes_of(info: os.stat_result) -> Modes:
    mode = info.st_mode
    if mode & stat.S_ISGID and mode & 0o050 == 0o050 and not mode & 0o007:
        return Modes(file=0o640, folder=0o2750, gid=info.st_gid, umask=0o027)
    return PRIVATE


def make_folders(folder: Path, *, durable: bool = False) -> Path:
    """Create ``folder`` and its missing parents, each with the mode its parent gives
    (:func:`modes_in`), whatever the umask; ``durable`` fsyncs each parent that gained an entry.

    Example: ``make_folders(pool.root / "reports" / "demo")``.
    """
    folder = Path(folder)
    missing = []
    current = folder
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        modes = modes_in(path.parent)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(path, modes.folder)
        if durable:
            fsync_dir(path.parent)
    return folder


def open_new_file(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL) -> int:
    """Open (creating it if missing) ``path`` with the mode its folder gives, whatever the
    umask; return the descriptor. An existing file of this user gets that mode too."""
    mode = modes_in(Path(path).parent).file
    fd = os.open(path, flags, mode)
    try:
        if flags & os.O_EXCL:
            os.fchmod(fd, mode)
        else:
            info = os.fstat(fd)
            if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != mode:
                os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def secure_file(path: Path) -> Path:
    """Give a file another program made (SQLite, papermill, a logging handler) the mode its
    folder gives; a missing file, or another user's, is left alone."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    mode = modes_in(path.parent).file
    mine = stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid()
    if mine and stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)
    return path


def create_private_file(path: Path) -> Path:
    """Create ``path`` empty with the mode its folder gives if it does not exist, else give it
    that mode, without ever opening an existing file: closing any descriptor of a SQLite
    database drops every POSIX lock this process holds on it, which can corrupt it."""
    path = Path(path)
    try:
        os.close(open_new_file(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        secure_file(path)
    return path


def private_umask(group: str | None = None) -> int:
    """Set the process umask to the pool's (0o077, or 0o027 with a ``group``) and return the
    old one: a second defence at entry points, which no writer relies on."""
    return os.umask(group_modes(group).umask)


class DataPool:
    """A data pool rooted at a local folder.

    Example: ``pool = DataPool(Path("pool")); pool.create()``.
    """

    def __init__(self, root: Path, *, group: str | None = None) -> None:
        self.root = Path(root)
        self.group = group or None
        self.studies = self.root / "studies"
        self.junk = self.root / "junk"
        self.reports = self.root / "reports"
        self.enrollment = self.root / "enrollment"
        self.resources = self.root / "resources"
        # Questionnaire exports: questionnaires/<source>/raw/ (snapshots) and decoded/.
        self.questionnaires = self.root / "questionnaires"
        # Third-party syncs: sync/<provider>/raw/, decoded/, written/, and the rate limits.
        self.sync = self.root / "sync"
        self.runs = self.root / "runs"  # executed notebooks of the pipelines
        # Sensor tables: tables/<study>/<sensor>/day=<local day>/subject=<id>/part-*.parquet
        self.tables = self.root / "tables"
        # Behavioural features: features/<study>/features.parquet (and .csv, app_usage.*)
        self.features = self.root / "features"
        self.logs = self.root / "logs"
        self.scheduler_queue = self.root / "scheduler.sqlite"  # the queue without Redis
        # Derived data that can always be rebuilt from the catalog (e.g. status sums).
        self.cache = self.root / ".cache"
        # One incoming folder per host, so recovery on one host never touches another's writes.
        self.incoming = self.root / INCOMING / _host_name()

    @classmethod
    def of(cls, config: Config) -> DataPool:
        """The pool of a configuration, with its ``[pool] group`` setting.

        Example: ``DataPool.of(load_config()).create()``.
        """
        return cls(config.pool, group=config.pool_group)

    def path(self, relative: str | Path) -> Path:
        """The full path of a pool-relative name, as the catalog records it.

        Example: ``pool.path(row.path).read_bytes()``.
        """
        return self.root / relative

    def relative(self, path: Path) -> str:
        """The pool-relative name the catalog records for a path inside the pool.

        Example: ``pool.relative(pool.logs / "cron.log") == "logs/cron.log"``.
        """
        return str(Path(path).relative_to(self.root))

    def sync_folder(self, provider: str, kind: str, *parts: str) -> Path:
        """A third-party provider's folder of one ``kind`` (``raw``, ``decoded``, ``written``),
        then ``parts`` (study, subject, stream...).

        Example: ``pool.sync_folder("gh", "decoded", "steps")``.
        """
        return self.sync.joinpath(provider, kind, *parts)

    def create(self) -> None:
        """Create the pool's folders (idempotent) with the modes of its ``group`` setting.

        A pool whose root has other modes or another group (an older pool, or a changed
        setting) has every folder and file under it set to them first.
        """
        modes = group_modes(self.group)
        make_folders(self.root.parent)
        with contextlib.suppress(FileExistsError):
            self.root.mkdir(mode=0o700)
        info = os.stat(self.root)
        if stat.S_IMODE(info.st_mode) != modes.folder or (
            modes.gid is not None and info.st_gid != modes.gid
        ):
            self._apply(modes)
        for folder in (
            self.studies,
            self.junk,
            self.reports,
            self.enrollment,
            self.resources,
            self.incoming,
        ):
            make_folders(folder)

    def _apply(self, modes: Modes) -> None:
        """Set ``modes`` on every folder and file of the pool, the root last (so an
        interrupted run is taken up again by the next :meth:`create`)."""
        try:
            for top, folders, files in os.walk(self.root, topdown=False):
                for name in files:
                    path = os.path.join(top, name)
                    if not os.path.islink(path):
                        self._set(path, modes.file, modes.gid)
                for name in folders:
                    path = os.path.join(top, name)
                    if not os.path.islink(path):
                        self._set(path, modes.folder, modes.gid)
            self._set(self.root, modes.folder, modes.gid)
        except PermissionError as exc:
            raise ConfigError(
                f"cannot give the pool {self.root} to group {self.group!r}: {exc.strerror}"
                " (are you a member of it?)"
                if self.group
                else f"cannot make the pool {self.root} private: {exc.strerror}"
            ) from exc

    @staticmethod
    def _set(path: str | Path, mode: int, gid: int | None) -> None:
        if gid is not None:
            os.chown(path, -1, gid)  # before chmod: a change of group clears setgid
        os.chmod(path, mode)

    def write_incoming(self, data: bytes, *, tag: str) -> Path:
        """Write ``data`` to a new private file in the incoming folder and fsync it.

        ``tag`` starts the file name, so recovery can find the ledger row (e.g. ``b<sha256>``).
        """
        path = self.incoming / f"{tag}-{os.getpid()}.{next(_sequence)}{PART_SUFFIX}"
        try:
            fd = open_new_file(path)
        except FileNotFoundError:
            make_folders(self.incoming)
            fd = open_new_file(path)
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

    def store(self, data: bytes, relative: str) -> str:
        """Store ``data`` durably as a new raw file at the pool-relative name ``relative`` (or
        ``<stem>_1<suffix>``, ``_2``... if it is taken); return the name used.

        The way every raw file enters the pool: written and fsynced in the incoming folder,
        linked under its final name (which never overwrites), the folder fsynced, the
        incoming name removed. A crash leaves at most an incoming file, which ``workbench
        recover`` discards (whoever stored it had not recorded it yet). Holds the incoming
        folder's shared lock meanwhile, so recovery never takes a file being stored.

        Example: ``pool.store(body, "questionnaires/mt/raw/PHQ9/PHQ9_20240501T000000.json")``.
        """
        stem, dot, suffix = relative.rpartition(".")
        stem, suffix = (stem, dot + suffix) if dot and "/" not in suffix else (relative, "")
        lock = self.hold_incoming()
        try:
            incoming = self.write_incoming(data, tag=RAW_TAG)
            try:
                for n in itertools.count():
                    name = relative if n == 0 else f"{stem}_{n}{suffix}"
                    try:
                        final = self.link(incoming, name)
                        break
                    except FileExistsError:
                        continue
                fsync_dir(final.parent)
            finally:
                os.unlink(incoming)
        finally:
            os.close(lock)
        return name

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
        make_folders(self.incoming)
        return open_new_file(
            self.root / INCOMING / f"{self.incoming.name}.lock", os.O_RDWR | os.O_CREAT
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
    make_folders(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{next(_sequence)}.tmp")
    try:
        fd = open_new_file(temporary)
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


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(folder: Path) -> None:
    """Create ``folder`` and its missing parents, fsyncing each parent that gained an entry."""
    make_folders(folder, durable=True)
