"""The catalog: SQLite in WAL mode, a schema version, upgrades on open."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from workbench import catalog as catalog_module
from workbench.catalog import SCHEMA_VERSION, Catalog, open_catalog
from workbench.errors import CatalogError


def test_sqlite_runs_in_wal_mode(home):
    catalog = open_catalog(home)
    with catalog.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    assert catalog.version() == SCHEMA_VERSION


def test_upgrade_applies_each_missing_migration_once(home, monkeypatch):
    open_catalog(home).dispose()
    applied = []

    def add_notes(conn):
        applied.append(SCHEMA_VERSION + 1)
        conn.execute(text("ALTER TABLE studies ADD COLUMN notes TEXT"))

    monkeypatch.setattr(catalog_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(catalog_module.MIGRATIONS, SCHEMA_VERSION + 1, add_notes)
    catalog = Catalog(home.catalog_url)
    assert catalog.upgrade() == SCHEMA_VERSION + 1
    assert catalog.upgrade() == SCHEMA_VERSION + 1
    assert applied == [SCHEMA_VERSION + 1]
    assert catalog.version() == SCHEMA_VERSION + 1
    with catalog.engine.connect() as conn:
        conn.execute(text("SELECT notes FROM studies"))


def test_a_newer_catalog_is_refused(home):
    catalog = open_catalog(home)
    with catalog.engine.begin() as conn:
        conn.execute(text("UPDATE schema_info SET value = '999' WHERE key = 'version'"))
    with pytest.raises(CatalogError, match="newer than this workbench"):
        Catalog(home.catalog_url).upgrade()


def test_bad_url_is_a_catalog_error():
    with pytest.raises(CatalogError):
        Catalog("not a url")


def test_sync_makes_commits_durable_without_dropping_locks(home):
    catalog = open_catalog(home)
    with catalog.writing() as conn:  # durable: syncs on exit
        conn.execute(text("INSERT INTO schema_info (key, value) VALUES ('probe', 'x')"))
    with catalog.engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM schema_info WHERE key = 'synced_at'")).scalar()
    # every pooled connection, the one sync used among them, is back to NORMAL (1), not FULL
    pooled = [catalog.engine.connect() for _ in range(catalog.engine.pool.checkedin())]
    assert pooled and all(c.execute(text("PRAGMA synchronous")).scalar() == 1 for c in pooled)
    for c in pooled:
        c.close()


def test_a_version_1_catalog_gains_the_status_tables(home):
    catalog = open_catalog(home)
    with catalog.writing() as conn:
        for table in ("alerts", "status_history", "status_current", "status_sensors", "state"):
            conn.execute(text(f"DROP TABLE {table}"))
        conn.execute(text("UPDATE schema_info SET value = '1' WHERE key = 'version'"))
    catalog.dispose()
    catalog = open_catalog(home)
    assert catalog.version() == SCHEMA_VERSION
    with catalog.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM status_sensors")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM alerts")).scalar() == 0
    catalog.dispose()


def test_a_named_lock_holds_across_processes(home):
    import subprocess
    import sys

    probe = (
        "import sys; from workbench.catalog import Catalog\n"
        "with Catalog(sys.argv[1]).lock('sync.run-1', blocking=False) as taken:\n"
        "    print(taken)\n"
    )

    def taken_elsewhere() -> str:
        done = subprocess.run(
            [sys.executable, "-c", probe, home.catalog_url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    catalog = open_catalog(home)
    try:
        with catalog.lock("sync.run-1") as taken:
            assert taken
            assert taken_elsewhere() == "False"  # another process must not run alongside
        assert taken_elsewhere() == "True"  # released when the block ends
    finally:
        catalog.dispose()
