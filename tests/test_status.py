"""Study status: hand-computed cases, incremental refresh, history, atomic CSV."""

from __future__ import annotations

import random
import threading

import polars as pl
from sqlalchemy import update

from tests.conftest import DAY, HOUR, LAG, NOW, T0, Scenario
from workbench.pool import DataPool
from workbench.refresh import refresh_status
from workbench.status import (
    fold_new_uploads,
    jtrack_columns,
    rebuild_aggregates,
    status_csv_path,
    status_history_table,
    study_status,
)
from workbench.subject_state import Activity
from workbench.writers import render


def row(table, subject, device=None):
    found = table.filter(
        (pl.col("subject_name") == subject)
        & (pl.col("device_id").is_null() if device is None else pl.col("device_id") == device)
    )
    assert found.height == 1, found
    return found.row(0, named=True)


def refreshed(catalog, study="demo", **options):
    """The status table after the new uploads are folded in, as a refresh computes it."""
    fold_new_uploads(catalog)
    return study_status(catalog, study, **options)


def ms(value):
    return None if value is None else int(value.timestamp() * 1000)


def test_columns_start_with_jtracks_in_order(catalog, scenario):
    table = refreshed(catalog, now=NOW)
    expected = jtrack_columns(["accelerometer", "location"])
    assert table.columns[: len(expected)] == expected
    assert expected[:7] == [
        "app",
        "subject_name",
        "device_id",
        "date_registered",
        "date_left_study",
        "time_in_study",
        "status_code",
    ]
    assert table.height == 8  # f has two rows, g one without a device


def test_sending_subject(catalog, scenario, people):
    r = row(refreshed(catalog, now=NOW), people[0].subject, "a1")
    assert r["activity_code"] == Activity.OK and r["activity"] == "ok"
    assert r["time_in_study"] == 10.0
    assert r["accelerometer_n_batches"] == 120 and r["location_n_batches"] == 240
    assert r["accelerometer_completeness"] == 50.0  # 120 of 24 x 10
    assert r["location_completeness"] == 100.0
    assert ms(r["accelerometer_last_time_received"]) == NOW - HOUR
    assert ms(r["accelerometer_last_sample"]) == NOW - HOUR - LAG  # from the data
    assert ms(r["last_data"]) == NOW - HOUR - LAG  # the newest sample of any sensor
    assert r["hours_since_last_data"] == 1.2
    assert ms(r["date_registered"]) == T0 and r["date_left_study"] is None


def test_silent_subject(catalog, scenario, people):
    r = row(refreshed(catalog, now=NOW), people[1].subject, "b1")
    assert r["activity_code"] == Activity.NO_DATA
    assert ms(r["last_data"]) == T0 + 72 * HOUR - LAG
    assert r["hours_since_last_data"] == 7 * 24.0 + 0.2
    # silent since the last sample plus the 48 h threshold
    assert ms(r["activity_since"]) == T0 + 72 * HOUR - LAG + 48 * HOUR
    assert r["accelerometer_completeness"] == 30.0  # 72 of 240
    assert r["location_n_batches"] == 0 and r["location_completeness"] == 0.0


def test_left_early_subject(catalog, scenario, people):
    r = row(refreshed(catalog, now=NOW), people[2].subject, "c1")
    assert r["activity_code"] == Activity.LEFT_EARLY and r["status_code"] == 1
    assert ms(r["date_left_study"]) == T0 + 5 * DAY
    assert r["time_in_study"] == 5.0
    assert r["location_completeness"] == 100.0  # 120 of 24 x 5 days in study


def test_completed_subject(catalog, scenario, people):
    r = row(refreshed(catalog, now=NOW), people[3].subject, "d1")
    assert r["activity_code"] == Activity.COMPLETED
    assert r["time_in_study"] == round(14 + 1 / 24, 2)
    assert r["accelerometer_completeness"] == 0.0  # expected over the 14 days of the study


def test_duration_over_not_left(catalog, scenario, people):
    r = row(refreshed(catalog, now=NOW), people[4].subject, "e1")
    assert r["activity_code"] == Activity.OVER_NOT_LEFT
    assert ms(r["activity_since"]) == T0 - 5 * DAY + 14 * DAY
    assert r["time_in_study"] == 15.0


def test_several_devices(catalog, scenario, people):
    table = refreshed(catalog, now=NOW)
    for device in ("f1", "f2"):
        r = row(table, people[5].subject, device)
        assert r["activity_code"] == Activity.SEVERAL_DEVICES
        assert ms(r["activity_since"]) == T0 + 2 * DAY  # when the second phone came


def test_never_registered(catalog, scenario, people):
    r = row(refreshed(catalog, now=NOW), people[6].subject)
    assert r["app"] is None and r["time_in_study"] is None
    assert r["activity_code"] == Activity.NO_DATA
    assert ms(r["activity_since"]) == T0 - DAY + 48 * HOUR


def test_stale_threshold_is_the_studys(catalog, scenario, people):
    from workbench.catalog import studies

    with catalog.writing() as conn:
        definition = conn.execute(studies.select()).one().definition
        conn.execute(
            update(studies).values(
                definition=definition.replace('"staleness_hours": 48', '"staleness_hours": 200'),
                revision=studies.c.revision + 1,
            )
        )
    r = row(refreshed(catalog, now=NOW), people[1].subject, "b1")
    assert r["activity_code"] == Activity.OK  # 168 h silent, under 200


def test_refresh_after_new_uploads_equals_full_recomputation(catalog, study, people, home):
    s = Scenario(catalog, people)
    rng = random.Random(7)
    for i, p in enumerate(people):
        s.device(p.subject, f"d{i}", registered=T0 + rng.randrange(DAY))
    for step in range(5):
        for _ in range(40):
            i = rng.randrange(len(people))
            s.batches(
                people[i].subject,
                f"d{i}",
                rng.choice(["accelerometer", "location"]),
                [T0 + step * DAY + rng.randrange(DAY)],
            )
        now = T0 + (step + 1) * DAY
        refresh_status(home, catalog=catalog, now=now, mail=False)
        incremental = study_status(catalog, "demo", now=now)
        full = study_status(catalog, "demo", now=now, from_ledger=True)
        assert incremental.equals(full), step
        assert incremental["accelerometer_n_batches"].sum() + incremental[
            "location_n_batches"
        ].sum() == 40 * (step + 1)
    assert rebuild_aggregates(catalog, workers=3) == 200  # three ranges of subjects
    assert study_status(catalog, "demo", now=now).equals(full)


def test_refresh_reads_only_new_ledger_rows(catalog, scenario, home):
    first = refresh_status(home, catalog=catalog, now=NOW)
    assert first.folded == 120 + 240 + 72 + 120 + 1 + 1
    assert refresh_status(home, catalog=catalog, now=NOW).folded == 0
    scenario.batches(list(scenario.people)[0], "a1", "location", [NOW])
    assert refresh_status(home, catalog=catalog, now=NOW).folded == 1


def test_history_says_when_a_subject_went_silent_and_came_back(catalog, scenario, people, home):
    b = people[1].subject
    refresh_status(home, catalog=catalog, now=T0 + 4 * DAY)  # b still sending recently
    refresh_status(home, catalog=catalog, now=NOW)  # b silent
    scenario.batches(b, "b1", "accelerometer", [NOW + HOUR])
    refresh_status(home, catalog=catalog, now=NOW + 2 * HOUR)
    history = status_history_table(catalog, "demo", subject=b)
    assert history["to_code"].to_list() == [Activity.OK, Activity.NO_DATA, Activity.OK]
    assert history["from_code"].to_list() == [None, Activity.OK, Activity.NO_DATA]
    went_silent = history.row(1, named=True)
    assert ms(went_silent["at"]) == T0 + 72 * HOUR - LAG + 48 * HOUR
    assert ms(went_silent["noticed_at"]) == NOW
    assert ms(history.row(2, named=True)["at"]) == NOW + HOUR - LAG


def test_refresh_writes_the_csv_in_jtracks_column_order(catalog, scenario, home):
    refresh_status(home, catalog=catalog, now=NOW)
    path = status_csv_path(DataPool(home.pool), "demo")
    table = pl.read_csv(path)
    assert table.columns[:11] == jtrack_columns(["accelerometer", "location"])
    assert table.height == 8
    assert not list(path.parent.glob(".*tmp"))


def test_a_reader_never_sees_a_partial_csv(catalog, study, home):
    from workbench.enrollment import enroll

    many = enroll(catalog, "demo", 300)
    s = Scenario(catalog, many)
    for i, p in enumerate(many):
        s.device(p.subject, f"d{i}")
    path = status_csv_path(DataPool(home.pool), "demo")
    refresh_status(home, catalog=catalog, now=NOW)
    expected = path.read_bytes().count(b"\n")
    stop = threading.Event()
    seen = []

    def read():
        while not stop.is_set():
            data = path.read_bytes()
            seen.append((data.count(b"\n"), data.endswith(b"\n")))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for k in range(15):
            refresh_status(home, catalog=catalog, now=NOW + k * HOUR)
    finally:
        stop.set()
        reader.join()
    assert len(seen) > 10
    assert all(lines == expected and complete for lines, complete in seen)


def test_status_through_the_upload_server(client, catalog, subjects, home):
    from tests.conftest import Phone

    phone = Phone(client, subjects[0])
    phone.register()
    from workbench.times import now_ms

    recent = now_ms() - HOUR
    assert phone.upload(phone.batch("accelerometer", start=recent)).status_code == 200
    assert phone.upload(phone.batch("location", n=5, start=recent)).status_code == 200
    table = refreshed(catalog)
    r = row(table, subjects[0].subject, phone.device)
    assert r["accelerometer_n_batches"] == 1 and r["location_n_batches"] == 1
    assert r["activity_code"] == Activity.OK
    assert 0.9 < r["hours_since_last_data"] < 1.1


def cli_run(home, *args):
    from click.testing import CliRunner

    from workbench.cli import cli

    result = CliRunner().invoke(cli, ["--home", str(home.home), *args])
    return result


def test_cli_status_formats(home, scenario, people, tmp_path):
    table = cli_run(home, "status", "demo")
    assert table.exit_code == 0, table.output
    assert "| subject" in table.output and people[6].subject in table.output
    assert "accelerometer %" in table.output
    csv = cli_run(home, "status", "demo", "--format", "csv")
    assert csv.output.splitlines()[0].startswith(
        "app,subject_name,device_id,date_registered,date_left_study,time_in_study,status_code,"
        "accelerometer_n_batches,accelerometer_last_time_received"
    )
    import json

    rows = json.loads(cli_run(home, "status", "demo", "--format", "json").output)
    assert len(rows) == 8 and {"activity_code", "hours_since_last_data"} <= set(rows[0])
    out = tmp_path / "all.parquet"
    done = cli_run(home, "status", "--all", "--format", "parquet", "--out", str(out))
    assert done.exit_code == 0, done.output
    assert pl.read_parquet(out)["study"].unique().to_list() == ["demo"]
    assert cli_run(home, "status", "--format", "parquet", "demo").exit_code == 2
    assert cli_run(home, "status").exit_code == 2
    missing = cli_run(home, "status", "nope")
    assert missing.exit_code == 4 and "no study 'nope'" in missing.output


def test_cli_status_history(home, scenario, people):
    cli_run(home, "status", "demo")
    shown = cli_run(home, "status", "demo", "--history", "--subject", people[1].subject)
    assert shown.exit_code == 0, shown.output
    # the CLI sees the scenario years later: every phone's 14 days are over
    assert "duration over, not left" in shown.output and people[1].subject in shown.output
    assert people[0].subject not in shown.output


def test_cli_refresh_and_alerts(home, scenario, people):
    done = cli_run(home, "refresh")
    assert done.exit_code == 0 and "alerts:" in done.output, done.output
    listed = cli_run(home, "alerts", "demo", "--format", "json")
    import json

    items = json.loads(listed.output)
    assert {"never_sent", "several_devices"} <= {i["kind"] for i in items}
    assert all(i["action"] and i["since"] for i in items)
    first = items[0]["id"]
    acked = cli_run(home, "alerts", "ack", str(first), "--note", "called", "--by", "ana")
    assert acked.exit_code == 0 and "acknowledged by ana" in acked.output
    again = json.loads(cli_run(home, "alerts", "list", "--format", "json").output)
    assert [i["note"] for i in again if i["id"] == first] == ["called"]
    assert "| id" in cli_run(home, "alerts").output
    assert cli_run(home, "alerts", "ack", "424242").exit_code == 4


def test_refreshes_keep_the_csv_equal_to_a_full_recomputation(catalog, study, people, home):
    """Each refresh reuses the sums the previous one cached and re-reads only the sources
    that changed; the CSV must still equal a computation from the whole ledger."""
    pool = DataPool(home.pool)
    s = Scenario(catalog, people)
    rng = random.Random(11)
    for i, p in enumerate(people):
        s.device(p.subject, f"d{i}", registered=T0)
    path = status_csv_path(pool, "demo")
    for step in range(8):
        for _ in range(rng.randrange(0, 30)):
            i = rng.randrange(len(people))
            sensor = rng.choice(["accelerometer", "location"])
            s.batches(people[i].subject, f"d{i}", sensor, [T0 + step * DAY + rng.randrange(DAY)])
        if step == 4:
            rebuild_aggregates(catalog)  # a new generation: the cached sums are not reused
        if step == 6:
            for cached in (pool.cache / "status").glob("*.parquet"):
                cached.write_bytes(b"damaged")
        now = T0 + (step + 1) * DAY
        refresh_status(home, catalog=catalog, now=now)
        full = study_status(catalog, "demo", now=now, from_ledger=True)
        assert pl.read_csv(path.read_bytes()).equals(pl.read_csv(render(full, "csv"))), step
        assert len(list((pool.cache / "status").glob("demo@*.parquet"))) == 1


# ---------------------------------------------------------------------------- completeness per app


def _add_ema_sensor(catalog) -> None:
    from workbench.catalog import studies

    with catalog.writing() as conn:
        definition = conn.execute(studies.select()).one().definition
        conn.execute(
            studies.update().values(
                definition=definition.replace(
                    '"location": {', '"ema": {"batches_per_day": 24}, "location": {'
                ),
                revision=studies.c.revision + 1,
            )
        )


def test_each_app_counts_only_its_sensors_and_a_full_subject_gets_no_alert(catalog, study, people):
    from workbench.alerts import alert_conditions
    from workbench.studies import get_study

    _add_ema_sensor(catalog)
    s = Scenario(catalog, people[:1])
    subject = people[0].subject
    s.device(subject, "phone", registered=T0)
    s.device(subject, "ema-app", registered=T0, app="ema")
    hours = [T0 + LAG + i * HOUR for i in range(1, 241)]  # 24 a day for ten days: 100 %
    for sensor in ("accelerometer", "location"):
        s.batches(subject, "phone", sensor, hours)
    s.batches(subject, "ema-app", "ema", hours)
    table = refreshed(catalog, now=NOW + LAG)
    rows = {r["app"]: r for r in table.iter_rows(named=True)}
    assert rows["main"]["accelerometer_completeness"] == rows["main"]["location_completeness"]
    assert rows["main"]["location_completeness"] == 100.0
    assert rows["main"]["ema_completeness"] is None  # the main app does not record ema
    assert rows["ema"]["ema_completeness"] == 100.0
    assert rows["ema"]["accelerometer_completeness"] is None  # nor the EMA app sensors
    found = alert_conditions(get_study(catalog, "demo"), table, now=NOW + LAG)
    assert not [key for key in found if key[2] == "low_completeness"]


def test_completeness_of_a_subject_who_left_never_passes_100(catalog, study, people):
    s = Scenario(catalog, people[:1])
    subject = people[0].subject
    # left after a day and a half; the phone sent the batch it was filling when it left
    s.device(subject, "x1", registered=T0, status=1, time_left=T0 + 36 * HOUR)
    s.batches(subject, "x1", "location", [T0 + (i + 1) * HOUR for i in range(37)])
    s.batches(subject, "x1", "accelerometer", [T0 + (i + 1) * HOUR for i in range(40)])
    row = refreshed(catalog, now=NOW).row(0, named=True)
    assert row["location_completeness"] == 100.0  # 37 of ceil(36): not 102.8 %
    assert row["accelerometer_completeness"] == 100.0  # 40 of 36: capped


def test_an_active_device_is_due_only_its_full_batches(catalog, study, people):
    s = Scenario(catalog, people[:1])
    subject = people[0].subject
    s.device(subject, "x1", registered=T0)
    s.batches(subject, "x1", "location", [T0 + (i + 1) * HOUR for i in range(30)])
    # 30.5 hours in: 30 full hourly batches are due
    row = refreshed(catalog, now=T0 + 30 * HOUR + HOUR // 2).row(0, named=True)
    assert row["location_completeness"] == 100.0


# ---------------------------------------------------------------------------- reads never write


def _watermark(catalog):
    from sqlalchemy import select

    from workbench.catalog import state, status_history, status_sensors

    with catalog.engine.connect() as conn:
        return (
            conn.execute(
                select(state.c.value).where(state.c.key == "status.last_upload_id")
            ).scalar(),
            conn.execute(select(status_sensors.c.n_batches)).scalars().all(),
            len(conn.execute(select(status_history.c.id)).all()),
        )


def test_reads_after_new_uploads_move_neither_the_watermark_nor_the_aggregates(
    catalog, scenario, people, home
):
    from workbench.dashboards import status_view
    from workbench.reports import attrition

    refresh_status(home, catalog=catalog, now=NOW, mail=False)
    scenario.batches(people[1].subject, "b1", "accelerometer", [NOW + HOUR])
    before = _watermark(catalog)
    shown = status_view(home, "demo", catalog=catalog, now=NOW + 2 * HOUR)
    attrition(home, "demo", now=NOW + 2 * HOUR)
    study_status(catalog, "demo", now=NOW + 2 * HOUR)
    assert _watermark(catalog) == before
    # the views show what the refresh produced: b is still silent until the next refresh
    assert row(shown.table, people[1].subject, "b1")["activity_code"] == Activity.NO_DATA
    refresh_status(home, catalog=catalog, now=NOW + 2 * HOUR, mail=False)
    assert _watermark(catalog)[0] > before[0]
    again = status_view(home, "demo", catalog=catalog, now=NOW + 2 * HOUR)
    assert row(again.table, people[1].subject, "b1")["activity_code"] == Activity.OK
