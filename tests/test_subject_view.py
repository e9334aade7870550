"""One subject's page: the figures built from a home with simulated days, and the page in
headless Chromium, opened from the status dashboard's table.

The home holds a week-long study of three simulated subjects whose sensor tables and stored
features are built, and a fourth subject enrolled after the features run (its page computes
them). The browser tests serve the dashboards as ``workbench dashboards`` does (Voila, behind
a token) and reuse the page helpers of ``tests/test_dashboards.py``.
"""

from __future__ import annotations

import datetime as dt
import os

import polars as pl
import pytest

import workbench
from tests.conftest import free_port
from tests.test_dashboards import OUTPUT, browser  # noqa: F401  (the Chromium fixture)
from workbench.catalog import open_catalog
from workbench.config import init_home
from workbench.dashboards import (
    dashboard_access,
    dashboard_urls,
    serve_dashboards,
    stop_process,
    subject_page_url,
    wait_for_dashboards,
)
from workbench.enrollment import enroll
from workbench.features.build import read_features, write_features
from workbench.refresh import refresh_status
from workbench.sensors.tables import build_tables
from workbench.simulators.days import simulate_days
from workbench.studies import create_study, definition_from_options
from workbench.subject_view import (
    MAIN_FEATURES,
    SubjectDashboard,
    SubjectView,
    day_table_html,
    feature_figure,
    page_query,
    subject_view,
    yield_figure,
)
from workbench.widgets import StatusDashboard

STUDY = "walk"
SENSORS = ["location", "activity", "application_usage", "ema"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Three subjects' simulated days with tables and stored features, then a fourth
    subject whose days reached the tables after the features run."""
    config = init_home(tmp_path_factory.mktemp("subject") / "home")
    catalog = open_catalog(config)
    definition = definition_from_options(STUDY, duration_days=7, sensors=SENSORS)
    create_study(catalog, {**definition, "timezone": "Europe/Berlin"})
    catalog.dispose()
    simulate_days(config, STUDY, subjects=3, days=4, seed=3)
    build_tables(config, STUDY, processes=1)
    write_features(config, STUDY, processes=1)
    late = simulate_days(config, STUDY, subjects=1, days=3, seed=4)
    build_tables(config, STUDY, processes=1)
    refresh_status(config, mail=False)
    return config, late.days["subject"][0]


def stored_subjects(config) -> list[str]:
    return sorted(read_features(config, STUDY)["subject"].unique().to_list())


def test_the_view_reads_the_stored_features_and_the_yield(home):
    config, _late = home
    subject = stored_subjects(config)[0]
    view = subject_view(config, STUDY, subject)
    assert view.stored
    assert view.features.equals(read_features(config, STUDY, subjects=[subject]).sort("day"))
    # the yield per sensor and day: the best device's valid hours of data_yield
    rows = workbench.data_yield(config, STUDY, subjects=[subject])
    best = rows.group_by("sensor", "day").agg(pl.col("valid_hours").max())
    shown = view.yields.select("sensor", "day", "valid_hours")
    assert shown.sort("sensor", "day").equals(best.sort("sensor", "day"))
    assert set(view.sensors) == set(SENSORS) - {"ema"}  # answers: no valid hours to chart
    days = {d.isoformat() for d in view.features["day"]} | {d.isoformat() for d in rows["day"]}
    assert view.days == sorted(days)


def test_the_yield_chart_shows_valid_hours_per_sensor_against_the_target(home):
    config, _late = home
    view = subject_view(config, STUDY, stored_subjects(config)[1])
    figure = yield_figure(view)
    bars, target = figure.marks
    assert list(bars.labels) == view.sensors
    assert list(bars.x) == view.days
    hours = {(s, d.isoformat()): v for s, d, v in view.yields.select("sensor", "day", "valid_hours").iter_rows()}  # fmt: skip
    for sensor, series in zip(view.sensors, bars.y, strict=True):
        assert list(series) == [hours.get((sensor, day), 0) for day in view.days]
    assert max(max(series) for series in bars.y) > 0  # the simulated phones sent data
    in_study = view.yields.group_by("day").agg(pl.col("in_study_hours").max())
    expected = {d.isoformat(): 0.5 * h for d, h in in_study.iter_rows()}  # target 50 %
    assert list(target.y) == pytest.approx([expected[d] for d in view.days], abs=0.01)


def test_feature_charts_mark_thin_days_and_leave_out_missing_values(home):
    config, _late = home
    study = subject_view(config, STUDY, stored_subjects(config)[0]).study
    days = [dt.date(2024, 3, 4) + dt.timedelta(d) for d in range(3)]
    table = pl.DataFrame(
        {
            "subject": ["s1"] * 3,
            "day": days,
            "valid_day": [True, False, True],
            "valid_hours_max": [20, 4, 18],
            "location_places": [3, 1, None],  # the third day has no location fix
            "location_home_minutes": [600.0, None, 500.0],
        }
    )
    view = SubjectView(
        study=study,
        subject="s1",
        days=[d.isoformat() for d in days],
        yields=pl.DataFrame(
            schema={
                "sensor": pl.String,
                "day": pl.Date,
                "in_study_hours": pl.Float64,
                "valid_hours": pl.Int64,
                "yield_pct": pl.Float64,
            }
        ),
        features=table,
        stored=True,
    )
    valid, thin = feature_figure(view, "location_places", "Places", "places").marks
    # no bar, not a zero, on the third day; the thin day in grey
    assert (list(valid.x), list(valid.y), list(valid.colors)) == (["2024-03-04"], [3], ["#4c78a8"])
    assert (list(thin.x), list(thin.y), list(thin.colors)) == (["2024-03-05"], [1], ["#c9c9c9"])
    assert list(valid.scales["x"].domain) == view.days  # the day without a value keeps its place
    assert valid.opacities[0] == thin.opacities[0] == 1.0
    valid, thin = feature_figure(view, "location_home_minutes", "Home", "min").marks
    assert (list(valid.x), list(valid.y)) == (["2024-03-04", "2024-03-06"], [600.0, 500.0])
    assert thin.opacities[0] == 0.0  # no thin day has a value: its mark shows nothing
    rows = day_table_html(view)
    assert "<tr class='wb-thin' data-day='2024-03-05'>" in rows
    assert "<td data-feature='location_places'><span class='wb-null'>" in rows


def test_the_page_shows_each_main_feature_and_the_day_table(home):
    config, _late = home
    subject = stored_subjects(config)[2]
    page = SubjectDashboard(config, study=STUDY, subject=subject)
    assert page.error.value == ""
    assert subject in page.title.value
    html = "".join(getattr(c, "value", "") for c in page.root.children)
    assert "Features from the last <code>workbench features</code> run" in html
    stored = read_features(config, STUDY, subjects=[subject])
    for row in stored.iter_rows(named=True):
        assert f"data-day='{row['day'].isoformat()}'" in html
    grid = next(c for c in page.root.children if c.__class__.__name__ == "GridBox")
    assert [f.title for f in grid.children] == [title for _c, title, _u in MAIN_FEATURES]


def test_a_subject_without_stored_features_has_them_computed_and_says_so(home):
    config, late = home
    assert late not in stored_subjects(config)
    view = subject_view(config, STUDY, late)
    assert not view.stored
    assert view.features.height >= 3  # its simulated days
    computed = workbench.features(config, STUDY, subjects=[late], processes=1)
    assert view.features.equals(computed.sort("day"))
    page = SubjectDashboard(config, study=STUDY, subject=late)
    html = "".join(getattr(c, "value", "") for c in page.root.children)
    assert "No stored features for this subject yet" in html and "computed now" in html


@pytest.mark.parametrize(
    ("study", "subject", "message"),
    [
        (STUDY, "nobody_1", "no subject 'nobody_1' is enrolled in study 'walk'"),
        (STUDY, "../../etc/passwd", "invalid subject name '../../etc/passwd'"),
        (STUDY, "<script>x</script>", "invalid subject name '&lt;script&gt;"),
        ("no-such-study", "walk_00001", "no study 'no-such-study'"),
        ("../walk", "walk_00001", "invalid study name '../walk'"),
        (None, None, "No subject chosen"),
    ],
)
def test_a_bad_or_unknown_id_is_a_message(home, study, subject, message):
    config, _late = home
    page = SubjectDashboard(config, study=study, subject=subject)
    assert message in page.error.value.replace("&#x27;", "'")
    assert page.view is None
    assert list(page.root.children) == [page.title, page.error]  # no figures, no table


def test_the_status_table_links_each_subject_to_its_page(home, tmp_path):
    config, _late = home
    page = StatusDashboard(config, study=STUDY)
    for subject in stored_subjects(config):
        href = subject_page_url(STUDY, subject).replace("&", "&amp;")
        assert f"href='{href}'" in page.table.value
    # a home whose dashboards predate the subject page: plain ids, no broken links
    older = init_home(tmp_path / "older")
    (older.home / "notebooks" / "dashboards" / "subject.ipynb").unlink()
    catalog = open_catalog(older)
    create_study(catalog, definition_from_options("old", duration_days=7))
    (person,) = enroll(catalog, "old", 1)
    catalog.dispose()
    table = StatusDashboard(older, study="old").table.value
    assert f"<td>{person.subject}</td>" in table and "wb-subject-link" not in table


def test_the_page_reads_study_and_subject_from_the_address(monkeypatch):
    monkeypatch.delenv("VOILA_KERNEL_ID", raising=False)
    assert page_query("a", "b") == ("a", "b")  # not under Voila: the notebook's parameters
    monkeypatch.setenv("VOILA_KERNEL_ID", "k1")
    monkeypatch.setenv("VOILA_PREHEAT", "False")  # a kernel started for its request
    monkeypatch.setenv("QUERY_STRING", "token=t&study=walk&subject=walk_00002")
    assert page_query("a", "b") == ("walk", "walk_00002")
    monkeypatch.setenv("QUERY_STRING", "token=t")
    assert page_query("a", None) == ("a", None)


# ---------------------------------------------------------------------------- in the browser


def watch(page) -> list[str]:
    """What went wrong on ``page``: script errors and console errors of our server."""
    problems: list[str] = []
    page.route(lambda u: not u.startswith("http://127.0.0.1"), lambda r: r.abort())
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda m: (
            m.type == "error"
            and (m.location or {}).get("url", "").startswith("http://127.0.0.1")
            and problems.append(f"console: {m.text}")
        ),
    )
    return problems


def assert_clean(page, problems: list[str]) -> None:
    assert not page.query_selector_all(
        "[data-mime-type='application/vnd.jupyter.stderr'],"
        "[data-mime-type='application/vnd.jupyter.error'], .jp-OutputArea-output.error"
    )
    assert "Traceback" not in page.content()
    assert not problems, problems


@pytest.fixture(scope="module")
def served(home):
    config, _late = home
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    access = dashboard_access(environ={})
    process = serve_dashboards(config, port=port, access=access)
    try:
        wait_for_dashboards(url, process=process, token=access.token, timeout=300)
        yield url, access
    finally:
        stop_process(process)


@pytest.mark.slow
def test_a_subject_link_opens_the_subject_page_with_its_plots(browser, served, home):  # noqa: F811
    config, _late = home
    url, access = served
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    status = context.new_page()
    problems = watch(status)
    status.goto(dashboard_urls(url, access)["study status"])
    status.wait_for_selector("a.wb-subject-link", timeout=180_000)
    subject = stored_subjects(config)[2]
    with context.expect_page(timeout=60_000) as opened:
        status.click(f"a.wb-subject-link:text-is('{subject}')")
    page = opened.value
    problems += watch(page)
    page.wait_for_selector(".wb-subject", timeout=180_000)
    page.wait_for_selector("table.wb-days", timeout=180_000)
    page.wait_for_function(
        "() => document.querySelectorAll('.bqplot rect.bar').length > 20", timeout=180_000
    )
    assert "subject.ipynb" in page.url and f"subject={subject}" in page.url
    assert page.inner_text(".wb-subject") == subject
    assert len(page.query_selector_all(".bqplot")) == 1 + len(MAIN_FEATURES)
    assert "Features from the last" in page.inner_text(".wb-source")

    # the day table holds the stored features, day by day
    stored = read_features(config, STUDY, subjects=[subject]).sort("day")
    shown = page.query_selector_all("table.wb-days tbody tr")
    assert [r.get_attribute("data-day") for r in shown] == [d.isoformat() for d in stored["day"]]
    for row, values in zip(shown, stored.iter_rows(named=True), strict=True):
        places = row.query_selector("td[data-feature='location_places']").inner_text()
        assert places == str(values["location_places"])
        km = row.query_selector("td[data-feature='location_distance_km']").inner_text()
        assert km == f"{values['location_distance_km']:.1f}"
        assert ("wb-thin" in row.get_attribute("class")) == (not values["valid_day"])
    assert_clean(page, problems)
    folder = os.path.join(OUTPUT, "dashboards")
    os.makedirs(folder, exist_ok=True)
    page.screenshot(path=os.path.join(folder, "subject.png"), full_page=True)

    # a bad and an unknown subject in the address: a message, no traceback, no data
    base = f"{url}/voila/render/subject.ipynb"
    for query, message in [
        ("study=walk&subject=..%2F..%2Fetc", "invalid subject name '../../etc'"),
        ("study=walk&subject=nobody_7", "no subject 'nobody_7' is enrolled in study 'walk'"),
    ]:
        other = context.new_page()
        seen = watch(other)
        other.goto(f"{base}?{query}")
        error = other.wait_for_selector(".wb-error:not(:empty)", timeout=180_000)
        assert message in error.inner_text()
        assert not other.query_selector(".bqplot, table.wb-days")
        assert_clean(other, seen)
        other.close()
    context.close()


@pytest.mark.slow
def test_the_subject_page_needs_the_sign_in(browser, served, home):  # noqa: F811
    config, _late = home
    url, _access = served
    subject = stored_subjects(config)[0]
    page = browser.new_page()
    page.route(lambda u: not u.startswith("http://127.0.0.1"), lambda r: r.abort())
    page.goto(f"{url}/voila/render/{subject_page_url(STUDY, subject)}")
    page.wait_for_selector("input[name='password']", timeout=60_000)
    assert "/login" in page.url
    assert not page.query_selector(".wb-subject, .bqplot, table.wb-days")
    assert "location_places" not in page.content()
    page.close()


def test_a_subject_without_data_shows_empty_states(tmp_path):
    config = init_home(tmp_path / "empty")
    catalog = open_catalog(config)
    create_study(catalog, definition_from_options("quiet", duration_days=7, sensors=SENSORS))
    (person,) = enroll(catalog, "quiet", 1)
    catalog.dispose()
    page = SubjectDashboard(config, study="quiet", subject=person.subject)
    assert page.error.value == ""
    html = "".join(getattr(c, "value", "") for c in page.root.children)
    assert "No sensor data for this subject yet." in html
    assert "No day with features yet." in html
    assert not [c for c in page.root.children if not isinstance(getattr(c, "value", None), str)]
