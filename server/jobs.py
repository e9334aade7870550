"""The job tracking API (trackerapi-compatible) on the upload server's Bottle app.

``GET /api-keys/protected`` answers whether the key is valid (trackerapi's check on
construction), ``POST /job_configurations`` saves configurations: a ``{"job_configs": [...]}``
file, or one configuration as trackerapi's ``register_job_config`` sends it (with its
``version``), ``POST /jobs`` creates a job, ``POST /events`` records a ``step``, ``complete``
or ``error``, ``GET /jobs/<provider_job_id>`` answers the job with its progress and a page of
its events (``?after=<event_id>&limit=<n>``; ``next`` in the answer links the following page).
The answers to ``POST /jobs`` and ``POST /events`` also carry, at the top, what trackerapi
reads from them: ``provider_job_id`` and the event's ``id``. What a job stores and an answer
carries is bounded by ``[jobs]`` in workbench.toml. Every request carries an API key
(``workbench jobs apikey create``) in ``x-api_key``, as trackerapi sends it (the server's
worker passes header names with underscores through, as ``HTTP_X_API_KEY``), in
``x-api-key``, or as ``Authorization: Bearer <key>`` for proxies that drop underscores.
Answers are JSON; refusals have the shape ``{"ok": false, "error": <code>, "message":
<sentence>}``. The logic is in :mod:`workbench.jobs`.
"""

from __future__ import annotations

import functools
import json
from urllib.parse import quote, urlencode

import orjson
from bottle import Bottle, HTTPResponse, request
from workbench_server.bodies import read_json_object

from workbench import jobs
from workbench.catalog import Catalog
from workbench.config import JobsConfig
from workbench.errors import WorkbenchError

MAX_BODY = 1024 * 1024  # configurations and events are small


def install_job_routes(app: Bottle, catalog: Catalog, *, limits: JobsConfig | None = None) -> None:
    """Add the tracking API to ``app``, keeping its state in ``catalog``, within ``limits``
    (default: the ``[jobs]`` settings of the app's workbench home).

    Example: ``install_job_routes(app, ingest.catalog)`` inside ``create_app``.
    """
    if limits is None:
        ingest = app.config.get("workbench.ingest")
        limits = ingest.config.jobs if ingest is not None else JobsConfig()

    def route(handler):
        """Check the API key, run ``handler(customer, **url_args)`` and answer its
        ``(status, body)`` as JSON; a workbench error is answered with its status and JSON."""

        @functools.wraps(handler)
        def answer(**url_args):
            try:
                customer = _authorize(catalog)
                status, body = handler(customer, **url_args)
            except WorkbenchError as exc:
                return _json(exc.status, exc.to_json())
            return _json(status, {"ok": True, **body})

        return answer

    @app.post("/job_configurations")
    @route
    def post_job_configurations(customer):
        if customer:
            raise jobs.NotAllowed(
                "job configurations are shared by all customers: change them with a key "
                "that belongs to no customer"
            )
        body = _json_body()
        if "job_configs" not in body and "tag" in body:  # one, as trackerapi registers it
            config = jobs.parse_job_config(body, source="the request body")
            saved = jobs.save_job_configs(catalog, [config])
            return 200, {"saved": saved, "tag": config.tag, "version": config.version}
        configs = jobs.parse_job_configs(body, source="the request body")
        return 200, {"saved": jobs.save_job_configs(catalog, configs)}

    @app.get("/api-keys/protected")
    @route
    def get_api_key_check(customer):
        return 200, {"customer_id": customer or None}

    @app.post("/jobs")
    @route
    def post_job(customer):
        body = _json_body()
        job = jobs.create_job(
            catalog,
            provider_job_id=body.get("provider_job_id"),
            customer_id=body.get("customer_id"),
            tag=body.get("tag"),
            as_customer=customer,
        )
        return 200, {"provider_job_id": job["provider_job_id"], "job": job}

    @app.post("/events")
    @route
    def post_event(customer):
        body = _json_body()
        job_id, kind, tag = body.get("provider_job_id"), body.get("kind"), body.get("tag")
        event_id = body.get("event_id")
        event = jobs.record_event(
            catalog,
            provider_job_id=job_id,
            kind=kind,
            tag=tag,
            metadata=body.get("event_metadata"),
            event_id=jobs.derived_event_id(job_id, kind, tag) if event_id is None else event_id,
            as_customer=customer,
            limits=limits,
        )
        job = jobs.get_job(catalog, job_id, events=False, as_customer=customer)
        return 200, {"id": event["event_id"], "event": event, "job": job}

    @app.get("/jobs/<provider_job_id>")
    @route
    def get_job(customer, provider_job_id):
        limit = _page_size(limits)
        after = request.query.get("after") or None
        job = jobs.get_job(catalog, provider_job_id, events=False, as_customer=customer)
        job["events"], following = jobs.events_page(
            catalog, provider_job_id, after=after, limit=limit, as_customer=customer
        )
        next_page = None
        if following is not None:
            query = urlencode({"after": following, "limit": limit})
            next_page = f"/jobs/{quote(job['provider_job_id'], safe='')}?{query}"
        return 200, {"job": job, "next": next_page}


def _page_size(limits: JobsConfig) -> int:
    """The ``?limit=`` of the request: a whole number from 1 to the largest page size."""
    text = request.query.get("limit", "")
    if not text:
        return limits.page_size
    if not text.isdigit() or not 1 <= int(text) <= limits.max_page_size:
        raise jobs.InvalidJobRequest(
            f"limit must be a whole number from 1 to {limits.max_page_size}, not {text[:20]!r}",
            field="limit",
        )
    return int(text)


def _json(status: int, body: dict) -> HTTPResponse:
    try:
        content = orjson.dumps(body)
    except orjson.JSONEncodeError:
        # orjson writes at most 254 levels; metadata stored before the depth limit may be deeper
        content = json.dumps(body).encode("utf-8")
    return HTTPResponse(content, status=status, headers={"Content-Type": "application/json"})


def _authorize(catalog: Catalog) -> str:
    """The customer of the request's API key ("" for a key of no customer), or
    :class:`~workbench.jobs.InvalidApiKey`."""
    header = request.environ.get("HTTP_X_API_KEY", "")
    scheme, _, bearer = request.environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    bearer = bearer.strip() if scheme.lower() == "bearer" else ""
    if header and bearer and header != bearer:
        raise jobs.InvalidApiKey("x-api_key and Authorization name different API keys")
    key = header or bearer
    if not key:
        raise jobs.InvalidApiKey(
            "missing API key: send it in x-api_key, in x-api-key or as Authorization: "
            "Bearer <key>; make one with `workbench jobs apikey create`"
        )
    customer = jobs.check_api_key(catalog, key)
    if customer is None:
        raise jobs.InvalidApiKey("wrong or revoked API key")
    return customer


def _json_body() -> dict:
    """The request body as a JSON object, read no further than :data:`MAX_BODY`."""
    return read_json_object(
        request.environ, limit=MAX_BODY, invalid=jobs.InvalidJobRequest, owner="tracker"
    )
