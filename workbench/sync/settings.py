"""The ``[sync]`` section of workbench.toml: schedule settings and ``[[sync.providers]]``.

Example::

    settings = sync_settings(load_config("demo-home"))
    settings.provider("google_health").rate_limit     # (300, 60.0)
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field, fields

from workbench.config import Config
from workbench.errors import ConfigError, UnknownProvider

PROVIDER_TYPES = ("google_health", "open_humans", "rest")
WINDOWS = ("day", "week", "month", "all")
NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")

# What each built-in type uses unless its table says otherwise.
TYPE_DEFAULTS: dict[str, dict] = {
    "google_health": {
        "base_url": "https://health.googleapis.com",
        "authorize_url": "https://accounts.google.com/o/oauth2/v2/auth",
        "token_url": "https://oauth2.googleapis.com/token",
        "scopes": ("https://www.googleapis.com/auth/googlehealth.activity_and_fitness.readonly",),
        "rate_limit": (300, 60.0),  # per user per minute
        "limit_scope": "account",
        "window": "week",
        "streams": ("steps",),
    },
    "open_humans": {
        "base_url": "https://www.openhumans.org",
        "authorize_url": "/direct-sharing/projects/oauth2/authorize/",
        "token_url": "/oauth2/token/",
        "scopes": (),
        "rate_limit": (60, 60.0),  # the project's realm, as oh-moves-source had it
        "limit_scope": "client",
        "window": "all",
        "streams": ("files",),
    },
    "rest": {"window": "week", "streams": ("records",)},
}


@dataclass(frozen=True)
class ProviderConfig:
    """One ``[[sync.providers]]`` table. URLs starting with ``/`` are joined to ``base_url``;
    the OAuth2 client's id and secret come from the environment variables named here."""

    name: str
    type: str
    base_url: str = ""
    authorize_url: str = ""
    token_url: str = ""
    scopes: tuple[str, ...] = ()
    client_id_env: str = ""
    client_secret_env: str = ""
    rate_limit: tuple[int, float] = (60, 60.0)  # requests per seconds
    limit_scope: str = "client"  # client: one bucket for the provider; account: one per account
    window: str = "week"
    history_days: int = 730  # how far back a new account's first sync reaches
    timeout: float = 30.0  # seconds per request
    streams: tuple[str, ...] = ()
    # type "rest" only: the declarative endpoint
    endpoint: str = ""  # path (joined to base_url) with {stream}
    method: str = "GET"
    params: dict = field(default_factory=dict)  # values may hold {start}, {end}, {end_inclusive}
    records: str = "data"  # dotted path of the record list in the JSON answer
    date_field: str = "date"
    fields: tuple[str, ...] = ()  # value fields kept (empty: every field)

    def url(self, value: str) -> str:
        return self.base_url.rstrip("/") + value if value.startswith("/") else value

    def client(self) -> tuple[str, str]:
        """(client id, client secret) from the environment, or :class:`ConfigError`."""
        missing = [v for v in (self.client_id_env, self.client_secret_env) if not os.environ.get(v)]
        if not self.client_id_env or not self.client_secret_env or missing:
            raise ConfigError(
                f"sync provider {self.name!r} needs its OAuth2 client in the environment: set "
                + " and ".join(missing or ["client_id_env and client_secret_env in [sync]"])
            )
        return os.environ[self.client_id_env], os.environ[self.client_secret_env]


@dataclass(frozen=True)
class SyncSettings:
    """The ``[sync]`` section."""

    key_env: str = "WORKBENCH_SYNC_KEY"  # Fernet key encrypting tokens at rest
    stale_days: float = 4.0  # accounts not synced for this long are queued
    incomplete_grace_hours: float = 24.0  # links never completed are removed after this
    refresh_ahead_minutes: float = 75.0  # maintenance refreshes tokens expiring this soon
    poll_minutes: int = 15  # the polling bridge's window
    activity_keep_days: float = 30.0  # ended activities (and their log) kept this long
    inline_wait: float = 1.5  # waits up to this long happen in the run; longer ones requeue it
    safety_ms: int = 100  # added to every local rate window against clock and network skew
    callback_url: str = ""  # empty: [server] public_url + /sync/callback
    providers: tuple[ProviderConfig, ...] = ()

    @property
    def key(self) -> str | None:
        return os.environ.get(self.key_env) or None

    def provider(self, name: str) -> ProviderConfig:
        for provider in self.providers:
            if provider.name == name:
                return provider
        known = ", ".join(p.name for p in self.providers) or "none"
        raise UnknownProvider(f"no sync provider {name!r} in workbench.toml (providers: {known})")


def sync_settings(config: Config) -> SyncSettings:
    """The checked ``[sync]`` section of ``config`` (defaults when absent), parsed once per
    section as written: every later call answers the same frozen settings.

    Example: ``sync_settings(load_config()).stale_days``.
    """
    written = json.dumps(config.sync, sort_keys=True, default=str)
    return _parsed(written, config.server.public_url)


@functools.lru_cache(maxsize=32)
def _parsed(written: str, public_url: str) -> SyncSettings:
    raw = json.loads(written)
    providers = raw.pop("providers", [])
    known = {f.name for f in fields(SyncSettings)} - {"providers"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown keys in [sync]: {', '.join(sorted(unknown))}")
    try:
        settings = SyncSettings(**raw, providers=_providers(providers))
    except TypeError as exc:
        raise ConfigError(f"bad [sync] section: {exc}") from exc
    if settings.stale_days <= 0 or settings.poll_minutes < 1 or settings.inline_wait < 0:
        raise ConfigError("[sync] stale_days and poll_minutes must be positive")
    if not settings.callback_url:
        url = public_url.rstrip("/") + "/sync/callback"
        settings = SyncSettings(**{**_as_dict(settings), "callback_url": url})
    return settings


def _as_dict(settings: SyncSettings) -> dict:
    return {f.name: getattr(settings, f.name) for f in fields(settings)}


def _providers(raw: object) -> tuple[ProviderConfig, ...]:
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise ConfigError("sync providers must be written as [[sync.providers]] tables")
    found = []
    known = {f.name for f in fields(ProviderConfig)}
    for entry in raw:
        name = entry.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(
                f"[[sync.providers]] needs a name of lower-case letters, digits, '-', '_': {name!r}"
            )
        kind = entry.get("type")
        if kind not in PROVIDER_TYPES:
            raise ConfigError(
                f"sync provider {name!r}: type must be one of {', '.join(PROVIDER_TYPES)}"
            )
        unknown = set(entry) - known
        if unknown:
            raise ConfigError(
                f"unknown keys in sync provider {name!r}: {', '.join(sorted(unknown))}"
            )
        values = {**TYPE_DEFAULTS[kind], **entry}
        limit = values.get("rate_limit")
        if isinstance(limit, dict):
            limit = (limit.get("requests"), limit.get("seconds"))
        if (
            not isinstance(limit, (tuple, list))
            or len(limit) != 2
            or not isinstance(limit[0], int)
            or limit[0] < 1
            or not isinstance(limit[1], (int, float))
            or limit[1] <= 0
        ):
            raise ConfigError(
                f"sync provider {name!r}: rate_limit is {{requests = N, seconds = S}}, both positive"
            )
        values["rate_limit"] = (int(limit[0]), float(limit[1]))
        for key in ("scopes", "streams", "fields"):
            values[key] = tuple(values.get(key, ()))
        try:
            provider = ProviderConfig(**values)
        except TypeError as exc:
            raise ConfigError(f"bad sync provider {name!r}: {exc}") from exc
        if provider.window not in WINDOWS:
            raise ConfigError(f"sync provider {name!r}: window must be one of {', '.join(WINDOWS)}")
        if provider.limit_scope not in ("client", "account"):
            raise ConfigError(f"sync provider {name!r}: limit_scope is 'client' or 'account'")
        if not provider.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"sync provider {name!r} needs an http(s) base_url")
        if kind == "rest" and not provider.endpoint:
            raise ConfigError(f"sync provider {name!r} of type rest needs an endpoint")
        if not provider.streams:
            raise ConfigError(f"sync provider {name!r} needs at least one stream")
        if provider.timeout <= 0 or provider.history_days < 1:
            raise ConfigError(f"sync provider {name!r}: timeout and history_days must be positive")
        found.append(provider)
    names = [p.name for p in found]
    if len(set(names)) != len(names):
        raise ConfigError("two [[sync.providers]] share a name")
    return tuple(found)
