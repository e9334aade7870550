"""Tiered logging: debug, daily, error and critical files; critical events mailed."""

from __future__ import annotations

import logging
import logging.handlers
import socket

import pytest

from tests.test_alerts import smtp_server, with_smtp  # noqa: F401  (fixture)
from workbench.logs import KEEP, close_logging, setup_logging


@pytest.fixture
def logger(home):
    yield setup_logging(home)
    close_logging()


def read(home, name):
    return (home.pool / "logs" / name).read_text()


def test_each_tier_gets_its_levels(home, logger):
    child = logger.getChild("export")
    child.debug("a debug line")
    child.info("an info line")
    child.warning("a warning line")
    child.critical("a critical line")
    for handler in logger.handlers:
        handler.flush()
    assert all(m in read(home, "debug.log") for m in ("debug line", "info line", "critical line"))
    daily = read(home, "daily.log")
    assert "info line" in daily and "debug line" not in daily
    error = read(home, "error.log")
    assert "warning line" in error and "info line" not in error and "critical line" in error
    critical = read(home, "critical.log")
    assert "critical line" in critical and "warning line" not in critical
    assert "CRITICAL workbench.export: a critical line" in critical


def test_files_rotate_at_midnight_and_keep_366(home, logger):
    files = [h for h in logger.handlers if isinstance(h, logging.handlers.TimedRotatingFileHandler)]
    assert len(files) == 4
    assert all(h.when == "MIDNIGHT" and h.backupCount == KEEP == 366 and h.utc for h in files)


def test_setting_up_twice_adds_nothing(home, logger):
    before = len(logger.handlers)
    setup_logging(home)
    assert len(logger.handlers) == before


def test_critical_events_are_mailed(home, smtp_server):  # noqa: F811
    mailbox, port = smtp_server
    config = with_smtp(home, port)
    logger = setup_logging(config)
    try:
        logger.getChild("export").critical("sensitive data found on server")
        logger.getChild("export").error("only an error")
    finally:
        close_logging()
    assert len(mailbox.messages) == 1
    assert "sensitive data found on server" in mailbox.messages[0].content.decode()


def test_a_mail_that_fails_is_logged_not_raised(home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    config = with_smtp(home, dead)
    logger = setup_logging(config)
    try:
        logger.critical("source down")
        for handler in logger.handlers:
            handler.flush()
        assert "could not mail a critical event" in read(home, "error.log")
    finally:
        close_logging()
