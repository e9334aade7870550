"""Job tracking (the trackerapi model): job configurations, jobs, their events, API keys.

A job configuration names a job's steps and the points of work each stands for; it is read
from a JSON file in the trackerapi format, checked against ``job-configurations.schema.json``
and saved in the catalog by tag. A job is created with the provider's id for it and the tag
of its configuration; ``step`` events add their step's points once, ``complete`` brings it to
100 %, ``error`` marks it failed. Events carry an ``event_id`` chosen by the sender, so a
resent event changes nothing. Once a job is complete or failed, later events are recorded
but change nothing.

What a job stores is bounded by ``[jobs]`` in workbench.toml (:class:`~workbench.config.JobsConfig`):
events per job, the size and nesting depth of an event's metadata. Its events are read a
page at a time (:func:`events_page`).

Errors raised here (all :class:`~workbench.errors.WorkbenchError`)::

    InvalidJobRequest        a body or argument the tracker cannot use (HTTP 400, exit 2)
    └── InvalidJobConfig     configurations failing their schema, duplicate tags (HTTP 400, exit 2)
    UnknownJobConfig         no job configuration of that tag (HTTP 400, exit 4)
    UnknownJob               no job of that provider_job_id (HTTP 404, exit 4)
    JobConflict              the provider_job_id is taken by another job (HTTP 409, exit 4)
    InvalidApiKey            missing, wrong or revoked API key (HTTP 401, exit 2)
    NotAllowed               the API key's customer may not do this (HTTP 403, exit 2)
    MetadataTooDeep          metadata nested deeper than max_metadata_depth (HTTP 400, exit 2)
    TooManyEvents            the job holds max_events events already (HTTP 413, exit 2)
    MetadataTooLarge         metadata over max_metadata_bytes (HTTP 413, exit 2)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, func, select, update
from sqlalchemy.exc import IntegrityError

from workbench.catalog import (
    Catalog,
    api_keys,
    dialect_insert,
    job_configurations,
    job_events,
    jobs,
    now_ms,
)
from workbench.config import JobsConfig
from workbench.enrollment import hash_token
from workbench.errors import (  # noqa: F401  (re-exported: the job-tracking errors)
    InvalidApiKey,
    InvalidJobConfig,
    InvalidJobRequest,
    JobConflict,
    MetadataTooDeep,
    MetadataTooLarge,
    NotAllowed,
    TooManyEvents,
    UnknownJob,
    UnknownJobConfig,
    WorkbenchError,
)
from workbench.templates import load_schema, schema_validator

KINDS = ("step", "complete", "error")
MAX_ID = 128  # characters of provider_job_id, customer_id, tags and event_id (catalog columns)
DEFAULT_LIMITS = JobsConfig()  # the [jobs] defaults of workbench.toml


# --- configurations ----------------------------------------------------------------------


@dataclass(frozen=True)
class StepConfig:
    """One step of a job: its tag, display name and the points of work it stands for."""

    tag: str
    name: str
    points: int

    def __post_init__(self) -> None:
        if isinstance(self.points, bool) or not isinstance(self.points, int) or self.points < 1:
            raise InvalidJobConfig(
                f"step {self.tag!r}: points must be a whole number of at least 1, "
                f"not {self.points!r}"
            )


@dataclass(frozen=True)
class JobConfig:
    """A job's tag, display name and steps.

    Example: ``JobConfig("my_job", "My Job", [StepConfig("say_hello", "Say Hello", 10)])``.
    """

    tag: str
    name: str
    step_configurations: list[StepConfig]

    @property
    def total_points(self) -> int:
        """The points of all steps: what 100 % stands for."""
        return sum(step.points for step in self.step_configurations)

    def step(self, tag: str) -> StepConfig:
        """The step of that tag, or :class:`InvalidJobRequest` naming the job's steps."""
        for step in self.step_configurations:
            if step.tag == tag:
                return step
        known = ", ".join(s.tag for s in self.step_configurations)
        raise InvalidJobRequest(f"job {self.tag!r} has no step {tag!r}; its steps: {known}")

    def as_dict(self) -> dict:
        """The configuration in the file format."""
        return {
            "name": self.name,
            "tag": self.tag,
            "step_configurations": [
                {"name": s.name, "tag": s.tag, "points": s.points} for s in self.step_configurations
            ],
        }


def job_config_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a job configurations file.

    Example: ``job_config_schema()["required"]`` → ``["job_configs"]``.
    """
    return copy.deepcopy(load_schema("job-configurations"))


def generate_schema(location: Path = Path("."), name: str = "job-configurations-schema") -> Path:
    """Write the schema to ``<location>/<name>.generated.json`` (creating the folder); return
    its path. A configurations file then points at it with ``"$schema"``.

    Example: ``generate_schema(Path("configs"))`` → ``configs/job-configurations-schema.generated.json``.
    """
    folder = Path(location)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.generated.json"
    path.write_text(json.dumps(job_config_schema(), indent=2) + "\n", encoding="utf-8")
    return path


@functools.cache
def _validator():
    return schema_validator(load_schema("job-configurations"))


def parse_job_configs(
    document: object, *, source: str = "the job configurations"
) -> list[JobConfig]:
    """Check a parsed configurations document and return its configurations.

    Errors name ``source`` and the JSON path of what is wrong, e.g.
    ``jobs.json: $.job_configs[0].step_configurations[1].points: 0 is less than the minimum of 1``.
    """
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        shown = "; ".join(f"{e.json_path}: {e.message}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more problems)" if len(errors) > 5 else ""
        raise InvalidJobConfig(f"{source}: {shown}{more}")
    configs = [
        JobConfig(
            tag=job["tag"],
            name=job["name"],
            # JSON Schema counts 10.0 as an integer; it is stored as 10.
            step_configurations=[
                StepConfig(s["tag"], s["name"], int(s["points"]))
                for s in job["step_configurations"]
            ],
        )
        for job in document["job_configs"]
    ]
    _check_unique(configs, source)
    return configs


def _check_unique(configs: list[JobConfig], source: str) -> None:
    first: dict[str, int] = {}
    for i, config in enumerate(configs):
        if config.tag in first:
            raise InvalidJobConfig(
                f"{source}: job tag {config.tag!r} is used twice "
                f"($.job_configs[{first[config.tag]}] and $.job_configs[{i}]); tags must be unique"
            )
        first[config.tag] = i
        steps: dict[str, int] = {}
        for j, step in enumerate(config.step_configurations):
            if step.tag in steps:
                raise InvalidJobConfig(
                    f"{source}: step tag {step.tag!r} is used twice in job {config.tag!r} "
                    f"($.job_configs[{i}].step_configurations[{steps[step.tag]}] and "
                    f"[{j}]); step tags must be unique within a job"
                )
            steps[step.tag] = j


class JobConfigManager:
    """The job configurations of one file (or of an already parsed dict), checked and in memory.

    Example::

        manager = JobConfigManager(configurations_file="./job_configurations.json")
        job_config = manager.get_job_config("my_job")
        job_config.step_configurations[0].tag   # "say_hello"
    """

    def __init__(
        self, configurations_file: str | Path | Mapping, *, source: str | None = None
    ) -> None:
        if isinstance(configurations_file, Mapping):
            document = configurations_file
            self.source = source or "the job configurations"
        else:
            path = Path(configurations_file)
            self.source = source or str(path)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidJobConfig(f"cannot read job configurations {path}: {exc}") from exc
            try:
                document = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidJobConfig(
                    f"{path} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                ) from exc
        self.job_configs: list[JobConfig] = parse_job_configs(document, source=self.source)

    def __iter__(self) -> Iterator[JobConfig]:
        return iter(self.job_configs)

    @property
    def tags(self) -> list[str]:
        return [c.tag for c in self.job_configs]

    def get_job_config(self, tag: str) -> JobConfig:
        """The configuration of that tag, or :class:`UnknownJobConfig` listing the known tags."""
        for config in self.job_configs:
            if config.tag == tag:
                return config
        raise UnknownJobConfig(_unknown_tag_message(tag, self.job_configs, self.source))

    def as_dict(self) -> dict:
        """The configurations in the file format (without ``$schema``)."""
        return {"job_configs": [c.as_dict() for c in self.job_configs]}


def _unknown_tag_message(tag: object, configs: list[JobConfig], where: str) -> str:
    known = ", ".join(c.tag for c in configs) or "none"
    message = f"no job configuration tagged {tag!r} in {where}; known tags: {known}"
    named = [c.tag for c in configs if c.name == tag]
    if len(named) == 1:
        message += f" ({tag!r} is the name of {named[0]!r}: pass its tag)"
    return message


# --- configurations in the catalog -------------------------------------------------------


def save_job_configs(catalog: Catalog, configs: Iterable[JobConfig]) -> list[str]:
    """Save configurations in the catalog, replacing those of the same tags; return the tags.

    A job keeps the total points it was created with; a changed configuration counts for the
    jobs created after it.

    Example: ``save_job_configs(catalog, JobConfigManager("job_configurations.json"))``.
    """
    configs = list(configs)
    _check_unique(configs, "the job configurations")
    if not configs:
        return []
    now = now_ms()
    rows = [
        {
            "tag": c.tag,
            "name": c.name,
            "steps": json.dumps(c.as_dict()["step_configurations"]),
            "total_points": c.total_points,
            "updated_at": now,
        }
        for c in configs
    ]
    insert = dialect_insert(catalog.engine, job_configurations)
    upsert = insert.on_conflict_do_update(
        index_elements=["tag"],
        set_={
            name: insert.excluded[name] for name in ("name", "steps", "total_points", "updated_at")
        },
    )
    with catalog.writing() as conn:
        conn.execute(upsert, rows)
    return [c.tag for c in configs]


def list_job_configs(catalog: Catalog) -> list[JobConfig]:
    """Every saved configuration, by tag."""
    with catalog.engine.connect() as conn:
        rows = conn.execute(select(job_configurations).order_by(job_configurations.c.tag)).all()
    return [_config_from_row(row) for row in rows]


def _config_from_row(row) -> JobConfig:
    steps = [StepConfig(s["tag"], s["name"], s["points"]) for s in json.loads(row.steps)]
    return JobConfig(tag=row.tag, name=row.name, step_configurations=steps)


def _saved_config(conn: Connection, tag: str) -> JobConfig | None:
    row = conn.execute(select(job_configurations).where(job_configurations.c.tag == tag)).first()
    return None if row is None else _config_from_row(row)


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
                _insert_job(conn, job_id, customer, tag)
            break
        except IntegrityError:
            if attempt:  # pragma: no cover - a second concurrent creation of the same id
                raise
            # Created by a concurrent request: look again.
    return get_job(catalog, job_id)


def _insert_job(conn: Connection, job_id: str, customer: str | None, tag: str) -> None:
    existing = conn.execute(select(jobs).where(jobs.c.provider_job_id == job_id)).first()
    if existing is not None:
        if existing.tag != tag or existing.customer_id != customer:
            raise JobConflict(
                f"provider_job_id {job_id!r} is already a job of another configuration or "
                "customer; use a new id for a new job"
            )
        return
    config = _saved_config(conn, tag)
    if config is None:
        configs = [_config_from_row(r) for r in conn.execute(select(job_configurations))]
        raise UnknownJobConfig(_unknown_tag_message(tag, configs, "the catalog"))
    now = now_ms()
    conn.execute(
        jobs.insert().values(
            provider_job_id=job_id,
            customer_id=customer,
            tag=tag,
            status="running",
            points_done=0,
            points_total=config.total_points,
            created_at=now,
            updated_at=now,
        )
    )


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
                config = _saved_config(conn, job.tag)
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
        config = _saved_config(conn, row.tag)
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
