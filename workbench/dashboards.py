"""What the coordinators' dashboards show, and the Voila server that shows it.

The two dashboards in ``notebooks/dashboards/`` are one cell each: they build the widgets of
:mod:`workbench.widgets`, which read everything through the functions here. These are plain
functions of the catalog and the pool, so what a page shows is what the library computes:

- :func:`status_view`: one study's status table with a state per subject (active, stale,
  never started, left, completed), the headline counts, and hours since the newest sample of
  every sensor;
- :func:`daily_yield`: per subject and local day, the data yield from the sensor tables (mean
  over the sampled sensors) and each sensor's valid hours, for the heat map;
- :func:`daily_completeness`: per subject and day, the share of expected batches received
  (the heat map of a study whose sensor tables were never built);
- :func:`attrition_view`: retention, CONSORT funnel, dropout by week, EMA compliance and
  questionnaire completion by session, for a study or questionnaire source, a cohort and a
  date range;
- :func:`subject_page_url`: where a subject id links to, one subject's page
  (:mod:`workbench.subject_view`);
- :func:`voila_command` / :func:`serve_dashboards`: ``workbench dashboards``, behind a sign-in
  (:func:`dashboard_access`): a token in the printed URLs (random per start, or
  ``$WORKBENCH_DASHBOARDS_TOKEN``) or a password (``$WORKBENCH_DASHBOARDS_PASSWORD``).
  Serving without either is refused on any address but loopback.

Example::

    from workbench.dashboards import status_view
    view = status_view(config, "demo")
    view.counts        # {"enrolled": 12, "active": 9, "stale": 2, ...}
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import httpx
import polars as pl
from sqlalchemy import func, literal, select

from workbench.alerts import Alert, list_alerts, list_safety_alerts
from workbench.catalog import Catalog, borrowed_catalog, devices, fetch_tuples, uploads
from workbench.config import HOME_ENV, Config
from workbench.errors import UnprotectedDashboards, WorkbenchError
from workbench.pool import DataPool, make_folders, modes_in, open_new_file
from workbench.reports import (
    Attrition,
    attrition,
    cohort_of,
    completion_by_session,
    subset_attrition,
)
from workbench.status import sampled_sensors, study_status, subject_yield
from workbench.studies import Study, get_study, list_studies
from workbench.subject_state import LEFT_STATUSES, Activity, SubjectState
from workbench.templates import SHIPPED_NOTEBOOKS
from workbench.times import DAY_MS, HOUR_MS, now_ms

DASHBOARDS = SHIPPED_NOTEBOOKS / "dashboards"  # the shipped ones; a home has its own copies

# A subject's state on the status dashboard, in the order "who needs attention" sorts them.
STATES = tuple(s.value for s in SubjectState)
_S = SubjectState
COUNTS = (
    "enrolled",
    *(s.value for s in (_S.ACTIVE, _S.STALE, _S.NEVER_STARTED, _S.LEFT, _S.COMPLETED)),
)


@dataclass
class StatusView:
    """One study's status as the status dashboard shows it."""

    study: Study
    now: int
    table: pl.DataFrame  # the status table, one row per subject x app x device, plus "state"
    subjects: pl.DataFrame  # one row per subject: subject_name, state, hours_since_last_data
    counts: dict[str, int]
    freshness: pl.DataFrame  # per status row: <sensor> = hours since its newest sample
    alerts: list[Alert] = field(default_factory=list)  # open safety alerts first

    @property
    def sensors(self) -> list[str]:
        return list(self.study.sensors)


def subject_states(status: pl.DataFrame, *, staleness_hours: float) -> pl.DataFrame:
    """One row per subject of a status table with its state.

    A subject has completed when any of its devices completed the study; has left when a
    device left early and none is still in the study; has never started when no data arrived
    from any device; is stale when the newest data is ``staleness_hours`` old or older; and is
    active otherwise.
    """
    codes = pl.col("codes")
    ended = [Activity.LEFT_EARLY, Activity.COMPLETED]
    in_study = codes.list.eval(pl.element().is_in(ended).not_()).list.any()
    per = status.group_by("subject_name").agg(
        pl.col("activity_code").alias("codes"),
        pl.col("last_data").max(),
        pl.col("hours_since_last_data").min(),
    )
    state = (
        pl.when(codes.list.contains(Activity.COMPLETED))
        .then(pl.lit(SubjectState.COMPLETED.value))
        .when(codes.list.contains(Activity.LEFT_EARLY) & ~in_study)
        .then(pl.lit(SubjectState.LEFT.value))
        .when(pl.col("last_data").is_null())
        .then(pl.lit(SubjectState.NEVER_STARTED.value))
        .when(pl.col("hours_since_last_data") >= staleness_hours)
        .then(pl.lit(SubjectState.STALE.value))
        .otherwise(pl.lit(SubjectState.ACTIVE.value))
    )
    return (
        per.with_columns(state.alias("state"))
        .select("subject_name", "state", "last_data", "hours_since_last_data")
        .sort("subject_name")
    )


def headline_counts(subjects: pl.DataFrame) -> dict[str, int]:
    """Enrolled subjects and how many are in each state; the states add up to enrolled."""
    by_state = dict(subjects.group_by("state").len().iter_rows())
    return {"enrolled": subjects.height} | {s: int(by_state.get(s, 0)) for s in COUNTS[1:]}


def status_view(
    config: Config,
    study_id: str,
    *,
    catalog: Catalog | None = None,
    now: int | None = None,
) -> StatusView:
    """Everything the status dashboard shows of one study, as the last refresh left it (a
    read: uploads since then show after the next refresh).

    Example: ``status_view(config, "demo").counts["stale"]``.
    """
    with borrowed_catalog(config, catalog) as catalog:
        now = now_ms() if now is None else now
        study = get_study(catalog, study_id)
        table = study_status(catalog, study_id, now=now, pool=DataPool.of(config))
        # Open safety alerts of every questionnaire source come first, on every study's page:
        # they must not wait for someone to open the right one.
        safety = list_safety_alerts(catalog, [s.name for s in config.sources])
        items = safety + [
            a for a in list_alerts(catalog, study_id) if a.acked_at is None and not a.is_safety
        ]
    staleness = float(study.definition["staleness_hours"])
    subjects = subject_states(table, staleness_hours=staleness)
    table = table.join(subjects.select("subject_name", "state"), on="subject_name", how="left")
    freshness = table.select(
        *(
            ((now - pl.col(f"{s}_last_sample").cast(pl.Int64)) / HOUR_MS).round(1).alias(s)
            for s in study.sensors
        )
    )
    return StatusView(
        study=study,
        now=now,
        table=table,
        subjects=subjects,
        counts=headline_counts(subjects),
        freshness=freshness,
        alerts=items,
    )


def study_choices(config: Config, *, catalog: Catalog | None = None) -> list[str]:
    """The active studies, by id."""
    with borrowed_catalog(config, catalog) as catalog:
        return [s.id for s in list_studies(catalog) if s.active]


def daily_yield(
    config: Config,
    study: Study,
    subjects: list[str],
    *,
    days: int = 28,
    now: int | None = None,
    catalog: Catalog | None = None,
) -> pl.DataFrame | None:
    """Per subject of ``subjects`` and local day of the last ``days`` (today included, so
    far): ``yield_pct``, the mean over the study's sampled sensors (all sensors if none is
    sampled) of the subject's data yield that day, and ``hours_<sensor>``, each sensor's
    valid hours; null on days the subject was not in the study. None when the study's
    sensor tables were never built. A read of the tables the last build left.

    Columns subject_name, day (a date), yield_pct, hours_<sensor> per sensor of the study.
    """
    now = now_ms() if now is None else now
    with borrowed_catalog(config, catalog) as catalog:
        found = subject_yield(
            config, catalog, study, days=days - 1, now=now, subjects=subjects, today=True
        )
    if found is None:
        return None
    sensors = list(study.sensors)
    averaged = sampled_sensors(study) or sensors
    zone = zoneinfo.ZoneInfo(study.definition.get("timezone") or "UTC")
    today = dt.datetime.fromtimestamp(now / 1000, zone).date()
    dates = [today - dt.timedelta(days=k) for k in range(days - 1, -1, -1)]
    grid = pl.DataFrame({"subject_name": subjects}, schema={"subject_name": pl.String}).join(
        pl.DataFrame({"day": dates}, schema={"day": pl.Date}), how="cross"
    )
    schema = {"subject_name": pl.String, "day": pl.Date, "yield_pct": pl.Float64} | {
        f"hours_{s}": pl.Int64 for s in sensors
    }
    if found.is_empty():
        return grid.join(pl.DataFrame(schema=schema), on=["subject_name", "day"], how="left")
    mean = (
        found.filter(pl.col("sensor").is_in(averaged))
        .group_by("subject", "day")
        .agg(pl.col("yield_pct").mean().round(1))
    )
    hours = found.pivot(on="sensor", index=["subject", "day"], values="valid_hours")
    per_day = mean.join(hours, on=["subject", "day"], how="full", coalesce=True).rename(
        {"subject": "subject_name"}
    )
    return grid.join(per_day, on=["subject_name", "day"], how="left").select(
        "subject_name",
        "day",
        pl.col("yield_pct").cast(pl.Float64),
        *(
            (pl.col(s) if s in per_day.columns else pl.lit(None)).cast(pl.Int64).alias(f"hours_{s}")
            for s in sensors
        ),
    )


def daily_completeness(
    catalog: Catalog,
    study: Study,
    subjects: list[str],
    *,
    days: int = 28,
    now: int | None = None,
) -> pl.DataFrame:
    """Per subject of ``subjects`` and UTC day of the last ``days``: the percentage of the
    study's expected batches (all sensors, from all the subject's devices) whose newest
    sample is from that day, capped at 100.

    A day's expected batches are pro-rated to the part of it the subject spent in the study
    (from the first device's joining to now, or to the last ``time_left`` once every device
    left); days outside the study have no completeness (null).

    Columns subject_name, day (a date), batches, completeness.
    """
    now = now_ms() if now is None else now
    today = now // DAY_MS
    first = today - days + 1
    expected = sum(s["batches_per_day"] for s in study.sensors.values())
    c = uploads.c
    day = c.last_ts.op("/")(literal(DAY_MS))  # integer division in SQLite and PostgreSQL
    rows, spans = [], []
    if subjects:
        d = devices.c
        with catalog.engine.connect() as conn:
            rows = fetch_tuples(
                conn,
                select(c.subject_id, day, func.count())
                .where(
                    c.study_id == study.id,
                    c.subject_id.in_(subjects),
                    c.sensor.in_(list(study.sensors)),
                    c.last_ts >= first * DAY_MS,
                )
                .group_by(c.subject_id, day),
            )
            spans = fetch_tuples(
                conn,
                select(
                    d.subject_id,
                    d.status,
                    d.time_left,
                    func.coalesce(d.time_joined, d.registered_at),
                ).where(d.study_id == study.id, d.subject_id.in_(subjects)),
            )
    counts = pl.DataFrame(
        rows, schema={"subject_name": pl.String, "day": pl.Int64, "batches": pl.Int64}, orient="row"
    )
    stays = (
        pl.DataFrame(
            spans,
            schema={
                "subject_name": pl.String,
                "status": pl.Int64,
                "time_left": pl.Int64,
                "joined": pl.Int64,
            },
            orient="row",
        )
        .group_by("subject_name")
        .agg(
            pl.col("joined").min().alias("_from"),
            pl.when(pl.col("status").is_in(LEFT_STATUSES).all())
            .then(pl.col("time_left").max())
            .otherwise(None)
            .alias("_left"),
        )
        .with_columns(pl.min_horizontal(pl.col("_left").fill_null(now), pl.lit(now)).alias("_to"))
    )
    grid = pl.DataFrame({"subject_name": subjects}, schema={"subject_name": pl.String}).join(
        pl.DataFrame({"day": list(range(first, today + 1))}, schema={"day": pl.Int64}),
        how="cross",
    )
    day_start = pl.col("day") * DAY_MS
    inside = pl.when(pl.col("_from").is_not_null()).then(
        (
            pl.min_horizontal(day_start + DAY_MS, pl.col("_to"))
            - pl.max_horizontal(day_start, pl.col("_from"))
        ).clip(lower_bound=0)
    )
    due = expected * inside / DAY_MS
    return (
        grid.join(counts, on=["subject_name", "day"], how="left")
        .join(stays, on="subject_name", how="left")
        .with_columns(pl.col("batches").fill_null(0))
        .with_columns(
            pl.when(due > 0)
            .then((100 * pl.col("batches") / due).clip(upper_bound=100).round(1))
            .alias("completeness"),
            pl.from_epoch(pl.col("day") * DAY_MS, time_unit="ms").dt.date().alias("day"),
        )
        .select("subject_name", "day", "batches", "completeness")
    )


# ---------------------------------------------------------------------------- attrition


@dataclass
class AttritionView:
    """Everything the attrition dashboard shows for one choice of study, cohort and dates."""

    name: str
    kind: str  # sensing | questionnaire
    cohorts: list[str]  # every cohort of the study, whatever the filter
    result: Attrition  # of the participants the filter keeps
    completion: pl.DataFrame  # questionnaire completion by session (questionnaire sources)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.result.consort.iter_rows())


def attrition_choices(config: Config) -> list[str]:
    """What the attrition dashboard can show: the active studies, then the questionnaire
    sources of workbench.toml."""
    return study_choices(config) + [s.name for s in config.sources]


def attrition_view(
    config: Config,
    name: str,
    *,
    cohort: str | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    now: int | None = None,
) -> AttritionView:
    """The attrition of a study or questionnaire source, restricted to the participants who
    started in ``cohort`` (a month "YYYY-MM") and between ``since`` and ``until`` (dates,
    inclusive, UTC).

    Example: ``attrition_view(config, "demo", cohort="2026-11").result.retention``.
    """
    whole = attrition(config, name, now=now)
    starts = whole.dispositions["start"].drop_nulls()
    cohorts = sorted(
        pl.DataFrame({"start": starts}).select(cohort_of(pl.col("start")))["start"].unique()
    )
    lower = _day_ms(since)
    upper = None if until is None else _day_ms(until) + DAY_MS - 1
    result = (
        subset_attrition(whole, cohort=cohort, since=lower, until=upper)
        if cohort or since or until
        else whole
    )
    completion = (
        completion_by_session(config, name) if whole.kind == "questionnaire" else pl.DataFrame()
    )
    return AttritionView(
        name=name, kind=whole.kind, cohorts=cohorts, result=result, completion=completion
    )


def _day_ms(day: dt.date | None) -> int | None:
    if day is None:
        return None
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


# ---------------------------------------------------------------------------- serving

NAMES = {"study status": "study_status.ipynb", "attrition": "attrition.ipynb"}
# One subject's page, opened from the status table's subject ids with ?study=...&subject=...
SUBJECT_PAGE = "subject.ipynb"
TOKEN_ENV = "WORKBENCH_DASHBOARDS_TOKEN"
PASSWORD_ENV = "WORKBENCH_DASHBOARDS_PASSWORD"
# How the password's hash reaches the Voila process: in its environment, never its command line.
HASH_ENV = "WORKBENCH_DASHBOARDS_PASSWORD_HASH"
IDENTITY_PROVIDER = "workbench.dashboards.EnvPasswordIdentityProvider"


@dataclass(frozen=True)
class DashboardAccess:
    """How coordinators sign in to the dashboards: a token carried in the URLs, a password
    (kept as its argon2 hash) typed on the login page, both, or neither (open).

    Example: ``DashboardAccess(token="s3cret").url("http://127.0.0.1:8866/")``.
    """

    token: str = ""
    hashed_password: str = field(default="", repr=False)

    @property
    def required(self) -> bool:
        """Whether a page needs the token or the password."""
        return bool(self.token or self.hashed_password)

    def url(self, address: str) -> str:
        """``address`` with ``?token=...`` when there is a token, so it opens signed in."""
        return f"{address}?{urlencode({'token': self.token})}" if self.token else address


def dashboard_access(
    *, open_access: bool = False, environ: Mapping[str, str] = os.environ
) -> DashboardAccess:
    """The sign-in of a start of the dashboards: the token in ``$WORKBENCH_DASHBOARDS_TOKEN``
    and the password in ``$WORKBENCH_DASHBOARDS_PASSWORD`` (hashed here); with neither, a
    random token. ``open_access`` asks for no sign-in at all (loopback addresses only).

    Example: ``dashboard_access().token`` → ``"Jx3…"`` (random, unless the variable is set).
    """
    if open_access:
        return DashboardAccess()
    token = environ.get(TOKEN_ENV, "")
    password = environ.get(PASSWORD_ENV, "")
    hashed = ""
    if password:
        from jupyter_server.auth import passwd

        hashed = passwd(password)
    if not token and not hashed:
        token = secrets.token_urlsafe(32)
    return DashboardAccess(token=token, hashed_password=hashed)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost``, 127.0.0.0/8, ``::1``).

    Example: ``is_loopback("0.0.0.0")`` → ``False``.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, access: DashboardAccess) -> None:
    """Refuse (:class:`UnprotectedDashboards`) to serve without sign-in on ``host`` unless
    it is a loopback address."""
    if not access.required and not is_loopback(host):
        raise UnprotectedDashboards(
            f"refusing to serve the dashboards on {host} without a token or password: anyone "
            "who can reach the port would see the study; drop --no-auth (a token is the "
            f"default) or set {PASSWORD_ENV}"
        )


def __getattr__(name: str):
    # Voila imports the identity provider by name; jupyter_server loads only when it does.
    if name == "EnvPasswordIdentityProvider":
        return _identity_provider()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _identity_provider() -> type:
    """jupyter_server's password identity provider, its hash read from :data:`HASH_ENV`."""
    from jupyter_server.auth.identity import PasswordIdentityProvider
    from traitlets import default

    class EnvPasswordIdentityProvider(PasswordIdentityProvider):
        """The password's hash comes from the environment, not the command line (which
        every local user can read)."""

        @default("hashed_password")
        def _hashed_password_from_environment(self) -> str:
            return os.environ.get(HASH_ENV, "")

    return EnvPasswordIdentityProvider


def voila_command(
    *,
    port: int,
    host: str = "127.0.0.1",
    folder: Path = DASHBOARDS,
    preheat: bool = True,
    access: DashboardAccess | None = None,
) -> list[str]:
    """The command line serving the notebooks in ``folder`` with Voila: sources hidden, a
    landing page listing them, each at ``/voila/render/<name>.ipynb``.

    With ``preheat``, Voila keeps one kernel per notebook that has already run it, so a page
    opens without waiting for a kernel to start and the notebook to run; the dashboards
    refresh themselves, so what such a kernel computed earlier is brought up to date.

    When ``access`` requires a sign-in, jupyter_server's identity provider checks it: the
    token and the password's hash are read from the environment
    (:func:`dashboard_environment`), so neither shows on the command line. Without
    ``access`` the pages are open.
    """
    command = [
        sys.executable,
        "-m",
        "voila",
        str(folder),
        "--no-browser",
        f"--port={port}",
        f"--Voila.ip={host}",
        "--strip_sources=True",
        "--show_tracebacks=False",
        "--theme=light",
        "--classic-tree",  # a landing page rendered by the server: plain links, no script
    ]
    if access is not None and access.required:
        # auto_token: the identity provider takes its token from $JUPYTER_TOKEN (none when
        # only a password is set), instead of Voila's default of no token at all.
        command += [
            "--Voila.auto_token=True",
            "--PasswordIdentityProvider.allow_password_change=False",
        ]
        if access.hashed_password:
            command += [f"--Voila.identity_provider_class={IDENTITY_PROVIDER}"]
    if preheat:
        command += ["--preheat_kernel=True", "--pool_size=1"]
    return command


def dashboard_environment(
    config: Config, access: DashboardAccess, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The environment of the Voila process: the home, and the sign-in of ``access`` only
    (a token or password of the caller's environment never passes on as such)."""
    env = {
        name: value
        for name, value in environ.items()
        if name not in ("JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE", TOKEN_ENV, PASSWORD_ENV, HASH_ENV)
    }
    env[HOME_ENV] = str(config.home)
    if access.token:
        env["JUPYTER_TOKEN"] = access.token
    if access.hashed_password:
        env[HASH_ENV] = access.hashed_password
    return env


def dashboards_folder(config: Config) -> Path:
    """The home's ``notebooks/dashboards`` (copied there by ``workbench init``), else the
    shipped ones.

    Example: ``dashboards_folder(config) / "study_status.ipynb"``.
    """
    own = config.home / "notebooks" / "dashboards"
    return own if own.is_dir() else DASHBOARDS


def serve_dashboards(
    config: Config,
    *,
    port: int,
    access: DashboardAccess | None = None,
    host: str = "127.0.0.1",
    folder: Path | None = None,
    preheat: bool = True,
    log: Path | None = None,
) -> subprocess.Popen:
    """Start Voila on the dashboards for ``config``'s home behind ``access``
    (:func:`dashboard_access`), in its own process group, its output appended to ``log``
    (default: this process's); the caller waits for it (:func:`wait_for_dashboards`) and
    stops it (:func:`stop_process`). Without a sign-in (``access`` None or open) only a
    loopback ``host`` is served: :class:`UnprotectedDashboards` otherwise.

    Example: ``serve_dashboards(config, port=8866, access=dashboard_access())``.
    """
    access = access or DashboardAccess()
    check_exposure(host, access)
    folder = folder or dashboards_folder(config)
    if not folder.is_dir():
        raise WorkbenchError(f"no dashboards folder at {folder}")
    return start_server(
        config,
        voila_command(port=port, host=host, folder=folder, preheat=preheat, access=access),
        env=dashboard_environment(config, access),
        cwd=folder,
        log=log,
    )


def start_server(
    config: Config, command: list[str], *, env: dict, cwd: Path, log: Path | None
) -> subprocess.Popen:
    """Start a Jupyter server (Voila, JupyterLab) in its own process group with the pool's
    umask (what its kernels write is private too), its output appended to ``log`` (default:
    this process's)."""
    output = None
    if log is not None:
        make_folders(log.parent)
        output = os.fdopen(open_new_file(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab")
    try:
        return subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            start_new_session=True,
            umask=modes_in(config.pool).umask,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
        )
    finally:
        if output is not None:
            output.close()


def wait_for_dashboards(
    url: str,
    *,
    process: subprocess.Popen,
    timeout: float = 120,
    token: str = "",
    path: str = "/",
    name: str = "the dashboard server",
) -> None:
    """Wait until the Jupyter server (Voila, or ``name``) at ``url`` answers ``path``, by
    default the landing page (with ``token``, or by sending to its login page); raise if it
    exits or times out."""
    deadline = time.monotonic() + timeout
    params = {"token": token} if token else None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise WorkbenchError(f"{name} exited with status {process.returncode}")
        try:
            answer = httpx.get(url + path, params=params, timeout=2)
            if answer.status_code == 200 or (
                answer.is_redirect and "/login" in answer.headers.get("location", "")
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise WorkbenchError(f"{name} did not answer at {url} within {timeout:.0f} s")


def dashboard_urls(url: str, access: DashboardAccess | None = None) -> dict[str, str]:
    """The landing page and each dashboard's address under the server at ``url``, each with
    the token of ``access`` (if any) so that it opens signed in."""
    access = access or DashboardAccess()
    return {"landing page": access.url(url + "/")} | {
        name: access.url(f"{url}/voila/render/{notebook}") for name, notebook in NAMES.items()
    }


def subject_page_url(study: str, subject: str) -> str:
    """The address of ``subject``'s page relative to another dashboard's page (the pages are
    served side by side, so the link keeps the server's address and sign-in).

    Example: ``subject_page_url("demo", "demo_00001")`` →
    ``"subject.ipynb?study=demo&subject=demo_00001"``.
    """
    return f"{SUBJECT_PAGE}?{urlencode({'study': study, 'subject': subject})}"


def stop_process(process: subprocess.Popen, *, timeout: float = 20) -> None:
    """Stop a server started in its own process group: SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
