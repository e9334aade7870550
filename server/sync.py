"""The OAuth2 callback of sync links on the upload server's Bottle app.

``GET /sync/callback?state=...&code=...`` completes a link started by ``workbench sync link``:
the code is exchanged for tokens (stored encrypted) and the account becomes active. The answer
is a short HTML page for the participant's browser; failures answer 400 with the reason (a
provider's ``?error=access_denied`` too). The logic is in :mod:`workbench.sync.accounts`.
"""

from __future__ import annotations

import html

from bottle import Bottle, HTTPResponse, request

from workbench.catalog import Catalog
from workbench.config import Config
from workbench.errors import WorkbenchError


def install_sync_routes(app: Bottle, config: Config, catalog: Catalog) -> None:
    """Add ``/sync/callback`` to ``app``.

    Example: ``install_sync_routes(app, config, ingest.catalog)`` inside ``create_app``.
    """
    from workbench.sync.accounts import complete_link

    @app.get("/sync/callback")
    def sync_callback():
        state = request.query.get("state", "")
        code = request.query.get("code", "")
        refused = request.query.get("error", "")
        if refused:
            return _page(400, "Not linked", f"The provider answered: {refused}.")
        if not state or not code:
            return _page(400, "Not linked", "The link is missing its state or code.")
        try:
            account = complete_link(config, catalog, state, code)
        except WorkbenchError as exc:
            return _page(exc.status if exc.status < 500 else 502, "Not linked", exc.message)
        return _page(
            200,
            "Linked",
            f"Your {account.provider} account is now linked to study {account.study}. "
            "You can close this page.",
        )


def _page(status: int, title: str, text: str) -> HTTPResponse:
    body = (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>\n"
    )
    return HTTPResponse(body, status=status, headers={"Content-Type": "text/html; charset=utf-8"})
