"""The incremental sync of one account: windows from its checkpoint to today, within limits.

A run takes the account's run lock without waiting (a second run of the same account is
recorded as skipped, never overlaps), then for each stream walks the provider's windows from
the checkpoint to the one holding today. Before each request it takes a permit from the rate
limit (:mod:`workbench.sync.ratelimit`); a wait up to ``[sync] inline_wait`` seconds is slept
(the scheduler cannot wake a run more precisely), a longer one ends the run as ``limited`` with
``resume_at``, and the run is queued on huey for then. Every answer is status-checked: only a
200 whose JSON parses is stored. Each window is stored before the next is asked for: the raw
answer as an immutable, hashed file in the pool and a ``sync_raw`` row (the ledger), then its
records merged into per-month Parquet and CSV under
``sync/<provider>/decoded/<stream>/<study>/<subject>/`` (one row per day or record, the latest
fetch wins). A complete window (it ended before today) advances the checkpoint; the last,
partial window does not, so the next run drops and fetches it again.

Example::

    result = sync_account(config, 7)
    print(result.summary())
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from dataclasses import dataclass

import httpx
import orjson
import polars as pl
from sqlalchemy import select, update

from workbench import scheduler
from workbench.catalog import (
    Catalog,
    borrowed_catalog,
    dialect_insert,
    sync_accounts,
    sync_checkpoints,
    sync_raw,
    sync_runs,
)
from workbench.config import Config
from workbench.decoded import merge_decoded
from workbench.errors import ConfigError, SourceUnavailable, TokenRevoked
from workbench.pool import DataPool, write_file_atomically
from workbench.sync.accounts import Account, access_token, get_account, mark_revoked
from workbench.sync.providers import Provider, get_provider
from workbench.sync.ratelimit import RateLimits, limit_key
from workbench.sync.settings import sync_settings
from workbench.times import now_ms, utc_datetime
from workbench.writers import csv_bytes, write_parquet_atomically

log = logging.getLogger("workbench.sync")


@dataclass
class SyncResult:
    """What one run did."""

    account_id: int
    run_id: int | None
    status: str  # succeeded | limited | failed | skipped | revoked
    requests: int = 0
    windows: int = 0
    records: int = 0
    resume_at: int | None = None  # limited: when the run continues
    error: str | None = None

    def summary(self) -> str:
        text = (
            f"account {self.account_id}: {self.status}, {self.requests} requests, "
            f"{self.windows} windows, {self.records} records"
        )
        if self.resume_at:
            when = utc_datetime(self.resume_at)
            text += f", resumes at {when:%H:%M:%S}Z"
        return text + (f" ({self.error})" if self.error else "")


def today_utc() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def checkpoint(catalog: Catalog, account_id: int, stream: str) -> dt.date | None:
    """The first day not yet stored in a complete window (None: nothing synced yet)."""
    c = sync_checkpoints.c
    with catalog.engine.connect() as conn:
        value = conn.execute(
            select(c.next_start).where(c.account_id == account_id, c.stream == stream)
        ).scalar()
    return dt.date.fromisoformat(value) if value else None


def _advance(catalog: Catalog, account_id: int, stream: str, day: dt.date) -> None:
    now = now_ms()
    with catalog.writing() as conn:
        conn.execute(
            dialect_insert(catalog.engine, sync_checkpoints)
            .values(
                account_id=account_id, stream=stream, next_start=day.isoformat(), updated_at=now
            )
            .on_conflict_do_update(
                index_elements=["account_id", "stream"],
                set_={"next_start": day.isoformat(), "updated_at": now},
                where=sync_checkpoints.c.next_start < day.isoformat(),  # only forward
            )
        )


def decoded_folder(config: Config, provider: str, stream: str, account: Account):
    return DataPool.of(config).sync_folder(
        provider, "decoded", stream, account.study, account.subject
    )


def combine_stream(config: Config, provider: str, stream: str) -> pl.DataFrame:
    """Every decoded record of one provider's stream, all accounts, sorted by id."""
    root = DataPool.of(config).sync_folder(provider, "decoded", stream)
    files = sorted(root.glob(f"*/*/{stream}_*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed").sort("id")


def store_window(
    config: Config,
    catalog: Catalog,
    account: Account,
    provider: Provider,
    stream: str,
    window: tuple[dt.date, dt.date],
    complete: bool,
    payload,
    rows: list[dict],
) -> int:
    """Store one fetched window: raw file and ledger row, then its decoded records; return
    the ``sync_raw`` id."""
    fetched = now_ms()
    start, end = window
    body = orjson.dumps(
        {
            "account": account.id,
            "provider": provider.name,
            "stream": stream,
            "window": [start.isoformat(), end.isoformat()],
            "fetched_at": fetched,
            "response": payload,
        }
    )
    sha = hashlib.sha256(body).hexdigest()
    pool = DataPool.of(config)
    folder = pool.sync_folder(provider.name, "raw", account.study, account.subject, stream)
    name = f"{stream}_{start.isoformat()}_{fetched}_{sha[:12]}.json"
    relative = pool.store(body, pool.relative(folder / name))  # never over an earlier window
    with catalog.writing() as conn:
        raw_id = conn.execute(
            sync_raw.insert()
            .values(
                account_id=account.id,
                provider=provider.name,
                stream=stream,
                window_start=start.isoformat(),
                window_end=end.isoformat(),
                complete=int(complete),
                fetched_at=fetched,
                path=relative,
                sha256=sha,
                bytes=len(body),
                n_records=len(rows),
            )
            .returning(sync_raw.c.id)
        ).scalar_one()
    target = decoded_folder(config, provider.name, stream, account)
    _drop_window(target, stream, start, end)  # a partial window fetched before is replaced
    if rows:
        frame = pl.DataFrame(
            [
                {
                    "id": f"{account.subject}:{row.get('file_id') or row['date']}",
                    "study": account.study,
                    "subject": account.subject,
                    "account": account.id,
                    **row,
                    "fetched_at": fetched,
                }
                for row in rows
            ],
            strict=False,
            infer_schema_length=None,
        )
        frame = frame.with_columns(pl.col("date").str.slice(0, 7).alias("_date"))
        merge_decoded(target, stream, frame)
    return raw_id


def _drop_window(folder, stream: str, start: dt.date, end: dt.date) -> None:
    """Remove the decoded rows of [start, end) from the month files they fall in."""
    months = {start.isoformat()[:7], (end - dt.timedelta(days=1)).isoformat()[:7]}
    for month in months:
        path = folder / f"{stream}_{month}.parquet"
        if not path.exists():
            continue
        frame = pl.read_parquet(path)
        kept = frame.filter(
            (pl.col("date") < start.isoformat()) | (pl.col("date") >= end.isoformat())
        )
        if kept.height != frame.height:
            write_parquet_atomically(kept, path)
            write_file_atomically(path.with_suffix(".csv"), csv_bytes(kept))


def _start_run(catalog: Catalog, account_id: int, trigger: str, status: str = "running") -> int:
    with catalog.writing() as conn:
        return conn.execute(
            sync_runs.insert()
            .values(account_id=account_id, trigger=trigger, status=status, started_at=now_ms())
            .returning(sync_runs.c.id)
        ).scalar_one()


def _finish_run(catalog: Catalog, result: SyncResult) -> None:
    now = now_ms()
    values = {"last_attempt_at": now}
    if result.status == "succeeded":
        values["last_synced_at"] = now
        values["error"] = None
    elif result.status == "failed":
        values["error"] = (result.error or "")[:500]
    with catalog.writing() as conn:
        conn.execute(
            update(sync_runs)
            .where(sync_runs.c.id == result.run_id)
            .values(
                status=result.status,
                finished_at=now,
                requests=result.requests,
                windows=result.windows,
                records=result.records,
                resume_at=result.resume_at,
                error=result.error,
            )
        )
        if result.status != "skipped":
            conn.execute(
                update(sync_accounts)
                .where(sync_accounts.c.id == result.account_id)
                .values(**values)
            )


SYNC_TASK = "sync_account"  # the scheduler's task that runs sync_account


def queue_sync(
    config: Config, account_id: int, *, eta_ms: int | None = None, trigger: str = "queue"
) -> None:
    """Queue a sync of ``account_id`` on the scheduler, at once or for ``eta_ms``. A run
    resumed after a rate limit is woken up to ``[sync] inline_wait`` seconds early (the
    scheduler's resolution is one second) and waits the rest itself.

    Example: ``queue_sync(config, 3)``.
    """
    if eta_ms is not None:
        eta_ms -= int(sync_settings(config).inline_wait * 1000)
    scheduler.queue_task(config, SYNC_TASK, account_id, trigger, eta_ms=eta_ms)


def sync_account(
    config: Config,
    account_id: int,
    *,
    trigger: str = "manual",
    catalog: Catalog | None = None,
    limits: RateLimits | None = None,
    today: dt.date | None = None,
    reschedule: bool = True,
) -> SyncResult:
    """Sync one account from its checkpoint to today; see the module's description.

    With ``reschedule``, a run stopped by a rate limit queues its continuation on huey for
    when the limit resets. Never raises for what a provider answers: the result says.

    Example: ``sync_account(config, 3).status``.
    """
    with borrowed_catalog(config, catalog) as catalog:
        own_limits = limits is None
        limits = limits or RateLimits(config, catalog)
        try:
            account = get_account(catalog, account_id)
            if account.status != "active":
                run_id = _start_run(catalog, account_id, trigger, status="skipped")
                result = SyncResult(
                    account_id,
                    run_id,
                    "revoked" if account.status == "revoked" else "skipped",
                    error=f"the account is {account.status}",
                )
                _finish_run(catalog, SyncResult(**{**result.__dict__, "status": "skipped"}))
                return result
            with catalog.lock(f"sync.run-{account_id}", blocking=False) as taken:
                if not taken:
                    run_id = _start_run(catalog, account_id, trigger, status="skipped")
                    result = SyncResult(
                        account_id,
                        run_id,
                        "skipped",
                        error="another run of this account is going on",
                    )
                    _finish_run(catalog, result)
                    log.info("account %d: a run is going on; this one is skipped", account_id)
                    return result
                with catalog.writing() as conn:  # runs left 'running' died with their worker
                    conn.execute(
                        update(sync_runs)
                        .where(
                            sync_runs.c.account_id == account_id, sync_runs.c.status == "running"
                        )
                        .values(
                            status="interrupted", error="its worker stopped before the run ended"
                        )
                    )
                result = SyncResult(account_id, _start_run(catalog, account_id, trigger), "running")
                try:
                    _run(config, catalog, limits, account, result, today or today_utc())
                except BaseException as exc:
                    result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
                    _finish_run(catalog, result)
                    raise
                _finish_run(catalog, result)
            log.info("%s", result.summary())
            if result.status == "limited" and reschedule and result.resume_at:
                queue_sync(config, account_id, eta_ms=result.resume_at, trigger="resume")
            return result
        finally:
            if own_limits:
                limits.close()


def _run(config, catalog, limits, account: Account, result: SyncResult, today: dt.date) -> None:
    settings = sync_settings(config)
    provider = get_provider(settings, account.provider)
    key = limit_key(provider, account.id)
    rate = provider.config.rate_limit
    with httpx.Client(base_url=provider.config.base_url, timeout=provider.config.timeout) as http:
        for stream in provider.streams:
            start = checkpoint(catalog, account.id, stream) or provider.initial_start(today)
            for window in provider.windows(start, today):
                outcome = _fetch_window(
                    config, catalog, limits, http, provider, account, stream, window, key, rate,
                    settings.inline_wait, result,
                )  # fmt: skip
                if outcome is None:
                    return  # result says why (limited, failed, revoked)
                payload, rows = outcome
                complete = provider.config.window != "all" and window[1] <= today
                store_window(
                    config, catalog, account, provider, stream, window, complete, payload, rows
                )
                result.windows += 1
                result.records += len(rows)
                if complete:
                    _advance(catalog, account.id, stream, window[1])
    result.status = "succeeded"


def _fetch_window(
    config, catalog, limits, http, provider, account, stream, window, key, rate, inline, result
):
    """One window's payload and records, or None with ``result`` set to why not."""
    stale = None
    for _attempt in range(2):  # a second time only after a refused (401) token was refreshed
        while True:
            wait = limits.acquire(key, rate)
            if wait == 0:
                break
            if wait > inline:
                result.status, result.resume_at = "limited", now_ms() + int(wait * 1000)
                return None
            time.sleep(wait)  # shorter than the scheduler can wake a run
        try:
            token, generation = access_token(config, catalog, account, stale_generation=stale)
        except TokenRevoked as exc:
            result.status, result.error = "revoked", exc.message
            return None
        except (SourceUnavailable, ConfigError) as exc:
            result.status, result.error = "failed", exc.message
            return None
        request = provider.request(stream, window[0], window[1], account)
        try:
            response = http.request(**request, headers={"Authorization": f"Bearer {token}"})
        except httpx.TransportError as exc:  # refused, dropped, timed out
            result.status = "failed"
            result.error = f"{provider.name}: {type(exc).__name__}: {exc or 'no answer'}"
            return None
        result.requests += 1
        blocked = limits.observe(key, response)
        if response.status_code == 429:
            result.status = "limited"
            result.resume_at = now_ms() + int((blocked or 60) * 1000)
            return None
        if response.status_code == 401 and stale is None:
            stale = generation  # refresh once and ask again
            continue
        if response.status_code in (401, 403):
            reason = f"{provider.name} answered {response.status_code}: {response.text[:200]}"
            mark_revoked(catalog, account, reason)
            result.status, result.error = "revoked", reason
            return None
        if response.status_code != 200:
            result.status = "failed"
            result.error = (
                f"{provider.name} answered {response.status_code} for {stream} "
                f"{window[0]}..{window[1]}: {response.text[:200]}"
            )
            return None
        try:
            payload = orjson.loads(response.content)
            rows = provider.parse(stream, payload)
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
            result.status = "failed"
            result.error = f"{provider.name}: unreadable answer for {stream} {window[0]}: {exc}"
            return None
        return payload, rows
    return None  # pragma: no cover - the loop returns
