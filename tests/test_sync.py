"""Sync with third-party APIs: links, tokens, rate limits, incremental windows, destinations,
maintenance and polling, against the local provider simulator on loopback."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from workbench.alerts import list_alerts
from workbench.catalog import open_catalog, sync_accounts, sync_raw, sync_tokens
from workbench.cli import cli
from workbench.config import load_config
from workbench.enrollment import enroll
from workbench.errors import AuthorizationFailed, ConfigError, DestinationFailed
from workbench.simulators.providers import ProviderSimulator, start_simulator
from workbench.sync import (
    add_activity,
    combine_stream,
    complete_link,
    due_accounts,
    generate_key,
    get_account,
    list_poll_log,
    poll_activities,
    put_file,
    run_maintenance,
    start_link,
    sync_account,
)
from workbench.sync.accounts import access_token
from workbench.sync.engine import checkpoint
from workbench.sync.ratelimit import RateLimits
from workbench.sync.settings import sync_settings
from workbench.times import now_ms

pytestmark = pytest.mark.slow
FORK = multiprocessing.get_context("spawn")  # no locks inherited from test threads


@pytest.fixture(autouse=True)
def sync_env(monkeypatch):
    monkeypatch.setenv("WORKBENCH_SYNC_KEY", generate_key())
    monkeypatch.setenv("SIM_ID", "demo-client")
    monkeypatch.setenv("SIM_SECRET", "demo-secret")


@pytest.fixture
def simulator():
    sim = ProviderSimulator(rate_limit=(1000, 60.0))
    running = start_simulator(sim)
    yield sim
    running.stop()


def provider_toml(name, kind, url, *, limit=(1000, 60), scope="client", extra=""):
    return f"""
[[sync.providers]]
name = "{name}"
type = "{kind}"
base_url = "{url}"
authorize_url = "{"/o/oauth2/v2/auth" if kind != "open_humans" else "/direct-sharing/projects/oauth2/authorize/"}"
token_url = "{"/token" if kind != "open_humans" else "/oauth2/token/"}"
client_id_env = "SIM_ID"
client_secret_env = "SIM_SECRET"
rate_limit = {{ requests = {limit[0]}, seconds = {limit[1]} }}
limit_scope = "{scope}"
history_days = 70
{extra}
"""


@pytest.fixture
def lab(home, catalog, simulator, tmp_path):
    """A home with a study of three subjects and providers pointing at the simulator."""
    from workbench.studies import create_study, definition_from_options

    create_study(catalog, definition_from_options("demo", duration_days=14))
    enroll(catalog, "demo", 3)
    empty = tmp_path / "no-pipelines"
    empty.mkdir()
    path = home.home / "workbench.toml"
    text = (
        path.read_text().split("\n[sync]")[0].replace('folder = "pipelines"', f'folder = "{empty}"')
    )
    text += "\n[sync]\ninline_wait = 0.0\n"
    text += provider_toml("gh", "google_health", simulator.url)
    text += provider_toml("oh", "open_humans", simulator.url)
    text += provider_toml(
        "pedometer",
        "rest",
        simulator.url,
        extra='endpoint = "/api/daily"\nparams = { start = "{start}", end = "{end}" }\n'
        'fields = ["steps"]\nstreams = ["steps"]',
    )
    path.write_text(text)
    return load_config(home.home)


def link(config, catalog, subject, provider, login=None):
    """Link an account the way a participant's browser does (the simulator approves)."""
    _, url = start_link(config, catalog, "demo", subject, provider)
    if login:
        url += f"&login_hint={login}"
    location = httpx.get(url).headers["location"]
    query = parse_qs(urlparse(location).query)
    return complete_link(config, catalog, query["state"][0], query["code"][0])


def set_limit(config, provider, requests, seconds):
    path = config.home / "workbench.toml"
    text = path.read_text()
    start = text.index(f'name = "{provider}"')
    head, tail = text[:start], text[start:]
    old = tail[tail.index("rate_limit") : tail.index("\n", tail.index("rate_limit"))]
    path.write_text(
        head
        + tail.replace(old, f"rate_limit = {{ requests = {requests}, seconds = {seconds} }}", 1)
    )
    return load_config(config.home)


# ---------------------------------------------------------------------------- links, windows


def test_link_sync_and_the_next_run_fetches_only_the_partial_window(lab, catalog, simulator):
    account = link(lab, catalog, "demo_00001", "gh")
    assert account.status == "active"
    with catalog.engine.connect() as conn:
        stored = conn.execute(select(sync_tokens.c.access_token)).scalar()
    assert "." not in stored[:3] and stored.startswith("gAAAA")  # Fernet, not the token
    first = sync_account(lab, account.id, catalog=catalog)
    assert first.status == "succeeded" and first.windows == first.requests >= 10
    table = combine_stream(lab, "gh", "steps")
    today = dt.datetime.now(dt.UTC).date()
    assert table["date"].max() == today.isoformat()
    assert table["id"].n_unique() == table.height  # one row per day
    assert checkpoint(catalog, account.id, "steps") == today - dt.timedelta(days=today.weekday())
    before = simulator.stats["requests"]
    again = sync_account(lab, account.id, catalog=catalog)
    assert again.status == "succeeded" and again.requests == 1  # only this week again
    assert simulator.stats["requests"] == before + 1
    assert combine_stream(lab, "gh", "steps").height == table.height
    with catalog.engine.connect() as conn:
        rows = conn.execute(select(sync_raw).where(sync_raw.c.account_id == account.id)).all()
    assert len(rows) == first.windows + 1 and sum(1 for r in rows if not r.complete) == 2
    assert all((lab.pool / r.path).stat().st_size == r.bytes for r in rows)


def test_verify_checks_the_sync_ledger(lab, catalog):
    from workbench.ledger import verify

    account = link(lab, catalog, "demo_00001", "gh")
    assert sync_account(lab, account.id, catalog=catalog).status == "succeeded"
    assert verify(lab, settle=0) == []
    with catalog.engine.connect() as conn:
        first, second = (
            conn.execute(select(sync_raw.c.path).order_by(sync_raw.c.id)).scalars().all()[:2]
        )
    (lab.pool / first).write_bytes(b"{}")
    (lab.pool / second).unlink()
    found = {(d.kind, d.path) for d in verify(lab, settle=0)}
    assert found == {("size", first), ("missing", second)}


def test_a_declarative_rest_provider_syncs_without_code(lab, catalog):
    account = link(lab, catalog, "demo_00002", "pedometer")
    result = sync_account(lab, account.id, catalog=catalog)
    assert result.status == "succeeded" and result.records >= 70
    table = combine_stream(lab, "pedometer", "steps")
    assert set(table.columns) >= {"date", "steps", "subject"} and "unit" not in table.columns


def test_error_bodies_are_never_stored(lab, catalog, simulator):
    account = link(lab, catalog, "demo_00001", "gh")
    simulator.set_faults({"data_status": 500})
    result = sync_account(lab, account.id, catalog=catalog)
    assert result.status == "failed" and "500" in result.error
    with catalog.engine.connect() as conn:
        assert conn.execute(select(sync_raw)).first() is None
    assert combine_stream(lab, "gh", "steps").is_empty()
    assert checkpoint(catalog, account.id, "steps") is None


def test_the_callback_route_completes_a_link(lab, catalog, simulator):
    from workbench_server.app import create_app

    _, url = start_link(lab, catalog, "demo", "demo_00003", "gh")
    location = httpx.URL(httpx.get(url).headers["location"])
    app = create_app(lab)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as client:
        done = client.get(f"/sync/callback?{location.query.decode()}")
        assert done.status_code == 200 and "linked" in done.text
        assert client.get("/sync/callback?state=nope&code=x").status_code == 400
        assert client.get("/sync/callback?error=access_denied").status_code == 400
    assert [a.status for a in workbench_accounts(catalog)] == ["active"]


def approvals(url, n):
    """``n`` callbacks the provider would send for one authorization URL: one state, each
    with its own code (as when a participant approves twice, or a callback is replayed)."""
    return [httpx.URL(httpx.get(url).headers["location"]).query.decode() for _ in range(n)]


def test_a_state_is_used_up_by_its_first_callback(lab, catalog, simulator):
    from tests.conftest import ServerProcess

    _, url = start_link(lab, catalog, "demo", "demo_00001", "gh")
    first, again = approvals(url, 2)
    assert parse_qs(first)["state"] == parse_qs(again)["state"]
    server = ServerProcess(lab.home).start()
    try:
        assert httpx.get(f"{server.url}/sync/callback?{first}", timeout=60).status_code == 200
        replay = httpx.get(f"{server.url}/sync/callback?{again}", timeout=60)
        assert replay.status_code == 400
        assert "unknown or expired authorization state" in replay.text
    finally:
        server.stop()
    assert [a.status for a in workbench_accounts(catalog)] == ["active"]


def test_two_racing_callbacks_with_one_state_link_once(lab, catalog, simulator):
    from tests.conftest import ServerProcess

    _, url = start_link(lab, catalog, "demo", "demo_00002", "gh")
    queries = approvals(url, 2)
    server = ServerProcess(lab.home).start()
    start = threading.Barrier(2)
    statuses = []

    def callback(query):
        start.wait(timeout=60)
        statuses.append(httpx.get(f"{server.url}/sync/callback?{query}", timeout=120).status_code)

    try:
        racers = [threading.Thread(target=callback, args=(q,)) for q in queries]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(timeout=180)
    finally:
        server.stop()
    assert sorted(statuses) == [200, 400]
    assert [a.status for a in workbench_accounts(catalog)] == ["active"]


def test_racing_library_calls_with_one_state_link_once(lab, catalog, simulator):
    _, url = start_link(lab, catalog, "demo", "demo_00003", "gh")
    queries = [parse_qs(q) for q in approvals(url, 4)]
    start = threading.Barrier(len(queries))
    outcomes = []

    def callback(query):
        start.wait(timeout=60)
        try:
            complete_link(lab, catalog, query["state"][0], query["code"][0])
            outcomes.append("linked")
        except AuthorizationFailed as exc:
            outcomes.append(exc.message)

    racers = [threading.Thread(target=callback, args=(q,)) for q in queries]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=180)
    assert sorted(outcomes) == ["linked"] + 3 * [
        "unknown or expired authorization state; start the link again"
    ]


def workbench_accounts(catalog):
    from workbench.sync import list_accounts

    return list_accounts(catalog)


def test_bad_configuration_is_a_clear_error(lab, catalog, monkeypatch):
    monkeypatch.delenv("WORKBENCH_SYNC_KEY")
    _, url = start_link(lab, catalog, "demo", "demo_00001", "gh")
    query = parse_qs(urlparse(httpx.get(url).headers["location"]).query)
    with pytest.raises(ConfigError, match="WORKBENCH_SYNC_KEY"):
        complete_link(lab, catalog, query["state"][0], query["code"][0])
    path = lab.home / "workbench.toml"
    path.write_text(path.read_text().replace('type = "rest"', 'type = "fax"'))
    with pytest.raises(ConfigError, match="type must be one of"):
        sync_settings(load_config(lab.home))


# ---------------------------------------------------------------------------- rate limits


def test_a_limit_mid_sync_keeps_the_data_and_resumes_where_it_stopped(lab, catalog, simulator):
    from workbench.scheduler import open_queue

    account = link(lab, catalog, "demo_00001", "gh")
    # stricter than the workbench was told; a window long enough for a loaded machine to make
    # its 4 requests and look at the block before the window resets
    simulator.limit, simulator.interval = 4, 6.0
    began = now_ms()
    first = sync_account(lab, account.id, catalog=catalog)
    ended = now_ms()
    # its RateLimit-Remaining: 0 stops the run before a request would be refused
    assert first.status == "limited" and first.windows == 4 and first.requests == 4
    assert simulator.stats["throttled"] == 0
    # the partial data is in the pool, and the checkpoint is after the last stored window
    assert combine_stream(lab, "gh", "steps").height == 28
    start = checkpoint(catalog, account.id, "steps")
    # requeued on huey for when the provider's window resets (RateLimit-Reset)
    scheduled = open_queue(lab).huey.pending()  # the consumer moves it to its schedule
    assert [t.args for t in scheduled] == [(account.id, "resume")]
    eta = scheduled[0].eta.replace(tzinfo=dt.UTC).timestamp() * 1000
    early = sync_settings(lab).inline_wait * 1000  # woken that much early (0 here)
    assert abs(eta - (first.resume_at - early)) < 50
    # at the provider's reset: 6 s after its first counted request (made during the sync)
    assert began + 6000 - 50 <= first.resume_at <= ended + 6000 + 50
    asked = now_ms()
    blocked = RateLimits(lab, catalog).acquire("gh", (1000, 60.0))
    # the provider's signal beats the local budget (which has 996 requests left)
    assert asked - 50 <= first.resume_at - blocked * 1000 <= now_ms() + 50
    simulator.limit = 1000
    time.sleep(max(0, (first.resume_at - now_ms()) / 1000) + 0.05)
    before = simulator.stats["requests"]
    second = sync_account(lab, account.id, catalog=catalog)
    assert second.status == "succeeded"
    weeks = len(range(0, (dt.datetime.now(dt.UTC).date() - start).days + 1, 7))
    assert second.requests == simulator.stats["requests"] - before == weeks  # nothing twice
    assert (
        combine_stream(lab, "gh", "steps")["date"].n_unique()
        == combine_stream(lab, "gh", "steps").height
    )


def test_the_local_budget_stops_a_run_before_the_provider_must(lab, catalog, simulator):
    config = set_limit(lab, "gh", 3, 30)
    account = link(config, catalog, "demo_00001", "gh")
    began = now_ms()
    result = sync_account(config, account.id, catalog=catalog, reschedule=False)
    assert result.status == "limited" and result.requests == 3 and result.windows == 3
    assert simulator.stats["throttled"] == 0
    # when the first of the 3 requests is 30 s old (and the safety margin has passed)
    assert began + 30_000 - 50 <= result.resume_at <= now_ms() + 30_200


def _acquire_many(home, key, count, queue):
    config = load_config(home)
    catalog = open_catalog(config)
    limits = RateLimits(config, catalog)
    queue.put(sum(1 for _ in range(count) if limits.acquire(key, (8, 30.0)) == 0))
    limits.close()
    catalog.dispose()


def test_the_sqlite_bucket_holds_across_processes(lab):
    queue = FORK.Queue()
    workers = [
        FORK.Process(target=_acquire_many, args=(lab.home, "shared", 10, queue)) for _ in range(3)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)  # spawned interpreters import the workbench: slow on a loaded machine
    assert sum(queue.get(timeout=5) for _ in workers) == 8


def test_the_bucket_can_be_redis(lab, catalog, redis_url, monkeypatch):
    monkeypatch.setenv("WORKBENCH_REDIS_URL", redis_url)
    one, two = RateLimits(lab, catalog), RateLimits(lab, catalog)
    assert one.backend == "redis"
    granted = [one.acquire("gh:1", (3, 10.0)) == 0 for _ in range(2)]
    granted += [two.acquire("gh:1", (3, 10.0)) == 0 for _ in range(2)]
    assert granted == [True, True, True, False]
    assert 9 < two.acquire("gh:1", (3, 10.0)) <= 10.2
    assert two.acquire("gh:2", (3, 10.0)) == 0  # keyed by provider and account
    one.close()
    two.close()


def test_rate_limit_headers_override_the_local_count(lab, catalog):
    limits = RateLimits(lab, catalog)
    response = httpx.Response(200, headers={"RateLimit-Remaining": "0", "RateLimit-Reset": "4.5"})
    assert limits.observe("gh", response) == 4.5
    assert 4 < limits.acquire("gh", (1000, 60.0)) <= 4.5
    assert limits.observe("x", httpx.Response(200, headers={"RateLimit-Remaining": "7"})) is None
    assert limits.observe("y", httpx.Response(429, headers={"Retry-After": "3"})) == 3


# ---------------------------------------------------------------------------- tokens


def _refresh(home, account_id, queue):
    config = load_config(home)
    catalog = open_catalog(config)
    try:
        token, _ = access_token(config, catalog, get_account(catalog, account_id))
        queue.put(token)
    except Exception as exc:  # the parent reports it
        queue.put(f"error: {exc}")
    finally:
        catalog.dispose()


def test_two_workers_refreshing_one_account_make_one_refresh(lab, catalog, simulator):
    account = link(lab, catalog, "demo_00001", "gh")
    with catalog.writing() as conn:
        conn.execute(update(sync_tokens).values(expires_at=now_ms() - 1000))
    simulator.set_faults({"token_delay": 0.5})
    queue = FORK.Queue()
    workers = [FORK.Process(target=_refresh, args=(lab.home, account.id, queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)  # spawned interpreters import the workbench: slow on a loaded machine
    tokens = [queue.get(timeout=5) for _ in workers]
    assert simulator.stats["refreshes"] == 1 and simulator.stats["invalid_grant"] == 0
    assert tokens[0] == tokens[1] and not tokens[0].startswith("error")
    assert sync_account(lab, account.id, catalog=catalog).status == "succeeded"


def test_a_revoked_token_opens_an_alert_and_is_not_retried(lab, catalog, simulator):
    account = link(lab, catalog, "demo_00001", "gh", login="ana")
    simulator.revoke("ana")
    first = sync_account(lab, account.id, catalog=catalog)
    assert first.status == "revoked"
    assert get_account(catalog, account.id).status == "revoked"
    found = [a for a in list_alerts(catalog, "demo") if a.kind == "sync_revoked"]
    assert len(found) == 1 and found[0].device == "gh" and "link" in found[0].action
    requests = simulator.stats["requests"]
    again = sync_account(lab, account.id, catalog=catalog)
    assert again.status == "revoked" and simulator.stats["requests"] == requests
    assert account.id not in due_accounts(catalog, stale_days=4)
    # an expired token whose refresh token is refused: the same, no crash
    other = link(lab, catalog, "demo_00002", "gh", login="bo")
    with catalog.writing() as conn:
        conn.execute(
            update(sync_tokens).where(sync_tokens.c.account_id == other.id).values(expires_at=1)
        )
    simulator.revoke("bo")
    assert sync_account(lab, other.id, catalog=catalog).status == "revoked"
    assert len([a for a in list_alerts(catalog, "demo") if a.kind == "sync_revoked"]) == 2


def _sync_in_process(home, account_id, queue, ready):
    try:
        config = load_config(home)
        ready.wait(120)  # both processes are up: they start together
        queue.put(sync_account(config, account_id, trigger="queue", reschedule=False).status)
    except BaseException as exc:  # the parent reports it
        queue.put(f"error: {exc!r}")


def test_two_queued_syncs_of_one_account_never_overlap(lab, catalog, simulator):
    account = link(lab, catalog, "demo_00001", "gh", login="cy")
    simulator.set_faults({"delay": 0.1})
    queue, ready = FORK.Queue(), FORK.Barrier(2)
    workers = [
        FORK.Process(target=_sync_in_process, args=(lab.home, account.id, queue, ready))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(180)
    assert sorted(queue.get(timeout=5) for _ in workers) == ["skipped", "succeeded"]
    assert simulator.max_concurrent["cy"] == 1


def test_the_scheduler_resumes_a_limited_sync(lab, catalog, simulator):
    """Through huey for real: a run stopped by the provider's limit continues on its own."""
    account = link(lab, catalog, "demo_00001", "gh")
    simulator.limit, simulator.interval = 6, 5.0  # a window a loaded machine cannot outlast
    first = sync_account(lab, account.id, catalog=catalog)
    assert first.status == "limited"
    consumer = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "--home", str(lab.home), "scheduler", "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (
            time.monotonic() < deadline and get_account(catalog, account.id).last_synced_at is None
        ):
            time.sleep(0.2)
    finally:
        os.killpg(consumer.pid, signal.SIGTERM)
        consumer.wait(timeout=30)
    assert get_account(catalog, account.id).last_synced_at is not None
    assert (
        combine_stream(lab, "gh", "steps")["date"].max()
        == dt.datetime.now(dt.UTC).date().isoformat()
    )


# ---------------------------------------------------------------------------- destinations


def test_a_failed_upload_leaves_the_old_file_untouched(lab, catalog, simulator):
    account = link(lab, catalog, "demo_00001", "oh", login="dee")
    assert account.external_id
    first = put_file(lab, catalog, account, "progress.json", b'{"percent": 10}')
    second = put_file(lab, catalog, account, "progress.json", b'{"percent": 20}')
    files = simulator.files("dee")
    assert list(files) == [second] and files[second]["content"] == b'{"percent": 20}'
    assert first != second
    for fault in ("fail_put", "fail_complete"):
        simulator.set_faults({fault: True})
        with pytest.raises(DestinationFailed, match="old file is untouched"):
            put_file(lab, catalog, account, "progress.json", b'{"percent": 30}')
        simulator.set_faults({fault: False})
        files = simulator.files("dee")
        assert list(files) == [second] and files[second]["content"] == b'{"percent": 20}'
    # Open Humans as a source: the member's files land in the pool
    assert sync_account(lab, account.id, catalog=catalog).status == "succeeded"
    assert combine_stream(lab, "oh", "files")["file_id"].to_list() == [second]


# ---------------------------------------------------------------------------- scheduled work


def test_maintenance_removes_incomplete_profiles_refreshes_and_cleans(
    lab, catalog, simulator, caplog
):
    active = link(lab, catalog, "demo_00001", "gh")
    pending, _ = start_link(lab, catalog, "demo", "demo_00002", "gh")
    with catalog.writing() as conn:
        conn.execute(
            update(sync_accounts).where(sync_accounts.c.id == pending.id).values(created_at=1)
        )
        conn.execute(update(sync_tokens).values(expires_at=now_ms() + 60_000))
        conn.execute(
            sync_tokens.insert().values(
                account_id=999, access_token="x", generation=1, updated_at=1
            )
        )
    caplog.set_level("INFO", logger="workbench.sync")
    report = run_maintenance(lab, catalog=catalog)
    assert report.removed_incomplete == [pending.id] and report.refreshed == [active.id]
    assert report.orphans.get("sync_tokens") == 1 and report.expired_states == 0
    assert "removing incomplete profile: account" in caplog.text
    assert simulator.stats["refreshes"] == 1
    assert [a.id for a in workbench_accounts(catalog)] == [active.id]


def test_the_polling_bridge_writes_progress_and_logs_a_row(lab, catalog, simulator):
    source = link(lab, catalog, "demo_00001", "gh", login="eve")
    destination = link(lab, catalog, "demo_00001", "oh", login="eve-oh")
    now = now_ms()
    soon = add_activity(
        catalog, name="walk", source_account=source.id, destination_account=destination.id,
        stream="steps", goal=10_000, starts_at=now - 86_400_000, ends_at=now + 5 * 60_000,
    )  # fmt: skip
    add_activity(
        catalog, name="later", source_account=source.id, destination_account=destination.id,
        stream="steps", goal=10_000, starts_at=now + 86_400_000, ends_at=now + 2 * 86_400_000,
    )  # fmt: skip
    assert poll_activities(lab, catalog=catalog, now=now).written == [soon]
    assert poll_activities(lab, catalog=catalog, now=now).written == [soon]
    files = list(simulator.files("eve-oh").values())
    assert len(files) == 1 and b'"percent"' in files[0]["content"]  # replaced, not added
    log = list_poll_log(catalog)
    assert [r["status"] for r in log] == ["written", "written"] and log[0]["value"].endswith("%")


def test_due_accounts_and_the_cli(lab, catalog, simulator):
    account = link(lab, catalog, "demo_00001", "gh")
    assert due_accounts(catalog, stale_days=4) == [account.id]
    runner = CliRunner()
    home = ["--home", str(lab.home)]
    assert "gh" in runner.invoke(cli, [*home, "sync", "providers"]).output
    ran = runner.invoke(cli, [*home, "sync", "run", str(account.id)])
    assert ran.exit_code == 0 and "succeeded" in ran.output
    assert due_accounts(catalog, stale_days=4) == []
    listed = runner.invoke(cli, [*home, "sync", "accounts"])
    assert "demo_00001" in listed.output and "active" in listed.output
    linked = runner.invoke(cli, [*home, "sync", "link", "demo", "demo_00003", "gh"])
    assert linked.exit_code == 0 and "/o/oauth2/v2/auth?" in linked.output
    wrong = runner.invoke(cli, [*home, "sync", "link", "demo", "nobody", "gh"])
    assert wrong.exit_code != 0 and "no subject 'nobody'" in wrong.output
    assert runner.invoke(cli, [*home, "sync", "run", "424242"]).exit_code == 4
    assert "orphaned" in runner.invoke(cli, [*home, "sync", "maintenance"]).output
    assert "activities written" in runner.invoke(cli, [*home, "sync", "poll"]).output
