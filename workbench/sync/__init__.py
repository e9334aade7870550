"""Sync with third-party APIs: providers, accounts and tokens, rate limits, incremental
windows, destinations, and the scheduled work around them (DESIGN.md §9).

    settings      the [sync] section of workbench.toml and its [[sync.providers]]
    providers     connectors (Google Health, Open Humans, declarative REST) and fetch windows
    accounts      linking (OAuth2), encrypted tokens, refresh under a lock across processes
    ratelimit     pyrate-limiter buckets (SQLite or Redis) and the provider's own signals
    engine        one account's incremental sync into the data pool
    destinations  writing back: the pool, Open Humans (direct upload with safe replace)
    scheduled     stale accounts queued, hourly maintenance, the 15-minute polling bridge,
                  the scheduler's sync_account task

A local provider speaking the same protocols, for tests and the demo, is
:mod:`workbench.simulators.providers`.

Example::

    from workbench.sync import start_link, sync_account
    account, url = start_link(config, catalog, "demo", "demo_00001", "google_health")
    ...                                   # the participant authorizes; the server's callback
    print(sync_account(config, account.id).summary())
"""

from workbench.sync.accounts import (
    Account,
    access_token,
    complete_link,
    generate_key,
    get_account,
    list_accounts,
    start_link,
)
from workbench.sync.destinations import put_file
from workbench.sync.engine import SyncResult, combine_stream, queue_sync, sync_account
from workbench.sync.scheduled import (
    add_activity,
    due_accounts,
    list_poll_log,
    list_runs,
    poll_activities,
    queue_due,
    run_maintenance,
)
from workbench.sync.settings import sync_settings

__all__ = [
    "Account",
    "SyncResult",
    "access_token",
    "add_activity",
    "combine_stream",
    "complete_link",
    "due_accounts",
    "generate_key",
    "get_account",
    "list_accounts",
    "list_poll_log",
    "list_runs",
    "poll_activities",
    "put_file",
    "queue_due",
    "queue_sync",
    "run_maintenance",
    "start_link",
    "sync_account",
    "sync_settings",
]
