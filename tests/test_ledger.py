"""verify() finds every disagreement between ledger and files; recovery finishes crashed writes."""

from __future__ import annotations

import hashlib
import os

import orjson
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from workbench.catalog import uploads
from workbench.cli import cli
from workbench.errors import WorkbenchError
from workbench.ingest import batch_row, recover_incoming
from workbench.ledger import ledger_counts, verify
from workbench.pool import DataPool


@pytest.fixture
def stored(phone, catalog, app):
    """Three stored batches, synced as the server's background sync does; their ledger rows."""
    for _ in range(3):
        assert phone.upload().status_code == 200
    app.config["workbench.ingest"].ledger.sync()
    with catalog.engine.connect() as conn:
        return conn.execute(select(uploads).order_by(uploads.c.id)).all()


def kinds(found) -> list[str]:
    return sorted(d.kind for d in found)


def test_clean_pool_verifies(stored, home):
    assert verify(home) == []
    result = CliRunner().invoke(cli, ["--home", str(home.home), "verify"])
    assert result.exit_code == 0 and "ledger and files agree" in result.output


def test_missing_file(stored, home):
    (home.pool / stored[0].path).unlink()
    found = verify(home, settle=0)
    assert kinds(found) == ["missing"] and found[0].path == stored[0].path


def test_changed_file_is_caught_by_hash_and_size(stored, home):
    target = home.pool / stored[1].path
    data = bytearray(target.read_bytes())
    data[10] ^= 1
    target.chmod(0o640)
    target.write_bytes(bytes(data))
    assert kinds(verify(home)) == ["hash"]
    assert verify(home, check_hashes=False) == []  # same size: only the hash can tell
    target.write_bytes(bytes(data) + b" ")
    assert kinds(verify(home, check_hashes=False)) == ["size"]


def test_unrecorded_and_temporary_files(stored, home):
    folder = (home.pool / stored[0].path).parent
    (folder / "stray.json").write_text("[]")
    (folder / "half-written.tmp").write_text("[")
    assert kinds(verify(home)) == ["temporary", "unrecorded"]


def test_cli_lists_every_discrepancy_and_exits_5(stored, home):
    (home.pool / stored[0].path).unlink()
    (home.pool / stored[1].path).unlink()
    result = CliRunner().invoke(cli, ["--home", str(home.home), "verify"])
    assert result.exit_code == 5
    assert result.output.count("missing") == 2
    assert "2 discrepancies" in result.output


def test_counts(stored, catalog):
    counts = ledger_counts(catalog, "demo")
    assert counts["batches"] == 3 and counts["records"] == sum(r.n_records for r in stored)


def crashed_batch(home, phone, *, recorded: bool):
    """Leave what a server killed after the incoming write (and maybe the ledger commit) leaves."""
    from workbench.catalog import Catalog
    from workbench.ledger import insert_ignore

    records = phone.batch()
    body = orjson.dumps(records)
    sha = hashlib.sha256(body).hexdigest()
    row = batch_row(
        "demo",
        phone.subject,
        phone.device,
        "accelerometer",
        body,
        sha,
        len(records),
        records[0]["timestamp"],
        records[-1]["timestamp"],
        received=1_700_000_000_000,
    )
    pool = DataPool(home.pool)
    pool.write_incoming(body, tag=f"b{sha}")
    if recorded:
        catalog = Catalog(home.catalog_url)
        with catalog.writing() as conn:
            conn.execute(insert_ignore(catalog), row)
        catalog.dispose()
    return row, body


@pytest.mark.parametrize("recorded", [True, False], ids=["row-committed", "row-lost"])
def test_recovery_links_or_reledgers_an_interrupted_batch(phone, home, catalog, app, recorded):
    row, body = crashed_batch(home, phone, recorded=recorded)
    assert kinds(verify(home, settle=0)) == (
        ["missing", "temporary"] if recorded else ["temporary"]
    )
    with pytest.raises(WorkbenchError, match="a server on this host is writing"):
        recover_incoming(home)
    app.config["workbench.ingest"].close()  # the server stops (its lock goes); recovery runs
    done = recover_incoming(home)
    assert done["completed"] == 1 and done["reledgered"] == (0 if recorded else 1)
    with catalog.engine.connect() as conn:
        path = conn.execute(
            select(uploads.c.path).where(uploads.c.sha256 == row["sha256"])
        ).scalar_one()
    assert (home.pool / path).read_bytes() == body
    assert verify(home) == []
    assert DataPool(home.pool).incoming_files() == []
    # the phone never got its 200 and retries: the retry is a duplicate, stored once
    retry = phone.upload(body)
    assert retry.status_code == 200 and retry.json()["duplicate"] is True
    with catalog.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(uploads)).scalar_one() == 1


def test_retry_completes_a_batch_whose_link_was_lost(phone, home, catalog):
    row, body = crashed_batch(home, phone, recorded=True)
    for leftover in DataPool(home.pool).incoming_files():
        os.unlink(leftover)  # as if only the link was lost
    assert kinds(verify(home, settle=0)) == ["missing"]
    retry = phone.upload(body)
    assert retry.json()["duplicate"] is True
    assert (home.pool / row["path"]).read_bytes() == body


def test_unanswered_junk_and_cut_short_batches_are_discarded(home):
    pool = DataPool(home.pool)
    pool.write_incoming(b"[]", tag="j" + "0" * 64)
    pool.write_incoming(b'[{"studyId": "de', tag="b" + "1" * 64)  # hash does not match
    assert recover_incoming(home) == {"completed": 0, "reledgered": 0, "discarded": 2, "junk": 0}
    assert pool.incoming_files() == []


def test_complete_batch_that_no_longer_passes_goes_to_junk(home, catalog):
    body = orjson.dumps(
        [{"studyId": "../x", "username": "u", "deviceid": "d", "sensorname": "s", "timestamp": 1}]
    )
    pool = DataPool(home.pool)
    pool.write_incoming(body, tag="b" + hashlib.sha256(body).hexdigest())
    assert recover_incoming(home)["junk"] == 1
    [kept] = list((home.pool / "junk" / "recovered").iterdir())
    assert kept.read_bytes() == body
    assert verify(home) == []


def test_recovery_of_another_hosts_folder(home):
    pool = DataPool(home.pool)
    other = home.pool / ".incoming" / "old-container"
    other.mkdir(parents=True)
    (other / ("j" + "2" * 64 + "-1.0.part")).write_bytes(b"x")
    assert kinds(verify(home, settle=0)) == ["temporary"]
    assert recover_incoming(home)["discarded"] == 0  # only this host's folder by default
    assert recover_incoming(home, all_hosts=True)["discarded"] == 1
    assert pool.incoming_files(all_hosts=True) == [] and verify(home) == []


def test_link_never_overwrites(home):
    pool = DataPool(home.pool)
    first = pool.write_incoming(b"one", tag="b1")
    pool.publish(first, "studies/x/file.json")
    second = pool.write_incoming(b"two", tag="b2")
    with pytest.raises(FileExistsError):
        pool.link(second, "studies/x/file.json")
    assert (home.pool / "studies/x/file.json").read_bytes() == b"one"


def test_names_awaiting_the_background_sync_are_not_discrepancies(phone, home, app):
    for _ in range(5):
        assert phone.upload().status_code == 200
    assert verify(home) == []  # whether or not the half-second background sync has run yet
    app.config["workbench.ingest"].ledger.sync()
    assert DataPool(home.pool).incoming_files() == []
    assert verify(home) == []


def test_a_bad_row_does_not_fail_the_rows_it_shares_a_commit_with(home, catalog):
    from workbench.ledger import LedgerWriter, _Pending

    writer = LedgerWriter(catalog)
    try:
        good = [
            _Pending(batch_row("demo", "s", "d", "acc", b"x", f"{i:x}" * 64, 1, 1, 2, received=1))
            for i in range(3)
        ]
        bad = _Pending({**good[0].row, "sha256": "e" * 64, "path": "p/bad", "first_ts": 2**63})
        writer._commit([good[0], bad, good[1], good[2]])
        assert [p.row_id is not None for p in good] == [True, True, True]
        # the driver's own refusal of a 64-bit overflow: sqlite3 and psycopg word it differently
        assert bad.row_id is None
        assert isinstance(bad.error, OverflowError) or "out of range" in str(bad.error)
        assert ledger_counts(catalog)["batches"] == 3
    finally:
        writer.close()
