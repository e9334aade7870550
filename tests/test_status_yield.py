"""Data yield in the status: the table's ``yield_7d_<sensor>`` columns and the ``low_yield``
alert, from real batches uploaded through the WSGI app and built into sensor tables.

Days are counted back from the real today (the study's zone is UTC): the yield's grid of days
in the study ends at the present. Location fixes every 10 minutes fill each hour's six
10-minute slots, so ``hours`` hours of fixes make ``hours`` valid hours: 12 h is 50 %, 6 h 25 %.
"""

from __future__ import annotations

import csv
import datetime as dt
import random

import pytest

from tests.conftest import Phone
from workbench.alerts import list_alerts
from workbench.pool import DataPool
from workbench.refresh import refresh_status
from workbench.sensors.tables import build_tables
from workbench.simulators.phones import make_batch
from workbench.status import read_recent_yield, status_csv_path, study_status
from workbench.subject_state import Activity
from workbench.times import now_ms

HOUR = 3_600_000
DAY = 24 * HOUR
FIX = 10 * 60_000  # JTrack's location interval


@pytest.fixture
def today():
    """Today's UTC date (the study's zone), taken once so a test never straddles midnight."""
    day = dt.datetime.now(dt.UTC).date()
    if dt.datetime.now(dt.UTC).hour == 23 and dt.datetime.now(dt.UTC).minute >= 50:
        pytest.skip("too close to midnight: the days counted back would move under the test")
    return day


def midnight(today: dt.date, days_ago: int) -> int:
    day = today - dt.timedelta(days=days_ago)
    return int(dt.datetime.combine(day, dt.time(), dt.UTC).timestamp() * 1000)


def joined(client, enrollment, today, *, days_ago: int = 10) -> Phone:
    """A phone of ``enrollment``'s subject that joined the study ``days_ago`` days ago."""
    phone = Phone(client, enrollment, device=f"{enrollment.subject}-phone")
    assert phone.register(time_joined=midnight(today, days_ago)).status_code == 200
    return phone


def fixes(phone: Phone, start: int, count: int, sensor: str = "location") -> None:
    """``count`` records of ``sensor`` every 10 minutes from ``start``, in batches of 100."""
    for first in range(0, count, 100):
        n = min(100, count - first)
        records = make_batch(
            "demo", phone.subject, phone.device, sensor, start + first * FIX, n * FIX, n,
            random.Random(first),
        )  # fmt: skip
        assert phone.upload(records).status_code == 200


def day_of(phone: Phone, today: dt.date, days_ago: int, hours: int) -> None:
    """Location fixes for the first ``hours`` hours of the day ``days_ago`` days ago."""
    fixes(phone, midnight(today, days_ago), hours * 6)


def sending(phone: Phone) -> None:
    """One fix 10 minutes ago: the subject is sending (activity ok, not stale)."""
    fixes(phone, now_ms() - FIX, 1)


def low_yield_alerts(catalog, *, closed: bool = False) -> dict:
    return {
        a.subject: a
        for a in list_alerts(catalog, "demo", include_closed=closed)
        if a.kind == "low_yield"
    }


def test_the_status_table_has_the_mean_yield_of_the_last_seven_complete_days(
    home, catalog, client, subjects, today
):
    phone = joined(client, subjects[0], today)
    for days_ago in range(1, 7):
        day_of(phone, today, days_ago, 12)  # 12 valid hours: 50 %
    # 7 days ago: nothing (0 %); 8 days ago: a full day, outside the window
    day_of(phone, today, 8, 24)
    build_tables(home, "demo")
    refresh_status(home, studies=["demo"], mail=False)

    table = study_status(catalog, "demo", pool=DataPool.of(home))
    rows = {r["subject_name"]: r for r in table.iter_rows(named=True)}
    sending_one = rows[subjects[0].subject]
    assert sending_one["yield_7d_location"] == round((6 * 50 + 0) / 7, 1) == 42.9
    assert sending_one["yield_7d_accelerometer"] == 0.0  # registered, recorded nothing
    assert rows[subjects[1].subject]["yield_7d_location"] is None  # no device: no day in study

    with open(status_csv_path(DataPool.of(home), "demo"), encoding="utf-8") as saved:
        written = {r["subject_name"]: r for r in csv.DictReader(saved)}
    assert written[subjects[0].subject]["yield_7d_location"] == "42.9"
    assert written[subjects[1].subject]["yield_7d_location"] == ""


def test_a_study_without_sensor_tables_has_null_yield_and_no_yield_alert(
    home, catalog, client, subjects, today
):
    phone = joined(client, subjects[0], today)
    for days_ago in range(1, 6):
        day_of(phone, today, days_ago, 2)  # low days, but no table was ever built
    sending(phone)
    report = refresh_status(home, studies=["demo"], mail=False)
    assert report.studies == ["demo"]
    assert read_recent_yield(DataPool.of(home), "demo") is None
    table = study_status(catalog, "demo", pool=DataPool.of(home))
    assert table["yield_7d_location"].null_count() == table.height
    assert not low_yield_alerts(catalog)

    build_tables(home, "demo")  # once built, the same days are known to be low
    refresh_status(home, studies=["demo"], mail=False)
    assert subjects[0].subject in low_yield_alerts(catalog)


def test_a_yield_alert_opens_after_the_studys_low_days_and_not_one_day_sooner(
    home, catalog, client, subjects, today
):
    three, two = joined(client, subjects[0], today), joined(client, subjects[1], today)
    day_of(three, today, 4, 24)
    for days_ago in (1, 2, 3):
        day_of(three, today, days_ago, 6)  # 25 %, under the target of 50 %
    day_of(two, today, 3, 24)
    for days_ago in (1, 2):
        day_of(two, today, days_ago, 6)
    sending(three)
    sending(two)
    build_tables(home, "demo")
    refresh_status(home, studies=["demo"], mail=False)

    found = low_yield_alerts(catalog)
    assert set(found) == {three.subject}
    alert = found[three.subject]
    assert alert.since == midnight(today, 3)  # the first low day
    assert alert.device == ""  # about the subject, whatever its devices
    assert "25%" in alert.detail and "3 days in a row" in alert.detail
    assert "battery optimisation" in alert.action


def test_a_day_at_the_target_ends_the_low_days(home, catalog, client, subjects, today):
    phone = joined(client, subjects[0], today)
    day_of(phone, today, 4, 24)
    for days_ago in (2, 3):
        day_of(phone, today, days_ago, 6)
    day_of(phone, today, 1, 12)  # exactly the target (50 %) is not low
    sending(phone)
    build_tables(home, "demo")
    refresh_status(home, studies=["demo"], mail=False)
    assert not low_yield_alerts(catalog)


def test_a_yield_alert_closes_when_a_good_day_comes(home, catalog, client, subjects, today):
    phone = joined(client, subjects[0], today)
    day_of(phone, today, 5, 24)
    for days_ago in (2, 3, 4):
        day_of(phone, today, days_ago, 6)
    day_of(phone, today, 1, 20)  # yesterday: 20 valid hours, 83 %
    sending(phone)
    build_tables(home, "demo")

    # seen a day ago, the three low days were the last three complete ones
    refresh_status(home, studies=["demo"], mail=False, now=now_ms() - DAY)
    opened = low_yield_alerts(catalog)[phone.subject]
    assert opened.since == midnight(today, 4)

    refresh_status(home, studies=["demo"], mail=False)
    table = study_status(catalog, "demo", pool=DataPool.of(home))
    row = table.filter(table["subject_name"] == phone.subject).row(0, named=True)
    assert row["activity_code"] == Activity.OK  # still sending: closed by the good day
    assert phone.subject not in low_yield_alerts(catalog)
    assert low_yield_alerts(catalog, closed=True)[phone.subject].closed_at is not None


def test_no_yield_alert_for_a_subject_who_left(home, catalog, client, subjects, today):
    staying, leaving = joined(client, subjects[0], today), joined(client, subjects[1], today)
    for phone in (staying, leaving):
        day_of(phone, today, 4, 24)
        for days_ago in (1, 2, 3):
            day_of(phone, today, days_ago, 6)
        sending(phone)
    assert leaving.set_status(1, time_left=now_ms() - 60_000).status_code == 200
    build_tables(home, "demo")
    refresh_status(home, studies=["demo"], mail=False)
    assert set(low_yield_alerts(catalog)) == {staying.subject}


def test_the_heat_map_shows_mean_yield_and_each_sensors_valid_hours(
    home, catalog, client, subjects, today
):
    from workbench.dashboards import daily_yield
    from workbench.studies import get_study
    from workbench.widgets import StatusDashboard

    phone = joined(client, subjects[0], today, days_ago=3)
    day_of(phone, today, 1, 12)  # location 12 h (50 %), accelerometer nothing (0 %)
    day_of(phone, today, 2, 6)  # location 6 h (25 %)
    build_tables(home, "demo")
    refresh_status(home, studies=["demo"], mail=False)

    names = [s.subject for s in subjects]
    days = daily_yield(home, get_study(catalog, "demo"), names, days=5)
    cells = {(r["subject_name"], r["day"]): r for r in days.iter_rows(named=True)}
    assert days.height == 3 * 5  # every subject, every day: a full grid
    yesterday = cells[(phone.subject, today - dt.timedelta(days=1))]
    assert (yesterday["hours_location"], yesterday["hours_accelerometer"]) == (12, 0)
    assert yesterday["yield_pct"] == 25.0  # (50 + 0) / 2
    before = cells[(phone.subject, today - dt.timedelta(days=2))]
    assert (before["hours_location"], before["hours_accelerometer"]) == (6, 0)
    assert before["yield_pct"] == 12.5
    assert cells[(phone.subject, today - dt.timedelta(days=4))]["yield_pct"] is None  # not yet
    assert all(cells[(names[1], d)]["yield_pct"] is None for d in {d for _s, d in cells})

    page = StatusDashboard(home.home, study="demo")
    assert "Data yield by day" in page.heat_title.value
    assert page.heat in page.heat_box.children
    row = list(page.heat_map.row).index(phone.subject)
    column = list(page.heat_map.column).index(str(today - dt.timedelta(days=1)))
    hover = {"event": "hover", "data": {"rowNum": row, "columnNum": column}}  # as bqplot sends
    page._heat_hover(page.heat_map, hover)
    assert "location: 12 h" in page.heat_tip.value
    assert "accelerometer: 0 h" in page.heat_tip.value
    assert "data yield 25 %" in page.heat_tip.value
    # the table's 7-day yields, under the target: location (0 + 25 + 50) / 3, accelerometer 0
    assert page.table.value.endswith(
        "<td class='wb-yield-low'>0</td><td class='wb-yield-low'>25</td></tr></tbody></table>"
    )
