"""A local stand-in for a MindTrails study server: the questionnaire export API.

Used by the demo, the tests and the benchmarks in place of a real MindTrails (MT-Java) server::

    private, public = generate_keypair(Path("keys"))
    tables, deleteable = demo_tables(load_public_key(public), participants=20)
    server = StudyServer(tables, deleteable=deleteable, user="export", password="secret")
    running = start_in_thread(server)          # or serve(server, port=9000) until Ctrl-C
    httpx.get(f"{running.url}/export/", auth=("export", "secret")).json()
    running.stop()

The protocol, with HTTP Basic auth on every route (401 and ``WWW-Authenticate: Basic
realm="export"`` otherwise) and JSON errors ``{"error": code, "message": text}``:

    GET    /export/                 [{"name", "size", "deleteable"}, ...] sorted by name
    GET    /export/<name>           the table's rows by ascending id; ?greaterThan=N keeps id > N
    DELETE /export/<name>/<id>      {"deleted": id}; 404 no such row; 403 do-not-delete table
    POST   /_faults                 change the Faults (a partial JSON object); answers all of them
    POST   /_rows/<name>            append a JSON array of rows; {"added": n, "last_id": k}

Faults (errors, delays, dropped connections, an ignored ``greaterThan``) touch only the
``/export`` routes, so a test can always steer the server through the control routes. Every row
has an integer ``id``, a ``date`` (ISO 8601 UTC) and ``participantRSA``: the participant id
encrypted with the study's RSA public key (PKCS#1 v1.5, as Java's default ``RSA`` cipher, or
OAEP with SHA-256), base64-encoded.
"""

from __future__ import annotations

import base64
import bisect
import hmac
import logging
import math
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

import orjson
from bottle import Bottle, HTTPResponse, request, response
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger("workbench.simulators.study_server")

PRIVATE_KEY_FILE = "private_key.pem"
PUBLIC_KEY_FILE = "public_key.pem"
PADDINGS = ("pkcs1v15", "oaep")
REALM = 'Basic realm="export"'
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
PREFER_NOT = 555  # MindTrails' "prefer not to answer" code for scale items
PREFER_NOT_SHARE = 0.05
# PHQ-9 item 9 (thoughts of being better off dead or of self-harm) is answered 0 by everyone
# but this participant, who answers it 2 at the first assessment: the demo's safety alert.
# Skipped answers (555) stay as drawn, so the demo also shows alerts for a skipped item 9.
SAFETY_ITEM = "suicidal"
AT_RISK = "P0001"

ASSESSMENTS = ("PRE", "SESSION3", "SESSION6", "SESSION8", "POST")
PHQ9_ITEMS = (
    "interest",
    "depressed",
    "sleep",
    "tired",
    "appetite",
    "failure",
    "concentration",
    "slow",
    "suicidal",
)
GAD7_ITEMS = ("nervous", "control", "worry", "relax", "restless", "irritable", "afraid")
CONDITIONS = ("CONTROL", "TRAINING")
GENDERS = (
    ("Female", 55),
    ("Male", 30),
    ("Transgender Female", 2),
    ("Transgender Male", 2),
    ("Other", 4),
    ("Prefer not to answer", 7),
)
COUNTRIES = (
    ("United States", 40),
    ("Canada", 6),
    ("United Kingdom", 6),
    ("España", 8),
    ("Côte d’Ivoire", 6),
    ("日本", 8),
    ("Deutschland", 5),
    ("México", 6),
    ("Brasil", 5),
    ("India", 5),
    ("Österreich", 3),
    ("Prefer not to answer", 2),
)
EDUCATION = (
    "Some high school",
    "High school graduate",
    "Some college",
    "Associate's degree",
    "Bachelor's degree",
    "Some graduate school",
    "Master's degree",
    "Doctoral degree",
    "Prefer not to answer",
)


# --- keys and encryption ------------------------------------------------------------------


def generate_keypair(
    directory: Path, *, bits: int = 2048, passphrase: bytes | None = None
) -> tuple[Path, Path]:
    """Write private_key.pem (PKCS#8, encrypted with passphrase if given) and public_key.pem into directory (created if missing); return (private, public). Existing files are kept, not overwritten.

    Example: ``private, public = generate_keypair(Path("keys"), bits=2048)``
    """
    directory = Path(directory)
    if not directory.is_dir():
        directory.mkdir(parents=True, mode=0o700)
    private_path, public_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    if private_path.exists():
        key = serialization.load_pem_private_key(private_path.read_bytes(), password=passphrase)
    elif public_path.exists():
        raise FileExistsError(
            f"{public_path} exists without {PRIVATE_KEY_FILE}: move it away to make a new pair"
        )
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        encryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        _write_new(private_path, pem, mode=0o600)
    if not public_path.exists():
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        _write_new(public_path, pem, mode=0o600)  # kept beside the private key
    return private_path, public_path


def load_public_key(source: Path | bytes | rsa.RSAPublicKey) -> rsa.RSAPublicKey:
    """The RSA public key from a PEM file, PEM bytes or a key object.

    Example: ``key = load_public_key(Path("keys/public_key.pem"))``
    """
    if isinstance(source, rsa.RSAPublicKey):
        return source
    pem = source if isinstance(source, bytes) else Path(source).read_bytes()
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the public key is not an RSA key")
    return key


def encrypt_value(
    public_key: Path | bytes | rsa.RSAPublicKey, value: str, *, padding: str = "pkcs1v15"
) -> str:
    """base64 RSA ciphertext of value; padding 'pkcs1v15' or 'oaep'.

    Example: ``encrypt_value(key, "P0042", padding="oaep")`` -> ``"k3J0...=="``
    """
    key = load_public_key(public_key)
    ciphertext = key.encrypt(value.encode("utf-8"), _padding(padding))
    return base64.b64encode(ciphertext).decode("ascii")


def _padding(name: str) -> rsa_padding.AsymmetricPadding:
    if name == "pkcs1v15":
        return rsa_padding.PKCS1v15()
    if name == "oaep":
        return rsa_padding.OAEP(
            mgf=rsa_padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        )
    raise ValueError(f"unknown padding {name!r}: use one of {', '.join(PADDINGS)}")


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Create path with data and mode; fail if it appeared meanwhile (never overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


# --- the server ---------------------------------------------------------------------------


@dataclass
class Faults:
    """Misbehaviour of the /export routes, to exercise a client's error handling."""

    error_rate: float = 0.0  # share of requests answered 500 (JSON error)
    delay: float = 0.0  # seconds slept before answering (to provoke client timeouts)
    drop_rate: float = 0.0  # share of requests whose connection is closed without an answer
    ignore_greater_than: bool = False  # behave like a server that ignores ?greaterThan
    seed: int = 0  # for the random choices


class ConnectionDropped(Exception):
    """Raised by the app to make the threaded server close the connection without an answer."""


class StudyServer:
    """The tables and settings of one simulated study server."""

    def __init__(
        self,
        tables: dict[str, list[dict]],
        *,
        deleteable: dict[str, bool],
        user: str,
        password: str,
        faults: Faults | None = None,
    ) -> None:
        self.tables: dict[str, list[dict]] = {}
        self.deleteable = {name: bool(deleteable.get(name, False)) for name in tables}
        self.user = user
        self.password = password
        self.faults = faults if faults is not None else Faults()
        self._lock = threading.Lock()
        self._next_id: dict[str, int] = {}
        self._rng = random.Random(self.faults.seed)
        self._rng_seed = self.faults.seed
        for name, rows in tables.items():
            with_id = sorted((dict(row) for row in rows if "id" in row), key=itemgetter("id"))
            self.tables[name] = with_id
            self._next_id[name] = (with_id[-1]["id"] + 1) if with_id else 1
            self.add_rows(name, [row for row in rows if "id" not in row])

    def add_rows(self, table: str, rows: list[dict], *, keep_ids: bool = False) -> None:
        """Append rows to table, assigning the next ids (and the current time where date is missing).

        With ``keep_ids``, each row keeps the ``id`` it has (any integer, as a hand-edited
        database might hold) in its place by id, and the next ids given are not changed.

        Example: ``server.add_rows("PHQ9", [{"participantRSA": "...", "session": "POST"}])``
        """
        if table not in self.tables:
            raise KeyError(table)
        stamp = datetime.now(UTC).strftime(DATE_FORMAT)
        with self._lock:
            target = self.tables[table]
            for row in rows:
                if keep_ids:
                    bisect.insort(target, {"date": stamp} | row, key=itemgetter("id"))
                    continue
                row_id = self._next_id[table]
                self._next_id[table] = row_id + 1
                target.append({"id": row_id, "date": stamp} | _without_id(row))

    def last_id(self, table: str) -> int:
        """The highest id ever given in table (0 if none).

        Example: ``server.last_id("PHQ9")`` -> ``180``
        """
        with self._lock:
            return self._next_id[table] - 1

    def listing(self) -> list[dict]:
        """One ``{name, size, deleteable}`` entry per table, sorted by name.

        Example: ``server.listing()[0]`` -> ``{"name": "Demographics", "size": 20, "deleteable": True}``
        """
        with self._lock:
            return [
                {"name": name, "size": len(self.tables[name]), "deleteable": self.deleteable[name]}
                for name in sorted(self.tables)
            ]

    def rows(self, table: str, *, greater_than: int | None = None) -> list[dict]:
        """The rows of table by ascending id, only those with id > greater_than if given.

        Example: ``server.rows("PHQ9", greater_than=100)``
        """
        with self._lock:
            rows = self.tables[table]
            if greater_than is None:
                return list(rows)
            start = bisect.bisect_right(rows, greater_than, key=itemgetter("id"))
            return rows[start:]

    def delete_row(self, table: str, row_id: int) -> bool:
        """Remove one row; False if table has no row of that id.

        Example: ``server.delete_row("PHQ9", 3)`` -> ``True``
        """
        with self._lock:
            rows = self.tables[table]
            index = bisect.bisect_left(rows, row_id, key=itemgetter("id"))
            if index == len(rows) or rows[index]["id"] != row_id:
                return False
            del rows[index]
            return True

    def set_faults(self, changes: dict) -> Faults:
        """Change some Faults fields in place (validated); return the faults.

        Example: ``server.set_faults({"drop_rate": 0.0})``
        """
        kinds = {"error_rate": float, "delay": float, "drop_rate": float}
        kinds |= {"ignore_greater_than": bool, "seed": int}
        unknown = sorted(set(changes) - {f.name for f in fields(Faults)})
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(unknown)}")
        for name, value in changes.items():
            kind = kinds[name]
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
            if kind is int and not (numeric and float(value).is_integer()):
                raise ValueError(f"{name} must be an integer")
            if kind is float and not (numeric and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0")
            if name.endswith("_rate") and value > 1:
                raise ValueError(f"{name} must be between 0 and 1")
        with self._lock:
            for name, value in changes.items():
                setattr(self.faults, name, kinds[name](value))
        return self.faults

    def _draw(self) -> float:
        with self._lock:
            if self._rng_seed != self.faults.seed:
                self._rng = random.Random(self.faults.seed)
                self._rng_seed = self.faults.seed
            return self._rng.random()

    def app(self) -> Bottle:
        """A new Bottle WSGI app serving the export protocol for these tables.

        Example: ``httpx.Client(transport=httpx.WSGITransport(app=server.app()))``
        """
        return _build_app(self)


def _without_id(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "id"}


def _json(status: int, body: object, headers: dict | None = None) -> HTTPResponse:
    return HTTPResponse(
        orjson.dumps(body),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _error(status: int, code: str, message: str, headers: dict | None = None) -> HTTPResponse:
    return _json(status, {"error": code, "message": message}, headers)


def _build_app(server: StudyServer) -> Bottle:
    app = Bottle()
    app.catchall = False  # let ConnectionDropped (and bugs) reach the WSGI server

    @app.hook("before_request")
    def check_auth_and_faults():
        credentials = request.auth
        if credentials is None or not (
            hmac.compare_digest(credentials[0].encode(), server.user.encode())
            and hmac.compare_digest(credentials[1].encode(), server.password.encode())
        ):
            raise _error(
                401, "unauthorized", "missing or wrong credentials", {"WWW-Authenticate": REALM}
            )
        if not request.path.startswith("/export"):
            return
        faults = server.faults
        if faults.delay > 0:
            time.sleep(faults.delay)
        if faults.drop_rate > 0 and server._draw() < faults.drop_rate:
            raise ConnectionDropped(request.path)
        if faults.error_rate > 0 and server._draw() < faults.error_rate:
            raise _error(500, "server_error", "simulated server failure")

    @app.get("/export")
    @app.get("/export/")
    def list_tables():
        return _json(200, server.listing())

    @app.get("/export/<name>")
    def get_rows(name):
        if name not in server.tables:
            return _error(404, "not_found", f"no table {name!r}")
        raw = request.query.get("greaterThan")
        greater_than = None
        if raw is not None:
            try:
                greater_than = int(raw)
            except ValueError:
                return _error(400, "bad_request", f"greaterThan must be an integer, not {raw!r}")
        if server.faults.ignore_greater_than:
            greater_than = None
        return _json(200, server.rows(name, greater_than=greater_than))

    @app.delete("/export/<name>/<row_id>")
    def delete_row(name, row_id):
        if name not in server.tables:
            return _error(404, "not_found", f"no table {name!r}")
        if not server.deleteable[name]:
            return _error(403, "forbidden", f"table {name!r} is marked do-not-delete")
        try:
            number = int(row_id)
        except ValueError:
            return _error(400, "bad_request", f"row id must be an integer, not {row_id!r}")
        if not server.delete_row(name, number):
            return _error(404, "not_found", f"no row {number} in table {name!r}")
        return _json(200, {"deleted": number})

    @app.post("/_faults")
    def post_faults():
        try:
            changes = orjson.loads(request.body.read())
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of Faults fields")
            faults = server.set_faults(changes)
        except (orjson.JSONDecodeError, ValueError) as exc:
            return _error(400, "bad_request", str(exc))
        return _json(200, asdict(faults))

    @app.post("/_rows/<name>")
    def post_rows(name):
        if name not in server.tables:
            return _error(404, "not_found", f"no table {name!r}")
        try:
            rows = orjson.loads(request.body.read())
        except orjson.JSONDecodeError as exc:
            return _error(400, "bad_request", f"the body is not JSON: {exc}")
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            return _error(400, "bad_request", "the body must be a JSON array of objects")
        server.add_rows(name, rows)
        return _json(200, {"added": len(rows), "last_id": server.last_id(name)})

    for status, code in ((404, "not_found"), (405, "method_not_allowed")):
        app.error_handler[status] = _json_error_page(status, code)
    return app


def _json_error_page(status: int, code: str):
    def page(error) -> bytes:
        response.content_type = "application/json"
        return orjson.dumps({"error": code, "message": str(error.body) or f"HTTP {status}"})

    return page


# --- serving over HTTP --------------------------------------------------------------------


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow or hung client never blocks stopping


class _ServerHandler(ServerHandler):
    def handle_error(self) -> None:
        if isinstance(sys.exc_info()[1], ConnectionDropped):
            self.status = "000 dropped"  # write nothing; the socket is closed after run()
            log.debug("dropped the connection for %s", self.environ.get("PATH_INFO"))
            return
        super().handle_error()


class _RequestHandler(WSGIRequestHandler):
    timeout = 30  # seconds a connected client may stay silent

    def handle(self) -> None:
        """Like WSGIRequestHandler.handle, with a handler that can drop the connection."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        handler = _ServerHandler(
            self.rfile, self.wfile, self.get_stderr(), self.get_environ(), multithread=True
        )
        handler.request_handler = self
        handler.run(self.server.get_app())

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s - %s", self.address_string(), fmt % args)


def _make_http_server(server: StudyServer, host: str, port: int) -> _ThreadingWSGIServer:
    return make_server(
        host, port, server.app(), server_class=_ThreadingWSGIServer, handler_class=_RequestHandler
    )


def serve(server: StudyServer, *, host: str = "127.0.0.1", port: int = 9000) -> None:
    """Serve until interrupted, with a threaded WSGI server able to drop connections (drop_rate).

    Example: ``serve(StudyServer(tables, deleteable=deleteable, user="u", password="p"))``
    """
    with _make_http_server(server, host, port) as httpd:
        log.info("study server on http://%s:%d/export/", host, httpd.server_port)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            log.info("study server stopped")


@dataclass
class RunningServer:
    """A study server serving in a background thread; ``stop()`` (or leaving ``with``) ends it."""

    url: str
    httpd: _ThreadingWSGIServer
    thread: threading.Thread

    def stop(self) -> None:
        """Stop accepting requests, close the socket and wait for the serving thread."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_in_thread(
    server: StudyServer, *, host: str = "127.0.0.1", port: int = 0
) -> RunningServer:
    """Serve in a daemon thread (port 0 picks a free port) and return the running server.

    Example: ``with start_in_thread(server) as running: httpx.get(running.url + "/export/", ...)``
    """
    httpd = _make_http_server(server, host, port)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    return RunningServer(url=f"http://{host}:{httpd.server_port}", httpd=httpd, thread=thread)


# --- demo data ----------------------------------------------------------------------------


@dataclass
class _Person:
    pid: str
    joined: datetime
    condition: str
    severity: float  # 0..1, drives the item answers
    assessments: list[tuple[str, datetime]]


def demo_tables(
    public_key: Path | bytes | rsa.RSAPublicKey,
    *,
    participants: int = 20,
    days: int = 14,
    seed: int = 0,
    padding: str = "pkcs1v15",
    rows_per_table: int | None = None,
) -> tuple[dict[str, list[dict]], dict[str, bool]]:
    """Realistic tables (and their deleteable flags) for `participants` people over `days` days. rows_per_table, if given, makes PHQ9 exactly that many rows (for benchmarks).

    PHQ-9 item 9 is 0 for everyone but participant P0001, who answers it 2 at the first
    assessment (a safety alert for the demo); about 5 % of answers are 555 (prefer not to say).

    Example: ``tables, deleteable = demo_tables(key, participants=50, days=28, seed=1)``
    """
    if participants < 1 or days < 1:
        raise ValueError("participants and days must be at least 1")
    if rows_per_table is not None and rows_per_table < 0:
        raise ValueError("rows_per_table must be >= 0")
    key = load_public_key(public_key)
    _padding(padding)
    rng = random.Random(seed)
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = end - timedelta(days=days)
    people = [_person(i + 1, start, end, rng) for i in range(participants)]

    def encrypt(person: _Person) -> str:
        return encrypt_value(key, person.pid, padding=padding)

    participant_rows = [
        (
            p.joined,
            {
                "participantRSA": encrypt(p),
                "study": "mindtrails",
                "condition": p.condition,
                "email_optout": rng.random() < 0.1,
            },
        )
        for p in people
    ]
    demographic_rows = [
        (
            p.joined + timedelta(seconds=rng.randint(60, 600)),
            {
                "participantRSA": encrypt(p),
                "gender": _weighted(GENDERS, rng),
                "birth_year": -1 if rng.random() < 0.05 else rng.randint(1950, 2006),
                "country": _weighted(COUNTRIES, rng),
                "education": rng.choice(EDUCATION),
            },
        )
        for p in people
    ]
    visits = [(p, session, when) for p in people for session, when in p.assessments]
    if rows_per_table is not None:
        phq_visits = [_extra_visit(rng.choice(people), end, rng) for _ in range(rows_per_table)]
    else:
        phq_visits = visits
    tables = {
        "participant": _numbered(participant_rows),
        "Demographics": _numbered(demographic_rows),
        "PHQ9": _numbered(_scale_row(p, s, t, PHQ9_ITEMS, encrypt, rng) for p, s, t in phq_visits),
        "GAD7": _numbered(
            _scale_row(p, s, t + timedelta(minutes=rng.uniform(1, 5)), GAD7_ITEMS, encrypt, rng)
            for p, s, t in visits
        ),
    }
    deleteable = {"participant": False, "Demographics": True, "PHQ9": True, "GAD7": True}
    return tables, deleteable


def _person(number: int, start: datetime, end: datetime, rng: random.Random) -> _Person:
    span = (end - start).total_seconds()
    joined = start + timedelta(seconds=rng.uniform(0, span * 0.8))
    reached = rng.choices(range(1, len(ASSESSMENTS) + 1), weights=(2, 2, 2, 2, 3))[0]
    assessments = []
    when = joined + timedelta(minutes=rng.uniform(5, 30))
    for session in ASSESSMENTS[:reached]:
        if when >= end:
            break
        assessments.append((session, when))
        when += timedelta(days=rng.uniform(1, 3), minutes=rng.uniform(0, 120))
    return _Person(
        pid=f"P{number:04d}",
        joined=joined,
        condition=rng.choice(CONDITIONS),
        severity=rng.betavariate(2, 3),
        assessments=assessments,
    )


def _extra_visit(
    person: _Person, end: datetime, rng: random.Random
) -> tuple[_Person, str, datetime]:
    span = max((end - person.joined).total_seconds(), 1.0)
    return person, rng.choice(ASSESSMENTS), person.joined + timedelta(seconds=rng.uniform(0, span))


def _scale_row(person, session, when, items, encrypt, rng: random.Random):
    step = ASSESSMENTS.index(session)
    relief = (0.12 if person.condition == "TRAINING" else 0.04) * step
    level = 3 * person.severity * max(0.0, 1 - relief)
    row = {"participantRSA": encrypt(person), "session": session}
    for item in items:
        if rng.random() < PREFER_NOT_SHARE:
            row[item] = PREFER_NOT
        else:
            row[item] = min(3, max(0, round(rng.gauss(level, 0.7))))
    if SAFETY_ITEM in row:  # drawn all the same, so that the other values stay as they were
        if person.pid == AT_RISK and step == 0:
            row[SAFETY_ITEM] = 2
        elif row[SAFETY_ITEM] != PREFER_NOT:
            row[SAFETY_ITEM] = 0
    row["time_on_page"] = round(rng.lognormvariate(math.log(45), 0.5), 3)
    return when, row


def _numbered(dated_rows) -> list[dict]:
    """Rows sorted by date with ids 1, 2, ... (a server numbers rows as they arrive)."""
    ordered = sorted(dated_rows, key=itemgetter(0))
    return [
        {"id": i, "date": when.strftime(DATE_FORMAT)} | row
        for i, (when, row) in enumerate(ordered, start=1)
    ]


def _weighted(choices, rng: random.Random) -> str:
    values, weights = zip(*choices, strict=True)
    return rng.choices(values, weights=weights)[0]
