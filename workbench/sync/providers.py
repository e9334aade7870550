"""Provider connectors: how to authorize, what a fetch window is, how to ask for one and how
to read the answer. A tiny registry maps a provider ``type`` to its class:

    google_health   the Google Health API (successor of the Fitbit Web API): daily steps from
                    ``POST /v4/users/me/dataTypes/steps/dataPoints:dailyRollUp``
    open_humans     Open Humans: the member's data files from
                    ``GET /api/direct-sharing/project/exchange-member/`` (also a destination)
    rest            declarative: endpoint, window parameters, record path and fields in TOML

Example::

    provider = get_provider(sync_settings(config), "google_health")
    provider.windows(date(2026, 1, 1), date(2026, 1, 20))
"""

from __future__ import annotations

import datetime as dt
from typing import ClassVar
from urllib.parse import urlencode

from workbench.errors import ConfigError
from workbench.sync.settings import ProviderConfig, SyncSettings

# ---------------------------------------------------------------------------- windows


def window_start(day: dt.date, kind: str) -> dt.date:
    """The first day of the window holding ``day`` (ISO weeks start on Monday)."""
    if kind == "week":
        return day - dt.timedelta(days=day.weekday())
    if kind == "month":
        return day.replace(day=1)
    return day


def window_end(start: dt.date, kind: str) -> dt.date:
    """The day after the window starting at ``start`` (windows are closed-open)."""
    if kind == "week":
        return start + dt.timedelta(days=7)
    if kind == "month":
        return (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return start + dt.timedelta(days=1)


def windows(start: dt.date, today: dt.date, kind: str) -> list[tuple[dt.date, dt.date]]:
    """The windows from the one holding ``start`` to the one holding ``today``; the last one
    is partial (it reaches today). ``all`` is one window from ``start`` to tomorrow."""
    if kind == "all":
        return [(start, today + dt.timedelta(days=1))]
    found = []
    current = window_start(start, kind)
    while current <= today:
        end = window_end(current, kind)
        found.append((current, end))
        current = end
    return found


# ---------------------------------------------------------------------------- providers


class Provider:
    """Base connector: OAuth2 authorization code flow with client credentials in the body."""

    kind: ClassVar[str] = ""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.name = config.name

    @property
    def streams(self) -> tuple[str, ...]:
        return self.config.streams

    def authorization_url(self, state: str, redirect_uri: str) -> str:
        """Where the participant grants access; the provider redirects to ``redirect_uri``."""
        client_id, _ = self.config.client()
        query = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "access_type": "offline",
        }
        if self.config.scopes:
            query["scope"] = " ".join(self.config.scopes)
        return f"{self.config.url(self.config.authorize_url)}?{urlencode(query)}"

    def token_form(self, grant: dict) -> tuple[str, dict, tuple[str, str]]:
        """(token URL, form, basic auth) of a token request (code exchange or refresh)."""
        client_id, secret = self.config.client()
        return self.config.url(self.config.token_url), grant, (client_id, secret)

    def initial_start(self, today: dt.date) -> dt.date:
        return window_start(today - dt.timedelta(days=self.config.history_days), self.config.window)

    def windows(self, start: dt.date, today: dt.date) -> list[tuple[dt.date, dt.date]]:
        return windows(start, today, self.config.window)

    def request(self, stream: str, start: dt.date, end: dt.date, account) -> dict:
        """Keyword arguments of ``httpx.Client.request`` fetching one window."""
        raise NotImplementedError

    def parse(self, stream: str, payload) -> list[dict]:
        """The records of one answer, each with an ISO ``date``."""
        raise NotImplementedError

    def identity_request(self) -> dict | None:
        """The request naming the member after linking (None: the provider has none)."""
        return None

    def identity(self, payload) -> str | None:
        return None


def _civil(day: dt.date) -> dict:
    return {"date": {"year": day.year, "month": day.month, "day": day.day}}


class GoogleHealth(Provider):
    """Daily activity (steps) from the Google Health API's daily roll-up: one request per
    window (a week is well under the 90-day maximum range and the page size)."""

    kind = "google_health"

    def request(self, stream, start, end, account) -> dict:
        return {
            "method": "POST",
            "url": f"/v4/users/me/dataTypes/{stream}/dataPoints:dailyRollUp",
            "json": {
                "range": {"start": _civil(start), "end": _civil(end)},
                "windowSizeDays": 1,
                "pageSize": 1000,
            },
        }

    def parse(self, stream, payload) -> list[dict]:
        if not isinstance(payload, dict):
            raise ValueError("the answer is not a JSON object")
        points = payload.get("rollupDataPoints", [])
        if not isinstance(points, list):
            raise ValueError("rollupDataPoints is not a list")
        rows = []
        key = {"steps": "steps"}.get(stream, stream)
        for point in points:
            day = point["civilStartTime"]["date"]
            value = point.get(key) or {}
            rows.append(
                {
                    "date": f"{day['year']:04d}-{day['month']:02d}-{day['day']:02d}",
                    stream: int(value.get("countSum", 0)),
                }
            )
        return rows


class OpenHumans(Provider):
    """Open Humans as a source: the member's data files (one listing per run)."""

    kind = "open_humans"
    exchange = "/api/direct-sharing/project/exchange-member/"

    def authorization_url(self, state: str, redirect_uri: str) -> str:
        client_id, _ = self.config.client()
        query = {
            "client_id": client_id,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "state": state,
        }
        return f"{self.config.url(self.config.authorize_url)}?{urlencode(query)}"

    def request(self, stream, start, end, account) -> dict:
        return {"method": "GET", "url": self.exchange}

    def parse(self, stream, payload) -> list[dict]:
        if not isinstance(payload, dict) or not isinstance(payload.get("data", []), list):
            raise ValueError("the exchange-member answer has no data list")
        return [
            {
                "date": str(item.get("created", ""))[:10] or "undated",
                "file_id": str(item["id"]),
                "basename": item.get("basename"),
                "source": item.get("source"),
                "tags": ",".join(item.get("metadata", {}).get("tags", [])),
            }
            for item in payload.get("data", [])
        ]

    def identity_request(self) -> dict:
        return {"method": "GET", "url": self.exchange}

    def identity(self, payload) -> str | None:
        return str(payload.get("project_member_id")) if isinstance(payload, dict) else None


class Rest(Provider):
    """A provider declared in TOML: ``endpoint`` (with ``{stream}``), ``method``, ``params``
    whose values may use ``{start}``, ``{end}`` (exclusive) and ``{end_inclusive}`` (ISO
    dates), ``records`` (dotted path of the record list), ``date_field`` and ``fields``."""

    kind = "rest"

    def request(self, stream, start, end, account) -> dict:
        values = {
            "start": start.isoformat(),
            "end": end.isoformat(),
            "end_inclusive": (end - dt.timedelta(days=1)).isoformat(),
            "stream": stream,
        }
        try:
            params = {k: str(v).format(**values) for k, v in self.config.params.items()}
            url = self.config.endpoint.format(**values)
        except (KeyError, IndexError) as exc:
            raise ConfigError(f"sync provider {self.name!r}: unknown placeholder {exc}") from None
        method = self.config.method.upper()
        if method == "GET":
            return {"method": method, "url": url, "params": params}
        return {"method": method, "url": url, "json": params}

    def parse(self, stream, payload) -> list[dict]:
        records = payload
        for part in filter(None, self.config.records.split(".")):
            if not isinstance(records, dict) or part not in records:
                raise ValueError(f"the answer has no {self.config.records!r}")
            records = records[part]
        if not isinstance(records, list):
            raise ValueError(f"{self.config.records!r} is not a list")
        rows = []
        for record in records:
            if not isinstance(record, dict) or self.config.date_field not in record:
                raise ValueError(f"a record without {self.config.date_field!r}")
            kept = {f: record.get(f) for f in self.config.fields} if self.config.fields else record
            rows.append({**kept, "date": str(record[self.config.date_field])[:10]})
        return rows


REGISTRY: dict[str, type[Provider]] = {}


def register(cls: type[Provider]) -> type[Provider]:
    """Add a connector class under its ``kind`` (usable as a decorator)."""
    REGISTRY[cls.kind] = cls
    return cls


for _cls in (GoogleHealth, OpenHumans, Rest):
    register(_cls)


def get_provider(settings: SyncSettings, name: str) -> Provider:
    """The connector of the provider called ``name`` in ``[sync]``."""
    config = settings.provider(name)
    return REGISTRY[config.type](config)
