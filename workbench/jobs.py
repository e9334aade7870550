"""Job tracking (the trackerapi model): job configurations, jobs, their events, API keys.

A job configuration names a job's steps and the points of work each stands for; it is read
(by :mod:`workbench.tracker`, which owns the file format) from a JSON file in the trackerapi
format and saved in the catalog by tag. A configuration with a ``version`` is registered
once: the same tag and version again changes nothing if it is the same and is a
:class:`JobConfigConflict` if it is not; without a version, it replaces its tag's. A job is
created with the provider's id for it and the tag (or display name) of its configuration,
and keeps that configuration's version; ``step`` events add their step's points once,
``complete`` brings it to 100 %, ``error`` marks it failed. Events carry an ``event_id``
chosen by the sender, so a resent event changes nothing. Once a job is complete or failed,
later events are recorded but change nothing.

What a job stores is bounded by ``[jobs]`` in workbench.toml (:class:`~workbench.config.JobsConfig`):
events per job, the size and nesting depth of an event's metadata. Its events are read a
page at a time (:func:`events_page`).

Errors raised here (all :class:`~workbench.errors.WorkbenchError`)::

    InvalidJobRequest        a body or argument the tracker cannot use (HTTP 400, exit 2)
    └── InvalidJobConfig     configurations failing their schema, duplicate tags (HTTP 400, exit 2)
    UnknownJobConfig         no job configuration of that tag (HTTP 400, exit 4)
    UnknownJob               no job of that provider_job_id (HTTP 404, exit 4)
    JobConflict              the provider_job_id is taken by another job (HTTP 409, exit 4)
    JobConfigConflict        a changed configuration under a registered tag and version (HTTP 409, exit 4)
    InvalidApiKey            missing, wrong or revoked API key (HTTP 401, exit 2)
    NotAllowed               the API key's customer may not do this (HTTP 403, exit 2)
    MetadataTooDeep          metadata nested deeper than max_metadata_depth (HTTP 400, exit 2)
    TooManyEvents            the job holds max_events events already (HTTP 413, exit 2)
    MetadataTooLarge         metadata over max_metadata_bytes (HTTP 413, exit 2)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable

from sqlalchemy import Connection, func, select, update
from sqlalchemy.exc import IntegrityError

from workbench.catalog import (
    Catalog,
    api_keys,
    dialect_insert,
    job_config_versions,
    job_configurations,
    job_events,
    jobs,
)
from workbench.config import JobsConfig
from workbench.enrollment import hash_token
from workbench.errors import (  # noqa: F401  (re-exported: the job-tracking errors)
    InvalidApiKey,
    InvalidJobConfig,
    InvalidJobRequest,
    JobConfigConflict,
    JobConflict,
    MetadataTooDeep,
    MetadataTooLarge,
    NotAllowed,
    TooManyEvents,
    UnknownJob,
    UnknownJobConfig,
    WorkbenchError,
)
from workbench.times import now_ms
from workbench.tracker import (  # noqa: F401  (re-exported: the configurations)
    JobConfig,
    JobConfigManager,
    StepConfig,
    check_unique,
    find_config,
    generate_schema,
    job_config_schema,
    parse_job_config,
    parse_job_configs,
    unknown_tag_message,
)

KINDS = ("step", "complete", "error")
MAX_ID = 128  # characters of provider_job_id, customer_id, tags and event_id (catalog columns)
DEFAULT_LIMITS = JobsConfig()  # the [jobs] defaults of workbench.toml


# --- configurations in the catalog -------------------------------------------------------


def save_job_configs(catalog: Catalog, configs: Iterable[JobConfig]) -> list[str]:
    """Save configurations in the catalog; return their tags. All or none are saved.

    A configuration without a version replaces the tag's configuration. One with a version
    is registered once: the same tag and version again with the same name and steps changes
    nothing, with other ones it is a :class:`JobConfigConflict`; a new version becomes the
    tag's configuration for the jobs created after it. A job keeps the steps and total points
    it was created with.

    Example: ``save_job_configs(catalog, JobConfigManager("job_configurations.json"))``.
    """
    configs = list(configs)
    check_unique(configs, "the job configurations")
    if not configs:
        return []
    for attempt in range(2):
        try:
            with catalog.writing() as conn:
                for config in configs:
                    _save_config(catalog, conn, config)
            break
        except IntegrityError:
            if attempt:  # pragma: no cover - a second concurrent registration of the same version
                raise
            # The same version, registered by a concurrent request: compare with it.
    return [c.tag for c in configs]


def _save_config(catalog: Catalog, conn: Connection, config: JobConfig) -> None:
    steps = json.dumps(config.as_dict()["step_configurations"])
    now = now_ms()
    if config.version is not None:
        stored = conn.execute(
            select(job_config_versions).where(
                job_config_versions.c.tag == config.tag,
                job_config_versions.c.version == config.version,
            )
        ).first()
        if stored is not None:
            if (stored.name, stored.steps) != (config.name, steps):
                raise JobConfigConflict(
                    f"job configuration {config.tag!r} version {config.version!r} is already "
                    "registered with other steps or another name; give the changed "
                    "configuration a new version",
                    tag=config.tag,
                    version=config.version,
                )
            return  # registered before: the tag's current version stays as it is
        conn.execute(
            job_config_versions.insert().values(
                tag=config.tag,
                version=config.version,
                name=config.name,
                steps=steps,
                total_points=config.total_points,
                created_at=now,
            )
        )
    row = {
        "tag": config.tag,
        "name": config.name,
        "steps": steps,
        "total_points": config.total_points,
        "updated_at": now,
        "version": config.version,
    }
    insert = dialect_insert(catalog.engine, job_configurations)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["tag"],
            set_={
                name: insert.excluded[name]
                for name in ("name", "steps", "total_points", "updated_at", "version")
            },
        ),
        row,
    )


def list_job_configs(catalog: Catalog) -> list[JobConfig]:
    """Every saved configuration (the current version of each tag), by tag."""
    with catalog.engine.connect() as conn:
        rows = conn.execute(select(job_configurations).order_by(job_configurations.c.tag)).all()
    return [_config_from_row(row) for row in rows]


def _config_from_row(row) -> JobConfig:
    steps = [StepConfig(s["tag"], s["name"], s["points"]) for s in json.loads(row.steps)]
    return JobConfig(tag=row.tag, name=row.name, step_configurations=steps, version=row.version)


def _saved_config(conn: Connection, tag: str) -> JobConfig | None:
    row = conn.execute(select(job_configurations).where(job_configurations.c.tag == tag)).first()
    return None if row is None else _config_from_row(row)


def _job_config(conn: Connection, job) -> JobConfig | None:
    """The configuration a job was created with: its version's, else the tag's current one."""
    if job.config_version is not None:
        row = conn.execute(
            select(job_config_versions).where(
                job_config_versions.c.tag == job.tag,
                job_config_versions.c.version == job.config_version,
            )
        ).first()
        if row is not None:
            return _config_from_row(row)
    return _saved_config(conn, job.tag)


# --- jobs and events ---------------------------------------------------------------------


def _identifier(value: object, field: str, *, optional: bool = False) -> str | None:
    """A provider_job_id, customer_id, tag or event_id as text: a non-empty string or a whole
    number (the trackerapi README passes ``customer_id=142``)."""
    if value is None and optional:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > MAX_ID:
        raise InvalidJobRequest(
            f"{field} must be a non-empty string of at most {MAX_ID} characters, not {value!r:.60}",
            field=field,
        )
    return value


def create_job(
    catalog: Catalog,
    *,
    provider_job_id: str,
    customer_id: str | int | None,
    tag: str,
    as_customer: str | None = None,
) -> dict:
    """Start tracking a job of a saved configuration; return it as :func:`get_job` does.

    ``tag`` is the configuration's tag, or the display name of exactly one configuration
    (trackerapi's README passes ``job_config.name``); the job is stored with the tag.

    Creating the same ``provider_job_id`` again with the same tag and customer returns the
    existing job; with another one it is a :class:`JobConflict`. ``as_customer``: the customer
    of the API key used, whose jobs alone it may create ("" or None: any customer).

    Example: ``create_job(catalog, provider_job_id=str(uuid.uuid4()), customer_id=142, tag="my_job")``.
    """
    job_id = _identifier(provider_job_id, "provider_job_id")
    customer = _identifier(customer_id, "customer_id", optional=True)
    tag = _identifier(tag, "tag")
    if as_customer:
        if customer is None:
            customer = as_customer
        elif customer != as_customer:
            raise NotAllowed(
                f"this API key belongs to customer {as_customer!r}; "
                f"it cannot create jobs for customer {customer!r}"
            )
    for attempt in range(2):
        try:
            with catalog.writing() as conn:
                tag = _insert_job(conn, job_id, customer, tag)
            break
        except IntegrityError:
            if attempt:  # pragma: no cover - a second concurrent creation of the same id
                raise
            # Created by a concurrent request: look again.
    return get_job(catalog, job_id)


def _insert_job(conn: Connection, job_id: str, customer: str | None, tag: str) -> str:
    """Insert the job unless it exists; return its configuration's tag."""
    config = _saved_config(conn, tag)
    if config is None:
        configs = [_config_from_row(r) for r in conn.execute(select(job_configurations))]
        config = find_config(tag, configs)  # trackerapi's README passes the job's name
        if config is None:
            raise UnknownJobConfig(unknown_tag_message(tag, configs, "the catalog"))
        tag = config.tag
    existing = conn.execute(select(jobs).where(jobs.c.provider_job_id == job_id)).first()
    if existing is not None:
        if existing.tag != tag or existing.customer_id != customer:
            raise JobConflict(
                f"provider_job_id {job_id!r} is already a job of another configuration or "
                "customer; use a new id for a new job"
            )
        return tag
    now = now_ms()
    conn.execute(
        jobs.insert().values(
            provider_job_id=job_id,
            customer_id=customer,
            tag=tag,
            config_version=config.version,
            status="running",
            points_done=0,
            points_total=config.total_points,
            created_at=now,
            updated_at=now,
        )
    )
    return tag


def derived_event_id(provider_job_id: object, kind: object, tag: object) -> str:
    """An event id for a sender that gives none: the same for the same kind, tag and job, so
    that a resent step counts once (a second ``error`` of one job is then dropped too).

    Example: ``derived_event_id("42", "step", "say_hello")`` → ``"derived-a6310b16…"``.
    """
    digest = hashlib.sha256(json.dumps([provider_job_id, kind, tag]).encode()).hexdigest()
    return f"derived-{digest[:40]}"


def nesting_depth(value: object) -> int:
    """How deeply arrays and objects nest in a JSON value (0 for a number or string), counted
    without recursion, so any depth is measured.

    Example: ``nesting_depth({"a": [1, {"b": 2}]})`` → ``3``.
    """
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in children)
    return deepest


def _stored_metadata(metadata: object, limits: JobsConfig) -> str | None:
    """The metadata as the JSON text to store, checked against the limits."""
    if metadata is None:
        return None
    depth = nesting_depth(metadata)
    if depth > limits.max_metadata_depth:
        raise MetadataTooDeep(
            f"event metadata nests {depth} levels of arrays and objects; at most "
            f"{limits.max_metadata_depth} are accepted",
            field="event_metadata",
        )
    try:
        text = json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise InvalidJobRequest(f"event metadata must be JSON: {exc}") from exc
    size = len(text.encode("utf-8"))
    if size > limits.max_metadata_bytes:
        raise MetadataTooLarge(
            f"event metadata of {size} bytes (as JSON) is over the limit of "
            f"{limits.max_metadata_bytes} bytes",
            field="event_metadata",
        )
    return text


def record_event(
    catalog: Catalog,
    *,
    provider_job_id: str,
    kind: str,
    tag: str | None = None,
    metadata: object = None,
    event_id: str,
    as_customer: str | None = None,
    limits: JobsConfig = DEFAULT_LIMITS,
) -> dict:
    """Record an event of a job and move its progress; return the event.

    ``step`` adds the step's points the first time that step is reported, ``complete`` sets
    the job to 100 % and complete, ``error`` marks it failed. An ``event_id`` seen before for
    the job changes nothing: the stored event is returned with ``"duplicate": True``.

    ``limits`` bound what is stored: metadata nested deeper than ``max_metadata_depth`` is
    :class:`MetadataTooDeep`, larger than ``max_metadata_bytes`` :class:`MetadataTooLarge`;
    once the job holds ``max_events`` events, a new one is :class:`TooManyEvents` unless it
    moves the job (a step's first report, ``complete`` or ``error`` of a running job), so a
    job can always finish.

    Example: ``record_event(catalog, provider_job_id="42", kind="step", tag="say_hello", event_id=uuid.uuid4().hex)``.
    """
    job_id = _identifier(provider_job_id, "provider_job_id")
    event_id = _identifier(event_id, "event_id")
    if kind not in KINDS:
        raise InvalidJobRequest(f"kind must be one of {', '.join(KINDS)}, not {kind!r:.40}")
    tag = _identifier(tag, "tag", optional=kind != "step")
    stored_metadata = _stored_metadata(metadata, limits)
    try:
        with catalog.writing() as conn:
            # The job row is locked first (on PostgreSQL), so events of one job queue here.
            job = conn.execute(
                select(jobs).where(jobs.c.provider_job_id == job_id).with_for_update()
            ).first()
            if job is None or (as_customer and job.customer_id != as_customer):
                raise UnknownJob(f"no job {job_id!r}; create it first")
            stored = _stored_event(conn, job_id, event_id)
            if stored is not None:
                return {**stored, "duplicate": True}
            points, changes = 0, {}
            if kind == "step":
                config = _job_config(conn, job)
                if config is None:
                    raise UnknownJobConfig(
                        f"the configuration {job.tag!r} of job {job_id!r} is gone"
                    )
                step = config.step(tag)
                seen = conn.execute(
                    select(job_events.c.id).where(
                        job_events.c.provider_job_id == job_id,
                        job_events.c.kind == "step",
                        job_events.c.tag == tag,
                    )
                ).first()
                if job.status == "running" and seen is None:
                    points = min(step.points, job.points_total - job.points_done)
                    changes = {"points_done": job.points_done + points}
            elif job.status == "running":
                points = job.points_total - job.points_done if kind == "complete" else 0
                changes = {
                    "status": kind,
                    "points_done": job.points_done + points,
                }
            if not changes:
                held = conn.execute(
                    select(func.count())
                    .select_from(job_events)
                    .where(job_events.c.provider_job_id == job_id)
                ).scalar_one()
                if held >= limits.max_events:
                    raise TooManyEvents(
                        f"job {job_id!r} holds {held} events, the limit; only events that "
                        "move it (a step's first report, complete, error) are still taken"
                    )
            now = now_ms()
            conn.execute(
                job_events.insert().values(
                    provider_job_id=job_id,
                    event_id=event_id,
                    kind=kind,
                    tag=tag,
                    metadata=stored_metadata,
                    points=points,
                    created_at=now,
                )
            )
            if changes:
                conn.execute(
                    update(jobs).where(jobs.c.id == job.id).values(**changes, updated_at=now)
                )
    except IntegrityError:
        # The same event, recorded by a concurrent request.
        with catalog.engine.connect() as conn:
            stored = _stored_event(conn, job_id, event_id)
        if stored is None:
            raise
        return {**stored, "duplicate": True}
    with catalog.engine.connect() as conn:
        return {**_stored_event(conn, job_id, event_id), "duplicate": False}


def _stored_event(conn: Connection, job_id: str, event_id: str) -> dict | None:
    row = conn.execute(
        select(job_events).where(
            job_events.c.provider_job_id == job_id, job_events.c.event_id == event_id
        )
    ).first()
    return None if row is None else _event_dict(row)


def _event_dict(row) -> dict:
    return {
        "event_id": row.event_id,
        "kind": row.kind,
        "tag": row.tag,
        "metadata": None if row.metadata is None else json.loads(row.metadata),
        "points": row.points,
        "created_at": row.created_at,
    }


def _job_dict(row, config: JobConfig | None) -> dict:
    progress = 1.0 if row.status == "complete" else min(1.0, row.points_done / row.points_total)
    return {
        "provider_job_id": row.provider_job_id,
        "customer_id": row.customer_id,
        "tag": row.tag,
        "name": config.name if config else None,
        "status": row.status,
        "points_done": row.points_done,
        "points_total": row.points_total,
        "progress": progress,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def get_job(
    catalog: Catalog,
    provider_job_id: str,
    *,
    events: bool = True,
    as_customer: str | None = None,
) -> dict:
    """A job with its progress (0..1), its steps (each ``done`` or not) and, unless ``events``
    is False, all its events in the order they arrived (:func:`events_page` reads a page).

    Example: ``get_job(catalog, "42")["progress"]`` → ``0.2857…``.
    """
    job_id = _identifier(provider_job_id, "provider_job_id")
    with catalog.engine.connect() as conn:
        row = conn.execute(select(jobs).where(jobs.c.provider_job_id == job_id)).first()
        if row is None or (as_customer and row.customer_id != as_customer):
            raise UnknownJob(f"no job {job_id!r}")
        config = _job_config(conn, row)
        done = set(
            conn.execute(
                select(job_events.c.tag)
                .where(job_events.c.provider_job_id == job_id, job_events.c.kind == "step")
                .distinct()
            ).scalars()
        )
        found = (
            conn.execute(
                select(job_events)
                .where(job_events.c.provider_job_id == job_id)
                .order_by(job_events.c.id)
            ).all()
            if events
            else []
        )
    job = _job_dict(row, config)
    job["steps"] = [
        {"tag": s.tag, "name": s.name, "points": s.points, "done": s.tag in done}
        for s in (config.step_configurations if config else [])
    ]
    if events:
        job["events"] = [_event_dict(e) for e in found]
    return job


def events_page(
    catalog: Catalog,
    provider_job_id: str,
    *,
    after: str | None = None,
    limit: int = 100,
    as_customer: str | None = None,
) -> tuple[list[dict], str | None]:
    """Up to ``limit`` events of a job, in the order they arrived, after the event whose
    ``event_id`` is ``after`` (from the first without it); and the event id to pass as
    ``after`` for the next page, None when there is none.

    Example: ``page, following = events_page(catalog, "42", limit=50)``.
    """
    job_id = _identifier(provider_job_id, "provider_job_id")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidJobRequest(f"limit must be a whole number of at least 1, not {limit!r:.40}")
    with catalog.engine.connect() as conn:
        row = conn.execute(
            select(jobs.c.customer_id).where(jobs.c.provider_job_id == job_id)
        ).first()
        if row is None or (as_customer and row.customer_id != as_customer):
            raise UnknownJob(f"no job {job_id!r}")
        query = select(job_events).where(job_events.c.provider_job_id == job_id)
        if after is not None:
            after = _identifier(after, "after")
            start = conn.execute(
                select(job_events.c.id).where(
                    job_events.c.provider_job_id == job_id, job_events.c.event_id == after
                )
            ).scalar()
            if start is None:
                raise InvalidJobRequest(
                    f"job {job_id!r} has no event {after!r} to page after", field="after"
                )
            query = query.where(job_events.c.id > start)
        found = conn.execute(query.order_by(job_events.c.id).limit(limit + 1)).all()
    page = [_event_dict(e) for e in found[:limit]]
    return page, (page[-1]["event_id"] if len(found) > limit else None)


def list_jobs(catalog: Catalog, *, limit: int = 50) -> list[dict]:
    """The most recently created jobs, newest first, with their progress (no events).

    Example: ``[j["progress"] for j in list_jobs(catalog, limit=5)]``.
    """
    with catalog.engine.connect() as conn:
        rows = conn.execute(select(jobs).order_by(jobs.c.id.desc()).limit(limit)).all()
        configs = {
            r.tag: _config_from_row(r)
            for r in conn.execute(
                select(job_configurations).where(
                    job_configurations.c.tag.in_(sorted({row.tag for row in rows}))
                )
            )
        }
    return [_job_dict(row, configs.get(row.tag)) for row in rows]


# --- API keys ----------------------------------------------------------------------------


def create_api_key(catalog: Catalog, *, customer_id: str | None = None) -> str:
    """Make a new API key for the tracking API and return it; only its SHA-256 is stored, so
    this is the only copy. A key with a ``customer_id`` sees and creates that customer's jobs
    only; one without may do everything.

    Example: ``key = create_api_key(catalog, customer_id="142")``.
    """
    customer = _identifier(customer_id, "customer_id", optional=True)
    key = secrets.token_urlsafe(32)
    with catalog.writing() as conn:
        conn.execute(
            api_keys.insert().values(
                key_hash=hash_token(key), customer_id=customer, created_at=now_ms()
            )
        )
    return key


def check_api_key(catalog: Catalog, key: str | None) -> str | None:
    """The customer id of a valid, unrevoked key ("" when it has none), else None.

    Example: ``check_api_key(catalog, key)`` → ``"142"``.
    """
    if not key or not isinstance(key, str) or len(key) > 512:
        return None
    digest = hash_token(key)
    with catalog.engine.connect() as conn:
        row = conn.execute(
            select(api_keys.c.key_hash, api_keys.c.customer_id, api_keys.c.revoked_at).where(
                api_keys.c.key_hash == digest
            )
        ).first()
    if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
        return None
    return row.customer_id or ""
