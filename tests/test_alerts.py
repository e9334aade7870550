"""Alerts: open on a condition, mail once, close when it ends, acknowledged by a person."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import DAY, HOUR, LAG, NOW, T0
from workbench.alerts import ack_alert, list_alerts, mail_new_alerts
from workbench.config import load_config
from workbench.errors import MailError, UnknownAlert
from workbench.refresh import refresh_status

pytest.importorskip("aiosmtpd")


def kinds(catalog):
    return sorted((a.subject, a.device, a.kind) for a in list_alerts(catalog, "demo"))


def test_each_kind_opens_with_since_and_action(catalog, scenario, people, home):
    report = refresh_status(home, catalog=catalog, now=NOW)
    a, b, c, d, e, f, g = (p.subject for p in people)
    assert kinds(catalog) == sorted(
        [
            (a, "a1", "low_completeness"),  # accelerometer at 50 % < 80 %
            (b, "b1", "stale"),
            (b, "b1", "low_completeness"),
            (e, "e1", "over_not_left"),
            (e, "e1", "low_completeness"),  # one batch in 15 days
            (f, "", "several_devices"),
            (f, "f1", "low_completeness"),  # an active phone that sends nothing counts too
            (f, "f2", "low_completeness"),
            (g, "", "never_sent"),
        ]
    )
    assert report.opened == 9 and report.closed == 0
    by_kind = {(x.subject, x.kind): x for x in list_alerts(catalog, "demo")}
    assert by_kind[(b, "stale")].since == T0 + 72 * HOUR - LAG
    assert "no data from b1" in by_kind[(b, "stale")].detail
    assert by_kind[(e, "over_not_left")].since == T0 + 9 * DAY
    assert by_kind[(g, "never_sent")].since == T0 - DAY
    assert "f1, f2" in by_kind[(f, "several_devices")].detail
    assert "accelerometer 50%" in by_kind[(a, "low_completeness")].detail
    assert all(x.action for x in by_kind.values())


def test_alert_closes_when_data_resumes_and_is_not_reopened_twice(catalog, scenario, people, home):
    b = people[1].subject
    refresh_status(home, catalog=catalog, now=NOW)
    refresh_status(home, catalog=catalog, now=NOW + HOUR)
    stale = [x for x in list_alerts(catalog, "demo") if x.kind == "stale"]
    assert len(stale) == 1  # a second refresh opens nothing new
    scenario.batches(b, "b1", "accelerometer", [NOW + 2 * HOUR])
    report = refresh_status(home, catalog=catalog, now=NOW + 3 * HOUR)
    assert report.closed >= 1
    assert not [x for x in list_alerts(catalog, "demo") if x.kind == "stale"]
    closed = [x for x in list_alerts(catalog, "demo", include_closed=True) if x.kind == "stale"]
    assert len(closed) == 1 and closed[0].closed_at == NOW + 3 * HOUR


def test_ack_records_who_and_why(catalog, scenario, home):
    refresh_status(home, catalog=catalog, now=NOW)
    first = list_alerts(catalog, "demo")[0]
    done = ack_alert(catalog, first.id, by="ana", note="called the subject")
    assert (done.acked_by, done.note) == ("ana", "called the subject")
    assert done.acked_at is not None and done.is_open
    with pytest.raises(UnknownAlert):
        ack_alert(catalog, 99999, by="ana")


class Mailbox:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope)
        return "250 OK"


@pytest.fixture
def smtp_server():
    from aiosmtpd.controller import Controller

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield mailbox, port
    controller.stop()


def with_smtp(home, port):
    path = home.home / "workbench.toml"
    text = path.read_text().replace('host = ""', 'host = "127.0.0.1"')
    text = text.replace("port = 25", f"port = {port}")
    text = text.replace("recipients = []", 'recipients = ["coordinator@lab.example"]')
    path.write_text(text)
    return load_config(home.home)


def test_alerts_are_mailed_once_when_they_open(catalog, scenario, people, home, smtp_server):
    mailbox, port = smtp_server
    config = with_smtp(home, port)
    assert config.smtp is not None and config.smtp.port == port
    first = refresh_status(config, catalog=catalog, now=NOW)
    assert first.mailed == 9 and len(mailbox.messages) == 1
    message = mailbox.messages[0]
    assert message.rcpt_tos == ["coordinator@lab.example"]
    body = message.content.decode()
    assert "9 new alert(s)" in body and "stale" in body and "to do:" in body
    refresh_status(config, catalog=catalog, now=NOW + HOUR)
    assert len(mailbox.messages) == 1  # nothing new: no mail
    # a new condition: subject a's phone goes silent
    later = NOW + 3 * DAY
    refresh_status(config, catalog=catalog, now=later)
    assert len(mailbox.messages) == 2
    second = mailbox.messages[1].content.decode()
    assert "stale" in second and people[0].subject in second
    assert people[1].subject + " / b1: stale" not in second  # mailed before


def test_a_failed_mail_is_retried_at_the_next_refresh(catalog, scenario, home, smtp_server):
    mailbox, port = smtp_server
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    config = with_smtp(home, dead)
    report = refresh_status(config, catalog=catalog, now=NOW)
    assert report.mailed == 0 and "cannot mail" in report.mail_error
    with pytest.raises(MailError):
        mail_new_alerts(catalog, config.smtp, now=NOW)
    path = home.home / "workbench.toml"
    path.write_text(path.read_text().replace(f"port = {dead}", f"port = {port}"))
    report = refresh_status(load_config(home.home), catalog=catalog, now=NOW + HOUR)
    assert report.mailed == 9 and len(mailbox.messages) == 1
