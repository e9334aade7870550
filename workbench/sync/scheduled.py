"""Scheduled sync work: queueing stale accounts, hourly maintenance, the 15-minute polling
bridge, and the scheduler's task that runs one account's sync.

* :func:`queue_due` queues every active account not synced for ``[sync] stale_days`` (4)
  and not already waiting for a rate limit to reset.
* :func:`run_maintenance` removes links never completed after ``incomplete_grace_hours``
  (logged), forgets expired authorization states, refreshes tokens expiring within
  ``refresh_ahead_minutes``, deletes orphaned records (tokens, checkpoints, files, activities
  and poll rows whose account or activity is gone) and activities ended long ago.
* :func:`poll_activities` finds activities starting or ending within the next
  ``poll_minutes``, reads the progress from the source account's provider, writes the
  percentage of the goal to the destination account (safe replace) and logs a row.

Example::

    queue_due(config)                  # the sync pipeline, hourly
    print(run_maintenance(config))     # the sync_maintenance pipeline, hourly
    print(poll_activities(config))     # the poll pipeline, every 15 minutes
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy import and_, delete, func, or_, select

from workbench import scheduler
from workbench.catalog import (
    Catalog,
    borrowed_catalog,
    open_catalog,
    sync_accounts,
    sync_activities,
    sync_auth_states,
    sync_checkpoints,
    sync_limits,
    sync_poll_log,
    sync_remote_files,
    sync_runs,
    sync_tokens,
)
from workbench.config import Config
from workbench.errors import (
    ConfigError,
    DestinationFailed,
    SourceUnavailable,
    TokenRevoked,
    UnknownAccount,
    WorkbenchError,
)
from workbench.sync.accounts import STATE_TTL_MS, access_token, get_account
from workbench.sync.engine import SYNC_TASK, SyncResult, _fetch_window, queue_sync, sync_account
from workbench.sync.providers import get_provider
from workbench.sync.ratelimit import RateLimits, limit_key
from workbench.sync.settings import sync_settings
from workbench.times import DAY_MS, HOUR_MS, format_ms, now_ms, utc_datetime

log = logging.getLogger("workbench.sync")


# ---------------------------------------------------------------------------- the task


_shared: dict[str, tuple] = {}
_shared_lock = threading.Lock()


def _shared_state(home: str):
    """One configuration, catalog and set of rate buckets per process for the huey tasks."""
    from workbench.config import load_config

    with _shared_lock:
        if home not in _shared:
            config = load_config(home)
            catalog = open_catalog(config)
            _shared[home] = (config, catalog, RateLimits(config, catalog))
        return _shared[home]


@scheduler.task(SYNC_TASK)
def _sync_task(home: str, account_id: int, trigger: str = "queue") -> dict:
    """The scheduler's task: sync one account; stopped by a rate limit, the run queues its
    continuation for when the limit resets (:func:`sync_account`)."""
    config, catalog, limits = _shared_state(home)
    try:
        result = sync_account(config, account_id, trigger=trigger, catalog=catalog, limits=limits)
    except UnknownAccount as exc:
        log.warning("%s", exc.message)
        return {"account_id": account_id, "status": "unknown"}
    return {
        "account_id": account_id,
        "status": result.status,
        "requests": result.requests,
        "windows": result.windows,
    }


# ---------------------------------------------------------------------------- due accounts


def due_accounts(catalog: Catalog, *, stale_days: float, now: int | None = None) -> list[int]:
    """Active accounts not synced for ``stale_days`` and not waiting for a limit to reset."""
    now = now_ms() if now is None else now
    a, r = sync_accounts.c, sync_runs.c
    latest = (
        select(r.account_id, func.max(r.id).label("run_id"))
        .where(r.status != "skipped")
        .group_by(r.account_id)
        .subquery()
    )
    waiting = (
        select(latest.c.account_id)
        .join(sync_runs, sync_runs.c.id == latest.c.run_id)
        .where(r.status == "limited", r.resume_at > now - HOUR_MS)
    )
    query = (
        select(a.id)
        .where(
            a.status == "active",
            or_(a.last_synced_at.is_(None), a.last_synced_at < now - int(stale_days * DAY_MS)),
            a.id.not_in(waiting),
        )
        .order_by(a.id)
    )
    with catalog.engine.connect() as conn:
        return [row.id for row in conn.execute(query)]


def queue_due(config: Config, *, catalog: Catalog | None = None) -> list[int]:
    """Queue a sync of every due account on the scheduler; return their ids."""
    with borrowed_catalog(config, catalog) as catalog:
        found = due_accounts(catalog, stale_days=sync_settings(config).stale_days)
        for account_id in found:
            queue_sync(config, account_id, trigger="due")
        if found:
            log.info("queued %d due accounts: %s", len(found), ", ".join(map(str, found)))
        return found


# ---------------------------------------------------------------------------- maintenance


@dataclass
class MaintenanceReport:
    removed_incomplete: list[int] = field(default_factory=list)
    expired_states: int = 0
    refreshed: list[int] = field(default_factory=list)
    refresh_failed: list[int] = field(default_factory=list)
    revoked: list[int] = field(default_factory=list)
    orphans: dict[str, int] = field(default_factory=dict)
    ended_activities: int = 0

    def summary(self) -> str:
        return (
            f"{len(self.removed_incomplete)} incomplete profiles removed, "
            f"{self.expired_states} expired authorization states, "
            f"{len(self.refreshed)} tokens refreshed ({len(self.refresh_failed)} failed, "
            f"{len(self.revoked)} revoked), {sum(self.orphans.values())} orphaned records and "
            f"{self.ended_activities} ended activities deleted"
        )


def run_maintenance(
    config: Config, *, catalog: Catalog | None = None, now: int | None = None
) -> MaintenanceReport:
    """The hourly sync maintenance (see the module's description)."""
    settings = sync_settings(config)
    now = now_ms() if now is None else now
    report = MaintenanceReport()
    a = sync_accounts.c
    with borrowed_catalog(config, catalog) as catalog:
        grace = now - int(settings.incomplete_grace_hours * HOUR_MS)
        with catalog.writing() as conn:
            doomed = conn.execute(
                select(a.id, a.study_id, a.subject_id, a.provider, a.created_at).where(
                    a.status == "pending", a.created_at < grace
                )
            ).all()
            for row in doomed:
                log.info(
                    "removing incomplete profile: account %d (%s/%s on %s), link started %s and "
                    "never completed",
                    row.id, row.study_id, row.subject_id, row.provider, format_ms(row.created_at),
                )  # fmt: skip
            if doomed:
                conn.execute(delete(sync_accounts).where(a.id.in_([r.id for r in doomed])))
            report.removed_incomplete = [r.id for r in doomed]
            report.expired_states = conn.execute(
                delete(sync_auth_states).where(sync_auth_states.c.created_at < now - STATE_TTL_MS)
            ).rowcount
            report.orphans = _delete_orphans(conn, now)
            ended = (
                conn.execute(
                    select(sync_activities.c.id).where(
                        sync_activities.c.ends_at < now - int(settings.activity_keep_days * DAY_MS)
                    )
                )
                .scalars()
                .all()
            )
            if ended:
                conn.execute(delete(sync_poll_log).where(sync_poll_log.c.activity_id.in_(ended)))
                conn.execute(delete(sync_activities).where(sync_activities.c.id.in_(ended)))
            report.ended_activities = len(ended)
        ahead = int(settings.refresh_ahead_minutes * 60_000)
        t = sync_tokens.c
        with catalog.engine.connect() as conn:
            expiring = (
                conn.execute(
                    select(t.account_id)
                    .join(sync_accounts, a.id == t.account_id)
                    .where(
                        a.status == "active", t.expires_at.is_not(None), t.expires_at < now + ahead
                    )
                    .order_by(t.account_id)
                )
                .scalars()
                .all()
            )
        for account_id in expiring:
            try:
                access_token(config, catalog, get_account(catalog, account_id), ahead_ms=ahead)
                report.refreshed.append(account_id)
            except TokenRevoked as exc:
                report.revoked.append(account_id)
                log.warning("%s", exc.message)
            except (SourceUnavailable, ConfigError) as exc:
                report.refresh_failed.append(account_id)
                log.warning("account %d: token not refreshed: %s", account_id, exc.message)
        log.info("sync maintenance: %s", report.summary())
        return report


def _delete_orphans(conn, now: int) -> dict[str, int]:
    accounts = select(sync_accounts.c.id)
    counts = {}
    for table in (sync_tokens, sync_checkpoints, sync_auth_states, sync_remote_files):
        counts[table.name] = conn.execute(
            delete(table).where(table.c.account_id.not_in(accounts))
        ).rowcount
    act = sync_activities.c
    counts["sync_activities"] = conn.execute(
        delete(sync_activities).where(
            or_(act.source_account.not_in(accounts), act.destination_account.not_in(accounts))
        )
    ).rowcount
    counts["sync_poll_log"] = conn.execute(
        delete(sync_poll_log).where(sync_poll_log.c.activity_id.not_in(select(act.id)))
    ).rowcount
    counts["sync_limits"] = conn.execute(
        delete(sync_limits).where(sync_limits.c.blocked_until < now - DAY_MS)
    ).rowcount
    return {k: v for k, v in counts.items() if v}


# ---------------------------------------------------------------------------- polling bridge


def add_activity(
    catalog: Catalog,
    *,
    name: str,
    source_account: int,
    destination_account: int,
    stream: str,
    goal: int,
    starts_at: int,
    ends_at: int,
) -> int:
    """Record an activity for the polling bridge; return its id."""
    if goal <= 0 or ends_at <= starts_at:
        raise WorkbenchError("an activity needs a positive goal and an end after its start")
    for account_id in (source_account, destination_account):
        get_account(catalog, account_id)
    with catalog.writing() as conn:
        return conn.execute(
            sync_activities.insert()
            .values(
                name=name,
                source_account=source_account,
                destination_account=destination_account,
                stream=stream,
                goal=goal,
                starts_at=starts_at,
                ends_at=ends_at,
                created_at=now_ms(),
            )
            .returning(sync_activities.c.id)
        ).scalar_one()


@dataclass
class PollReport:
    written: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.written)} activities written, {len(self.failed)} failed"


def poll_activities(
    config: Config, *, catalog: Catalog | None = None, now: int | None = None
) -> PollReport:
    """The polling bridge (see the module's description); one log row per activity."""
    from workbench.sync.destinations import put_file

    settings = sync_settings(config)
    with borrowed_catalog(config, catalog) as catalog:
        now = now_ms() if now is None else now
        horizon = now + settings.poll_minutes * 60_000
        act = sync_activities.c
        report = PollReport()
        limits = RateLimits(config, catalog)
        try:
            with catalog.engine.connect() as conn:
                found = conn.execute(
                    select(sync_activities)
                    .where(
                        or_(
                            and_(act.starts_at >= now, act.starts_at < horizon),
                            and_(act.ends_at >= now, act.ends_at < horizon),
                        )
                    )
                    .order_by(act.id)
                ).all()
            for activity in found:
                progress = value = None
                try:
                    progress = _progress(config, catalog, limits, activity, now)
                    percent = min(100, round(progress * 100 / activity.goal))
                    value = f"{percent}%"
                    body = json.dumps(
                        {
                            "activity": activity.name,
                            "progress": progress,
                            "goal": activity.goal,
                            "percent": percent,
                            "at": format_ms(now),
                        },
                        sort_keys=True,
                    ).encode()
                    destination = get_account(catalog, activity.destination_account)
                    put_file(
                        config,
                        catalog,
                        destination,
                        f"activity-{activity.id}-progress.json",
                        body,
                        description=f"progress of {activity.name}",
                        tags=("workbench", "progress"),
                    )
                    status, detail = "written", None
                    report.written.append(activity.id)
                except (WorkbenchError, DestinationFailed) as exc:
                    status, detail = "failed", exc.message
                    report.failed.append(activity.id)
                    log.warning("activity %d: %s", activity.id, exc.message)
                with catalog.writing() as conn:
                    conn.execute(
                        sync_poll_log.insert().values(
                            activity_id=activity.id,
                            at=now,
                            progress=progress,
                            value=value,
                            status=status,
                            detail=detail,
                        )
                    )
            log.info("polling bridge: %s", report.summary())
            return report
        finally:
            limits.close()


def _progress(config, catalog, limits, activity, now: int) -> int:
    """The sum of the activity's stream from its start to now, read from the source."""
    account = get_account(catalog, activity.source_account)
    if account.status != "active":
        raise WorkbenchError(f"source account {account.id} is {account.status}")
    provider = get_provider(sync_settings(config), account.provider)
    start = utc_datetime(activity.starts_at).date()
    until = utc_datetime(min(now, activity.ends_at)).date()
    end = max(until, start) + dt.timedelta(days=1)
    import httpx

    result = SyncResult(account.id, None, "running")
    with httpx.Client(base_url=provider.config.base_url, timeout=provider.config.timeout) as http:
        outcome = _fetch_window(
            config, catalog, limits, http, provider, account, activity.stream, (start, end),
            limit_key(provider, account.id), provider.config.rate_limit, 0.0, result,
        )  # fmt: skip
    if outcome is None:
        raise WorkbenchError(
            f"progress not read from {provider.name}: {result.status} {result.error or ''}".strip()
        )
    _, rows = outcome
    return int(sum(int(row.get(activity.stream) or 0) for row in rows))


def list_poll_log(catalog: Catalog, *, limit: int = 50) -> list[dict]:
    """The latest rows of the polling bridge's log, newest first."""
    with catalog.engine.connect() as conn:
        return [
            dict(r._mapping)
            for r in conn.execute(
                select(sync_poll_log).order_by(sync_poll_log.c.id.desc()).limit(limit)
            )
        ]


def list_runs(catalog: Catalog, account_id: int | None = None, *, limit: int = 50) -> list[dict]:
    """The latest sync runs, newest first."""
    query = select(sync_runs).order_by(sync_runs.c.id.desc()).limit(limit)
    if account_id is not None:
        query = query.where(sync_runs.c.account_id == account_id)
    with catalog.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]
