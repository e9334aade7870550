"""Every rule of the upload server, driven in-process through the WSGI app."""

from __future__ import annotations

import hashlib
import json
import os

import orjson
import pytest
from sqlalchemy import func, select

from tests.conftest import Phone
from workbench.catalog import devices, rejections, uploads
from workbench.ledger import verify
from workbench.studies import archive_study, create_study, definition_from_options
from workbench.subjects import remove_subject


def count(catalog, table, *where) -> int:
    with catalog.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def stored_files(home) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), home.pool)
        for d, _, files in os.walk(home.pool / "studies")
        for f in files
    )


def junk_files(home) -> list[str]:
    return sorted(f for _, _, files in os.walk(home.pool / "junk") for f in files)


def test_write_data_stores_file_and_ledger_row(phone, catalog, home):
    records = phone.batch(n=30)
    answer = phone.upload(records)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["ok"] and body["duplicate"] is False and body["records"] == 30
    with catalog.engine.connect() as conn:
        row = conn.execute(select(uploads)).one()
    assert row.path == stored_files(home)[0]
    assert row.path.startswith(
        "studies/demo/demo_00001/dev-1/accelerometer/demo_demo_00001_dev-1_accelerometer_"
    )
    on_disk = (home.pool / row.path).read_bytes()
    assert hashlib.sha256(on_disk).hexdigest() == row.sha256 == body["sha256"]
    assert row.n_records == 30 and row.bytes == len(on_disk)
    assert row.first_ts == records[0]["timestamp"] and row.last_ts == records[-1]["timestamp"]
    assert verify(home) == []


@pytest.mark.parametrize("path", ["/", "/api"])
def test_both_post_paths_accept_uploads(phone, path):
    body = orjson.dumps(phone.batch())
    answer = phone.client.post(path, content=body, headers=phone.headers("write_data", body))
    assert answer.status_code == 200


@pytest.mark.parametrize("checksum", ["md5", "digest", None])
def test_good_or_absent_checksum_is_accepted(phone, checksum):
    assert phone.upload(checksum=checksum).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"md5": "0" * 32},
        {"Content-Digest": "sha-256=:" + "A" * 43 + "=:"},
    ],
    ids=["md5", "content-digest"],
)
def test_checksum_mismatch_is_400_and_stores_nothing(phone, catalog, home, headers):
    answer = phone.upload(checksum=None, headers=headers)
    assert answer.status_code == 400
    assert answer.json()["error"] == "checksum_mismatch"
    assert count(catalog, uploads) == 0 and stored_files(home) == [] and junk_files(home) == []
    assert count(catalog, rejections, rejections.c.reason == "checksum_mismatch") == 1


def test_malformed_content_digest_is_400(phone):
    answer = phone.upload(checksum=None, headers={"Content-Digest": "sha-256=not-base64"})
    assert answer.status_code == 400


def test_study_can_require_a_checksum(client, catalog, subjects):
    from workbench.enrollment import enroll

    definition = definition_from_options("strict", sensors=["accelerometer"])
    definition["checksum_required"] = True
    create_study(catalog, definition)
    p = Phone(client, enroll(catalog, "strict", 1)[0], study="strict")
    assert p.register().status_code == 200
    assert p.upload(checksum=None).status_code == 400
    assert p.upload(checksum="digest").status_code == 200


def test_token_is_required_and_checked(phone, catalog):
    body = orjson.dumps(phone.batch())
    missing = phone.client.post("/", content=body, headers={"ACTION": "write_data"})
    assert missing.status_code == 401
    wrong = phone.client.post(
        "/", content=body, headers={"ACTION": "write_data", "Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    assert count(catalog, uploads) == 0


def test_token_of_another_subject_is_refused(client, subjects, phone):
    other = Phone(client, subjects[1])
    other.token = phone.token
    assert other.register().status_code == 401


def test_legacy_study_needs_no_token(client, catalog):
    from workbench.enrollment import enroll

    create_study(catalog, definition_from_options("old", sensors=["accelerometer"], auth="legacy"))
    p = Phone(client, enroll(catalog, "old", 1)[0], study="old")
    p.token = "whatever"
    assert p.register().status_code == 200
    assert p.upload().status_code == 200


def test_unknown_study_goes_to_junk_with_409(phone, catalog, home):
    phone.study = "nosuchstudy"
    answer = phone.upload()
    assert answer.status_code == 409
    assert answer.json()["error"] == "unknown_study" and answer.json()["kept_in_junk"] is True
    assert count(catalog, uploads) == 0
    [junk] = junk_files(home)
    with catalog.engine.connect() as conn:
        row = conn.execute(select(rejections)).one()
    assert row.reason == "unknown_study" and row.status == 409 and row.study_id == "nosuchstudy"
    assert row.path.endswith(junk)
    assert verify(home) == []


def test_archived_study_goes_to_junk_with_409(phone, catalog, home):
    archive_study(catalog, "demo")
    answer = phone.upload()
    assert answer.status_code == 409 and answer.json()["error"] == "study_archived"
    assert len(junk_files(home)) == 1 and count(catalog, uploads) == 0


def test_unknown_sensor_goes_to_junk_with_422(phone, catalog, home):
    answer = phone.upload(phone.batch(sensor="gyroscope"))
    assert answer.status_code == 422 and answer.json()["error"] == "unknown_sensor"
    assert len(junk_files(home)) == 1
    assert count(catalog, rejections, rejections.c.sensor == "gyroscope") == 1


@pytest.mark.parametrize("known", [False, True], ids=["new-source", "known-source"])
@pytest.mark.parametrize("field", ["username", "sensorname", "deviceid", "studyId"])
def test_batch_mixing_sources_goes_to_junk_with_400(phone, catalog, home, field, known):
    if known:  # a source that stored a batch before is decoded by its own fast decoder
        assert phone.upload().status_code == 200
    records = phone.batch(n=5)
    records[3][field] = {
        "username": "demo_00002",
        "sensorname": "location",
        "deviceid": "dev-2",
        "studyId": "other",
    }[field]
    answer = phone.upload(records)
    assert answer.status_code == 400
    assert "same study, subject, device and sensor" in answer.json()["message"]
    assert len(junk_files(home)) == 1 and count(catalog, uploads) == int(known)


def test_known_source_is_checked_as_strictly(phone, catalog):
    assert phone.upload().status_code == 200
    for bad in (-1, "x", 1.5, 253_402_300_800_000):
        records = phone.batch(n=3)
        records[2]["timestamp"] = bad
        answer = phone.upload(records)
        assert answer.status_code == 400, (bad, answer.text)
        assert answer.json()["message"].startswith("the body must be a JSON array")
    assert count(catalog, uploads) == 1


def test_unregistered_device_is_403(client, subjects, catalog):
    p = Phone(client, subjects[1], device="never-registered")
    answer = p.upload()
    assert answer.status_code == 403 and "add_user" in answer.json()["message"]
    assert count(catalog, uploads) == 0


def test_unknown_subject_is_403_and_not_kept(client, subjects, catalog, home):
    p = Phone(client, subjects[0])
    p.subject = "demo_09999"
    answer = p.upload()
    assert answer.status_code == 403 and answer.json()["error"] == "unknown_subject"
    assert junk_files(home) == []
    assert count(catalog, rejections, rejections.c.subject_id == "demo_09999") == 1


def test_left_subject_within_grace_is_filed_then_refused(phone, catalog, home):
    from workbench.times import now_ms

    left = phone.set_status(1, time_left=now_ms())
    assert left.status_code == 200
    assert phone.upload().status_code == 200  # late batch inside the 24 h grace
    with catalog.engine.begin() as conn:
        conn.execute(devices.update().values(time_left=now_ms() - 25 * 3_600_000))
    refused = phone.upload()
    assert refused.status_code == 403 and refused.json()["error"] == "subject_not_active"
    assert len(junk_files(home)) == 1


def test_removed_subject_is_refused_at_once(phone, catalog):
    remove_subject(catalog, "demo", phone.subject, by="coordinator")
    assert phone.upload().status_code == 403
    back = phone.set_status(0)
    assert back.status_code == 403  # only the investigator can undo a removal


def test_identical_retry_is_stored_once(phone, catalog, home):
    body = orjson.dumps(phone.batch())
    first = phone.upload(body)
    again = phone.upload(body)
    assert first.status_code == again.status_code == 200
    assert first.json()["duplicate"] is False and again.json()["duplicate"] is True
    assert again.json()["id"] == first.json()["id"]
    assert count(catalog, uploads) == 1 and len(stored_files(home)) == 1


def test_same_second_uploads_get_distinct_files(phone, catalog, home):
    for _ in range(10):
        assert phone.upload().status_code == 200
    files = stored_files(home)
    assert len(files) == 10 == len(set(files)) == count(catalog, uploads)


def test_bad_json_is_400_and_accounted_for(phone, catalog, home):
    answer = phone.upload(b"[{not json")
    assert answer.status_code == 400 and answer.json()["error"] == "bad_request"
    assert "not valid JSON" in answer.json()["message"]
    assert count(catalog, rejections) == 1 and junk_files(home) == []


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"{}",
        b'[{"studyId": "demo"}]',
        b'[{"studyId":"demo","username":"u","deviceid":"d","sensorname":"s","timestamp":"x"}]',
    ],
    ids=["empty", "object", "missing-fields", "string-timestamp"],
)
def test_batch_that_breaks_the_schema_is_400_with_reason(phone, body):
    answer = phone.upload(body)
    assert answer.status_code == 400
    assert answer.json()["message"].startswith("the body must be a JSON array")


def test_body_over_server_limit_is_413(phone, home, catalog):
    import dataclasses

    import httpx
    from workbench_server.app import create_app

    from workbench.enrollment import Enrollment

    small = dataclasses.replace(home, server=dataclasses.replace(home.server, max_body_bytes=2000))
    transport = httpx.WSGITransport(app=create_app(small))
    with httpx.Client(transport=transport, base_url="http://t") as other:
        p = Phone(other, Enrollment("demo", phone.subject, phone.token))
        answer = p.upload(p.batch(n=100))
    assert answer.status_code == 413 and answer.json()["error"] == "body_too_large"
    assert count(catalog, rejections, rejections.c.reason == "body_too_large") == 1


def test_body_over_study_limit_is_413(client, catalog):
    from workbench.enrollment import enroll

    definition = definition_from_options("tiny", sensors=["accelerometer"])
    definition["max_body_bytes"] = 2048
    create_study(catalog, definition)
    p = Phone(client, enroll(catalog, "tiny", 1)[0], study="tiny")
    assert p.register().status_code == 200
    assert p.upload(p.batch(n=5)).status_code == 200
    assert p.upload(p.batch(n=100)).status_code == 413


def test_unknown_action_is_400(client):
    answer = client.post("/", content=b"[]", headers={"ACTION": "drop_tables"})
    assert answer.status_code == 400 and "unknown ACTION" in answer.json()["message"]


def test_add_user_is_idempotent_and_limits_devices(client, subjects, catalog):
    p = Phone(client, subjects[1], device="a")
    assert p.register().json()["message"].startswith("device a registered")
    assert p.register().json()["already_registered"] is True
    for name in "bcd":
        assert Phone(client, subjects[1], device=name).register().status_code == 200
    fifth = Phone(client, subjects[1], device="e").register()
    assert fifth.status_code == 409 and "maximum" in fifth.json()["message"]
    assert count(catalog, devices, devices.c.subject_id == subjects[1].subject) == 4


def test_ema_app_registers_its_own_device(client, subjects, catalog):
    p = Phone(client, subjects[2])
    message = {
        "studyId": "demo",
        "username": p.subject,
        "deviceid_ema": "ema-1",
        "status_ema": 0,
        "time_joined_ema": 1,
    }
    assert p.post("add_user", orjson.dumps(message)).json()["app"] == "ema"
    with catalog.engine.connect() as conn:
        row = conn.execute(select(devices)).one()
    assert (row.app, row.device_id, row.time_joined) == ("ema", "ema-1", 1)


def test_update_user_records_when_the_subject_left(phone, catalog):
    with catalog.engine.connect() as conn:
        joined = conn.execute(select(devices.c.time_joined)).scalar()
    answer = phone.set_status(1, time_left=joined + 1234)
    assert answer.status_code == 200
    with catalog.engine.connect() as conn:
        row = conn.execute(select(devices)).one()
    assert (row.status, row.time_left) == (1, joined + 1234)


def test_update_user_of_unregistered_device_is_403(client, subjects):
    p = Phone(client, subjects[1], device="ghost")
    answer = p.post(
        "update_user",
        orjson.dumps({"studyId": "demo", "username": p.subject, "deviceid": "ghost", "status": 1}),
    )
    assert answer.status_code == 403


@pytest.fixture
def resources(home, catalog):
    folder = home.home / "resources" / "ema"
    folder.mkdir(parents=True)
    (folder / "happy.png").write_bytes(b"\x89PNG fake")
    (folder / "audio").mkdir()
    (folder / "audio" / "chime.ogg").write_bytes(b"OggS fake")
    definition = definition_from_options("emastudy", sensors=["ema"])
    definition["resources"] = "resources/ema"
    create_study(catalog, definition)
    return folder


def test_resources_zip_with_etag_and_304(client, resources, catalog):
    import io
    import zipfile

    from workbench.enrollment import enroll

    token = enroll(catalog, "emastudy", 1)[0].token
    auth = {"Authorization": f"Bearer {token}"}
    answer = client.get("/resources/emastudy", headers=auth)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    names = sorted(zipfile.ZipFile(io.BytesIO(answer.content)).namelist())
    assert names == ["audio/chime.ogg", "happy.png"]
    etag = answer.headers["etag"]
    assert (
        client.get("/resources/emastudy", headers={**auth, "If-None-Match": etag}).status_code
        == 304
    )
    legacy = client.get("/", headers={**auth, "ACTION": "download_zip", "studyId": "emastudy"})
    assert legacy.status_code == 200 and legacy.headers["etag"] == etag
    (resources / "new.png").write_bytes(b"more")
    changed = client.get("/resources/emastudy", headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert client.get("/resources/emastudy").status_code == 401


def test_health_and_openapi(client):
    assert client.get("/health").json() == {"ok": True, "status": "healthy", "message": "healthy"}
    spec = client.get("/openapi.yaml")
    assert spec.status_code == 200 and b"openapi:" in spec.content


def test_not_found_is_json(client):
    answer = client.get("/nowhere")
    assert answer.status_code == 404
    assert json.loads(answer.content)["ok"] is False


def test_ids_too_long_together_for_a_file_name_are_400(client, catalog):
    from workbench.enrollment import enroll

    long_study = "s" * 60
    create_study(catalog, definition_from_options(long_study, sensors=["accelerometer"]))
    p = Phone(client, enroll(catalog, long_study, 1)[0], device="d" * 128, study=long_study)
    assert p.register().status_code == 200
    answer = p.upload()
    assert answer.status_code == 400 and "too long together" in answer.json()["message"]
    assert count(catalog, uploads) == 0
