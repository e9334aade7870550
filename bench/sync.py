"""Benchmark: a rate-limited backfill through the scheduler, against the local simulator.

20 accounts each backfill two years of ISO weeks (one request per week) from a simulated
Google Health API that allows 60 requests per 6 s for the whole client (the 60 per 60 s of the
predecessor's realm, with the window scaled down so the run takes minutes). The syncs run as
huey tasks in a real ``workbench scheduler`` process; a run that meets the limit stores what
it has and requeues itself for the reset. Printed: the requests made, the 429s received, the
wall time against the ideal (requests needed / allowed rate), and the same backfill's
unthrottled speed measured in this run, to show the limit is what bounds it.

    .venv/bin/python bench/sync.py [--accounts 20] [--years 2] [--limit 60] [--seconds 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench.catalog import open_catalog, sync_accounts, sync_raw, sync_runs  # noqa: E402
from workbench.config import init_home, load_config  # noqa: E402
from workbench.enrollment import enroll  # noqa: E402
from workbench.simulators.providers import ProviderSimulator, start_simulator  # noqa: E402
from workbench.studies import create_study, definition_from_options  # noqa: E402
from workbench.sync import complete_link, generate_key, queue_sync, start_link, sync_account  # noqa: E402


def make_home(root: Path, url: str, *, accounts: int, days: int, limit: int, seconds: float):
    config = init_home(root)
    empty = root / "no-pipelines"
    empty.mkdir()
    path = root / "workbench.toml"
    text = path.read_text().split("\n[sync]")[0].replace('folder = ""', f'folder = "{empty}"')
    text += """
[pipelines.x]
""".replace("[pipelines.x]\n", "")
    text += f"""
[sync]
inline_wait = 1.5

[[sync.providers]]
name = "gh"
type = "google_health"
base_url = "{url}"
authorize_url = "/o/oauth2/v2/auth"
token_url = "/token"
client_id_env = "BENCH_CLIENT_ID"
client_secret_env = "BENCH_CLIENT_SECRET"
rate_limit = {{ requests = {limit}, seconds = {seconds} }}
limit_scope = "client"
window = "week"
history_days = {days}
"""
    path.write_text(text)
    config = load_config(root)
    catalog = open_catalog(config)
    create_study(catalog, definition_from_options("bench", duration_days=28))
    enroll(catalog, "bench", accounts)
    ids = []
    for n in range(1, accounts + 1):
        _, link = start_link(config, catalog, "bench", f"bench_{n:05d}", "gh")
        query = parse_qs(urlparse(httpx.get(link).headers["location"]).query)
        ids.append(complete_link(config, catalog, query["state"][0], query["code"][0]).id)
    return config, catalog, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--years", type=float, default=2.0)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    os.environ["WORKBENCH_SYNC_KEY"] = generate_key()
    os.environ["BENCH_CLIENT_ID"], os.environ["BENCH_CLIENT_SECRET"] = "demo-client", "demo-secret"
    os.environ.pop("WORKBENCH_REDIS_URL", None)
    days = int(args.years * 365)
    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    try:
        # baseline, same run: the same kind of backfill with no limit, in one process
        free = ProviderSimulator(rate_limit=(10**9, 1.0))
        free_running = start_simulator(free)
        config, catalog, ids = make_home(
            work / "free", free_running.url, accounts=2, days=days, limit=10**6, seconds=1
        )
        started = time.perf_counter()
        done = sum(sync_account(config, i, catalog=catalog).requests for i in ids)
        free_rate = done / (time.perf_counter() - started)
        catalog.dispose()
        free_running.stop()

        sim = ProviderSimulator(rate_limit=(args.limit, args.seconds))
        running = start_simulator(sim)
        config, catalog, ids = make_home(
            work / "limited", running.url, accounts=args.accounts, days=days,
            limit=args.limit, seconds=args.seconds,
        )  # fmt: skip
        consumer = subprocess.Popen(
            [sys.executable, "-m", "workbench.cli", "--home", str(config.home), "scheduler",
             "--workers", str(args.workers)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        time.sleep(2.0)  # the consumer is up before the clock starts
        started = time.perf_counter()
        for account in ids:
            queue_sync(config, account, trigger="bench")
        a = sync_accounts.c
        try:
            while True:
                with catalog.engine.connect() as conn:
                    left = conn.execute(
                        select(func.count()).where(a.last_synced_at.is_(None))
                    ).scalar()
                if left == 0:
                    break
                if consumer.poll() is not None:
                    raise SystemExit("the scheduler stopped")
                time.sleep(0.05)
            wall = time.perf_counter() - started
        finally:
            os.killpg(consumer.pid, signal.SIGTERM)
            consumer.wait(timeout=30)
        with catalog.engine.connect() as conn:
            windows = conn.execute(select(func.count()).select_from(sync_raw)).scalar()
            ours = conn.execute(select(func.sum(sync_runs.c.requests))).scalar()
            runs = conn.execute(select(func.count()).select_from(sync_runs)).scalar()
            limited = conn.execute(
                select(func.count()).where(sync_runs.c.status == "limited")
            ).scalar()
        catalog.dispose()
        running.stop()
        rate = args.limit / args.seconds
        ideal = windows / rate
        print(
            f"backfill: {args.accounts} accounts x {days} days in ISO weeks, simulator limit "
            f"{args.limit} requests / {args.seconds:g} s for the client, {args.workers} workers"
        )
        print(f"requests needed (windows stored):   {windows}")
        print(f"requests made (simulator count):    {sim.stats['requests']}  (ours: {ours})")
        print(f"429s received:                      {sim.stats['throttled']}")
        print(f"runs: {runs}, of which stopped at the limit and requeued: {limited}")
        print(f"wall time:                          {wall:.1f} s")
        print(f"ideal (needed / allowed rate):      {ideal:.1f} s  ({windows} / {rate:g} per s)")
        print(f"wall / ideal:                       {wall / ideal:.3f}")
        print(f"unthrottled baseline (this run):    {free_rate:.0f} requests/s in one process")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
