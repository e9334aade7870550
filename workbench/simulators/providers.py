"""A local stand-in for the sync providers, for tests, the demo and the benchmark.

One server speaks, on loopback, what the workbench's connectors use:

    GET  /o/oauth2/v2/auth, /direct-sharing/projects/oauth2/authorize/
                              authorization: approves at once and redirects to redirect_uri
                              with ?code=...&state=... (login_hint picks the user)
    POST /token, /oauth2/token/
                              authorization_code and refresh_token grants (client in HTTP
                              Basic); refresh tokens are single-use and rotate: a used one
                              answers 400 invalid_grant and revokes the user's tokens
    POST /v4/users/me/dataTypes/<type>/dataPoints:dailyRollUp
                              Google Health daily roll-up: rollupDataPoints of the range
    GET  /api/direct-sharing/project/exchange-member/
                              Open Humans: project_member_id and the member's data files
    POST /api/direct-sharing/project/files/upload/direct/   -> {"id", "url"}
    PUT  <url>                the file's bytes
    POST /api/direct-sharing/project/files/upload/complete/ (file_id)
    POST /api/direct-sharing/project/files/delete/          (project_member_id, file_id)
    GET  /api/daily?start=&end=
                              a plain REST source (for ``type = "rest"``): {"data": [...]}
    POST /_faults, GET /_stats
                              switch faults; counters (requests, 429s, refreshes, ...)

Data routes take ``Authorization: Bearer`` (401 otherwise, or after expiry or revocation) and
count against one sliding-window limit for the client (``rate_limit``): every answer carries
``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset`` (seconds, fractional),
and a request over the limit gets 429 with ``Retry-After``.

Example::

    simulator = ProviderSimulator(rate_limit=(60, 6.0))
    with start_in_thread(simulator) as running:
        ...  # point a [[sync.providers]] base_url at running.url
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, fields
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlencode

import orjson
from bottle import Bottle, HTTPResponse, request

from workbench.simulators.study_server import RunningServer, _make_http_server, start_in_thread

__all__ = [
    "ProviderSimulator",
    "SimulatorFaults",
    "RunningServer",
    "serve_simulator",
    "start_in_thread",
]


@dataclass
class SimulatorFaults:
    """What the simulator does wrong; change with :meth:`ProviderSimulator.set_faults`."""

    delay: float = 0.0  # seconds added to every data request
    token_delay: float = 0.0  # seconds the token endpoint takes (to widen refresh races)
    fail_put: bool = False  # the upload PUT answers 500
    fail_complete: bool = False  # upload complete answers 500
    data_status: int = 0  # nonzero: data routes answer this status with an error body
    revoke_on_reuse: bool = True  # a reused refresh token revokes the user's tokens


def _json(status: int, body, headers: dict | None = None) -> HTTPResponse:
    return HTTPResponse(
        orjson.dumps(body),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


class ProviderSimulator:
    """The simulated provider; thread-safe, state in memory."""

    def __init__(
        self,
        *,
        clients: dict[str, str] | None = None,
        rate_limit: tuple[int, float] = (60, 60.0),
        token_lifetime: float = 3600.0,
        seed: int = 1,
    ) -> None:
        self.clients = clients or {"demo-client": "demo-secret"}
        self.limit, self.interval = rate_limit[0], float(rate_limit[1])
        self.token_lifetime = token_lifetime
        self.seed = seed
        self.faults = SimulatorFaults()
        self.url = ""  # set when served, for upload URLs
        self._lock = threading.Lock()
        self._codes: dict[str, str] = {}  # code -> user
        self._access: dict[str, tuple[str, float]] = {}  # token -> (user, expires)
        self._refresh: dict[str, str] = {}  # live refresh token -> user
        self._used_refresh: dict[str, str] = {}
        self._window: deque[float] = deque()
        self._active: dict[str, int] = defaultdict(int)
        self._files: dict[str, dict[str, dict]] = defaultdict(dict)  # user -> id -> file
        self._pending: dict[str, dict] = {}  # upload id -> file before complete
        self._next_file = 1000
        self._users = 0
        self.stats = defaultdict(int)
        self.max_concurrent: dict[str, int] = defaultdict(int)

    # -- state helpers ------------------------------------------------------------------

    def set_faults(self, changes: dict) -> SimulatorFaults:
        known = {f.name for f in fields(SimulatorFaults)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown faults: {', '.join(sorted(unknown))}")
        with self._lock:
            self.faults = SimulatorFaults(**{**asdict(self.faults), **changes})
            return self.faults

    def files(self, user: str) -> dict[str, dict]:
        with self._lock:
            return {k: dict(v) for k, v in self._files[user].items()}

    def add_file(self, user: str, name: str, content: bytes) -> str:
        with self._lock:
            return self._store_file(user, name, content, {"tags": [], "description": ""})

    def _store_file(self, user, name, content, metadata) -> str:
        self._next_file += 1
        file_id = str(self._next_file)
        self._files[user][file_id] = {
            "id": int(file_id),
            "basename": name,
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "source": "direct-sharing-1",
            "metadata": metadata,
            "content": content,
        }
        return file_id

    def revoke(self, user: str) -> None:
        """Revoke every token of ``user`` (as a participant withdrawing consent would)."""
        with self._lock:
            self._revoke(user)

    def _revoke(self, user: str) -> None:
        for store in (self._access, self._refresh):
            for token in [
                t for t, v in store.items() if (v[0] if isinstance(v, tuple) else v) == user
            ]:
                del store[token]

    def expire_access_tokens(self) -> None:
        with self._lock:
            self._access = {t: (u, 0.0) for t, (u, _) in self._access.items()}

    def steps(self, user: str, day: date) -> int:
        digest = hashlib.sha256(f"{self.seed}:{user}:{day.isoformat()}".encode()).digest()
        value = 2000 + int.from_bytes(digest[:4], "big") % 12000
        today = datetime.now(UTC).date()
        if day > today:
            return 0
        if day == today:  # the day so far
            now = datetime.now(UTC)
            return int(value * (now.hour * 60 + now.minute) / 1440)
        return value

    def _issue(self, user: str) -> dict:
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self._access[access] = (user, time.time() + self.token_lifetime)
        self._refresh[refresh] = user
        return {
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": self.token_lifetime,
            "token_type": "Bearer",
            "scope": "activity",
        }

    # -- request checks ------------------------------------------------------------------

    def _limit_headers(self, now: float) -> tuple[bool, dict]:
        """Count one request against the client's window; (allowed, headers)."""
        while self._window and self._window[0] <= now - self.interval:
            self._window.popleft()
        allowed = len(self._window) < self.limit
        if allowed:
            self._window.append(now)
        reset = (self._window[0] + self.interval - now) if self._window else 0.0
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.limit - len(self._window)),
            "RateLimit-Reset": f"{max(reset, 0):.3f}",
        }
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil(reset)))
        return allowed, headers

    def _authorized(self) -> tuple[str | None, HTTPResponse | None, dict]:
        """(user, refusal, limit headers) of a data request."""
        header = request.get_header("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        with self._lock:
            self.stats["requests"] += 1
            found = self._access.get(token)
            if found is None or found[1] < time.time():
                self.stats["unauthorized"] += 1
                return None, _json(401, {"error": "invalid_token"}), {}
            allowed, headers = self._limit_headers(time.monotonic())
            if not allowed:
                self.stats["throttled"] += 1
                return None, _json(429, {"error": "rate_limited"}, headers), headers
            if self.faults.data_status:
                return (
                    None,
                    _json(self.faults.data_status, {"error": "server_error"}, headers),
                    headers,
                )
        return found[0], None, headers

    def _enter(self, user: str) -> None:
        with self._lock:
            self._active[user] += 1
            self.max_concurrent[user] = max(self.max_concurrent[user], self._active[user])
        if self.faults.delay:
            time.sleep(self.faults.delay)

    def _leave(self, user: str) -> None:
        with self._lock:
            self._active[user] -= 1

    # -- the app -------------------------------------------------------------------------

    def app(self) -> Bottle:
        app = Bottle()
        sim = self

        def authorize():
            client = request.query.get("client_id", "")
            redirect = request.query.get("redirect_uri", "")
            if client not in sim.clients or not redirect.startswith(("http://", "https://")):
                return _json(400, {"error": "invalid_request"})
            with sim._lock:
                user = request.query.get("login_hint")
                if not user:
                    sim._users += 1
                    user = f"user{sim._users}"
                code = secrets.token_urlsafe(16)
                sim._codes[code] = user
            query = urlencode({"code": code, "state": request.query.get("state", "")})
            return HTTPResponse(status=302, headers={"Location": f"{redirect}?{query}"})

        app.route("/o/oauth2/v2/auth", "GET", authorize)
        app.route("/direct-sharing/projects/oauth2/authorize/", "GET", authorize)

        def token():
            auth = request.auth or (
                request.forms.get("client_id"),
                request.forms.get("client_secret"),
            )
            if not auth or sim.clients.get(auth[0]) != auth[1]:
                return _json(401, {"error": "invalid_client"})
            grant = request.forms.get("grant_type")
            if sim.faults.token_delay:
                time.sleep(sim.faults.token_delay)
            with sim._lock:
                if grant == "authorization_code":
                    user = sim._codes.pop(request.forms.get("code", ""), None)
                    if user is None:
                        return _json(400, {"error": "invalid_grant"})
                    return _json(200, sim._issue(user))
                if grant == "refresh_token":
                    old = request.forms.get("refresh_token", "")
                    user = sim._refresh.pop(old, None)
                    if user is None:
                        sim.stats["invalid_grant"] += 1
                        reused = sim._used_refresh.get(old)
                        if reused and sim.faults.revoke_on_reuse:
                            sim._revoke(reused)
                        return _json(400, {"error": "invalid_grant"})
                    sim._used_refresh[old] = user
                    sim.stats["refreshes"] += 1
                    return _json(200, sim._issue(user))
            return _json(400, {"error": "unsupported_grant_type"})

        app.route("/token", "POST", token)
        app.route("/oauth2/token/", "POST", token)

        @app.post("/v4/users/me/dataTypes/<data_type>/<method>")
        def daily_roll_up(data_type, method):
            if method != "dataPoints:dailyRollUp":  # (a colon in a Bottle rule is a wildcard)
                return _json(404, {"error": {"code": 404, "status": "NOT_FOUND"}})
            user, refusal, headers = sim._authorized()
            if refusal:
                return refusal
            sim._enter(user)
            try:
                try:
                    body = json.loads(request.body.read() or b"{}")
                    start, end = (_civil(body["range"][k]) for k in ("start", "end"))
                except (KeyError, TypeError, ValueError):
                    return _json(
                        400, {"error": {"code": 400, "status": "INVALID_ARGUMENT"}}, headers
                    )
                if (end - start).days > 90 or end <= start:
                    return _json(
                        400, {"error": {"code": 400, "status": "INVALID_ARGUMENT"}}, headers
                    )
                points = []
                day = start
                while day < end and day <= datetime.now(UTC).date():
                    points.append(
                        {
                            "civilStartTime": {"date": _civil_json(day)},
                            "civilEndTime": {"date": _civil_json(day + timedelta(days=1))},
                            data_type: {"countSum": str(sim.steps(user, day))},
                        }
                    )
                    day += timedelta(days=1)
                return _json(200, {"rollupDataPoints": points}, headers)
            finally:
                sim._leave(user)

        @app.get("/api/daily")
        def daily():
            user, refusal, headers = sim._authorized()
            if refusal:
                return refusal
            sim._enter(user)
            try:
                try:
                    start = date.fromisoformat(request.query["start"])
                    end = date.fromisoformat(request.query["end"])
                except (KeyError, ValueError):
                    return _json(400, {"error": "start and end are ISO dates"}, headers)
                days = [start + timedelta(days=n) for n in range(max((end - start).days, 0))]
                rows = [
                    {"date": d.isoformat(), "steps": sim.steps(user, d), "unit": "count"}
                    for d in days
                    if d <= datetime.now(UTC).date()
                ]
                return _json(200, {"data": rows}, headers)
            finally:
                sim._leave(user)

        @app.get("/api/direct-sharing/project/exchange-member/")
        def exchange_member():
            user, refusal, headers = sim._authorized()
            if refusal:
                return refusal
            sim._enter(user)
            try:
                with sim._lock:
                    files = [
                        {k: v for k, v in f.items() if k != "content"}
                        for f in sim._files[user].values()
                    ]
                return _json(200, {"project_member_id": _member(user), "data": files}, headers)
            finally:
                sim._leave(user)

        @app.post("/api/direct-sharing/project/files/upload/direct/")
        def upload_direct():
            user, refusal, headers = sim._authorized()
            if refusal:
                return refusal
            if request.forms.get("project_member_id") != _member(user):
                return _json(403, {"detail": "not your member"}, headers)
            try:
                metadata = json.loads(request.forms.get("metadata", ""))
                if not {"tags", "description"} <= set(metadata):
                    raise ValueError
            except ValueError:
                return _json(400, {"metadata": "tags and description are required"}, headers)
            name = request.forms.get("filename", "")
            if not name:
                return _json(400, {"filename": "required"}, headers)
            with sim._lock:
                sim._next_file += 1
                upload = str(sim._next_file)
                sim._pending[upload] = {
                    "user": user,
                    "name": name,
                    "metadata": metadata,
                    "content": None,
                }
            return _json(201, {"id": int(upload), "url": f"{sim.url}/_upload/{upload}"}, headers)

        @app.put("/_upload/<upload>")
        def upload_put(upload):
            if sim.faults.fail_put:
                sim.stats["failed_puts"] += 1
                return _json(500, {"error": "storage unavailable"})
            with sim._lock:
                if upload not in sim._pending:
                    return _json(404, {"error": "no such upload"})
                sim._pending[upload]["content"] = request.body.read()
            return HTTPResponse(status=200)

        @app.post("/api/direct-sharing/project/files/upload/complete/")
        def upload_complete():
            user, refusal, headers = sim._authorized()
            if refusal:
                return refusal
            if sim.faults.fail_complete:
                return _json(500, {"error": "could not complete"}, headers)
            upload = request.forms.get("file_id", "")
            with sim._lock:
                pending = sim._pending.get(upload)
                if pending is None or pending["user"] != user or pending["content"] is None:
                    return _json(400, {"file_id": "no uploaded file of that id"}, headers)
                del sim._pending[upload]
                sim._files[user][upload] = {
                    "id": int(upload),
                    "basename": pending["name"],
                    "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "source": "direct-sharing-1",
                    "metadata": pending["metadata"],
                    "content": pending["content"],
                }
            return _json(200, {"status": "ok", "size": len(pending["content"])}, headers)

        @app.post("/api/direct-sharing/project/files/delete/")
        def delete_file():
            user, refusal, headers = sim._authorized()
            if refusal:
                return refusal
            if request.forms.get("project_member_id") != _member(user):
                return _json(403, {"detail": "not your member"}, headers)
            with sim._lock:
                removed = sim._files[user].pop(request.forms.get("file_id", ""), None)
            if removed is None:
                return _json(404, {"detail": "no such file"}, headers)
            return _json(200, {"ids": [removed["id"]]}, headers)

        @app.post("/_faults")
        def post_faults():
            try:
                return _json(200, asdict(sim.set_faults(json.loads(request.body.read() or b"{}"))))
            except (ValueError, TypeError) as exc:
                return _json(400, {"error": str(exc)})

        @app.get("/_stats")
        def get_stats():
            with sim._lock:
                return _json(200, {**sim.stats, "max_concurrent": dict(sim.max_concurrent)})

        return app


def _member(user: str) -> str:
    return str(10_000_000 + int(hashlib.sha256(user.encode()).hexdigest()[:6], 16))


def _civil(value: dict) -> date:
    d = value["date"]
    return date(int(d["year"]), int(d["month"]), int(d["day"]))


def _civil_json(day: date) -> dict:
    return {"year": day.year, "month": day.month, "day": day.day}


def start_simulator(simulator: ProviderSimulator, *, port: int = 0) -> RunningServer:
    """Serve in a daemon thread on 127.0.0.1 and return the running server."""
    running = start_in_thread(simulator, port=port)
    simulator.url = running.url
    return running


def serve_simulator(simulator: ProviderSimulator, *, port: int = 9100) -> None:
    """Serve until interrupted."""
    with _make_http_server(simulator, "127.0.0.1", port) as httpd:
        simulator.url = f"http://127.0.0.1:{httpd.server_port}"
        with contextlib.suppress(KeyboardInterrupt):
            httpd.serve_forever()
