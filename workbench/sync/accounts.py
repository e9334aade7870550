"""Accounts, OAuth2 links and tokens.

An account links a study's subject to a provider. :func:`start_link` records a pending
account and returns the provider's authorization URL; the provider sends the participant back
to the server's ``/sync/callback`` with a code, and :func:`complete_link` exchanges it for
tokens. Tokens are encrypted at rest with Fernet (the key comes from the variable named by
``[sync] key_env``). :func:`access_token` refreshes a token close to expiry under a lock per
account that holds across processes (the catalog's named lock), re-reads the token after taking
it (another process may have refreshed it meanwhile: refresh tokens are single-use) and
stores the new pair in one transaction. A provider refusing a token marks the account
revoked and opens an alert, so a scheduled job does not retry it in a loop.

Example::

    account, url = start_link(config, catalog, "demo", "demo_00001", "google_health")
    print(url)                    # the participant opens it; the callback completes the link
    token = access_token(config, catalog, account)
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import httpx
from sqlalchemy import delete, select, text, update

from workbench.catalog import (
    Catalog,
    alerts,
    subjects,
    sync_accounts,
    sync_auth_states,
    sync_tokens,
)
from workbench.config import Config
from workbench.errors import (
    AuthorizationFailed,
    ConfigError,
    SourceUnavailable,
    TokenRevoked,
    UnknownAccount,
    UnknownStudy,
    UnknownSubject,
)
from workbench.sync.providers import Provider, get_provider
from workbench.sync.settings import SyncSettings, sync_settings
from workbench.times import now_ms

log = logging.getLogger("workbench.sync")

STATE_TTL_MS = 3_600_000  # an authorization must come back within an hour
EXPIRY_MARGIN_MS = 60_000  # a token this close to its expiry is refreshed before use
REVOKING_ERRORS = {"invalid_grant", "invalid_token", "unauthorized_client", "access_denied"}


@dataclass(frozen=True)
class Account:
    """One linked (or pending) account."""

    id: int
    study: str
    subject: str
    provider: str
    status: str
    external_id: str | None
    created_at: int
    linked_at: int | None
    last_synced_at: int | None
    last_attempt_at: int | None
    error: str | None

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _account(row) -> Account:
    return Account(
        id=row.id,
        study=row.study_id,
        subject=row.subject_id,
        provider=row.provider,
        status=row.status,
        external_id=row.external_id,
        created_at=row.created_at,
        linked_at=row.linked_at,
        last_synced_at=row.last_synced_at,
        last_attempt_at=row.last_attempt_at,
        error=row.error,
    )


def get_account(catalog: Catalog, account_id: int) -> Account:
    """The account of that id, or :class:`UnknownAccount`."""
    with catalog.engine.connect() as conn:
        row = conn.execute(select(sync_accounts).where(sync_accounts.c.id == account_id)).first()
    if row is None:
        raise UnknownAccount(f"no sync account {account_id}; see `workbench sync accounts`")
    return _account(row)


def list_accounts(
    catalog: Catalog, *, study: str | None = None, provider: str | None = None
) -> list[Account]:
    """Every account, oldest first (optionally of one study or provider)."""
    c = sync_accounts.c
    query = select(sync_accounts).order_by(c.id)
    if study:
        query = query.where(c.study_id == study)
    if provider:
        query = query.where(c.provider == provider)
    with catalog.engine.connect() as conn:
        return [_account(r) for r in conn.execute(query)]


# ---------------------------------------------------------------------------- encryption


def generate_key() -> str:
    """A new Fernet key for ``[sync] key_env``."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _cipher(settings: SyncSettings):
    from cryptography.fernet import Fernet

    key = settings.key
    if not key:
        raise ConfigError(
            f"tokens are encrypted with the key in {settings.key_env}, which is not set; make "
            f'one with: python -c "from cryptography.fernet import Fernet; '
            f'print(Fernet.generate_key().decode())"'
        )
    try:
        return Fernet(key.encode())
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{settings.key_env} is not a Fernet key (32 url-safe base64 bytes)"
        ) from exc


def _decrypt(cipher, value: str | None) -> str | None:
    from cryptography.fernet import InvalidToken

    if value is None:
        return None
    try:
        return cipher.decrypt(value.encode()).decode()
    except InvalidToken:
        raise ConfigError(
            "a stored token cannot be decrypted with the key in the environment: it was "
            "encrypted with another key"
        ) from None


# ---------------------------------------------------------------------------- linking


def start_link(
    config: Config, catalog: Catalog, study: str, subject: str, provider_name: str
) -> tuple[Account, str]:
    """Record a pending account for ``subject`` (or reuse its account) and return it with the
    provider's authorization URL."""
    settings = sync_settings(config)
    provider = get_provider(settings, provider_name)
    with catalog.engine.connect() as conn:
        known = conn.execute(
            select(subjects.c.subject_id).where(
                subjects.c.study_id == study, subjects.c.subject_id == subject
            )
        ).first()
        if known is None:
            studies = conn.execute(text("SELECT 1 FROM studies WHERE study_id = :s"), {"s": study})
            if studies.first() is None:
                raise UnknownStudy(f"no study {study!r}")
            raise UnknownSubject(f"no subject {subject!r} enrolled in {study!r}")
    state = secrets.token_urlsafe(24)
    now = now_ms()
    c = sync_accounts.c
    with catalog.writing() as conn:
        row = conn.execute(
            select(c.id).where(
                c.study_id == study, c.subject_id == subject, c.provider == provider.name
            )
        ).first()
        if row is None:
            account_id = conn.execute(
                sync_accounts.insert()
                .values(
                    study_id=study,
                    subject_id=subject,
                    provider=provider.name,
                    status="pending",
                    created_at=now,
                )
                .returning(c.id)
            ).scalar_one()
        else:
            account_id = row.id
        conn.execute(
            sync_auth_states.insert().values(
                state=state,
                account_id=account_id,
                redirect_uri=settings.callback_url,
                created_at=now,
            )
        )
    url = provider.authorization_url(state, settings.callback_url)
    log.info("link started: account %d (%s/%s on %s)", account_id, study, subject, provider.name)
    return get_account(catalog, account_id), url


def complete_link(config: Config, catalog: Catalog, state: str, code: str) -> Account:
    """Exchange the authorization code of a callback for tokens and activate the account.

    The state is used up first, by one conditional DELETE: of two callbacks with the same
    state, however close, exactly one goes on; the other gets :class:`AuthorizationFailed`.
    A state whose code the provider then refuses is used up too (start the link again).
    """
    settings = sync_settings(config)
    pending = _use_up_state(catalog, state)
    if pending is None or pending.created_at < now_ms() - STATE_TTL_MS:
        raise AuthorizationFailed("unknown or expired authorization state; start the link again")
    account = get_account(catalog, pending.account_id)
    provider = get_provider(settings, account.provider)
    try:
        payload = _token_call(
            provider,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": pending.redirect_uri,
            },
        )
    except TokenRevoked as exc:
        raise AuthorizationFailed(f"{provider.name} refused the code: {exc.message}") from None
    cipher = _cipher(settings)
    external = _identify(provider, payload["access_token"])
    with catalog.writing() as conn:
        _store_token(conn, cipher, account.id, payload, generation=None)
        conn.execute(
            update(sync_accounts)
            .where(sync_accounts.c.id == account.id)
            .values(status="active", linked_at=now_ms(), external_id=external, error=None)
        )
        _close_alerts(conn, account)
    log.info("account %d linked to %s", account.id, provider.name)
    return get_account(catalog, account.id)


def _use_up_state(catalog: Catalog, state: str):
    """Delete the authorization state and return its row, or None when it is unknown or was
    used up already (by a concurrent callback too: the DELETE decides, not a prior read)."""
    table = sync_auth_states
    with catalog.writing() as conn:
        return conn.execute(
            delete(table)
            .where(table.c.state == state)
            .returning(table.c.account_id, table.c.redirect_uri, table.c.created_at)
        ).first()


def _identify(provider: Provider, token: str) -> str | None:
    request = provider.identity_request()
    if request is None:
        return None
    try:
        with httpx.Client(base_url=provider.config.base_url, timeout=provider.config.timeout) as h:
            response = h.request(**request, headers={"Authorization": f"Bearer {token}"})
    except httpx.TransportError as exc:
        raise SourceUnavailable(f"{provider.name} did not answer: {exc}") from None
    if response.status_code != 200:
        raise SourceUnavailable(
            f"{provider.name}: who-am-I answered {response.status_code}: {response.text[:200]}"
        )
    return provider.identity(response.json())


def _token_call(provider: Provider, form: dict) -> dict:
    """POST to the token endpoint; the answer's tokens, :class:`TokenRevoked` when the
    provider refuses the grant, :class:`SourceUnavailable` when it cannot answer."""
    url, form, auth = provider.token_form(form)
    try:
        response = httpx.post(url, data=form, auth=auth, timeout=provider.config.timeout)
    except httpx.TransportError as exc:
        raise SourceUnavailable(f"{provider.name} token endpoint did not answer: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code == 200 and isinstance(body, dict) and body.get("access_token"):
        return body
    error = body.get("error") if isinstance(body, dict) else None
    if response.status_code in (400, 401) and (error in REVOKING_ERRORS or error is None):
        raise TokenRevoked(f"{provider.name} refused the grant: {error or response.status_code}")
    raise SourceUnavailable(
        f"{provider.name} token endpoint answered {response.status_code}: {response.text[:200]}"
    )


def _store_token(conn, cipher, account_id: int, payload: dict, *, generation: int | None) -> None:
    """Insert or replace the account's token pair (in the caller's transaction)."""
    now = now_ms()
    expires_in = payload.get("expires_in")
    values = {
        "access_token": cipher.encrypt(payload["access_token"].encode()).decode(),
        "refresh_token": (
            cipher.encrypt(payload["refresh_token"].encode()).decode()
            if payload.get("refresh_token")
            else None
        ),
        "expires_at": now + int(float(expires_in) * 1000) if expires_in is not None else None,
        "scope": payload.get("scope"),
        "updated_at": now,
    }
    t = sync_tokens.c
    current = conn.execute(
        select(t.generation, t.refresh_token).where(t.account_id == account_id)
    ).first()
    if current is None:
        conn.execute(sync_tokens.insert().values(account_id=account_id, generation=1, **values))
        return
    if values["refresh_token"] is None:  # the provider kept the refresh token
        values["refresh_token"] = current.refresh_token
    conn.execute(
        update(sync_tokens)
        .where(t.account_id == account_id)
        .values(generation=current.generation + 1, **values)
    )


@dataclass(frozen=True)
class _Token:
    access: str
    refresh: str | None
    expires_at: int | None
    generation: int


def _read_token(catalog: Catalog, cipher, account_id: int) -> _Token | None:
    with catalog.engine.connect() as conn:
        row = conn.execute(
            select(sync_tokens).where(sync_tokens.c.account_id == account_id)
        ).first()
    if row is None:
        return None
    return _Token(
        access=_decrypt(cipher, row.access_token),
        refresh=_decrypt(cipher, row.refresh_token),
        expires_at=row.expires_at,
        generation=row.generation,
    )


def access_token(
    config: Config,
    catalog: Catalog,
    account: Account,
    *,
    stale_generation: int | None = None,
    ahead_ms: int = EXPIRY_MARGIN_MS,
) -> tuple[str, int]:
    """A usable access token of ``account`` and its generation, refreshed when it expires
    within ``ahead_ms`` or when the caller saw it refused (``stale_generation``)."""
    settings = sync_settings(config)
    cipher = _cipher(settings)
    token = _read_token(catalog, cipher, account.id)
    if token is None:
        raise TokenRevoked(f"account {account.id} has no token: link it again")
    if not _needs_refresh(token, stale_generation, ahead_ms):
        return token.access, token.generation
    with catalog.lock(f"sync.token-{account.id}"):
        token = _read_token(catalog, cipher, account.id)  # another process may have refreshed
        if not _needs_refresh(token, stale_generation, ahead_ms):
            return token.access, token.generation
        if not token.refresh:
            raise _revoke(
                config, catalog, account, "the token expired and there is no refresh token"
            )
        provider = get_provider(settings, account.provider)
        try:
            payload = _token_call(
                provider, {"grant_type": "refresh_token", "refresh_token": token.refresh}
            )
        except TokenRevoked as exc:
            raise _revoke(config, catalog, account, exc.message) from None
        with catalog.writing() as conn:
            _store_token(conn, cipher, account.id, payload, generation=token.generation)
        log.info("account %d: token refreshed", account.id)
        fresh = _read_token(catalog, cipher, account.id)
        return fresh.access, fresh.generation


def _needs_refresh(token: _Token, stale_generation: int | None, ahead_ms: int) -> bool:
    if stale_generation is not None and token.generation <= stale_generation:
        return True
    return token.expires_at is not None and token.expires_at <= now_ms() + ahead_ms


def _revoke(config: Config, catalog: Catalog, account: Account, reason: str) -> TokenRevoked:
    """Mark the account revoked, open an alert, and return the error to raise."""
    mark_revoked(catalog, account, reason)
    return TokenRevoked(
        f"account {account.id} ({account.study}/{account.subject} on {account.provider}): "
        f"{reason}; link it again with `workbench sync link {account.study} {account.subject} "
        f"{account.provider}`"
    )


def mark_revoked(catalog: Catalog, account: Account, reason: str) -> None:
    """Set the account's status to revoked and open a ``sync_revoked`` alert (once)."""
    now = now_ms()
    a = alerts.c
    with catalog.writing() as conn:
        conn.execute(
            update(sync_accounts)
            .where(sync_accounts.c.id == account.id)
            .values(status="revoked", error=reason[:500])
        )
        already = conn.execute(
            select(a.id).where(
                a.study_id == account.study,
                a.subject_id == account.subject,
                a.device_id == account.provider,
                a.kind == "sync_revoked",
                a.closed_at.is_(None),
            )
        ).first()
        if already is None:
            conn.execute(
                alerts.insert().values(
                    study_id=account.study,
                    subject_id=account.subject,
                    device_id=account.provider,
                    kind="sync_revoked",
                    since=now,
                    detail=f"{account.provider} refused the token of account {account.id}: {reason}"[
                        :500
                    ],
                    opened_at=now,
                )
            )
    log.error("account %d revoked: %s", account.id, reason)


def _close_alerts(conn, account: Account) -> None:
    a = alerts.c
    conn.execute(
        update(alerts)
        .where(
            a.study_id == account.study,
            a.subject_id == account.subject,
            a.device_id == account.provider,
            a.kind == "sync_revoked",
            a.closed_at.is_(None),
        )
        .values(closed_at=now_ms())
    )
