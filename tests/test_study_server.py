"""The local MindTrails-compatible study server: protocol in-process (WSGI), faults over loopback."""

from __future__ import annotations

import base64
import re
import stat
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from workbench.simulators.study_server import (
    GAD7_ITEMS,
    PHQ9_ITEMS,
    ConnectionDropped,
    Faults,
    StudyServer,
    demo_tables,
    encrypt_value,
    generate_keypair,
    load_public_key,
    start_in_thread,
)

USER, PASSWORD = "export", "s3cret"
PADDINGS = {
    "pkcs1v15": padding.PKCS1v15(),
    "oaep": padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
    ),
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A 1024-bit key pair: (private key object, public key object)."""
    private_path, public_path = generate_keypair(tmp_path_factory.mktemp("keys"), bits=1024)
    private = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    return private, load_public_key(public_path)


@pytest.fixture
def server(keys):
    """A study server holding the demo tables of 8 participants."""
    tables, deleteable = demo_tables(keys[1], participants=8, days=10, seed=3)
    return StudyServer(tables, deleteable=deleteable, user=USER, password=PASSWORD)


@pytest.fixture
def client(server):
    """An authenticated client of the server's WSGI app, in-process."""
    transport = httpx.WSGITransport(app=server.app())
    with httpx.Client(transport=transport, base_url="http://study", auth=(USER, PASSWORD)) as c:
        yield c


def decrypt(private, value: str, name: str = "pkcs1v15") -> str:
    return private.decrypt(base64.b64decode(value, validate=True), PADDINGS[name]).decode()


# --- keys -----------------------------------------------------------------------------------


def test_generate_keypair_writes_pkcs8_and_keeps_existing_files(tmp_path):
    private, public = generate_keypair(tmp_path / "new", bits=1024)
    assert (private.name, public.name) == ("private_key.pem", "public_key.pem")
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    before = private.read_bytes(), public.read_bytes()
    assert generate_keypair(tmp_path / "new", bits=1024) == (private, public)
    assert (private.read_bytes(), public.read_bytes()) == before


def test_generate_keypair_encrypts_private_key_with_passphrase(tmp_path):
    private, public = generate_keypair(tmp_path, bits=1024, passphrase=b"horse")
    assert private.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(private.read_bytes(), password=None)
    key = serialization.load_pem_private_key(private.read_bytes(), password=b"horse")
    secret = encrypt_value(load_public_key(public), "P0001")
    assert decrypt(key, secret) == "P0001"


def test_generate_keypair_rewrites_a_missing_public_key_from_the_private_one(tmp_path):
    private, public = generate_keypair(tmp_path, bits=1024)
    before = public.read_bytes()
    public.unlink()
    generate_keypair(tmp_path, bits=1024)
    assert public.read_bytes() == before


@pytest.mark.parametrize("name", sorted(PADDINGS))
def test_encrypt_value_decrypts_to_the_value(keys, name):
    private, public = keys
    secret = encrypt_value(public, "P0042", padding=name)
    assert len(base64.b64decode(secret)) == 128  # one 1024-bit RSA block
    assert decrypt(private, secret, name) == "P0042"


def test_encrypt_value_refuses_unknown_padding(keys):
    with pytest.raises(ValueError, match="unknown padding"):
        encrypt_value(keys[1], "P0001", padding="none")


# --- demo data ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PADDINGS))
def test_demo_rows_carry_the_encrypted_participant_id(keys, name):
    private, public = keys
    tables, _ = demo_tables(public, participants=5, padding=name)
    people = {decrypt(private, row["participantRSA"], name) for row in tables["participant"]}
    assert people == {f"P{n:04d}" for n in range(1, 6)}
    for table, rows in tables.items():
        for row in rows:
            assert decrypt(private, row["participantRSA"], name) in people, table
            assert [key for key in row if key.endswith("RSA")] == ["participantRSA"]


def test_demo_tables_have_ids_dates_and_flags(keys):
    tables, deleteable = demo_tables(keys[1], participants=12, days=14)
    assert deleteable == {"participant": False, "PHQ9": True, "GAD7": True, "Demographics": True}
    now = datetime.now(UTC)
    for rows in tables.values():
        assert [row["id"] for row in rows] == list(range(1, len(rows) + 1))
        dates = [datetime.strptime(row["date"], "%Y-%m-%dT%H:%M:%SZ") for row in rows]
        assert all(now - timedelta(days=15) < d.replace(tzinfo=UTC) <= now for d in dates)
        assert dates == sorted(dates)
    assert len({row["date"][:10] for row in tables["PHQ9"]}) >= 3


@pytest.mark.parametrize(("table", "items"), [("PHQ9", PHQ9_ITEMS), ("GAD7", GAD7_ITEMS)])
def test_demo_scale_items_are_0_to_3_or_prefer_not_to_answer(keys, table, items):
    tables, _ = demo_tables(keys[1], participants=30)
    answers = [row[item] for row in tables[table] for item in items]
    assert set(answers) <= {0, 1, 2, 3, 555}
    assert 0.01 < answers.count(555) / len(answers) < 0.12
    assert {0, 3} <= set(answers)
    assert {row["session"] for row in tables[table]} >= {"PRE", "POST"}
    assert all(isinstance(row["time_on_page"], float) for row in tables[table])


def test_demo_tables_are_deterministic_for_a_seed(keys):
    private, public = keys

    def plain(seed):
        tables, _ = demo_tables(public, participants=6, seed=seed)
        return {
            name: [
                row | {"participantRSA": decrypt(private, row["participantRSA"])} for row in rows
            ]
            for name, rows in tables.items()
        }

    assert plain(7) == plain(7)
    assert plain(7) != plain(8)


def test_rows_per_table_fixes_the_size_of_phq9(keys):
    tables, _ = demo_tables(keys[1], participants=3, rows_per_table=250)
    assert len(tables["PHQ9"]) == 250
    assert len(tables["participant"]) == 3


# --- protocol, in-process -------------------------------------------------------------------


def test_listing_gives_every_table_with_size_and_flag(client, server):
    response = client.get("/export/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == [
        {"name": name, "size": len(server.tables[name]), "deleteable": server.deleteable[name]}
        for name in ["Demographics", "GAD7", "PHQ9", "participant"]
    ]


@pytest.mark.parametrize("table", ["participant", "PHQ9", "GAD7", "Demographics"])
def test_rows_come_in_id_order(client, server, table):
    rows = client.get(f"/export/{table}").json()
    assert rows == server.tables[table]
    assert [row["id"] for row in rows] == sorted(row["id"] for row in rows)
    assert rows[0]["id"] == 1


@pytest.mark.parametrize(
    ("greater_than", "expected"),
    [("0", range(1, 9)), ("5", range(6, 9)), ("8", []), ("99", []), ("-3", range(1, 9))],
)
def test_greater_than_keeps_only_later_rows(client, greater_than, expected):
    rows = client.get("/export/participant", params={"greaterThan": greater_than}).json()
    assert [row["id"] for row in rows] == list(expected)


def test_unicode_countries_survive_the_json_round_trip(client, server):
    rows = client.get("/export/Demographics").json()
    assert rows == server.tables["Demographics"]
    countries = {row["country"] for row in rows}
    assert any(not country.isascii() for country in countries), countries


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/export/"),
        ("GET", "/export/PHQ9"),
        ("GET", "/export/nothing"),
        ("DELETE", "/export/PHQ9/1"),
        ("POST", "/_faults"),
        ("POST", "/_rows/PHQ9"),
    ],
)
@pytest.mark.parametrize("auth", [None, (USER, "wrong"), ("someone", PASSWORD)])
def test_missing_or_wrong_credentials_get_401(server, method, path, auth):
    transport = httpx.WSGITransport(app=server.app())
    with httpx.Client(transport=transport, base_url="http://study", auth=auth) as client:
        response = client.request(method, path, json={})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="export"'
    assert response.json().keys() == {"error", "message"}
    assert len(server.tables["PHQ9"]) > 0 and server.tables["PHQ9"][0]["id"] == 1


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/export/nothing", 404),
        ("GET", "/export/PHQ9?greaterThan=abc", 400),
        ("GET", "/export/PHQ9?greaterThan=1.5", 400),
        ("DELETE", "/export/nothing/1", 404),
        ("DELETE", "/export/PHQ9/999999", 404),
        ("DELETE", "/export/PHQ9/x", 400),
        ("DELETE", "/export/participant/1", 403),
        ("POST", "/export/", 405),
    ],
)
def test_refusals_answer_a_json_error(client, method, path, status):
    response = client.request(method, path)
    assert response.status_code == status
    body = response.json()
    assert body.keys() == {"error", "message"} and body["message"]


def test_delete_removes_one_row(client, server):
    size = len(server.tables["PHQ9"])
    assert client.delete("/export/PHQ9/2").json() == {"deleted": 2}
    ids = [row["id"] for row in client.get("/export/PHQ9").json()]
    assert 2 not in ids and len(ids) == size - 1
    assert client.delete("/export/PHQ9/2").status_code == 404
    sizes = {entry["name"]: entry["size"] for entry in client.get("/export/").json()}
    assert sizes["PHQ9"] == size - 1


def test_do_not_delete_tables_refuse_and_keep_the_row(client, server):
    response = client.delete("/export/participant/1")
    assert response.status_code == 403
    assert server.tables["participant"][0]["id"] == 1


def test_ignore_greater_than_fault_returns_all_rows(client, server):
    server.faults.ignore_greater_than = True
    rows = client.get("/export/participant", params={"greaterThan": "5"}).json()
    assert [row["id"] for row in rows] == list(range(1, 9))


def test_error_rate_one_answers_500_but_control_routes_work(client, server):
    server.faults.error_rate = 1.0
    response = client.get("/export/")
    assert response.status_code == 500
    assert response.json()["error"] == "server_error"
    assert client.post("/_faults", json={"error_rate": 0}).json()["error_rate"] == 0
    assert client.get("/export/").status_code == 200


def test_error_rate_half_fails_some_requests(client, server):
    server.faults.error_rate = 0.5
    statuses = {client.get("/export/").status_code for _ in range(40)}
    assert statuses == {200, 500}


def test_drop_rate_one_raises_in_process(client, server):
    server.faults.drop_rate = 1.0
    with pytest.raises(ConnectionDropped):
        client.get("/export/")


def test_add_rows_continues_the_ids_after_deletions(server):
    last = server.tables["GAD7"][-1]["id"]
    assert server.delete_row("GAD7", last)
    server.add_rows("GAD7", [{"session": "POST", "id": 1}, {"session": "POST"}])
    new = server.tables["GAD7"][-2:]
    assert [row["id"] for row in new] == [last + 1, last + 2]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", new[0]["date"])
    assert server.rows("GAD7", greater_than=last) == new


def test_post_rows_appends_and_reports_the_last_id(client, server):
    last = server.tables["PHQ9"][-1]["id"]
    rows = [{"participantRSA": "x", "session": "POST", "country": "日本"}] * 3
    assert client.post("/_rows/PHQ9", json=rows).json() == {"added": 3, "last_id": last + 3}
    fetched = client.get("/export/PHQ9", params={"greaterThan": last}).json()
    assert [row["id"] for row in fetched] == [last + 1, last + 2, last + 3]
    assert fetched[0]["country"] == "日本"


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/_rows/nothing", [], 404),
        ("/_rows/PHQ9", {"session": "POST"}, 400),
        ("/_rows/PHQ9", [1, 2], 400),
        ("/_faults", {"drop_rate": 2}, 400),
        ("/_faults", {"delay": -1}, 400),
        ("/_faults", {"delay": "slow"}, 400),
        ("/_faults", {"ignore_greater_than": 1}, 400),
        ("/_faults", {"typo_rate": 0.1}, 400),
        ("/_faults", [0.1], 400),
    ],
)
def test_control_routes_refuse_bad_bodies(client, server, path, body, status):
    response = client.post(path, content=orjson.dumps(body))
    assert response.status_code == status
    assert response.json()["error"]
    assert server.faults == Faults()


def test_post_faults_changes_only_the_given_fields(client, server):
    server.faults.delay = 0.01
    answer = client.post("/_faults", json={"ignore_greater_than": True, "seed": 4}).json()
    assert answer == {
        "error_rate": 0.0,
        "delay": 0.01,
        "drop_rate": 0.0,
        "ignore_greater_than": True,
        "seed": 4,
    }
    assert server.faults.ignore_greater_than is True


# --- a real server on loopback --------------------------------------------------------------


def test_threaded_server_drops_delays_and_keeps_serving(server):
    with start_in_thread(server) as running:
        assert running.url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=running.url, auth=(USER, PASSWORD), timeout=30) as client:
            assert client.get("/export/PHQ9").json() == server.tables["PHQ9"]

            assert client.post("/_faults", json={"drop_rate": 1.0}).status_code == 200
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                client.get("/export/")
            assert client.post("/_faults", json={"drop_rate": 0}).status_code == 200
            assert client.get("/export/").status_code == 200

            client.post("/_faults", json={"delay": 0.5})
            with pytest.raises(httpx.ReadTimeout):
                client.get("/export/", timeout=0.1)
            client.post("/_faults", json={"delay": 0})
            assert client.get("/export/participant").status_code == 200
    assert not running.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{running.url}/export/", auth=(USER, PASSWORD), timeout=1)
