"""The sanity check finds damaged, altered and unrecorded batch files, and only reads new ones."""

from __future__ import annotations

import hashlib
import json
import shutil

import orjson
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from tests.conftest import Phone
from workbench import sanity as sanity_module
from workbench.catalog import uploads
from workbench.cli import cli
from workbench.enrollment import enroll
from workbench.sanity import check_files, sanity_check
from workbench.studies import create_study, definition_from_options


@pytest.fixture
def stored(client, subjects, catalog, home):
    """Six batches stored through the upload server; their ledger rows."""
    phone = Phone(client, subjects[0])
    phone.register()
    for _ in range(6):
        assert phone.upload().status_code == 200
    with catalog.engine.connect() as conn:
        return conn.execute(select(uploads).order_by(uploads.c.id)).all()


def test_sound_files_pass_and_the_report_is_empty(home, catalog, stored):
    report = sanity_check(home, catalog=catalog, settle=0)
    assert report.checked == 6 and report.ok
    assert json.loads(report.report_json.read_text())["failed"] == 0


def test_finds_damaged_altered_and_unrecorded_files(home, catalog, stored):
    pool = home.pool
    truncated = pool / stored[0].path
    truncated.write_bytes(truncated.read_bytes()[:-40])
    altered = pool / stored[1].path
    body = bytearray(altered.read_bytes())
    body[body.index(b'"x":') + 4] ^= 1  # one digit changed, same size
    altered.write_bytes(bytes(body))
    stray = (pool / stored[2].path).with_name("copied-by-hand.json")
    shutil.copy(pool / stored[2].path, stray)
    missing = pool / stored[3].path
    missing.unlink()

    report = sanity_check(home, catalog=catalog, full=True)
    reasons = {f.path: f.reason for f in report.failures}
    assert reasons[stored[0].path].startswith("size:")
    assert reasons[stored[1].path].startswith("hash:")
    assert reasons[str(stray.relative_to(pool))].startswith("unrecorded:")
    assert reasons[stored[3].path].startswith("missing:")
    assert len(report.failures) == 4 and report.checked == 6
    written = json.loads(report.report_json.read_text())
    assert written["failed"] == 4
    assert {f["path"] for f in written["failures"]} == set(reasons)
    assert report.report_csv.read_text().count("\n") == 5  # header and four rows


def test_only_new_files_are_checked_unless_full(home, catalog, stored, client, subjects):
    # uploads of the last minute wait: their files may be a moment from being linked
    assert sanity_check(home, catalog=catalog).checked == 0
    assert sanity_check(home, catalog=catalog, settle=0).checked == 6
    assert sanity_check(home, catalog=catalog, settle=0).checked == 0
    phone = Phone(client, subjects[0])
    phone.sent = 100
    assert phone.upload().status_code == 200
    assert sanity_check(home, catalog=catalog, settle=0).checked == 1
    assert sanity_check(home, catalog=catalog, full=True).checked == 7


def _row(path, body, *, n=2, span=(1000, 2000), ids=("demo", "demo_00001", "d1", "accelerometer")):
    return (1, path, len(body), hashlib.sha256(body).hexdigest(), n, *span, *ids)


def _records(n=2, **change):
    out = []
    for i in range(n):
        record = {
            "studyId": "demo",
            "username": "demo_00001",
            "deviceid": "d1",
            "sensorname": "accelerometer",
            "timestamp": 1000 * (i + 1),
            "x": 0.1,
            "y": 0.2,
            "z": 9.81,
        }
        if i == n - 1:
            record.update(change)
        out.append(record)
    return out


@pytest.mark.parametrize(
    ("body", "row_changes", "reason"),
    [
        (b"[{]", {}, "schema: the body is not valid JSON"),
        (orjson.dumps(_records(timestamp="soon")), {}, "schema:"),
        (orjson.dumps(_records(username="demo_00002")), {}, "identifiers:"),
        (orjson.dumps(_records()), {"n": 3}, "count: 2 records, the ledger recorded 3"),
        (orjson.dumps(_records()), {"span": (1000, 2500)}, "span:"),
    ],
)
def test_file_content_checks(tmp_path, body, row_changes, reason):
    (tmp_path / "b.json").write_bytes(body)
    failures = check_files(str(tmp_path), [_row("b.json", body, **row_changes)])
    assert len(failures) == 1 and failures[0].reason.startswith(reason), failures


def test_a_sound_file_passes_the_content_checks(tmp_path):
    body = orjson.dumps(_records())
    (tmp_path / "b.json").write_bytes(body)
    assert check_files(str(tmp_path), [_row("b.json", body)]) == []


def test_worker_processes_find_the_same(home, catalog, stored, monkeypatch):
    (home.pool / stored[4].path).write_bytes(b"[]")
    monkeypatch.setattr(sanity_module, "IN_PROCESS_BELOW", 0)
    monkeypatch.setattr(sanity_module, "CHUNK", 2)
    report = sanity_check(home, catalog=catalog, workers=2, settle=0)
    assert report.checked == 6
    assert [f.path for f in report.failures] == [stored[4].path]


def test_cli_exits_1_when_a_file_fails(home, stored):
    runner = CliRunner()
    ok = runner.invoke(cli, ["--home", str(home.home), "sanity", "demo", "--full"])
    assert ok.exit_code == 0, ok.output
    assert "checked 6 files" in ok.output and "0 failed" in ok.output
    (home.pool / stored[5].path).write_bytes(b"[]")
    bad = runner.invoke(cli, ["--home", str(home.home), "sanity", "--full"])
    assert bad.exit_code == 1
    assert f"{stored[5].path}: size:" in bad.output


def test_a_batch_that_does_not_fit_its_sensor_schema_is_reported(home, catalog, client, subjects):
    phone = Phone(client, subjects[0])
    phone.register()
    good = phone.batch("location", n=5)
    assert phone.upload(good).status_code == 200
    bad = phone.batch("location", n=5)
    for record in bad[2:]:
        del record["accuracy"]  # the server files it; only the sensor schema knows the field
    assert phone.upload(bad).status_code == 200
    report = sanity_check(home, catalog=catalog, settle=0)
    assert report.checked == 2 and len(report.failures) == 1
    (failure,) = report.failures
    assert failure.reason.startswith("schema: location sensor schema: record 2:")
    assert "accuracy" in failure.reason and "(and 2 more records)" in failure.reason
    with catalog.engine.connect() as conn:
        paths = list(conn.execute(select(uploads.c.path).order_by(uploads.c.id)).scalars())
    assert failure.path == paths[1]  # the valid batch is not reported


def test_a_sensor_without_a_schema_passes_in_the_generic_shape(home, catalog, client):
    create_study(catalog, definition_from_options("other", sensors=["thermometer"]))
    (person,) = enroll(catalog, "other", 1)
    phone = Phone(client, person, study="other")
    assert phone.register().status_code == 200
    assert phone.upload(phone.batch("thermometer")).status_code == 200
    report = sanity_check(home, catalog=catalog, study="other", settle=0)
    assert report.checked == 1 and report.ok, report.failures
