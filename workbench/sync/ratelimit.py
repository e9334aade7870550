"""Rate limits: a pyrate-limiter bucket per provider (or per provider and account), and the
provider's own signals, which win over the local count.

The bucket is a pyrate-limiter ``SQLiteBucket`` in ``pool/sync/ratelimits.sqlite`` (one
table per key, writes serialized across processes by a file lock), or a ``RedisBucket`` when
the variable named by ``[redis] url_env`` holds a Redis URL: chosen here and nowhere else.
Every local window is ``safety_ms`` longer than the provider's, so requests that reach the
provider a little later than they left never count twice in its window.

A 429, a ``Retry-After`` or a ``RateLimit-Remaining: 0`` (with ``RateLimit-Reset`` seconds,
also read as ``X-RateLimit-*``) blocks the key in the catalog (``sync_limits``) until the
reset: no process sends to that provider before it, whatever its local count says.

:meth:`RateLimits.acquire` never waits: it returns 0 when a request may go, else the seconds
until one may.

Example::

    limits = RateLimits(config, catalog)
    wait = limits.acquire("google_health:7", (300, 60.0))
    if wait == 0:
        response = http.get(...)
        limits.observe("google_health:7", response)
"""

from __future__ import annotations

import datetime as dt
import email.utils
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading

import httpx
from sqlalchemy import select

from workbench.catalog import Catalog, dialect_insert, sync_limits
from workbench.config import Config
from workbench.errors import ConfigError
from workbench.pool import DataPool, create_private_file, make_folders, open_new_file
from workbench.sync.settings import sync_settings
from workbench.times import now_ms

log = logging.getLogger("workbench.sync")

LEAK_EVERY = 200  # puts between clean-ups of expired bucket entries


class _FileLock:
    """A re-entrant lock across threads and processes (RLock plus flock), as the bucket's
    lock: pyrate-limiter's own file lock needs the ``filelock`` package."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._rlock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self._pid = 0

    def __enter__(self):
        self._rlock.acquire()
        if self._depth == 0:
            if self._fd is None or self._pid != os.getpid():
                self._fd = open_new_file(self.path, os.O_RDWR | os.O_CREAT)
                self._pid = os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._rlock.release()

    # pyrate-limiter's combined_lock uses acquire/release
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self.__enter__()
        return True

    def release(self) -> None:
        self.__exit__(None, None, None)


def limit_key(provider, account_id: int) -> str:
    """The bucket key of a request: the provider, or the provider and account."""
    if provider.config.limit_scope == "account":
        return f"{provider.name}:{account_id}"
    return provider.name


class RateLimits:
    """Local buckets plus the provider-announced blocks, for one process."""

    def __init__(self, config: Config, catalog: Catalog) -> None:
        settings = sync_settings(config)
        self.catalog = catalog
        self.safety_ms = settings.safety_ms
        self.redis_url = config.redis_url
        self.path = DataPool.of(config).sync / "ratelimits.sqlite"
        self._buckets: dict[str, object] = {}
        self._puts = 0
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        return "redis" if self.redis_url else "sqlite"

    def _bucket(self, key: str, rate: tuple[int, float]):
        from pyrate_limiter import Rate

        name = f"{key}|{rate[0]}/{rate[1]}"
        with self._lock:
            bucket = self._buckets.get(name)
            if bucket is not None:
                return bucket
            rates = [Rate(rate[0], int(rate[1] * 1000) + self.safety_ms)]
            table = "rl_" + hashlib.sha256(name.encode()).hexdigest()[:20]
            if self.redis_url:
                bucket = self._redis_bucket(rates, f"workbench:ratelimit:{table}")
            else:
                bucket = self._sqlite_bucket(rates, table)
            self._buckets[name] = bucket
            return bucket

    def _sqlite_bucket(self, rates, table: str):
        from pyrate_limiter import SQLiteBucket

        make_folders(self.path.parent)
        lock = _FileLock(f"{self.path}.lock")
        with lock:
            create_private_file(self.path)  # SQLite keeps this mode
            conn = sqlite3.connect(
                str(self.path), isolation_level="DEFERRED", check_same_thread=False, timeout=30
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS '{table}' (name VARCHAR, item_timestamp INTEGER)"
            )
            conn.execute(f"CREATE INDEX IF NOT EXISTS 'idx_{table}' ON '{table}' (item_timestamp)")
            conn.commit()
        return SQLiteBucket(rates, conn, table, lock=lock)

    def _redis_bucket(self, rates, key: str):
        try:
            from redis import Redis
        except ImportError as exc:  # pragma: no cover - redis is in the dev and redis extras
            raise ConfigError(
                "rate-limit buckets in Redis need the redis package: pip install 'workbench[redis]'"
            ) from exc
        from pyrate_limiter import RedisBucket

        return RedisBucket.init(rates, Redis.from_url(self.redis_url), key)

    def blocked_until(self, key: str) -> int:
        """Until when (ms) the provider asked for no requests on ``key`` (0: not blocked)."""
        with self.catalog.engine.connect() as conn:
            value = conn.execute(
                select(sync_limits.c.blocked_until).where(sync_limits.c.key == key)
            ).scalar()
        return value or 0

    def acquire(self, key: str, rate: tuple[int, float]) -> float:
        """Take one request from ``key``'s budget: 0 when granted, else the seconds until the
        budget (or the provider's block) allows one. Never sleeps."""
        from pyrate_limiter import RateItem

        now = now_ms()
        blocked = self.blocked_until(key)
        if blocked > now:
            return (blocked - now) / 1000
        bucket = self._bucket(key, rate)
        item = RateItem(key, bucket.now())
        decision = bucket.put_decision(item)
        self._puts += 1
        if self._puts % LEAK_EVERY == 0:
            bucket.leak(bucket.now())
        if decision.allowed:
            return 0.0
        wait = decision.retry_after_ms
        if wait is None:
            wait = bucket.waiting(item)
        return max(wait, 1) / 1000

    def observe(self, key: str, response: httpx.Response) -> float | None:
        """Read the provider's limit signals; block ``key`` and return the seconds to wait when
        it says to stop (a 429, or no requests left), else None."""
        headers = response.headers
        retry_after = _seconds(headers.get("Retry-After"))
        remaining = headers.get("RateLimit-Remaining", headers.get("X-RateLimit-Remaining"))
        reset = _seconds(headers.get("RateLimit-Reset", headers.get("X-RateLimit-Reset")))
        wait = None
        reason = ""
        if response.status_code == 429:
            wait = retry_after if retry_after is not None else reset
            wait = 60.0 if wait is None else wait
            reason = f"429 from the provider (wait {wait:g} s)"
        elif retry_after is not None and response.status_code == 503:
            wait, reason = retry_after, f"503 with Retry-After {retry_after:g} s"
        elif remaining is not None and remaining.strip().isdigit() and int(remaining) <= 0:
            wait = reset if reset is not None else 60.0
            reason = f"no requests left in the provider's window (reset in {wait:g} s)"
        if wait is None:
            return None
        self.block(key, now_ms() + int(wait * 1000), reason)
        return wait

    def block(self, key: str, until: int, reason: str) -> None:
        """Record that ``key`` takes no requests before ``until`` (ms); blocks only lengthen."""
        now = now_ms()
        with self.catalog.writing(durable=False) as conn:
            conn.execute(
                dialect_insert(self.catalog.engine, sync_limits)
                .values(key=key, blocked_until=until, reason=reason, updated_at=now)
                .on_conflict_do_update(
                    index_elements=["key"],
                    set_={"blocked_until": until, "reason": reason, "updated_at": now},
                    where=sync_limits.c.blocked_until < until,
                )
            )
        log.info("rate limit on %s until %s: %s", key, until, reason)

    def close(self) -> None:
        for bucket in self._buckets.values():
            bucket.close()
        self._buckets.clear()


def _seconds(value: str | None) -> float | None:
    """Seconds from a delta (``"5"``, ``"5.25"``) or an HTTP date; None if absent or bad."""
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max((when - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)
