"""The device simulator against a real gunicorn server."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from workbench.catalog import devices, rejections, uploads
from workbench.ledger import verify
from workbench.simulators.phones import simulate

pytestmark = pytest.mark.slow


def test_simulation_fills_the_pool(home, catalog, server):
    report = simulate(home, "demo", subjects=8, days=2, url=server.url, batches_per_day=6, seed=3)
    assert report.failed == 0, report.errors[:3]
    assert report.stored > 0 and report.duplicates > 0
    assert report.fates["leaves"] >= 1 and report.fates["silent"] >= 1
    with catalog.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(uploads)).scalar_one() == report.stored
        assert conn.execute(select(func.count()).select_from(rejections)).scalar_one() == 0
        left = conn.execute(
            select(func.count()).select_from(devices).where(devices.c.status == 1)
        ).scalar_one()
        sensors = set(conn.execute(select(uploads.c.sensor).distinct()).scalars())
    assert left == report.fates["leaves"]
    assert sensors == {"accelerometer", "location"}
    assert verify(home) == []
    assert "stored" in report.summary()


def test_simulate_command_needs_a_running_server(home, study):
    from click.testing import CliRunner

    from workbench.cli import cli

    result = CliRunner().invoke(
        cli,
        [
            "--home",
            str(home.home),
            "simulate",
            "demo",
            "--subjects",
            "1",
            "--days",
            "1",
            "--url",
            "http://127.0.0.1:9",
        ],
    )
    assert (
        result.exit_code == 1 and "no upload server answers at http://127.0.0.1:9" in result.output
    )
