"""The coordinators' dashboards: what they compute, and the pages in headless Chromium.

The browser tests serve the dashboards with ``workbench.dashboards.serve_dashboards`` (Voila,
as ``workbench dashboards`` does, behind a token) over a pool of two synthetic studies and
drive the Debian ``chromium`` with Playwright. Screenshots go to ``test-output/dashboards/`` (or
``$WORKBENCH_TEST_OUTPUT/dashboards/``).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import os
import shutil
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass

import httpx
import polars as pl
import pytest
from click.testing import CliRunner
from jupyter_server.auth import passwd_check

from bench.synthetic import synthetic_study
from tests.conftest import LAG, NOW, REPO, free_port
from workbench.alerts import list_alerts
from workbench.catalog import open_catalog
from workbench.cli import cli
from workbench.config import init_home
from workbench.dashboards import (
    PASSWORD_ENV,
    TOKEN_ENV,
    DashboardAccess,
    attrition_view,
    daily_completeness,
    dashboard_access,
    dashboard_urls,
    headline_counts,
    serve_dashboards,
    status_view,
    stop_process,
    subject_states,
    voila_command,
    wait_for_dashboards,
)
from workbench.errors import UnprotectedDashboards
from workbench.refresh import refresh_status
from workbench.status import study_status
from workbench.studies import get_study

OUTPUT = os.environ.get("WORKBENCH_TEST_OUTPUT") or str(REPO / "test-output")


# ---------------------------------------------------------------------------- the numbers


def test_subject_states_one_per_subject(catalog, scenario, people, home):
    refresh_status(home, catalog=catalog, now=NOW, mail=False)
    table = study_status(catalog, "demo", now=NOW)
    states = dict(
        subject_states(table, staleness_hours=48).select("subject_name", "state").iter_rows()
    )
    a, b, c, d, e, f, g = (p.subject for p in people)
    assert states == {
        a: "active",  # sent an hour ago
        b: "stale",  # silent for seven days
        c: "left",  # left early
        d: "completed",
        e: "active",
        f: "active",  # two phones, but one sent an hour ago
        g: "never started",  # no phone
    }
    counts = headline_counts(subject_states(table, staleness_hours=48))
    assert counts == {
        "enrolled": 7,
        "active": 3,
        "stale": 1,
        "never started": 1,
        "left": 1,
        "completed": 1,
    }


def test_status_view_counts_and_alerts(home, catalog, scenario):
    refresh_status(home, catalog=catalog, now=NOW, mail=False)
    view = status_view(home, "demo", catalog=catalog, now=NOW)
    assert sum(v for k, v in view.counts.items() if k != "enrolled") == view.counts["enrolled"]
    assert view.table.height == study_status(catalog, "demo", now=NOW).height
    assert {"state", "subject_name"} <= set(view.table.columns)
    assert view.freshness.columns == ["accelerometer", "location"]
    # the stale subject's accelerometer: its newest sample is seven days old
    b_row = view.table.with_row_index().filter(pl.col("state") == "stale")["index"][0]
    assert 7 * 24 - 1 < view.freshness["accelerometer"][b_row] < 7 * 24 + 1


def test_daily_completeness_counts_batches_by_day_of_their_data(catalog, scenario, people, study):
    a = people[0].subject
    days = daily_completeness(catalog, study, [a, "nobody"], days=3, now=NOW)
    assert days.height == 6  # two subjects x three days, with zeros where nothing came
    per_day = sum(s["batches_per_day"] for s in study.sensors.values())
    today = days.filter(pl.col("subject_name") == a).sort("day")
    # a sends location every hour and accelerometer every two hours, until an hour before NOW
    table = pl.DataFrame(
        {
            "t": [NOW - 2 * 3_600_000 - i * 3_600_000 for i in range(240)]
            + [NOW - 3_600_000 - i * 2 * 3_600_000 for i in range(120)]
        }
    )
    day_of = ((table["t"] - LAG) // 86_400_000).value_counts().sort("t")
    expected = dict(day_of.iter_rows())
    for row in today.iter_rows(named=True):
        key = (dt.datetime(row["day"].year, row["day"].month, row["day"].day, tzinfo=dt.UTC)
               .timestamp() * 1000) // 86_400_000  # fmt: skip
        assert row["batches"] == expected.get(int(key), 0)
        # today is in the study only up to NOW: its expected batches are pro-rated
        share = min(NOW - key * 86_400_000, 86_400_000) / 86_400_000
        assert row["completeness"] == min(100.0, round(100 * row["batches"] / (per_day * share), 1))
    nobody = days.filter(pl.col("subject_name") == "nobody")
    assert nobody["batches"].to_list() == [0, 0, 0]
    assert nobody["completeness"].to_list() == [None, None, None]  # never in the study


def test_daily_completeness_of_a_leaver_stops_at_time_left_and_never_passes_100(
    catalog, people, study
):
    from tests.conftest import HOUR, T0, Scenario

    s = Scenario(catalog, people[:1])
    subject = people[0].subject
    day0 = (T0 // 86_400_000 + 1) * 86_400_000  # a midnight after T0
    s.device(subject, "x1", registered=day0, status=1, time_left=day0 + 36 * HOUR)
    # 48 batches a day expected (24 per sensor): day 0 gets 60 (over), day 1 (half of it
    # in the study) gets 18 of its 24
    s.batches(subject, "x1", "location", [day0 + LAG + i * 1_440_000 for i in range(60)])
    day1 = day0 + 86_400_000
    s.batches(subject, "x1", "location", [day1 + LAG + i * HOUR for i in range(12)])
    s.batches(subject, "x1", "accelerometer", [day1 + LAG + i * HOUR for i in range(6)])
    days = daily_completeness(catalog, study, [subject], days=5, now=day0 + 3 * 86_400_000 + HOUR)
    by_day = list(days.select("batches", "completeness").iter_rows())
    # the day before joining and the days after leaving: not in the study
    assert by_day == [(0, None), (60, 100.0), (18, 75.0), (0, None), (0, None)]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Two synthetic studies: alpha (40 subjects) and beta (12)."""
    config = init_home(tmp_path_factory.mktemp("dashboards") / "home")
    alpha = synthetic_study(config, "alpha", subjects=40, seed=1)
    beta = synthetic_study(config, "beta", subjects=12, seed=2)
    return config, alpha, beta


def test_synthetic_groups_are_the_dashboard_states(pool):
    config, alpha, _beta = pool
    view = status_view(config, "alpha")
    by_state = dict(view.subjects.select("subject_name", "state").iter_rows())
    for group, subjects in alpha.groups.items():
        assert {by_state[s] for s in subjects} == {group}


def test_attrition_filters_by_cohort_and_start_date(pool):
    config, _alpha, _beta = pool
    whole = attrition_view(config, "alpha")
    assert whole.counts["enrolled"] == 40
    assert len(whole.cohorts) >= 2  # the synthetic starts span more than a month
    starts = whole.result.dispositions.drop_nulls("start")
    first = whole.cohorts[0]
    in_first = starts.filter(
        pl.from_epoch("start", time_unit="ms").dt.strftime("%Y-%m") == first
    ).height
    assert attrition_view(config, "alpha", cohort=first).counts["enrolled"] == in_first
    middle = dt.datetime.fromtimestamp(
        starts["start"].sort()[starts.height // 2] / 1000, dt.UTC
    ).date()
    later = attrition_view(config, "alpha", since=middle)
    earlier = attrition_view(config, "alpha", until=middle - dt.timedelta(days=1))
    assert later.counts["enrolled"] + earlier.counts["enrolled"] == starts.height
    assert 0 < later.counts["enrolled"] < starts.height


# ---------------------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the browser tests need Debian's chromium: `make test` installs it"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


@dataclass
class Served:
    """A running dashboard server: its address, its sign-in and the pages' signed-in URLs."""

    url: str
    access: DashboardAccess

    @property
    def urls(self) -> dict[str, str]:
        return dashboard_urls(self.url, self.access)


@pytest.fixture(scope="module")
def dashboards(pool):
    config = pool[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    access = dashboard_access(environ={})  # a random token, as `workbench dashboards` makes
    process = serve_dashboards(config, port=port, access=access)
    try:
        wait_for_dashboards(url, process=process, token=access.token)
        yield Served(url, access)
    finally:
        stop_process(process)


class Page:
    """A dashboard opened in a fresh page, with what went wrong on the way."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.problems: list[str] = []
        self.blocked: list[str] = []

        def external(route):  # the tests never reach the internet
            self.blocked.append(route.request.url)
            route.abort()

        self.page.route(lambda u: not u.startswith("http://127.0.0.1"), external)
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.page.on("console", self._console)
        self.page.goto(url)

    def _console(self, message) -> None:
        if message.type != "error":
            return
        where = (message.location or {}).get("url", "")
        if message.text.startswith("Failed to load resource") and not where.startswith(
            "http://127.0.0.1"
        ):
            return  # one of the blocked external stylesheets (Voila's optional icon CDN)
        self.problems.append(f"console: {message.text}")

    def wait_rendered(self, *selectors: str) -> None:
        for selector in selectors:
            self.page.wait_for_selector(selector, timeout=90_000)

    def counts(self) -> dict[str, str]:
        out = {}
        for card in self.page.query_selector_all(".wb-card"):
            out[card.get_attribute("data-key")] = card.query_selector(".wb-value").inner_text()
        return out

    def check_clean(self) -> None:
        errors = self.page.query_selector_all(
            "[data-mime-type='application/vnd.jupyter.stderr'],"
            "[data-mime-type='application/vnd.jupyter.error'], .jp-OutputArea-output.error"
        )
        assert not errors, [e.inner_text()[:500] for e in errors]
        assert all(e.inner_text() == "" for e in self.page.query_selector_all(".wb-error"))
        assert not self.problems, self.problems
        assert "Traceback" not in self.page.content()

    def screenshot(self, name: str) -> str:
        folder = os.path.join(OUTPUT, "dashboards")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.png")
        # Voila scrolls inside the page: make the window as tall as the dashboard instead
        height = self.page.evaluate(
            "() => Math.max(...Array.from(document.querySelectorAll('body, body *'))"
            ".map(e => e.scrollHeight))"
        )
        size = self.page.viewport_size
        self.page.set_viewport_size({"width": size["width"], "height": min(height, 8000)})
        self.page.screenshot(path=path, full_page=True)
        self.page.set_viewport_size(size)
        assert os.path.getsize(path) > 10_000
        return path


STATUS_READY = (".wb-cards", "table.wb-table", ".wb-alert", ".bqplot rect.heatmapcell")
ATTRITION_READY = (".wb-cards", ".bqplot path.line", ".bqplot rect.bar")


def wait_for_text(page, selector: str, text: str, timeout: float = 60_000) -> None:
    page.wait_for_function(
        "([s, t]) => { const e = document.querySelector(s); return e && e.innerText.trim() === t; }",
        arg=[selector, text],
        timeout=timeout,
    )


@pytest.mark.slow
def test_landing_page_lists_both_dashboards(browser, dashboards):
    page = Page(browser, dashboards.urls["landing page"])
    page.page.wait_for_selector("a[href*='study_status.ipynb']", timeout=60_000)
    assert page.page.query_selector("a[href*='attrition.ipynb']")
    page.check_clean()
    page.page.close()


@pytest.mark.slow
def test_status_dashboard_counts_study_switch_and_ack(browser, dashboards, pool):
    config = pool[0]
    page = Page(browser, dashboards.urls["study status"])
    page.wait_rendered(*STATUS_READY)
    page.check_clean()
    expected = status_view(config, "alpha").counts
    assert page.counts() == {k: str(v) for k, v in expected.items()}
    assert page.page.query_selector_all(".wb-fresh-ok, .wb-fresh-stale, .wb-fresh-none")
    assert len(page.page.query_selector_all("table.wb-table tbody tr")) == 25  # one page
    path = page.screenshot("study_status")

    # alpha has no sensor tables: the heat map shows batch completeness, each cell on hover
    assert "Completeness by day" in page.page.inner_text("body")
    subject = page.page.inner_text("table.wb-table tbody tr td")
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    catalog = open_catalog(config)
    try:
        days = daily_completeness(catalog, get_study(catalog, "alpha"), [subject], days=3)
    finally:
        catalog.dispose()
    value = days.filter(pl.col("day") == yesterday)["completeness"][0]
    tip = hover_heat_cell(page.page, subject, str(yesterday))
    assert ("not in the study" if value is None else f"completeness {value:g} %") in tip

    # an alert acknowledged on the page leaves the open list, in the page and the catalog
    catalog = open_catalog(config)
    try:
        before = [a for a in list_alerts(catalog, "alpha") if a.acked_at is None]
        first = page.page.query_selector(".wb-alert").get_attribute("data-id")
        page.page.click(f".wb-ack-{first}")
        page.page.wait_for_selector(f".wb-alert[data-id='{first}']", state="detached")
        wait_for_text(page.page, ".wb-alert-count", str(len(before) - 1))
        after = {a.id: a for a in list_alerts(catalog, "alpha")}
        assert after[int(first)].acked_at is not None
        assert after[int(first)].closed_at is None  # still open: handled, not resolved
    finally:
        catalog.dispose()

    # the study picker: beta's numbers replace alpha's
    page.page.select_option("select", label="beta")
    wait_for_text(page.page, ".wb-card[data-key='enrolled'] .wb-value", "12")
    beta = status_view(config, "beta").counts
    assert page.counts() == {k: str(v) for k, v in beta.items()}
    assert "beta_00001" in page.page.inner_text("table.wb-table")
    assert "alpha_" not in page.page.inner_text("table.wb-table")

    # the CSV download is the library's status table
    page.page.click("text=Status as CSV")
    page.page.wait_for_selector("a.wb-download")
    with page.page.expect_download() as download:
        page.page.click("a.wb-download")
    with open(download.value.path(), encoding="utf-8") as saved:
        rows = list(csv.DictReader(io.StringIO(saved.read())))
    catalog = open_catalog(config)
    try:
        library = study_status(catalog, "beta")
    finally:
        catalog.dispose()
    assert len(rows) == library.height
    assert [r["subject_name"] for r in rows] == library["subject_name"].to_list()
    page.check_clean()
    page.page.close()
    print(f"screenshot: {path}")


@pytest.mark.slow
def test_status_dashboard_filters_and_pages(browser, dashboards, pool):
    config, alpha, _beta = pool
    page = Page(browser, dashboards.urls["study status"])
    page.wait_rendered(*STATUS_READY)
    page.page.select_option("select >> nth=2", label="stale")  # the "Show" filter
    stale = sorted(alpha.groups["stale"])
    page.page.wait_for_function(
        "n => document.querySelectorAll('table.wb-table tbody tr').length === n",
        arg=len(stale),
        timeout=60_000,
    )
    shown = [
        row.query_selector("td").inner_text()
        for row in page.page.query_selector_all("table.wb-table tbody tr")
    ]
    assert sorted(shown) == stale
    page.check_clean()
    page.page.close()


@pytest.mark.slow
def test_attrition_dashboard(browser, dashboards, pool):
    config = pool[0]
    page = Page(browser, dashboards.urls["attrition"])
    page.wait_rendered(*ATTRITION_READY)
    page.check_clean()
    view = attrition_view(config, "alpha")
    expected = {k: str(v) for k, v in view.counts.items()}
    shown = page.counts()
    assert {k: shown[k] for k in expected} == expected
    assert page.page.query_selector_all(".bqplot")  # retention, funnel, dropout, compliance
    path = page.screenshot("attrition")

    # a cohort narrows everything to the participants who started that month
    cohort = view.cohorts[0]
    page.page.select_option("select >> nth=1", label=cohort)
    narrowed = attrition_view(config, "alpha", cohort=cohort).counts
    wait_for_text(page.page, ".wb-card[data-key='enrolled'] .wb-value", str(narrowed["enrolled"]))
    assert page.counts()["enrolled"] != expected["enrolled"]

    # another study changes the content
    page.page.select_option("select >> nth=0", label="beta")
    wait_for_text(page.page, ".wb-card[data-key='enrolled'] .wb-value", "12")
    page.check_clean()
    page.page.close()
    print(f"screenshot: {path}")


# ---------------------------------------------------------------------------- sign-in


def shows_no_study_data(page, pool) -> None:
    """The page is Voila's login form, with nothing of the studies on it."""
    _config, alpha, beta = pool
    page.wait_for_selector("input[name='password']", timeout=60_000)
    assert "/login" in page.url
    content = page.content()
    assert not page.query_selector(".wb-card, table.wb-table, .bqplot")
    for subject in [s for group in alpha.groups.values() for s in group] + [
        s for group in beta.groups.values() for s in group
    ]:
        assert subject not in content
    for study in ("alpha", "beta"):
        assert study not in content


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, "wrong"], ids=["no token", "wrong token"])
def test_without_the_token_a_page_shows_no_data(browser, dashboards, pool, token):
    wrong = DashboardAccess(token=token or "")
    for name in ("landing page", "study status", "attrition"):
        address = dashboard_urls(dashboards.url, wrong)[name]
        page = browser.new_page()
        page.route(lambda u: not u.startswith("http://127.0.0.1"), lambda r: r.abort())
        page.goto(address)
        shows_no_study_data(page, pool)
        page.close()
    # ...and the kernels behind the pages are not reachable either.
    import httpx

    kernel = f"{dashboards.url}/api/kernels/{uuid.uuid4()}"
    assert httpx.get(kernel, timeout=30).status_code == 403
    assert httpx.get(kernel, params={"token": token or ""}, timeout=30).status_code == 403
    signed_in = httpx.get(kernel, params={"token": dashboards.access.token}, timeout=30)
    assert signed_in.status_code == 404  # past the sign-in: no such kernel


@pytest.mark.slow
def test_a_password_from_the_environment_signs_in(browser, pool, monkeypatch):
    config = pool[0]
    monkeypatch.setenv(PASSWORD_ENV, "correct horse battery staple")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    access = dashboard_access()
    assert access.token == "" and access.required
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = serve_dashboards(config, port=port, access=access, preheat=False)
    try:
        wait_for_dashboards(url, process=process)
        status = dashboard_urls(url, access)["study status"]
        assert "token" not in status  # the password is typed, never in a URL
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.route(lambda u: not u.startswith("http://127.0.0.1"), lambda r: r.abort())
        page.goto(status)
        shows_no_study_data(page, pool)
        page.fill("input[name='password']", "wrong horse")
        page.press("input[name='password']", "Enter")
        shows_no_study_data(page, pool)
        page.fill("input[name='password']", "correct horse battery staple")
        page.press("input[name='password']", "Enter")
        enrolled = page.wait_for_selector(
            ".wb-card[data-key='enrolled'] .wb-value", timeout=120_000
        )
        assert enrolled.inner_text() == str(len(status_view(config, "alpha").subjects))
        page.close()
    finally:
        stop_process(process)


def test_the_sign_in_comes_from_the_environment_or_is_random():
    assert dashboard_access(environ={TOKEN_ENV: "team-token"}) == DashboardAccess("team-token")
    first, second = dashboard_access(environ={}), dashboard_access(environ={})
    assert len(first.token) >= 40 and first.token != second.token
    hashed = dashboard_access(environ={PASSWORD_ENV: "pw"}).hashed_password
    assert hashed.startswith("argon2:") and passwd_check(hashed, "pw")
    assert not passwd_check(hashed, "pw2")
    both = dashboard_access(environ={PASSWORD_ENV: "pw", TOKEN_ENV: "t"})
    assert both.token == "t" and both.hashed_password
    assert not dashboard_access(open_access=True, environ={TOKEN_ENV: "t"}).required
    urls = dashboard_urls("http://127.0.0.1:8866", DashboardAccess("a b&c"))
    assert urls["study status"] == (
        "http://127.0.0.1:8866/voila/render/study_status.ipynb?token=a+b%26c"
    )


def test_neither_token_nor_password_is_on_the_command_line():
    access = dashboard_access(environ={PASSWORD_ENV: "pw", TOKEN_ENV: "team-token"})
    command = " ".join(voila_command(port=8866, access=access))
    assert "team-token" not in command and access.hashed_password not in command
    assert "--Voila.auto_token=True" in command
    # The identity provider Voila is told to load reads the hash from the environment.
    name = next(a for a in command.split() if "identity_provider_class" in a).split("=")[1]
    found = subprocess.run(
        [sys.executable, "-c", f"import {name.rsplit('.', 1)[0]} as m; "
         f"print(m.{name.rsplit('.', 1)[1]}().hashed_password)"],
        env={**os.environ, "WORKBENCH_DASHBOARDS_PASSWORD_HASH": access.hashed_password,
             "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert found.stdout.strip() == access.hashed_password, found.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "dashboards.example.org"])
def test_open_dashboards_are_refused_off_loopback(pool, host):
    config = pool[0]
    port = free_port()
    with pytest.raises(UnprotectedDashboards, match=f"on {host} without a token or password"):
        serve_dashboards(config, port=port, host=host, access=DashboardAccess())
    result = CliRunner().invoke(
        cli, ["--home", str(config.home), "dashboards", "--host", host, "--no-auth"]
    )
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert "refusing to serve the dashboards" in result.output


# ---------------------------------------------------------------------------- empty states


def test_empty_states(tmp_path):
    from workbench.enrollment import enroll
    from workbench.studies import create_study, definition_from_options
    from workbench.widgets import AttritionDashboard, StatusDashboard

    config = init_home(tmp_path / "empty")
    page = StatusDashboard(config.home)
    assert "No studies yet" in page.root.children[1].value
    no_sources = dataclasses.replace(config, sources=())  # the template has a source
    assert "No studies or questionnaire" in AttritionDashboard(no_sources).root.children[1].value

    catalog = open_catalog(config)
    try:
        create_study(catalog, definition_from_options("fresh", duration_days=14))
        page = StatusDashboard(config.home, study="fresh")
        assert "No subjects enrolled yet" in page.table.value
        assert page.view.counts["enrolled"] == 0
        enroll(catalog, "fresh", 3)
        page.refresh()
        assert page.view.counts == {
            "enrolled": 3,
            "active": 0,
            "stale": 0,
            "never started": 3,
            "left": 0,
            "completed": 0,
        }
        assert "No data received" in page.heat_note.value
        assert page.heat not in page.heat_box.children  # no empty chart on the page
        assert "No open alerts" in page.alert_note.value
        assert page.error.value == ""
    finally:
        catalog.dispose()


def test_automatic_refresh_reloads_when_the_interval_has_passed(pool, monkeypatch):
    import asyncio

    from workbench.widgets import StatusDashboard

    config = pool[0]
    monkeypatch.setattr(StatusDashboard, "TICK", 0.05)

    async def scenario():
        page = StatusDashboard(config, study="beta", refresh_seconds=60)
        assert page._ticker is not None  # a running loop (the kernel's): the timer runs
        first = page.view.now
        await asyncio.sleep(0.3)
        assert page.view.now == first  # a minute has not passed
        page.loaded_at -= 61
        await asyncio.sleep(0.3)
        assert page.view.now > first  # reloaded
        page.interval.value = 0  # off
        reloaded = page.view.now
        page.loaded_at -= 10_000
        await asyncio.sleep(0.3)
        assert page.view.now == reloaded
        page._ticker.cancel()

    # in a thread of its own: Playwright's synchronous API holds this thread's event loop
    failures = []

    def run():
        try:
            asyncio.run(scenario())
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    if failures:
        raise failures[0]


# ---------------------------------------------------------------------------- safety alerts


@pytest.mark.slow
def test_a_safety_alert_is_listed_first_and_needs_a_note(browser, tmp_path):
    from workbench.alerts import open_safety_alerts

    config = init_home(tmp_path / "safety")
    synthetic_study(config, "gamma", subjects=8, seed=3)  # opens status alerts, older
    catalog = open_catalog(config)
    try:
        assert list_alerts(catalog, "gamma")  # the study has alerts of its own
        finding = {
            "subject": "P0001",
            "session": "PRE",
            "since": 1_714_642_200_000,  # newer than the study's: listed first all the same
            "detail": "Patient Health Questionnaire-9 (PHQ-9) (table PHQ9, session PRE): "
            "thoughts that they would be better off dead: at or above the threshold",
            "action": "contact the participant as the study's safety protocol says",
        }
        (alert,) = open_safety_alerts(catalog, "mindtrails", [finding])
    finally:
        catalog.dispose()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    access = dashboard_access(environ={})
    process = serve_dashboards(config, port=port, access=access)
    try:
        wait_for_dashboards(url, process=process, token=access.token)
        page = Page(browser, dashboard_urls(url, access)["study status"])
        page.wait_rendered(*STATUS_READY)
        page.check_clean()
        listed = page.page.query_selector_all(".wb-alert")
        assert len(listed) > 1
        first = listed[0]
        assert first.get_attribute("data-id") == str(alert.id)
        assert "wb-alert-safety" in first.get_attribute("class")
        assert first.inner_text().startswith("SAFETY")
        assert "P0001" in first.inner_text() and "mindtrails" in first.inner_text()
        assert all("wb-alert-safety" not in e.get_attribute("class") for e in listed[1:])
        assert page.page.evaluate(
            "() => getComputedStyle(document.querySelector('.wb-alert-safety')).borderLeftWidth"
        ) == "5px"  # fmt: skip
        page.screenshot("study_status_safety")

        # Acknowledge without a note is refused on the page; the alert stays open
        page.page.click(f".wb-ack-{alert.id}")
        page.page.wait_for_function(
            "() => [...document.querySelectorAll('.wb-error')].some(e => /note/.test(e.innerText))",
            timeout=60_000,
        )
        assert page.page.query_selector(f".wb-alert[data-id='{alert.id}']")
        catalog = open_catalog(config)
        try:
            assert list_safety_alerts_of(catalog)[0].acked_at is None
        finally:
            catalog.dispose()

        # with a note and a name: acknowledged, closed, who and when recorded
        page.page.fill(f".wb-note-{alert.id} textarea", "called; safety plan agreed")
        page.page.fill(f".wb-by-{alert.id} input", "dr-lee")
        page.page.click(f".wb-ack-{alert.id}")
        page.page.wait_for_selector(f".wb-alert[data-id='{alert.id}']", state="detached")
        catalog = open_catalog(config)
        try:
            done = next(a for a in list_alerts(catalog, include_closed=True) if a.id == alert.id)
        finally:
            catalog.dispose()
        assert (done.acked_by, done.note) == ("dr-lee", "called; safety plan agreed")
        assert done.acked_at is not None and done.closed_at is not None
        page.page.close()
    finally:
        stop_process(process)


def list_safety_alerts_of(catalog):
    from workbench.alerts import list_safety_alerts

    return list_safety_alerts(catalog, ["mindtrails"])


def test_the_refresh_button_refreshes_once_and_shows_the_new_uploads(
    home, catalog, scenario, people, monkeypatch
):
    from sqlalchemy import func, select

    import workbench.refresh
    import workbench.status
    from tests.conftest import HOUR
    from workbench.catalog import now_ms, state, uploads
    from workbench.status import FOLDED
    from workbench.widgets import StatusDashboard

    refresh_status(home, catalog=catalog, mail=False)
    page = StatusDashboard(home.home, study="demo")
    b = people[1].subject
    assert page.view.subjects.filter(pl.col("subject_name") == b)["state"][0] == "stale"
    scenario.batches(b, "b1", "accelerometer", [now_ms() - HOUR])
    folds = []
    real = workbench.status.fold_new_uploads

    def counted(catalog):
        folds.append(1)
        return real(catalog)

    monkeypatch.setattr(workbench.status, "fold_new_uploads", counted)
    monkeypatch.setattr(workbench.refresh, "fold_new_uploads", counted)
    page.load()  # a read: nothing folded, b still stale
    assert folds == []
    assert page.view.subjects.filter(pl.col("subject_name") == b)["state"][0] == "stale"
    page.refresh_button.click()
    assert len(folds) == 1  # one refresh, one fold
    assert page.view.subjects.filter(pl.col("subject_name") == b)["state"][0] == "active"
    with catalog.engine.connect() as conn:  # the fold watermark reached the new upload
        mark = conn.execute(select(state.c.value).where(state.c.key == FOLDED)).scalar()
        assert mark == conn.execute(select(func.max(uploads.c.id))).scalar()
    assert page.error.value == ""


# ---------------------------------------------------------------------------- data yield


def hover_heat_cell(page, subject: str, day: str) -> str:
    """Move the pointer onto the heat map's cell of ``subject`` and ``day``; its tooltip text."""
    cell = page.evaluate_handle(
        """([subject, day]) => Array.from(document.querySelectorAll('rect.heatmapcell'))
            .find(r => r.__data__ && r.__data__.row === subject && r.__data__.column === day)""",
        [subject, day],
    ).as_element()
    assert cell is not None, f"no heat map cell for {subject} on {day}"
    cell.scroll_into_view_if_needed()
    box = cell.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=5)
    page.wait_for_function(
        """([subject, day]) => {
            const tip = document.querySelector('.bqplot_tooltip_div .wb-heat-tip');
            return tip && tip.offsetParent !== null && tip.innerText.includes(subject + ' · ' + day);
        }""",
        arg=[subject, day],
        timeout=60_000,
    )
    return page.inner_text(".bqplot_tooltip_div .wb-heat-tip")


@pytest.mark.slow
def test_the_heat_map_shows_data_yield_per_subject_and_each_sensors_hours_on_hover(
    browser, tmp_path
):
    from workbench_server.app import create_app

    from tests.conftest import Phone
    from tests.test_status_yield import day_of, midnight, sending
    from workbench.enrollment import enroll
    from workbench.sensors.tables import build_tables
    from workbench.studies import create_study, definition_from_options

    config = init_home(tmp_path / "yield")
    today = dt.datetime.now(dt.UTC).date()
    catalog = open_catalog(config)
    try:
        create_study(
            catalog,
            definition_from_options(
                "demo", duration_days=14, sensors=["accelerometer", "location"]
            ),
        )
        people = enroll(catalog, "demo", 3)
    finally:
        catalog.dispose()
    app = create_app(config)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as client:
        for person, valid in zip(people[:2], (12, 6), strict=True):
            phone = Phone(client, person, device=f"{person.subject}-phone")
            assert phone.register(time_joined=midnight(today, 5)).status_code == 200
            day_of(phone, today, 1, valid)
            sending(phone)
    build_tables(config, "demo")
    refresh_status(config, mail=False)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    access = dashboard_access(environ={})
    process = serve_dashboards(config, port=port, access=access, preheat=False)
    try:
        wait_for_dashboards(url, process=process, token=access.token)
        page = Page(browser, dashboard_urls(url, access)["study status"])
        page.wait_rendered(".wb-cards", "table.wb-table", ".bqplot rect.heatmapcell")
        page.check_clean()
        assert "Data yield by day" in page.page.inner_text("body")
        rows = page.page.query_selector_all(".bqplot g.heatmaprow")
        assert len(rows) == 3  # one per subject on the table's page
        note = page.page.inner_text(".wb-muted >> text=sampled sensors")
        assert "valid hours" in note
        # colour: the days a subject was not in the study are grey, the others on the scale
        fills = page.page.evaluate(
            """() => Object.fromEntries(Array.from(document.querySelectorAll('rect.heatmapcell'))
                .map(r => [r.__data__.row + ' ' + r.__data__.column, getComputedStyle(r).fill]))"""
        )
        yesterday = str(today - dt.timedelta(days=1))
        grey = "rgb(240, 240, 240)"
        assert fills[f"{people[2].subject} {yesterday}"] == grey  # never started
        assert fills[f"{people[1].subject} {today - dt.timedelta(days=9)}"] == grey  # not yet
        assert fills[f"{people[1].subject} {yesterday}"] not in (grey, "rgb(0, 0, 0)")
        # hovering the second subject's yesterday shows its valid hours per sensor: location
        # 6 h of fixes, accelerometer nothing; yield (25 % + 0 %) / 2
        tip = hover_heat_cell(page.page, people[1].subject, yesterday)
        assert f"{people[1].subject} · {yesterday}" in tip
        assert "data yield 12.5 %" in tip
        assert "location: 6 h" in tip
        assert "accelerometer: 0 h" in tip
        tip = hover_heat_cell(page.page, people[0].subject, yesterday)  # the tip follows
        assert f"{people[0].subject} · {yesterday}" in tip
        assert "location: 12 h" in tip and "data yield 25 %" in tip
        page.screenshot("study_status_yield")
        page.check_clean()
        page.page.close()
    finally:
        stop_process(process)
