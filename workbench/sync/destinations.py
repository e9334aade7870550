"""Destinations: where the workbench writes values back.

``pool``         the data pool: ``sync/<destination>/written/<study>/<subject>/<name>``,
                 replaced atomically (see :func:`workbench.pool.write_file_atomically`)
``open_humans``  an Open Humans member's files, by the direct-upload protocol, replaced safely:
                 ask for an upload URL (``POST .../files/upload/direct/``), ``PUT`` the file,
                 ``POST .../files/upload/complete/``, check every status and that the member's
                 file list now holds the new file with its MD5; only then delete the old file
                 by id (``POST .../files/delete/``). Any failure before that raises
                 :class:`DestinationFailed` and leaves the old file as it was.

Example::

    put_file(config, catalog, account, "progress.json", b'{"percent": 40}')
"""

from __future__ import annotations

import hashlib
import json
import logging

import httpx
from sqlalchemy import select

from workbench.catalog import Catalog, dialect_insert, sync_remote_files
from workbench.config import Config
from workbench.errors import DestinationFailed, SourceUnavailable, TokenRevoked
from workbench.pool import DataPool, write_file_atomically
from workbench.sync.accounts import Account, access_token
from workbench.sync.providers import get_provider
from workbench.sync.ratelimit import RateLimits, limit_key
from workbench.sync.settings import sync_settings
from workbench.times import now_ms

log = logging.getLogger("workbench.sync")

OH = "/api/direct-sharing/project"


def put_file(
    config: Config,
    catalog: Catalog,
    account: Account,
    name: str,
    data: bytes,
    *,
    description: str = "written by the workbench",
    tags: tuple[str, ...] = ("workbench",),
) -> str:
    """Write ``data`` as the file ``name`` of ``account`` on its provider, replacing the one
    written before; return the new file's id on the destination."""
    settings = sync_settings(config)
    provider = get_provider(settings, account.provider)
    if provider.config.type == "open_humans":
        remote = _open_humans_replace(
            config, catalog, account, provider, name, data, description, tags
        )
    else:
        pool = DataPool.of(config)
        path = pool.sync_folder(provider.name, "written", account.study, account.subject, name)
        write_file_atomically(path, data)
        remote = pool.relative(path)
    now = now_ms()
    sha = hashlib.sha256(data).hexdigest()
    with catalog.writing() as conn:
        conn.execute(
            dialect_insert(catalog.engine, sync_remote_files)
            .values(account_id=account.id, name=name, remote_id=remote, sha256=sha, uploaded_at=now)
            .on_conflict_do_update(
                index_elements=["account_id", "name"],
                set_={"remote_id": remote, "sha256": sha, "uploaded_at": now},
            )
        )
    return remote


def _open_humans_replace(config, catalog, account, provider, name, data, description, tags) -> str:
    if not account.external_id:
        raise DestinationFailed(f"account {account.id} has no Open Humans member id; link it again")
    limits = RateLimits(config, catalog)
    key = limit_key(provider, account.id)
    md5 = hashlib.md5(data).hexdigest()
    try:
        token, _ = access_token(config, catalog, account)
    except (TokenRevoked, SourceUnavailable) as exc:
        raise DestinationFailed(
            f"cannot write {name} for account {account.id}: {exc.message}"
        ) from None
    auth = {"Authorization": f"Bearer {token}"}
    c = sync_remote_files.c
    with catalog.engine.connect() as conn:
        old = conn.execute(
            select(c.remote_id).where(c.account_id == account.id, c.name == name)
        ).scalar()

    def call(method: str, url: str, what: str, **kwargs) -> httpx.Response:
        wait = limits.acquire(key, provider.config.rate_limit)
        if wait:
            raise DestinationFailed(f"{what}: rate limit reached, retry in {wait:.0f} s")
        try:
            response = http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise DestinationFailed(f"{what}: {type(exc).__name__}: {exc or 'no answer'}") from None
        limits.observe(key, response)
        if response.status_code not in (200, 201, 204):
            raise DestinationFailed(
                f"{what} answered {response.status_code}: {response.text[:200]}; "
                f"the old file is untouched"
            )
        return response

    try:
        with httpx.Client(
            base_url=provider.config.base_url, timeout=provider.config.timeout
        ) as http:
            metadata = {"description": description, "tags": list(tags), "md5": md5}
            started = call(
                "POST",
                f"{OH}/files/upload/direct/",
                "asking Open Humans for an upload URL",
                headers=auth,
                data={
                    "project_member_id": account.external_id,
                    "filename": name,
                    "metadata": json.dumps(metadata),
                },
            ).json()
            new_id, upload_url = str(started["id"]), started["url"]
            call("PUT", upload_url, "uploading the file", content=data)
            call(
                "POST",
                f"{OH}/files/upload/complete/",
                "completing the upload",
                headers=auth,
                data={"file_id": new_id},
            )
            listing = call(
                "GET", f"{OH}/exchange-member/", "checking the upload", headers=auth
            ).json()
            present = {
                str(f["id"]): f.get("metadata", {}).get("md5") for f in listing.get("data", [])
            }
            if present.get(new_id) != md5:
                raise DestinationFailed(
                    f"the new {name} ({new_id}) is not listed with its MD5; the old file is untouched"
                )
            if old and old != new_id and old in present:
                try:
                    call(
                        "POST",
                        f"{OH}/files/delete/",
                        "deleting the old file",
                        headers=auth,
                        data={"project_member_id": account.external_id, "file_id": old},
                    )
                except DestinationFailed as exc:  # the new file is in place: keep it
                    log.error(
                        "account %d: %s: the old %s (%s) stays next to the new one (%s)",
                        account.id, exc.message, name, old, new_id,
                    )  # fmt: skip
    finally:
        limits.close()
    log.info(
        "account %d: %s replaced on Open Humans (new id %s, old %s)", account.id, name, new_id, old
    )
    return new_id
