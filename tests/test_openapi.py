"""The server's OpenAPI description: served, complete, and the server fuzzed against it.

The fuzzing drives the WSGI app in-process with schemathesis. Afterwards nothing may have
been written outside the data pool, and every stored file must be accounted for by the
ledger. Identifiers that try to leave the pool are refused before anything reaches the disk.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from workbench import errors
from workbench.enrollment import enroll
from workbench.ledger import verify
from workbench.studies import archive_study, create_study, definition_from_options
from workbench.templates import SHIPPED_NOTEBOOKS, SHIPPED_PIPELINES

OPENAPI = Path(__file__).resolve().parent.parent / "server" / "openapi.yaml"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def spec_routes(spec: dict) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in METHODS
    }


def bottle_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route, Bottle's ``<name>``/``<name:filter>`` as ``{name}``."""
    return {
        (route.method.upper(), re.sub(r"<(\w+)(?::[^>]*)?>", r"{\1}", route.rule))
        for route in app.routes
    }


# ---------------------------------------------------------------------- the document


def test_openapi_is_served_and_documents_every_route(client, app):
    response = client.get("/openapi.yaml")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/yaml")
    assert response.content == OPENAPI.read_bytes()
    spec = yaml.safe_load(response.text)
    assert spec["openapi"].startswith("3.")
    assert bottle_routes(app) == spec_routes(spec)


def test_openapi_is_valid_and_documents_every_refusal():
    schema = schemathesis.openapi.from_path(OPENAPI)
    schema.validate()
    spec = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    post = spec["paths"]["/"]["post"]
    action = spec["components"]["parameters"]["Action"]
    assert action["in"] == "header" and action["required"] is True
    assert set(action["schema"]["enum"]) == {"write_data", "add_user", "update_user"}
    codes = set(spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    refusals = [
        errors.BadRequest,
        errors.ChecksumMismatch,
        errors.Unauthorized,
        errors.SubjectNotActive,
        errors.UnknownSubject,
        errors.UnknownSensor,
        errors.Conflict,
        errors.BodyTooLarge,
        errors.UnknownStudy,
        errors.StudyArchived,
    ]
    for exc in refusals:
        assert str(exc.status) in post["responses"], exc
        assert exc.code in codes, exc
    assert spec["paths"]["/api"]["post"]["responses"] == post["responses"]


# ---------------------------------------------------------------------- fuzzing


@dataclass
class Identity:
    """Identifiers and token the fuzzer may substitute into a generated request."""

    study: str
    subject: str
    token: str | None
    sensor: str


# Examples per operation: (positive, negative). About 170 requests in all.
BUDGET = {
    ("POST", "/"): (40, 20),
    ("POST", "/api"): (20, 10),
    ("GET", "/"): (20, 10),
    ("GET", "/api"): (10, 0),
    ("GET", "/resources/{study}"): (25, 10),
    ("GET", "/health"): (3, 0),
    ("GET", "/openapi.yaml"): (2, 0),
    ("GET", "/api-keys/protected"): (3, 2),
    ("POST", "/job_configurations"): (10, 5),
    ("POST", "/jobs"): (10, 5),
    ("POST", "/events"): (10, 5),
    ("GET", "/jobs/{provider_job_id}"): (10, 5),
    ("GET", "/sync/callback"): (10, 5),
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
DEVICES = ["dev-1", "dev-2", "phone.7:a"]


def adopt(case, draw, identities: list[Identity], etags: dict[str, str]) -> None:
    """Sometimes make a generated request name real studies, subjects and tokens."""
    how = draw(st.sampled_from(["as generated", "real identifiers"]))
    if how == "as generated":
        return
    who = draw(st.sampled_from(identities))
    token = draw(st.sampled_from(["right", "wrong", "none"]))
    if token == "right" and who.token:
        case.headers["Authorization"] = f"Bearer {who.token}"
    elif token == "wrong":
        case.headers["Authorization"] = "Bearer not-a-token"
    else:
        case.headers.pop("Authorization", None)
    if case.method == "POST":
        device = draw(st.sampled_from(DEVICES))
        sensor = draw(st.sampled_from([who.sensor, "location", "gyroscope"]))
        body = case.body
        if isinstance(body, list):
            case.headers["ACTION"] = "write_data"
            for record in body:
                if isinstance(record, dict):
                    record.update(
                        studyId=who.study, username=who.subject, deviceid=device, sensorname=sensor
                    )
        elif isinstance(body, dict):
            case.headers["ACTION"] = draw(st.sampled_from(["add_user", "update_user"]))
            key = "deviceid_ema" if "deviceid_ema" in body else "deviceid"
            body.update({"studyId": who.study, "username": who.subject, key: device})
        # The fuzzer's checksums cannot match: leave them out so the request gets further.
        case.headers.pop("md5", None)
        case.headers.pop("Content-Digest", None)
    elif case.path == "/resources/{study}":
        case.path_parameters["study"] = who.study
    else:
        case.headers["ACTION"] = "download_zip"
        case.headers["studyId"] = who.study
    if who.study in etags and draw(st.booleans()):
        case.headers["If-None-Match"] = etags[who.study]


def tree(root: Path) -> set[Path]:
    found = set()
    for folder, dirs, files in os.walk(root):
        found.update(Path(folder, name) for name in dirs + files)
    return found


def assert_nothing_outside_pool(tmp_path: Path, home) -> None:
    assert [p.name for p in tmp_path.iterdir()] == ["home"]
    extra = [
        p.name
        for p in home.home.iterdir()
        if p.name not in ("workbench.toml", home.pool.name, "pipelines", "notebooks")
        and not re.fullmatch(r"server-\d+\.log", p.name)
    ]
    assert extra == []
    # the copies `workbench init` made of the shipped pipelines and notebooks, untouched
    for name, shipped in (("pipelines", SHIPPED_PIPELINES), ("notebooks", SHIPPED_NOTEBOOKS)):
        copied = {p.relative_to(home.home / name) for p in (home.home / name).rglob("*")}
        assert copied == {p.relative_to(shipped) for p in shipped.rglob("*")}
    assert home.pool == home.home / "pool"
    assert verify(home) == []


GENERATION_MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)


def fuzz(operation, mode, examples, identities, etags, seen: set) -> None:
    """Send ``examples`` generated requests to one operation and check every answer."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case, data):
        adopt(case, data.draw, identities, etags)
        response = case.call()  # an exception raised in the app would be a 500 over HTTP
        seen.add(response.status_code)
        case.validate_response(response, checks=CHECKS)

    run()


@pytest.mark.slow
def test_fuzz_the_server_against_its_openapi(app, client, home, catalog, tmp_path, phone):
    # A legacy study with a resources archive, and an archived one, beside "demo".
    resources = home.pool / "resources" / "ema"
    resources.mkdir(parents=True)
    (resources / "survey.json").write_bytes(b'{"questions": []}')
    create_study(
        catalog,
        {
            **definition_from_options("ema", sensors=["accelerometer"], auth="legacy"),
            "resources": "pool/resources/ema",
        },
    )
    create_study(catalog, definition_from_options("gone", sensors=["accelerometer"]))
    legacy = enroll(catalog, "ema", 1)[0]
    archived = enroll(catalog, "gone", 1)[0]
    archive_study(catalog, "gone")
    assert phone.upload().status_code == 200
    etag = client.get("/resources/ema").headers["ETag"]
    identities = [
        Identity("demo", phone.subject, phone.token, "accelerometer"),
        Identity("ema", legacy.subject, None, "accelerometer"),
        Identity("gone", archived.subject, archived.token, "accelerometer"),
        Identity("nosuchstudy", "nobody", "x", "accelerometer"),
    ]

    schema = schemathesis.openapi.from_path(OPENAPI)
    schema.app = app  # requests go to the WSGI app in-process
    statuses: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == set(BUDGET)

    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        seen = statuses.setdefault(label, set())
        budget = BUDGET[(operation.method.upper(), operation.path)]
        for mode, examples in zip(GENERATION_MODES, budget, strict=True):
            if examples:
                fuzz(operation, mode, examples, identities, {"ema": etag}, seen)

    assert_nothing_outside_pool(tmp_path, home)
    print({label: sorted(codes) for label, codes in statuses.items()})


@pytest.mark.parametrize(
    "action, message",
    [
        ("write_data", None),
        ("add_user", {"deviceid": "dev-2", "status": 0, "time_joined": 2**63}),
        ("update_user", {"deviceid": "dev-1", "status": 1, "time_left": 2**63}),
    ],
    ids=["write_data-timestamp", "add_user-time_joined", "update_user-time_left"],
)
def test_integers_beyond_sqlite_are_refused_not_a_server_error(phone, action, message):
    if message is None:
        records = phone.batch(n=2)
        records[-1]["timestamp"] = 2**63
        body = orjson.dumps(records)
    else:
        body = orjson.dumps({"studyId": phone.study, "username": phone.subject, **message})
    response = phone.post(action, body)
    assert response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/json"


# ---------------------------------------------------------------------- path traversal

BAD_IDENTIFIERS = {
    "dotdot-slash": "../x",
    "dotdot": "..",
    "slash": "a/b",
    "absolute": "/etc/passwd",
    "backslash": "..\\x",
    "nul": "a\x00b",
    "percent-encoded": "%2e%2e",
    "too-long": "x" * 300,
    "empty": "",
    "deep": "ok/../../../../tmp/x",
    "newline": "sub\n",
}
KIND = {
    "studyId": "study",
    "username": "subject",
    "deviceid": "device",
    "deviceid_ema": "device",
    "sensorname": "sensor",
}
TARGETS = [
    ("write_data", "studyId"),
    ("write_data", "username"),
    ("write_data", "deviceid"),
    ("write_data", "sensorname"),
    ("add_user", "studyId"),
    ("add_user", "username"),
    ("add_user", "deviceid"),
    ("add_user", "deviceid_ema"),
    ("download_zip", "studyId"),
]


def suspicious_names(value: str) -> set[str]:
    """File names a naive server could have created from ``value``."""
    names = {value} | set(re.split(r"[/\\\x00\n]", value))
    return {name for name in names if name not in ("", ".", "..")}


@pytest.mark.parametrize("value", list(BAD_IDENTIFIERS.values()), ids=list(BAD_IDENTIFIERS))
@pytest.mark.parametrize("action, field", TARGETS, ids=[f"{a}-{f}" for a, f in TARGETS])
def test_identifiers_leaving_the_pool_are_refused(
    phone, client, home, tmp_path, action, field, value
):
    before = tree(tmp_path)
    if action == "write_data":
        records = phone.batch(n=3)
        for record in records:
            record[field] = value
        response = phone.upload(records)
    elif action == "add_user":
        message = {"studyId": phone.study, "username": phone.subject, "deviceid": phone.device}
        message[field] = value
        response = phone.post("add_user", orjson.dumps(message))
    else:
        response = client.get(
            "/",
            params={field: value},
            headers={"ACTION": "download_zip", "Authorization": f"Bearer {phone.token}"},
        )

    # Every value is an invalid identifier of every kind: refused as such, never 409.
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["ok"] is False
    assert body["error"] == "bad_request"
    assert body["field"] == KIND[field]
    assert "kept_in_junk" not in body

    created = tree(tmp_path) - before
    assert [p for p in created if not p.is_relative_to(home.pool)] == []
    names = suspicious_names(value)
    assert [p for p in tree(tmp_path) if p.name in names] == []
    assert not (tmp_path.parent / "x").exists()
    assert_nothing_outside_pool(tmp_path, home)


def test_path_parameter_leaving_the_pool_is_refused(phone, client, home, tmp_path):
    headers = {"Authorization": f"Bearer {phone.token}"}
    for raw in ["..%2Fx", "%2e%2e", "a%00b", "x" * 300, "%5C..%5Cx"]:
        response = client.get(f"/resources/{raw}", headers=headers)
        assert response.status_code in (400, 404), (raw, response.text)
        assert response.json()["ok"] is False
    assert_nothing_outside_pool(tmp_path, home)


def test_a_stored_batch_is_filed_under_its_identifiers(phone, home):
    records = phone.batch(n=2)
    body = orjson.dumps(records)
    answer = phone.upload(body).json()
    assert answer["ok"] is True and answer["sha256"] == hashlib.sha256(body).hexdigest()
    stored = [p for p in (home.pool / "studies").rglob("*") if p.is_file()]
    assert len(stored) == 1
    relative = stored[0].relative_to(home.pool / "studies")
    assert relative.parts[:4] == ("demo", phone.subject, phone.device, "accelerometer")
    assert verify(home) == []


@pytest.mark.slow
def test_headers_that_are_not_utf8_are_refused_not_a_server_error(server, subjects):
    """Over real HTTP (gunicorn): header bytes reach the app as latin-1 text."""
    token = f"Bearer {subjects[0].token}"
    zip_headers = {"ACTION": "download_zip", "studyId": "demo", "Authorization": token}
    cases = {
        "POST ACTION": ("POST", "/", {"ACTION": b"\x80"}),
        "POST md5": ("POST", "/", {"ACTION": "write_data", "md5": b"\x80"}),
        "POST Content-Digest": ("POST", "/", {"ACTION": "write_data", "Content-Digest": b"\x80"}),
        "POST Authorization": ("POST", "/", {"ACTION": "write_data", "Authorization": b"\x80"}),
        "GET ACTION": ("GET", "/", {"ACTION": b"\x80"}),
        "GET studyId": ("GET", "/", {**zip_headers, "studyId": b"\x80"}),
        "GET If-None-Match": ("GET", "/", {**zip_headers, "If-None-Match": b"\x80"}),
        "GET resources Authorization": ("GET", "/resources/demo", {"Authorization": b"\x80"}),
    }
    answers = {}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for name, (method, path, headers) in cases.items():
            content = b"[]" if method == "POST" else None
            response = http.request(method, path, headers=headers, content=content)
            answers[name] = response.status_code
    assert {name: status for name, status in answers.items() if status >= 500} == {}
