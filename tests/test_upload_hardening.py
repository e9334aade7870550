"""What the upload server does with hostile or careless senders: JSON limits, junk quotas, a
full disk, the subject lifecycle, and what its answers reveal."""

from __future__ import annotations

import hashlib
import json
import os
import re

import httpx
import orjson
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from tests.conftest import Phone
from workbench.catalog import devices, open_catalog, rejections, uploads
from workbench.cli import cli
from workbench.config import load_config
from workbench.errors import BadRequest
from workbench.json_limits import MAX_DEPTH, check_json
from workbench.junk import list_junk, prune_junk
from workbench.ledger import verify
from workbench.sanity import check_files
from workbench.subjects import remove_subject, reset_devices, restore_subject
from workbench.times import now_ms


def set_server(home, **values):
    """Change [server] settings of the home's workbench.toml; return the new config."""
    path = home.home / "workbench.toml"
    text = path.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, key
    path.write_text(text)
    return load_config(home.home)


def count(catalog, table, *where):
    with catalog.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar()


def junk_files(home):
    return sorted(p for p in (home.pool / "junk").rglob("*") if p.is_file())


def client_for(app, address="203.0.113.7"):
    transport = httpx.WSGITransport(app=app, remote_addr=address)
    return httpx.Client(transport=transport, base_url="http://testserver")


# --- JSON limits -------------------------------------------------------------------------

DEEP = b'[{"x": ' + b"[" * 1000 + b"]" * 1000 + b"}]"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nest deeper"),
        (DEEP, "nest deeper"),
        (b'[{"x": 1e400}]', "overflows a double"),
        (b'[{"x": -1e400}]', "overflows a double"),
        (b'[{"x": 9223372036854775808}]', "signed 64-bit"),
        (b'[{"x": 18446744073709551616}]', "signed 64-bit"),
        (b'[{"x": -9223372036854775809}]', "signed 64-bit"),
        (b'[{"x": "\xff\xfe"}]', "not valid JSON"),
        (b'[{"x": "\\ud800"}]', "not valid JSON"),
        (b'[{"x": NaN}]', "not valid JSON"),
    ],
)
def test_json_outside_the_limits_is_refused(body, words):
    with pytest.raises(BadRequest, match=words):
        check_json(body)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * MAX_DEPTH + b"]" * MAX_DEPTH,
        b'[{"x": 9223372036854775807, "y": -9223372036854775808, "z": 1.5e308}]',
        '[{"text": "Grüße 😀", "n": null, "b": true}]'.encode(),
        b'[{"x": "\\ud83d\\ude00"}]',  # an escaped surrogate pair is one character
    ],
)
def test_json_within_the_limits_passes(body):
    check_json(body)
    json.loads(body)


@pytest.mark.parametrize(
    "extra",
    [
        {"nested": json.loads("[" * 50 + "]" * 50)},
        {"big": 2**64},
        {"huge": 2**70},
    ],
)
def test_write_data_refuses_hostile_json_with_a_rejection_row(phone, catalog, extra):
    records = phone.batch()
    records[0].update(extra)
    answer = phone.upload(json.dumps(records).encode())
    assert answer.status_code == 400 and answer.json()["error"] == "bad_request"
    assert count(catalog, uploads) == 0
    assert count(catalog, rejections, rejections.c.action == "write_data") == 1


@pytest.mark.parametrize(
    "body",
    [
        b'[{"studyId": "demo", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}]",
        b'[{"studyId": "demo", "x": 1e400}]',
        b'[{"studyId": "demo", "x": "\xff"}]',
    ],
)
def test_every_action_refuses_hostile_json(phone, catalog, body):
    for action in ("write_data", "add_user", "update_user"):
        sent = body if action == "write_data" else body[1:-1]  # an object for the user actions
        answer = phone.post(action, sent)
        assert answer.status_code == 400, (action, answer.text)
        assert answer.json()["ok"] is False
    assert count(catalog, rejections) == 3


@pytest.mark.slow
def test_deeply_nested_json_is_a_400_from_the_real_server(server, subjects):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        p = Phone(http, subjects[0])
        assert p.register().status_code == 200
        answer = p.upload(DEEP)
        assert answer.status_code == 400 and "nest deeper" in answer.json()["message"]
        assert p.upload().status_code == 200  # the worker is fine afterwards
    catalog = open_catalog(load_config(server.home))
    try:
        assert count(catalog, rejections, rejections.c.reason == "bad_request") == 1
    finally:
        catalog.dispose()


def test_sanity_reports_a_stored_file_other_readers_cannot_read(tmp_path):
    good = orjson.dumps(
        [
            {
                "studyId": "demo",
                "username": "s1",
                "deviceid": "d1",
                "sensorname": "accelerometer",
                "timestamp": 1,
                "x": 1.0,
                "y": 2.0,
                "z": 9.81,
            }
        ]
    )
    bad = good.replace(b"1.0", b"1e400")
    failures = []
    for name, body in (("good.json", good), ("bad.json", bad)):
        (tmp_path / name).write_bytes(body)
        row = (
            1,
            name,
            len(body),
            hashlib.sha256(body).hexdigest(),
            1,
            1,
            1,
            "demo",
            "s1",
            "d1",
            "accelerometer",
        )
        failures += check_files(str(tmp_path), [row])
    assert [f.path for f in failures] == ["bad.json"]
    assert "overflows a double" in failures[0].reason


# --- junk quotas, the low-disk guard, pruning --------------------------------------------


def unknown_study_batch(n=20, filler=0):
    records = [
        {
            "studyId": "nosuchstudy",
            "username": "x",
            "deviceid": "d",
            "sensorname": "accelerometer",
            "timestamp": 1_700_000_000_000 + i,
            "pad": "p" * filler,
        }
        for i in range(n)
    ]
    return orjson.dumps(records)


def test_unauthenticated_junk_is_kept_only_within_the_quotas(home, study):
    from workbench_server.app import create_app

    config = set_server(home, junk_quota_per_address=5000, junk_quota_total=8000)
    app = create_app(config)
    catalog = open_catalog(config)
    body = unknown_study_batch(filler=50)  # about 3.4 kB: one fits an address's quota
    assert 3000 < len(body) < 4000
    with (
        client_for(app, "198.51.100.1") as one,
        client_for(app, "198.51.100.2") as two,
        client_for(app, "198.51.100.3") as three,
    ):
        first = one.post("/", content=body, headers={"ACTION": "write_data"})
        assert first.status_code == 409 and first.json()["kept_in_junk"] is True
        over = one.post("/", content=body + b" ", headers={"ACTION": "write_data"})
        assert over.status_code == 409 and over.json()["kept_in_junk"] is False
        assert "quota for this address" in over.json()["message"]
        other = two.post("/", content=body + b"  ", headers={"ACTION": "write_data"})
        assert other.json()["kept_in_junk"] is True  # another address has its own quota
        total = three.post("/", content=body + b"   ", headers={"ACTION": "write_data"})
        assert total.status_code == 409 and total.json()["kept_in_junk"] is False
        assert "unauthenticated senders" in total.json()["message"]
    assert len(junk_files(home)) == 2
    with catalog.engine.connect() as conn:
        rows = conn.execute(select(rejections).order_by(rejections.c.id)).all()
    assert [r.path is not None for r in rows] == [True, False, True, False]
    for row, sent in zip(rows, (0, 1, 2, 3), strict=True):  # every refusal accounted for
        expected = body + b" " * sent
        assert (row.bytes, row.sha256) == (len(expected), hashlib.sha256(expected).hexdigest())
    assert verify(config) == []
    catalog.dispose()


def test_authenticated_junk_is_not_limited_by_the_quota(home, study, subjects):
    from workbench_server.app import create_app

    config = set_server(home, junk_quota_per_address=10, junk_quota_total=10)
    with client_for(create_app(config)) as http:
        p = Phone(http, subjects[0])
        assert p.register().status_code == 200
        answer = p.upload(p.batch(sensor="gyroscope"))  # not recorded by the study: 422
        assert answer.status_code == 422 and answer.json()["kept_in_junk"] is True
    assert len(junk_files(home)) == 1


def test_a_nearly_full_disk_refuses_uploads_with_507(home, study, subjects):
    from workbench_server.app import create_app

    config = set_server(home, min_free_bytes=10**18)  # more than any disk here has free
    with client_for(create_app(config)) as http:
        p = Phone(http, subjects[0])
        assert p.register().status_code == 200
        answer = p.upload()
        assert answer.status_code == 507 and answer.json()["error"] == "insufficient_storage"
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        junk = http.post("/", content=unknown_study_batch(), headers={"ACTION": "write_data"})
        assert junk.status_code == 507  # nothing is written, junk neither
    catalog = open_catalog(config)
    assert count(catalog, uploads) == 0
    assert count(catalog, rejections, rejections.c.reason == "insufficient_storage") == 2
    catalog.dispose()
    assert junk_files(home) == []


@pytest.mark.slow
def test_the_real_server_reports_degraded_health_on_a_full_disk(home, study):
    from tests.conftest import ServerProcess

    set_server(home, min_free_bytes=10**18)
    running = ServerProcess(home.home).start()
    try:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "degraded"
    finally:
        running.stop()


def test_junk_can_be_listed_and_pruned_and_verify_agrees(home, study):
    from workbench_server.app import create_app

    config = load_config(home.home)
    with client_for(create_app(config)) as http:
        for i in range(3):
            answer = http.post(
                "/", content=unknown_study_batch(n=5 + i), headers={"ACTION": "write_data"}
            )
            assert answer.json()["kept_in_junk"] is True
    listed = list_junk(config)
    assert listed.height == 3 and set(listed["reason"]) == {"unknown_study"}
    runner = CliRunner()
    shown = runner.invoke(cli, ["--home", str(home.home), "junk", "list"])
    assert shown.exit_code == 0 and "3 junk files" in shown.output
    refused = runner.invoke(cli, ["--home", str(home.home), "junk", "prune"])
    assert refused.exit_code == 2 and "--older-than" in refused.output
    dry = runner.invoke(cli, ["--home", str(home.home), "junk", "prune", "--all", "--dry-run"])
    assert dry.exit_code == 0 and "would remove 3 junk files" in dry.output
    assert len(junk_files(home)) == 3
    kept = runner.invoke(
        cli, ["--home", str(home.home), "junk", "prune", "--older-than", "30"]
    )  # all are younger
    assert kept.exit_code == 0 and "removed 0 junk files" in kept.output
    done = runner.invoke(cli, ["--home", str(home.home), "junk", "prune", "--all"])
    assert done.exit_code == 0 and "removed 3 junk files" in done.output, done.output
    assert junk_files(home) == []
    assert verify(config) == []  # the rows say pruned: nothing is missing
    assert list_junk(config).height == 0
    assert list_junk(config, include_pruned=True).height == 3


def test_a_junk_file_deleted_by_hand_is_still_reported(home, study):
    from workbench_server.app import create_app

    config = load_config(home.home)
    with client_for(create_app(config)) as http:
        http.post("/", content=unknown_study_batch(), headers={"ACTION": "write_data"})
    junk_files(home)[0].unlink()
    assert [d.kind for d in verify(config, settle=0)] == ["missing"]
    prune_junk(config)  # marks the row pruned; the missing file is not an error
    assert verify(config) == []


# --- subject lifecycle -------------------------------------------------------------------


def test_a_removed_subject_stays_removed_until_the_coordinator_restores(phone, catalog, home):
    remove_subject(catalog, "demo", phone.subject, by="coordinator")
    other = Phone(phone.client, _enrollment(phone), device="new-phone")
    added = other.register()
    assert added.status_code == 403 and added.json()["error"] == "subject_not_active"
    assert phone.upload().status_code == 403
    assert other.upload().status_code == 403
    assert phone.set_status(0).status_code == 403
    assert count(catalog, uploads) == 0
    with catalog.engine.connect() as conn:
        assert conn.execute(select(devices.c.status)).scalars().all() == [3]
    restore_subject(catalog, "demo", phone.subject)
    assert phone.upload().status_code == 200
    assert other.register().status_code == 200


def _enrollment(phone):
    from workbench.enrollment import Enrollment

    return Enrollment("demo", phone.subject, phone.token)


def test_the_app_cannot_set_or_lift_a_removal(phone):
    answer = phone.set_status(3)
    assert answer.status_code == 400 and "coordinator" in answer.json()["message"]
    assert phone.upload().status_code == 200


@pytest.mark.parametrize(
    ("time_left", "words"),
    [
        (4_102_444_800_000, "future"),  # 2100-01-01
        (1_000, "before the device's time_joined"),
    ],
)
def test_time_left_must_lie_between_joining_and_now(phone, catalog, time_left, words):
    answer = phone.set_status(1, time_left=time_left)
    assert answer.status_code == 400 and words in answer.json()["message"]
    with catalog.engine.connect() as conn:
        assert conn.execute(select(devices.c.status)).scalar() == 0


def test_max_devices_counts_every_device_ever_attached(client, catalog):
    from workbench.enrollment import enroll
    from workbench.studies import create_study, definition_from_options

    definition = definition_from_options("solo", sensors=["accelerometer"])
    definition["max_devices"] = 2
    create_study(catalog, definition)
    person = enroll(catalog, "solo", 1)[0]
    phones = [Phone(client, person, device=f"phone-{k}", study="solo") for k in "abcd"]
    for phone in phones[:2]:
        assert phone.register().status_code == 200
        assert phone.set_status(1).status_code == 200  # leaves ...
    refused = phones[2].register()  # ... and comes back with yet another phone
    assert refused.status_code == 409 and "reset-devices" in refused.json()["message"]
    reset_devices(catalog, "solo", person.subject)
    assert phones[2].register().status_code == 200
    assert phones[3].register().status_code == 200
    extra = Phone(client, person, device="phone-e", study="solo")
    assert extra.register().status_code == 409  # c and d were attached after the reset


def test_subject_commands_from_the_cli(home, phone):
    runner = CliRunner()
    base = ["--home", str(home.home), "subject"]
    removed = runner.invoke(cli, [*base, "remove", "demo", phone.subject, "--by", "alice"])
    assert removed.exit_code == 0 and "removed" in removed.output
    assert phone.upload().status_code == 403
    restored = runner.invoke(cli, [*base, "restore", "demo", phone.subject])
    assert restored.exit_code == 0 and "in the study" in restored.output
    assert phone.upload().status_code == 200
    unknown = runner.invoke(cli, [*base, "remove", "demo", "nobody"])
    assert unknown.exit_code != 0 and "no subject 'nobody'" in unknown.output


# --- what answers reveal -----------------------------------------------------------------


def test_a_missing_resources_folder_is_not_shown_as_a_server_path(home, catalog, subjects):
    from workbench_server.app import create_app

    from workbench.studies import create_study, definition_from_options

    definition = definition_from_options("ema", sensors=["ema"])
    definition["resources"] = "resources/ema"
    create_study(catalog, definition)
    from workbench.enrollment import enroll

    person = enroll(catalog, "ema", 1)[0]
    with client_for(create_app(home)) as http:
        answer = http.get("/resources/ema", headers={"Authorization": f"Bearer {person.token}"})
    assert answer.status_code == 422
    assert str(home.home) not in answer.text and "/" not in answer.json()["message"]


def test_the_resources_etag_follows_the_content(home, catalog):
    from workbench_server.app import create_app

    from workbench.enrollment import enroll
    from workbench.studies import create_study, definition_from_options

    folder = home.home / "resources" / "ema"
    folder.mkdir(parents=True)
    image = folder / "a.png"
    image.write_bytes(b"AAAA")
    definition = definition_from_options("ema", sensors=["ema"])
    definition["resources"] = "resources/ema"
    create_study(catalog, definition)
    person = enroll(catalog, "ema", 1)[0]
    auth = {"Authorization": f"Bearer {person.token}"}
    with client_for(create_app(home)) as http:
        first = http.get("/resources/ema", headers=auth)
        stat = image.stat()
        image.write_bytes(b"BBBB")  # same size, and the old modification time put back
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        second = http.get(
            "/resources/ema", headers={**auth, "If-None-Match": first.headers["ETag"]}
        )
    assert second.status_code == 200 and second.headers["ETag"] != first.headers["ETag"]


def test_a_resources_folder_outside_the_home_is_refused(catalog):
    from workbench.errors import InvalidDefinition
    from workbench.studies import create_study, definition_from_options

    for where in ("../../etc", "/etc"):
        definition = definition_from_options("ema", sensors=["ema"])
        definition["resources"] = where
        with pytest.raises(InvalidDefinition, match="inside the workbench home"):
            create_study(catalog, definition)


def test_rejections_record_when_they_arrive(phone, catalog):
    before = now_ms()
    phone.upload(b"not json")
    with catalog.engine.connect() as conn:
        row = conn.execute(select(rejections)).one()
    assert row.received_at >= before and row.path is None
