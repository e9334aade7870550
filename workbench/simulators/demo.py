"""The demo behind ``make run``: a demo home, the upload server, simulated phones and simulated
days of real-shaped sensor data, and the sensor tables built from them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from workbench.alerts import list_alerts, list_safety_alerts
from workbench.catalog import open_catalog
from workbench.config import CONFIG_NAME, init_home, load_config
from workbench.errors import StudyExists, WorkbenchError
from workbench.ledger import verify
from workbench.pool import DataPool, write_file_atomically
from workbench.refresh import refresh_status
from workbench.serving import serve_command, wait_for_server
from workbench.simulators.days import simulate_days
from workbench.simulators.phones import simulate
from workbench.status import status_csv_path, study_status
from workbench.studies import create_study, definition_from_options
from workbench.writers import render

DEMO_STUDY = "demo"
DEMO_SENSORS = ["accelerometer", "activity", "location", "application_usage", "ema"]
DEMO_TIMEZONE = "Europe/Berlin"
DEMO_BATCHES_PER_DAY = 12
# Subjects whose days are simulated in full (a home, a workplace, commutes, sleep, app
# sessions), beside the phones that show the status and alerts: few, for a quick start.
DEMO_SENSING_SUBJECTS = 3
DEMO_SENSING_DAYS = 5
DEMO_SOURCE = "mindtrails"  # the source in the template workbench.toml  # per sensor: what the study expects and the simulated phones send


def run_demo(
    home: Path,
    *,
    port: int = 8080,
    subjects: int = 12,
    days: int = 3,
    keep_serving: bool = True,
    dashboards_port: int | None = 8866,
    lab_port: int | None = 8888,
) -> None:
    """Initialise ``home`` if needed, create the demo study, serve, simulate and verify; then
    keep serving with the scheduler, the dashboards and JupyterLab (a port of 0 or None: not
    that one) until Ctrl-C or SIGTERM."""
    if not (home / CONFIG_NAME).exists():
        init_home(home)
    config = load_config(home)
    catalog = open_catalog(config)
    try:
        definition = definition_from_options(
            DEMO_STUDY, duration_days=28, sensors=DEMO_SENSORS, timezone=DEMO_TIMEZONE
        )
        for sensor in definition["sensors"].values():
            sensor["batches_per_day"] = DEMO_BATCHES_PER_DAY
        create_study(catalog, {**definition, "name": "Demo study"})
        print(f"created study {DEMO_STUDY!r}")
    except StudyExists:
        print(f"study {DEMO_STUDY!r} exists; adding new simulated subjects to it")
    finally:
        catalog.dispose()
    url = f"http://127.0.0.1:{port}"
    # SIGTERM (e.g. from a process manager) stops the demo like Ctrl-C: the children go too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    _sync_environment(config)  # the server's OAuth2 callback stores encrypted tokens
    server = subprocess.Popen(serve_command(home, port=port), start_new_session=True)
    questionnaires = scheduler = dashboards = lab = None
    try:
        wait_for_server(url, process=server)
        print(f"upload server running at {url} (health: {url}/health, API: {url}/openapi.yaml)")
        report = simulate(
            config,
            DEMO_STUDY,
            subjects=subjects,
            days=days,
            url=url,
            batches_per_day=DEMO_BATCHES_PER_DAY,
            progress=True,
        )
        print(report.summary())
        days = simulate_days(
            config,
            DEMO_STUDY,
            subjects=DEMO_SENSING_SUBJECTS,
            days=DEMO_SENSING_DAYS,
            url=url,
            progress=True,
        )
        print(f"simulated days: {days.summary()}")
        problems = verify(config)
        print(
            "verify: ledger and files agree"
            if not problems
            else f"verify: {len(problems)} discrepancies"
        )
        _build_tables(config)
        _compute_features(config, sorted(set(days.days["subject"].to_list())))
        refreshed = refresh_status(config)
        catalog = open_catalog(config)
        try:
            table = study_status(catalog, DEMO_STUDY)
            open_alerts = list_alerts(catalog, DEMO_STUDY)
        finally:
            catalog.dispose()
        print(f"\nstatus of {DEMO_STUDY!r} ({refreshed.summary()}):")
        print(render(table, "table").decode(), end="")
        print(
            f"{len(open_alerts)} open alerts: workbench --home {home} alerts {DEMO_STUDY}; "
            f"status CSV: {status_csv_path(DataPool.of(config), DEMO_STUDY)}"
        )
        questionnaires = _export_questionnaires(config)
        _link_sync_demo(config, url, queue=keep_serving)
        print(f"data pool: {config.pool}")
        if keep_serving:
            scheduler = _start_scheduler(config)
            if dashboards_port:
                dashboards = _start_dashboards(config, dashboards_port)
            if lab_port:
                lab = _start_lab(config, lab_port)
            print(f"\nupload server: {url}   (Ctrl-C to stop)")
            server.wait()
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        from workbench.dashboards import stop_process

        for process in (server, questionnaires, scheduler, dashboards, lab):
            if process is not None:
                stop_process(process)


def _build_tables(config) -> None:
    """Build the demo's sensor tables and print what they hold: the build's summary and the
    mean data yield per sensor."""
    import polars as pl

    from workbench.sensors.schemas import sensor_schema
    from workbench.sensors.tables import build_tables
    from workbench.sensors.yields import data_yield

    # The demo's tables are small: one process starts sooner than a pool of them.
    print(build_tables(config, DEMO_STUDY, progress=True, processes=1).summary())
    sampled = [s for s in DEMO_SENSORS if sensor_schema(s).interval_s]  # not EMA's prompts
    quality = (
        data_yield(config, DEMO_STUDY)
        .filter(pl.col("sensor").is_in(sampled))
        .group_by("sensor")
        .agg(pl.col("yield_pct").mean())
        .sort("sensor")
    )
    shown = ", ".join(
        f"{row['sensor']} {row['yield_pct']:.0f} %" for row in quality.iter_rows(named=True)
    )
    print(f"data yield per sensor (mean over subject-days): {shown}")
    print(
        f"sensor tables: {DataPool.of(config).tables / DEMO_STUDY} (in JupyterLab: "
        f"workbench.sensor_data(config, {DEMO_STUDY!r}, 'location'); to share: workbench "
        f"--home {config.home} tables export {DEMO_STUDY} --out DIR)"
    )


def _compute_features(config, subjects: list[str]) -> None:
    """Compute the demo's behavioural features and print a few, averaged over the valid days of
    ``subjects`` (those of the simulated days: the phones' records are random)."""
    import polars as pl

    from workbench.features.build import read_features, write_features

    print(write_features(config, DEMO_STUDY, processes=1).summary())
    days = read_features(config, DEMO_STUDY, subjects=subjects).filter(pl.col("valid_day"))
    shown = {
        "location_places": "places",
        "location_home_minutes": "minutes at home",
        "location_distance_km": "km travelled",
        "activity_walking_minutes": "minutes walking",
        "app_minutes_total": "app minutes",
    }
    present = [c for c in shown if c in days.columns]
    if days.is_empty() or not present:
        print("features: no valid subject-day yet")
        return
    means = days.select(pl.col(present).mean()).row(0, named=True)
    figures = ", ".join(f"{means[c]:.1f} {shown[c]}" for c in present if means[c] is not None)
    print(
        f"features, mean of {days.height} valid days of the simulated days' subjects: {figures} "
        f"(workbench.features(config, {DEMO_STUDY!r}); the subject pages of the dashboards)"
    )


def _start_scheduler(config) -> subprocess.Popen:
    """Start ``workbench scheduler`` with the demo pipelines and queue one run of each, so
    `workbench runs` shows them at once rather than at their first scheduled time."""
    from workbench.pipelines import load_pipelines
    from workbench.scheduler import queue_task

    process = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "--home", str(config.home), "scheduler"],
        start_new_session=True,
    )
    for name in load_pipelines(config):
        queue_task(config, "run_pipeline", name, None, "demo")
    print(
        f"scheduler running the pipelines of {config.pipelines.folder}; one run of each is "
        f"queued: watch `workbench --home {config.home} runs`"
    )
    return process


def _start_dashboards(config, port: int) -> subprocess.Popen:
    """Serve the status and attrition dashboards with Voila behind a token (or the password
    of the environment) and print their addresses, the token in each."""
    from workbench.dashboards import (
        dashboard_access,
        dashboard_urls,
        serve_dashboards,
        wait_for_dashboards,
    )

    url = f"http://127.0.0.1:{port}"
    log = DataPool.of(config).logs / "dashboards.log"
    access = dashboard_access()
    process = serve_dashboards(config, port=port, log=log, access=access)
    wait_for_dashboards(url, process=process, token=access.token)
    for name, address in dashboard_urls(url, access).items():
        print(f"dashboards, {name}: {address}")
    print(f"dashboards log: {log}")
    return process


def _start_lab(config, port: int) -> subprocess.Popen | None:
    """Start JupyterLab on the demo home behind a token and print its address, the token in
    it; when its port is taken, say so and go on without it."""
    from workbench.errors import PortInUse
    from workbench.lab import lab_access, lab_url, serve_lab, wait_for_lab

    url = f"http://127.0.0.1:{port}"
    log = DataPool.of(config).logs / "lab.log"
    access = lab_access()
    try:
        process = serve_lab(config, port=port, access=access, log=log)
    except PortInUse as exc:
        print(f"JupyterLab not started: {exc.message} (--lab-port, or make run LAB_PORT=...)")
        return None
    try:
        wait_for_lab(url, process=process, access=access)
    except BaseException:
        from workbench.dashboards import stop_process

        stop_process(process)
        raise
    print(f"JupyterLab: {lab_url(url, access)}")
    print(f"JupyterLab log: {log}")
    return process


def _export_questionnaires(config) -> subprocess.Popen | None:
    """Start the local study server of the template's source and export it once; return the
    server's process (it keeps serving with the upload server)."""
    from workbench.export import export_sources
    from workbench.logs import setup_logging

    source = next((s for s in config.sources if s.name == DEMO_SOURCE), None)
    if source is None:
        return None
    # The local study server accepts these logins; a real source's come from the environment.
    for variable in (source.user_env, source.password_env):
        os.environ.setdefault(variable, "demo")
    port = httpx.URL(source.url).port or 80
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workbench.cli",
            "--home",
            str(config.home),
            "simulate-questionnaires",
            "--port",
            str(port),
        ],
        start_new_session=True,
        env={
            **os.environ,
            "MT_USER": os.environ[source.user_env],
            "MT_PASSWORD": os.environ[source.password_env],
        },
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{source.url}/export/", timeout=1)
            break
        except httpx.TransportError:
            if process.poll() is not None:
                raise WorkbenchError(
                    "the local study server did not start; see its output above"
                ) from None
            time.sleep(0.2)
    setup_logging(config)
    for report in export_sources(config, DEMO_SOURCE):
        print(f"questionnaires exported: {report.summary()}")
    catalog = open_catalog(config)
    try:
        safety = list_safety_alerts(catalog, [DEMO_SOURCE])
    finally:
        catalog.dispose()
    print(
        f"safety alerts: {len(safety)} open (first on the status dashboard; "
        f"workbench --home {config.home} alerts; docs/safety.md)"
    )
    for alert in safety[:5]:
        print(
            f"  safety alert #{alert.id}: participant {alert.subject}, session "
            f"{alert.device or 'none'}: {alert.detail}"
        )
    print(
        f"decoded tables: {DataPool.of(config).questionnaires / DEMO_SOURCE / 'decoded'}; "
        f"study server: {source.url}/export/"
    )
    return process


def _sync_environment(config) -> None:
    """Give the demo (and the processes it starts) a token key and the simulator's OAuth2
    client. The key is kept in ``keys/sync.key`` of the demo home: a real home keeps it in
    the environment only."""
    from workbench.sync.accounts import generate_key
    from workbench.sync.settings import sync_settings

    settings = sync_settings(config)
    if not settings.key:
        path = config.home / "keys" / "sync.key"
        if not path.exists():
            write_file_atomically(path, generate_key().encode())
        os.environ[settings.key_env] = path.read_text().strip()
    for provider in settings.providers:
        os.environ.setdefault(provider.client_id_env, "demo-client")
        os.environ.setdefault(provider.client_secret_env, "demo-secret")


def _link_sync_demo(config, url: str, *, queue: bool) -> None:
    """Serve the local Google-Health-style simulator (in a thread of the demo), link the
    first demo subject to it through the upload server's callback, then queue its sync on the
    scheduler (or, with --exit, sync it at once)."""
    from workbench.simulators.providers import ProviderSimulator, start_simulator
    from workbench.sync import list_accounts, queue_sync, start_link, sync_account
    from workbench.sync.settings import sync_settings

    settings = sync_settings(config)
    provider = next((p for p in settings.providers if p.type == "google_health"), None)
    if provider is None:
        return
    port = httpx.URL(provider.base_url).port or 80
    try:
        start_simulator(ProviderSimulator(rate_limit=provider.rate_limit), port=port)
    except OSError as exc:
        print(f"sync demo skipped: port {port} of the provider simulator is taken ({exc})")
        return
    catalog = open_catalog(config)
    try:
        account, link = start_link(
            config, catalog, DEMO_STUDY, f"{DEMO_STUDY}_00001", provider.name
        )
        # the participant's browser: the provider redirects to the callback on the server
        callback = httpx.URL(httpx.get(link, timeout=10).headers["location"])
        answer = httpx.get(str(callback.copy_with(host="127.0.0.1", port=httpx.URL(url).port)))
        account = next(a for a in list_accounts(catalog) if a.id == account.id)
    finally:
        catalog.dispose()
    print(f"sync: account {account.id} ({account.subject} on {provider.name}) {account.status} "
          f"after the callback ({answer.status_code})")  # fmt: skip
    if account.status != "active":
        return
    if queue:
        queue_sync(config, account.id, trigger="demo")
        print(
            f"sync: queued on the scheduler; watch `workbench --home {config.home} sync accounts`"
        )
    else:
        print(f"sync: {sync_account(config, account.id, trigger='demo').summary()}")
