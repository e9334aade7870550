"""The Bottle upload server: routes parse the request, call :mod:`workbench.ingest`, answer JSON.

JTrack-compatible: ``POST /`` or ``POST /api`` with an ``ACTION`` header (``write_data``,
``add_user``, ``update_user``); the EMA resources archive at ``GET /resources/<study>`` or
JTrack's ``GET`` with ``ACTION: download_zip``; ``GET /health``; ``GET /openapi.yaml``.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path

import orjson
from bottle import Bottle, HTTPResponse, request
from workbench_server.bodies import read_body

from workbench.config import Config
from workbench.errors import BadRequest, UploadRejected, WorkbenchError
from workbench.ingest import Ingest, Upload
from workbench.pool import private_umask

log = logging.getLogger("workbench.server")

OPENAPI = Path(__file__).with_name("openapi.yaml")


def create_app(config: Config) -> Bottle:
    """The WSGI application for one workbench home."""
    app = Bottle()
    private_umask(config.pool_group)  # a second defence: the pool's writers set modes themselves
    ingest = Ingest(config)
    atexit.register(ingest.close)
    app.config["workbench.ingest"] = ingest
    limit = config.server.max_body_bytes
    actions = {
        "write_data": ingest.write_data,
        "add_user": ingest.add_user,
        "update_user": ingest.update_user,
    }

    def answer(status: int, body: dict, headers: dict | None = None) -> HTTPResponse:
        return HTTPResponse(
            orjson.dumps(body),
            status=status,
            headers={"Content-Type": "application/json", **(headers or {})},
        )

    def failure(exc: WorkbenchError) -> HTTPResponse:
        return answer(exc.status, exc.to_json())

    def post_action():
        action = _header("ACTION")
        handler = actions.get(action)
        upload = Upload(
            body=b"",
            md5=_header("md5") or None,
            content_digest=_header("Content-Digest") or None,
            authorization=_header("Authorization") or None,
            remote_addr=request.environ.get("REMOTE_ADDR"),  # not X-Forwarded-For: senders set that
        )
        if handler is None:
            return failure(
                ingest.reject_unread(
                    action[:32] or "none",
                    upload,
                    BadRequest(
                        f"unknown ACTION header {action[:40]!r}: use write_data, add_user or update_user"
                    ),
                )
            )
        try:
            upload.body = read_body(request.environ, limit=limit)
        except UploadRejected as exc:
            return failure(ingest.reject_unread(action, upload, exc))
        try:
            receipt = handler(upload)
        except WorkbenchError as exc:
            return failure(exc)
        return answer(receipt.status, receipt.body)

    def download(study):
        try:
            status, etag, data = ingest.resources(
                study,
                authorization=_header("Authorization") or None,
                if_none_match=_header("If-None-Match") or None,
            )
        except WorkbenchError as exc:
            return failure(exc)
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if status == 304:
            return HTTPResponse(status=304, headers=headers)
        return HTTPResponse(
            data,
            status=200,
            headers={
                **headers,
                "Content-Type": "application/zip",
                "Content-Disposition": f'attachment; filename="{study}.zip"',
            },
        )

    @app.post("/")
    @app.post("/api")
    def post_root():
        return post_action()

    @app.get("/")
    @app.get("/api")
    def get_root():
        if _header("ACTION") == "download_zip":
            study = _header("studyId") or request.query.get("studyId")
            return download(study)
        return answer(
            200,
            {
                "ok": True,
                "message": "workbench upload server; POST with an ACTION header, see /openapi.yaml",
            },
        )

    @app.get("/resources/<study>")
    def get_resources(study):
        return download(study)

    @app.get("/health")
    def health():
        try:
            with ingest.catalog.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as exc:  # any failure to reach the catalog is "unhealthy"
            log.error("health check failed: %s", exc)
            return answer(
                503,
                {"ok": False, "status": "down", "message": "the catalog cannot be reached"},
            )
        if not ingest.storage_ok():
            return answer(
                503,
                {
                    "ok": False,
                    "status": "degraded",
                    "message": "free disk space in the pool is below min_free_bytes; "
                    "uploads are refused with 507",
                },
            )
        return answer(200, {"ok": True, "status": "healthy", "message": "healthy"})

    @app.get("/openapi.yaml")
    def openapi():
        return HTTPResponse(
            OPENAPI.read_bytes(), status=200, headers={"Content-Type": "application/yaml"}
        )

    def json_error(error) -> bytes:
        request_status = error.status_code
        if request_status >= 500:
            log.error("internal error on %s %s: %s", request.method, request.path, error.exception)
        error.content_type = "application/json"
        return orjson.dumps(
            {
                "ok": False,
                "error": "http_error",
                "message": (
                    error.body
                    if isinstance(error.body, str) and request_status < 500
                    else "internal error"
                ),
            }
        )

    for code in (400, 404, 405, 500):
        app.error_handler[code] = json_error

    from workbench_server.jobs import install_job_routes

    install_job_routes(app, ingest.catalog)  # the job-tracking API
    from workbench_server.sync import install_sync_routes

    install_sync_routes(app, config, ingest.catalog)  # the OAuth2 callback of sync links
    return app


def _header(name: str) -> str:
    """A request header as the WSGI server passed it (latin-1 text), "" when absent.

    Bottle's ``get_header`` re-decodes values as UTF-8 and raises on other bytes; identifiers
    and tokens are ASCII, so anything else simply fails the checks that follow.
    """
    return request.environ.get("HTTP_" + name.upper().replace("-", "_"), "")
