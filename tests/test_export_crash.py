"""The exporter killed with SIGKILL at each step; the next run converges, nothing lost,
duplicated, or deleted on the server that is not stored raw and decoded."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from sqlalchemy import select

from tests.conftest import configure
from workbench.catalog import export_deletions, export_raw, open_catalog
from workbench.decoded import combine_table, decoded_ids, source_folder
from workbench.export import rebuild_decoded
from workbench.ledger import verify
from workbench.simulators.study_server import StudyServer, demo_tables, start_in_thread

pytestmark = pytest.mark.slow


KILL_AT = Path(__file__).resolve().parent / "kill_at.py"


def export(config, fault=None):
    """`workbench export` in a process of its own, killed with SIGKILL at ``fault`` if given."""
    arguments = ["--home", str(config.home), "export"]
    command = [sys.executable, str(KILL_AT), fault, "--", *arguments] if fault else None
    return subprocess.run(
        command or [sys.executable, "-m", "workbench.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "fault", ["after-fetch", "before-record", "after-raw", "during-decode", "during-delete"]
)
def test_killed_exporter_converges(fault, home, keys, monkeypatch):
    tables, deleteable = demo_tables(keys / "public_key.pem", participants=10, days=6, seed=2)
    server = StudyServer(tables, deleteable=deleteable, user="mt", password="secret")
    original = {t: {r["id"]: dict(r) for r in rows} for t, rows in tables.items()}
    with start_in_thread(server) as running:
        config = configure(home, keys, monkeypatch, url=f'"{running.url}"', delete_mode="true")
        killed = export(config, fault)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        # nothing deleted that is not stored raw and decoded, even at the moment of the kill
        for table, rows in original.items():
            gone = set(rows) - {r["id"] for r in server.tables[table]}
            assert gone <= decoded_ids(config, "mindtrails", table), (table, gone)
        again = export(config)
        assert again.returncode == 0, again.stdout + again.stderr
    catalog = open_catalog(config)
    try:
        with catalog.engine.connect() as conn:
            raws = conn.execute(select(export_raw)).all()
            deletions = conn.execute(select(export_deletions)).all()
    finally:
        catalog.dispose()
    assert all(r.decoded_at is not None for r in raws)
    assert verify(config, settle=0) == []  # every raw snapshot recorded, no temporary left
    for table, rows in original.items():
        combined = combine_table(config, "mindtrails", table)
        assert sorted(combined["id"].to_list()) == sorted(rows), table  # nothing lost or doubled
        assert combined["participant"].str.starts_with("P").all()
        if deleteable[table]:
            assert server.tables[table] == [], table
        else:
            assert {r["id"] for r in server.tables[table]} == set(rows), table
    assert len(deletions) == sum(len(rows) for t, rows in original.items() if deleteable[t])
    folder = source_folder(config, "mindtrails") / "decoded"
    before = {p.relative_to(folder): pl.read_parquet(p) for p in sorted(folder.rglob("*.parquet"))}
    rebuild_decoded(config)
    after = {p.relative_to(folder): pl.read_parquet(p) for p in sorted(folder.rglob("*.parquet"))}
    assert before.keys() == after.keys() and all(before[k].equals(after[k]) for k in before)
