"""Safety items: scored, checked at each export, one alert per participant and session, mailed
at once without the answers, closed only by an acknowledgement with a note."""

from __future__ import annotations

import json
import logging
import re
import socket

import httpx
import polars as pl
import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, text

from tests.conftest import NOW, configure
from tests.test_alerts import smtp_server  # noqa: F401, F811  (fixture)
from workbench import alerts as alerts_module
from workbench.alerts import ack_alert, list_alerts, list_safety_alerts, mail_new_alerts
from workbench.catalog import SCHEMA_VERSION, open_catalog
from workbench.cli import cli
from workbench.config import load_config
from workbench.errors import (
    AlreadyAcknowledged,
    ConfigError,
    InstrumentMismatch,
    InvalidDefinition,
    NoteRequired,
    UnknownInstrument,
)
from workbench.export import export_source, rebuild_decoded
from workbench.instruments import instrument, score
from workbench.simulators.study_server import StudyServer, encrypt_value
from workbench.templates import TEMPLATES_DIR

PHQ9 = instrument("phq9").items  # item 9 ("suicidal") last


def answers(rest: float | None, item9: float | None) -> dict:
    return {**{c: rest for c in PHQ9[:-1]}, "suicidal": item9}


# ---------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("row", "total", "band", "safety"),
    [
        # item 9 = 3, the others 0: total 3 is "minimal", yet the safety item is positive
        (answers(0, 3), 3, "minimal", True),
        # item 9 = 1 is "several days": at the threshold
        (answers(0, 1), 1, "minimal", True),
        # item 9 blank: 8 answered, sum 8 -> 8 x 9 / 8 = 9 ("mild"), prorated; safety unknown
        (answers(1, None), 9, "mild", None),
        # item 9 = 555 (prefer not to answer): the total is prorated all the same; safety unknown
        (answers(2, 555), 18, "moderately severe", None),
        # item 9 = -1 (the other missing code), and 1.5 (not a whole answer): unknown
        (answers(0, -1), 0, "minimal", None),
        (answers(0, 1.5), 0, "minimal", None),
        # everything 0: no safety signal
        (answers(0, 0), 0, "minimal", False),
        # item 9 = 0 but the total is severe: the safety column is about item 9 only
        (answers(3, 0), 24, "severe", False),
    ],
)
def test_phq9_safety_column_hand_computed(row, total, band, safety):
    table = pl.DataFrame([row], schema={c: pl.Float64 for c in PHQ9})
    got = score(table, "phq9").row(0, named=True)
    assert (got["phq9_total"], got["phq9_band"], got["phq9_safety"]) == (total, band, safety)


def test_a_table_without_the_safety_column_is_refused_not_called_safe():
    table = pl.DataFrame({c: [0] for c in PHQ9[:-1]})  # eight items, no item 9: a PHQ-8
    with pytest.raises(InstrumentMismatch, match="suicidal"):
        score(table, "phq9")


def test_only_instruments_with_safety_items_get_the_column():
    gad7 = score(pl.DataFrame({c: [3] for c in instrument("gad7").items}), "gad7")
    assert "gad7_safety" not in gad7.columns
    phq8 = score(pl.DataFrame({c: [3] for c in instrument("phq8").items}), "phq8")
    assert "phq8_safety" not in phq8.columns  # PHQ-8 has no item 9


def test_phq9_declares_item_9_with_its_sources():
    (rule,) = instrument("phq9").safety
    assert (rule.item, rule.threshold) == ("suicidal", 1)
    assert "better off dead" in rule.label and "safety protocol" in rule.action
    cited = instrument("phq9").definition["safety"][0]["citation"]
    assert "16(9):606-613" in cited and "64(12):1195-1202" in cited


def test_a_safety_item_must_be_an_item(home):
    definition = json.loads((TEMPLATES_DIR / "instruments" / "gad7.json").read_text())
    definition["id"] = "gad7s"
    definition["safety"] = [{"item": "nope", "threshold": 1, "label": "x", "action": "y"}]
    folder = home.home / "instruments"
    folder.mkdir(exist_ok=True)
    (folder / "gad7s.json").write_text(json.dumps(definition))
    with pytest.raises(InvalidDefinition, match="safety names unknown items"):
        instrument("gad7s", config=home)


# ---------------------------------------------------------------------------- export


def phq9_row(key, pid: str, session: str, day: int, rest, item9) -> dict:
    row = {"date": f"2024-05-{day:02d}T09:30:00Z", "participantRSA": encrypt_value(key, pid)}
    return row | {"session": session} | answers(rest, item9)


@pytest.fixture
def server(keys):
    key = keys / "public_key.pem"
    rows = [
        phq9_row(key, "P0001", "PRE", 2, 0, 3),  # positive, total 3 ("minimal")
        phq9_row(key, "P0002", "PRE", 3, 2, 555),  # item 9 skipped, total prorated to 18
        phq9_row(key, "P0003", "PRE", 4, 0, 0),  # nothing to do
        phq9_row(key, "P0001", "PRE", 5, 0, 0),  # the same participant and session again
    ]
    return StudyServer({"PHQ9": rows}, deleteable={"PHQ9": True}, user="mt", password="secret")


def with_mail(home, keys, monkeypatch, port, **changes):
    path = home.home / "workbench.toml"
    body = path.read_text().replace('host = ""', 'host = "127.0.0.1"')
    body = body.replace("port = 25", f"port = {port}")
    body = body.replace("recipients = []", 'recipients = ["coordinator@lab.example"]')
    path.write_text(body)
    settings = {"instruments": '{ PHQ9 = "phq9" }', **changes}
    return configure(home, keys, monkeypatch, **settings)


def export(config, server):
    return export_source(config, "mindtrails", transport=httpx.WSGITransport(app=server.app()))


def safety_alerts(config, *, include_closed=True):
    catalog = open_catalog(config)
    try:
        found = list_alerts(catalog, include_closed=include_closed)
    finally:
        catalog.dispose()
    return [a for a in found if a.kind == "safety"]


# An answer, a total or a band: 555 is P0002's item 9, 18 its prorated total (mails only: a
# log line may hold 18 in a duration), then each item followed by a number.
ANSWER_TRACES = re.compile(
    r"555|total|\bband\b|phq9_|minimal|mild|moderate|severe|"
    + "|".join(rf"{c}\W{{0,3}}\d" for c in PHQ9)
)


def test_export_opens_one_alert_per_participant_and_session_mailed_without_answers(
    home,
    keys,
    monkeypatch,
    server,
    smtp_server,  # noqa: F811
    caplog,
):
    mailbox, port = smtp_server
    config = with_mail(home, keys, monkeypatch, port, safety_contacts='["clinician@lab.example"]')
    caplog.set_level(logging.DEBUG, logger="workbench")
    report = export(config, server)
    assert report.ok and "2 safety alert(s) opened, 2 mailed" in report.summary()

    opened = {(a.study, a.subject, a.device): a for a in safety_alerts(config)}
    assert set(opened) == {("mindtrails", "P0001", "PRE"), ("mindtrails", "P0002", "PRE")}
    positive, skipped = opened["mindtrails", "P0001", "PRE"], opened["mindtrails", "P0002", "PRE"]
    assert "better off dead" in positive.detail and "at or above" in positive.detail
    assert "not answered" in skipped.detail and "cannot be ruled out" in skipped.detail
    assert "safety protocol" in positive.action
    assert positive.since == 1714642200000  # 2024-05-02T09:30:00Z, the answer's date

    # mailed at once, one mail each, to the safety contacts only (not a digest)
    assert len(mailbox.messages) == 2
    assert all(m.rcpt_tos == ["clinician@lab.example"] for m in mailbox.messages)
    bodies = {m.content.decode() for m in mailbox.messages}
    first = next(b for b in bodies if "P0001" in b)
    for expected in (
        "mindtrails",
        "Session:      PRE",
        "Patient Health Questionnaire-9",
        "better off dead",
        "safety protocol",
        f"workbench alerts ack {positive.id} --note",
        f"SAFETY alert #{positive.id}",
    ):
        assert expected in first
    # the answers never go into a mail or a log: no item value, no total, no band
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"safety alert {positive.id} opened: source mindtrails, participant P0001" in logged
    for where in (*bodies, logged):
        assert not ANSWER_TRACES.search(where), ANSWER_TRACES.search(where)
    assert not any(re.search(r"\b18\b", body) for body in bodies)
    catalog = open_catalog(config)
    try:
        assert mail_new_alerts(catalog, config.smtp) == 0  # never again in the digest
    finally:
        catalog.dispose()

    # idempotent: a new row of the same participant and session opens nothing
    server.add_rows("PHQ9", [phq9_row(keys / "public_key.pem", "P0001", "PRE", 6, 0, 2)])
    assert export(config, server).ok
    assert len(safety_alerts(config)) == 2 and len(mailbox.messages) == 2
    # a new session does
    server.add_rows("PHQ9", [phq9_row(keys / "public_key.pem", "P0003", "POST", 7, 0, 1)])
    assert "1 safety alert(s) opened, 1 mailed" in export(config, server).summary()
    assert len(safety_alerts(config)) == 3 and len(mailbox.messages) == 3

    # acknowledged with a note: closed; a rebuild from raw re-opens nothing
    catalog = open_catalog(config)
    try:
        done = ack_alert(catalog, positive.id, by="dr-lee", note="called; safety plan made")
    finally:
        catalog.dispose()
    assert (done.acked_by, done.note) == ("dr-lee", "called; safety plan made")
    assert done.acked_at is not None and done.closed_at == done.acked_at
    rebuild_decoded(config, "mindtrails")
    after = {a.id: a for a in safety_alerts(config)}
    assert len(after) == 3 and after[positive.id].closed_at is not None
    assert len(mailbox.messages) == 3
    assert [a.id for a in safety_alerts(config, include_closed=False)] == sorted(
        a.id for a in after.values() if a.id != positive.id
    )


def test_without_safety_contacts_the_smtp_recipients_are_mailed(
    home,
    keys,
    monkeypatch,
    server,
    smtp_server,  # noqa: F811
):
    mailbox, port = smtp_server
    config = with_mail(home, keys, monkeypatch, port)
    assert export(config, server).ok
    assert len(mailbox.messages) == 2
    assert all(m.rcpt_tos == ["coordinator@lab.example"] for m in mailbox.messages)


def test_a_safety_mail_that_fails_is_sent_at_the_next_export(
    home,
    keys,
    monkeypatch,
    server,
    smtp_server,  # noqa: F811
):
    mailbox, port = smtp_server
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    config = with_mail(home, keys, monkeypatch, dead)
    report = export(config, server)
    assert "2 safety alert(s) opened, 0 mailed" in report.summary()
    assert all(a.mailed_at is None for a in safety_alerts(config))
    path = home.home / "workbench.toml"
    path.write_text(path.read_text().replace(f"port = {dead}", f"port = {port}"))
    report = export(load_config(home.home), server)  # nothing new on the server
    assert report.safety_mailed == 2 and len(mailbox.messages) == 2
    assert all(a.mailed_at is not None for a in safety_alerts(config))


def test_tables_not_mapped_to_an_instrument_open_nothing(home, keys, monkeypatch, server):
    config = configure(home, keys, monkeypatch, instruments="{}")
    assert export(config, server).ok
    assert safety_alerts(config) == []


def test_an_unknown_instrument_stops_the_export_before_it_fetches(home, keys, monkeypatch, server):
    config = configure(home, keys, monkeypatch, instruments='{ PHQ9 = "phq10" }')
    with pytest.raises(UnknownInstrument):
        export(config, server)
    assert not (config.pool / "questionnaires" / "mindtrails" / "raw").exists()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('instruments = ["phq9"]', "instruments maps tables"),
        ('instruments = { PHQ9 = "PHQ-9" }', "instruments maps tables"),
        ('safety_contacts = "clinician@lab.example"', "safety_contacts"),
        ('safety_contacts = ["clinician"]', "safety_contacts"),
    ],
)
def test_bad_safety_settings_are_clear_errors(tmp_path, entry, message):
    (tmp_path / "workbench.toml").write_text(
        f'[[sources]]\nname = "s"\nurl = "http://127.0.0.1:1"\n{entry}\n'
    )
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path)


def test_the_template_maps_the_demo_source_to_its_instruments(home):
    (source,) = home.sources
    assert source.instruments == {"PHQ9": "phq9", "GAD7": "gad7"}
    assert source.safety_contacts == ()


# ---------------------------------------------------------------------------- acknowledging


@pytest.fixture
def opened(catalog):
    found = [
        {"subject": "P0001", "session": "PRE", "since": 1, "detail": "d", "action": "call"},
        {"subject": "P0002", "session": "PRE", "since": 2, "detail": "d", "action": "call"},
    ]
    return alerts_module.open_safety_alerts(catalog, "mindtrails", found, now=10)


def test_a_safety_alert_is_closed_only_by_an_ack_with_a_note(catalog, opened):
    alert = opened[0]
    for note in (None, "", "   "):
        with pytest.raises(NoteRequired, match="note"):
            ack_alert(catalog, alert.id, by="ana", note=note)
    assert list_safety_alerts(catalog, ["mindtrails"])[0].acked_at is None
    done = ack_alert(catalog, alert.id, by="ana", note="called, safe")
    assert done.closed_at is not None and done.acked_by == "ana"
    with pytest.raises(AlreadyAcknowledged):
        ack_alert(catalog, alert.id, by="bob", note="overwrite")
    again = next(a for a in list_alerts(catalog, include_closed=True) if a.id == alert.id)
    assert (again.acked_by, again.note) == ("ana", "called, safe")
    # opening it again (a re-decode) changes nothing
    assert (
        alerts_module.open_safety_alerts(
            catalog,
            "mindtrails",
            [
                {"subject": "P0001", "session": "PRE", "since": 5, "detail": "d", "action": "a"}
            ],  # fmt: skip
        )
        == []
    )
    assert [a.id for a in list_safety_alerts(catalog, ["mindtrails"])] == [opened[1].id]


def test_cli_ack_of_a_safety_alert_requires_note(home, catalog, opened):
    runner = CliRunner()
    alert_id = str(opened[0].id)
    refused = runner.invoke(cli, ["--home", str(home.home), "alerts", "ack", alert_id])
    assert (
        refused.exit_code == 2 and "safety alert" in refused.output and "--note" in refused.output
    )
    done = runner.invoke(
        cli,
        ["--home", str(home.home), "alerts", "ack", alert_id, "--note", "called", "--by", "ana"],
    )
    assert done.exit_code == 0, done.output
    assert "acknowledged and closed by ana" in done.output


def test_safety_alerts_are_listed_first(home, catalog, opened, scenario):
    from workbench.refresh import refresh_status

    refresh_status(home, catalog=catalog, now=NOW)  # opens the scenario's status alerts (older)
    listed = list_alerts(catalog)
    assert len(listed) > 2
    assert [a.kind for a in listed[:2]] == ["safety", "safety"]
    assert all(a.kind != "safety" for a in listed[2:])
    runner = CliRunner()
    out = runner.invoke(
        cli, ["--home", str(home.home), "alerts", "--no-refresh", "--format", "json"]
    )
    assert [a["kind"] for a in json.loads(out.output)[:2]] == ["safety", "safety"]


# ---------------------------------------------------------------------------- catalog


def test_a_version_6_catalog_gains_the_safety_column_and_index(home):
    catalog = open_catalog(home)
    with catalog.writing() as conn:
        conn.execute(text("DROP INDEX ux_alerts_safety"))
        conn.execute(text("ALTER TABLE alerts DROP COLUMN action"))
        conn.execute(
            text(
                "INSERT INTO alerts (study_id, subject_id, device_id, kind, since, detail, "
                "opened_at) VALUES ('demo', 's1', 'd1', 'stale', 1, 'x', 1)"
            )
        )
        conn.execute(text("UPDATE schema_info SET value = '6' WHERE key = 'version'"))
    catalog.dispose()
    catalog = open_catalog(home)
    try:
        assert catalog.version() == SCHEMA_VERSION
        with catalog.engine.connect() as conn:
            columns = {c["name"] for c in inspect(conn).get_columns("alerts")}
            indexes = {i["name"] for i in inspect(conn).get_indexes("alerts")}
        assert "action" in columns and "ux_alerts_safety" in indexes
        assert list_alerts(catalog)[0].action == alerts_module.ACTIONS["stale"]  # kept
        from workbench.catalog import MIGRATIONS

        with catalog.writing() as conn:  # running it again changes nothing
            MIGRATIONS[7](conn)
    finally:
        catalog.dispose()


def test_alerts_of_a_questionnaire_source_can_be_listed_by_its_name(home, catalog):
    from click.testing import CliRunner

    from workbench.alerts import open_safety_alerts
    from workbench.cli import cli

    finding = {
        "subject": "P0009",
        "session": "PRE",
        "since": 1,
        "detail": "PHQ-9",
        "action": "call",
    }
    open_safety_alerts(catalog, "mindtrails", [finding])
    result = CliRunner().invoke(
        cli, ["--home", str(home.home), "alerts", "list", "mindtrails", "--no-refresh"]
    )
    assert result.exit_code == 0 and "P0009" in result.output
    unknown = CliRunner().invoke(cli, ["--home", str(home.home), "alerts", "list", "nosuch"])
    assert unknown.exit_code == 4 and "no study 'nosuch'" in unknown.output
