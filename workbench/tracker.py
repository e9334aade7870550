"""What a tracked job script imports: its job configurations and the tracking client.

Example (the trackerapi README's flow)::

    import uuid

    from workbench.tracker import JobConfigManager, TrackerApi

    job_config = JobConfigManager(configurations_file="./job_configurations.json").get_job_config("my_job")
    tracker = TrackerApi(api_key="<key>", base_url="http://127.0.0.1:8080")
    job = tracker.create_job(provider_job_id=str(uuid.uuid4()), customer_id=142, tag=job_config.name)
    job.send_event(kind="step", name=job_config.step_configurations[0].tag, metadata={"n": 1})
    job.send_event(kind="complete")

A configurations file is the trackerapi format (``job_configs``: a ``tag``, ``name``,
``step_configurations`` and optionally ``version`` each), checked against
``job-configurations.schema.json``. When the tracker does not know the configuration a job is
created with, the client registers it first: the one passed as ``configurations=``, or else the
one this process last took from a :class:`JobConfigManager` by that tag (or name).

Every request has a timeout and is retried (with a short backoff) when the tracker cannot be
reached or answers 5xx. If it still fails, the request is appended to a local spool (JSON lines,
by default ``~/.cache/workbench/tracker-spool.jsonl``) and the call returns normally with a
logged warning; for ``cooldown`` seconds after that, requests go straight to the spool. Every
request first resends what this tracker (same URL and key) spooled, in order, and while some of
it still fails, the new request is spooled behind it. Events carry an ``event_id`` made here, so
a request that reached the tracker but whose answer was lost counts once however often it is
resent. A refusal (4xx: wrong key, unknown tag, ...) is logged as an error and dropped.
The spool stores a fingerprint of the key, never the key.

A job script imports this module alone: it needs httpx and the standard library (jsonschema
when a file is first checked), never the catalog or SQLAlchemy.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from workbench.errors import InvalidJobConfig, InvalidJobRequest, UnknownJobConfig
from workbench.templates import load_schema, schema_validator

log = logging.getLogger("workbench.tracker")


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
    """A job's tag, display name, steps and (optionally) version.

    Example: ``JobConfig("my_job", "My Job", [StepConfig("say_hello", "Say Hello", 10)], "1.0.0")``.
    """

    tag: str
    name: str
    step_configurations: list[StepConfig]
    version: str | None = None

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
        """The configuration in the file format (``version`` only when it has one)."""
        found = {
            "name": self.name,
            "tag": self.tag,
            "step_configurations": [
                {"name": s.name, "tag": s.tag, "points": s.points} for s in self.step_configurations
            ],
        }
        if self.version is not None:
            found["version"] = self.version
        return found


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
def _validator(part: str | None = None):
    """The schema's validator, of the whole file or of one ``$defs`` entry (``"JobConfig"``)."""
    schema = load_schema("job-configurations")
    if part is not None:
        schema = {"$defs": schema["$defs"], "$ref": f"#/$defs/{part}"}
    return schema_validator(schema)


def _check_schema(document: object, source: str, part: str | None = None) -> None:
    errors = sorted(_validator(part).iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        shown = "; ".join(f"{e.json_path}: {e.message}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more problems)" if len(errors) > 5 else ""
        raise InvalidJobConfig(f"{source}: {shown}{more}")


def _config_from_document(job: Mapping) -> JobConfig:
    return JobConfig(
        tag=job["tag"],
        name=job["name"],
        # JSON Schema counts 10.0 as an integer; it is stored as 10.
        step_configurations=[
            StepConfig(s["tag"], s["name"], int(s["points"])) for s in job["step_configurations"]
        ],
        version=job.get("version"),
    )


def parse_job_configs(
    document: object, *, source: str = "the job configurations"
) -> list[JobConfig]:
    """Check a parsed configurations document and return its configurations.

    Errors name ``source`` and the JSON path of what is wrong, e.g.
    ``jobs.json: $.job_configs[0].step_configurations[1].points: 0 is less than the minimum of 1``.
    """
    _check_schema(document, source)
    configs = [_config_from_document(job) for job in document["job_configs"]]
    check_unique(configs, source)
    return configs


def parse_job_config(document: object, *, source: str = "the job configuration") -> JobConfig:
    """Check one configuration (an entry of ``job_configs``, as trackerapi's
    ``register_job_config`` sends it) and return it.

    Example: ``parse_job_config({"tag": "t", "name": "T", "version": "1", "step_configurations": [...]})``.
    """
    _check_schema(document, source, "JobConfig")
    config = _config_from_document(document)
    check_unique([config], source)
    return config


def check_unique(configs: list[JobConfig], source: str) -> None:
    """:class:`InvalidJobConfig` when two configurations share a tag, or two steps of one."""
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


# The configurations this process took from a JobConfigManager, by tag: what a TrackerApi
# registers when the tracker does not know a job's configuration.
_taken: dict[str, JobConfig] = {}


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
        """The configuration of that tag, or :class:`UnknownJobConfig` listing the known tags.

        A :class:`TrackerApi` of this process registers it with the tracker if need be.
        """
        for config in self.job_configs:
            if config.tag == tag:
                _taken[config.tag] = config
                return config
        raise UnknownJobConfig(unknown_tag_message(tag, self.job_configs, self.source))

    def as_dict(self) -> dict:
        """The configurations in the file format (without ``$schema``)."""
        return {"job_configs": [c.as_dict() for c in self.job_configs]}


def find_config(tag: object, configs: Iterable[JobConfig]) -> JobConfig | None:
    """The configuration of that tag; else the only one of that display name; else None.

    Example: ``find_config("My Job", manager).tag`` → ``"my_job"`` (trackerapi's README passes
    the name).
    """
    configs = list(configs)
    for config in configs:
        if config.tag == tag:
            return config
    named = [c for c in configs if c.name == tag]
    return named[0] if len(named) == 1 else None


def unknown_tag_message(tag: object, configs: list[JobConfig], where: str) -> str:
    """What to say when no configuration has ``tag``: the known tags."""
    known = ", ".join(c.tag for c in configs) or "none"
    message = f"no job configuration tagged {tag!r} in {where}; known tags: {known}"
    named = [c.tag for c in configs if c.name == tag]
    if len(named) == 1:
        message += f" ({tag!r} is the name of {named[0]!r}: pass its tag)"
    return message


def _configs_of(configs_or_file: object) -> list[JobConfig]:
    """Configurations from a file, a parsed dict, a manager or a list of JobConfig (checked)."""
    if isinstance(configs_or_file, JobConfigManager):
        return list(configs_or_file.job_configs)
    if isinstance(configs_or_file, list | tuple) and all(
        isinstance(c, JobConfig) for c in configs_or_file
    ):
        configs = list(configs_or_file)
        check_unique(configs, "the job configurations")
        return configs
    return JobConfigManager(configs_or_file).job_configs


# --- the client ----------------------------------------------------------------------------

SENT, REFUSED, FAILED = "sent", "refused", "failed"


def default_spool_path() -> Path:
    """``~/.cache/workbench/tracker-spool.jsonl`` (in the temporary folder if there is no home)."""
    try:
        return Path.home() / ".cache" / "workbench" / "tracker-spool.jsonl"
    except RuntimeError:  # no home directory can be determined
        return Path(tempfile.gettempdir()) / f"workbench-tracker-spool-{os.getuid()}.jsonl"


@dataclass
class TrackedJob:
    """A job the tracker follows; ``send_event`` reports its progress."""

    tracker: TrackerApi
    provider_job_id: str
    customer_id: str | int | None
    tag: str

    def send_event(
        self,
        kind: str,
        tag: str | None = None,
        name: str | None = None,
        metadata: dict | None = None,
    ) -> dict | None:
        """Report a ``step`` (its ``tag``; ``name`` is accepted for it, as in trackerapi's
        README), ``complete`` or ``error``. Returns the tracker's answer, or None when the event
        was spooled or refused; never raises.

        Example: ``job.send_event(kind="step", tag="say_hello", metadata={"Message": "Hi"})``.
        """
        if tag is None:
            tag = name
        elif name is not None and name != tag:
            log.warning("send_event got tag=%r and name=%r; sending tag %r", tag, name, tag)
        body = {
            "kind": kind,
            "tag": tag,
            "provider_job_id": self.provider_job_id,
            "event_metadata": metadata,
            "event_id": uuid.uuid4().hex,
        }
        return self.tracker._post("/events", body)


class TrackerApi:
    """A client of the tracking API (``server/jobs.py``), with trackerapi's calls.

    The constructor makes no network call. ``configurations`` (a file, a parsed dict, a
    :class:`JobConfigManager` or a list of :class:`JobConfig`) are the ones it registers when
    the tracker does not know a job's configuration; without them, those this process took
    from a :class:`JobConfigManager`. ``transport`` replaces httpx's network transport, e.g.
    ``httpx.WSGITransport(app=app)`` to talk to an app in-process.

    Example: ``tracker = TrackerApi(api_key=key, base_url="http://127.0.0.1:8080", timeout=2)``.
    """

    def __init__(
        self,
        api_key: str,
        base_url: str,
        *,
        timeout: float = 5.0,
        retries: int = 2,
        spool: Path | None = None,
        backoff: float = 0.2,
        cooldown: float = 30.0,
        configurations: object = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.configurations = None if configurations is None else _configs_of(configurations)
        self.base_url = base_url.rstrip("/")
        self.retries = max(0, retries)
        self.backoff = backoff
        self.cooldown = cooldown
        self.spool = Path(spool) if spool is not None else default_spool_path()
        self._key_id = hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]
        self._down_until = 0.0
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            # trackerapi's header, and the same key as a bearer token for proxies that drop
            # header names with underscores (nginx does by default).
            headers={"x-api_key": api_key, "Authorization": f"Bearer {api_key}"},
        )

    def __enter__(self) -> TrackerApi:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections (what is spooled stays spooled)."""
        self._client.close()

    def create_job(
        self, provider_job_id: str, customer_id: str | int | None, tag: str
    ) -> TrackedJob:
        """Tell the tracker about a new job of the configuration ``tag`` (or of that display
        name, as trackerapi's README passes it), registering the configuration first when the
        tracker does not know it; never raises.

        Example: ``job = tracker.create_job(provider_job_id=str(uuid.uuid4()), customer_id=142, tag="my_job")``.
        """
        provider_job_id = str(provider_job_id)
        config = self._known_config(tag)
        if config is not None:
            tag = config.tag
        body = {"provider_job_id": provider_job_id, "customer_id": customer_id, "tag": tag}
        self._post("/jobs", body, register=config)
        return TrackedJob(self, provider_job_id, customer_id, tag)

    def register_job_config(self, config: JobConfig) -> dict | None:
        """Register one configuration (trackerapi's call): the same tag and version again is
        fine, a changed one under them is refused (logged); never raises.

        Example: ``tracker.register_job_config(manager.get_job_config("my_job"))``.
        """
        return self._post("/job_configurations", config.as_dict())

    def post_job_configurations(self, configs_or_file) -> dict | None:
        """Send job configurations: a file, a parsed dict, a ``JobConfigManager`` or a list of
        ``JobConfig``. They are checked here first (``InvalidJobConfig`` for bad ones, before
        anything is sent); sending them never raises.

        Example: ``tracker.post_job_configurations("job_configurations.json")``.
        """
        configs = _configs_of(configs_or_file)
        return self._post("/job_configurations", {"job_configs": [c.as_dict() for c in configs]})

    def _known_config(self, tag: object) -> JobConfig | None:
        """The configuration a job of ``tag`` is created with, when this client knows it."""
        if self.configurations is not None:
            return find_config(tag, self.configurations)
        return find_config(tag, list(_taken.values()))

    def flush(self) -> int:
        """Resend what this tracker spooled, in order, until one fails; return how many of its
        requests are still spooled (0 when all went through or were refused; -1 when the spool
        cannot be read).

        Example: ``tracker.flush()`` → ``0``.
        """
        try:
            return self._flush()
        except OSError as exc:
            log.error("cannot read the tracker spool %s: %s", self.spool, exc)
            return -1

    # --- sending -----------------------------------------------------------------------

    def _post(self, path: str, body: dict, *, register: JobConfig | None = None) -> dict | None:
        """Send now or spool; log, never raise: tracking must not fail the tracked job.
        ``register``: the configuration to register, and the request to send once more, when
        the tracker answers that it does not know it."""
        try:
            body = json.loads(json.dumps(body, default=str))  # e.g. datetimes in metadata
            if time.monotonic() < self._down_until:
                self._spool(path, body, "the tracker failed moments ago")
                return None
            if self._flush():
                self._spool(path, body, "earlier requests are still waiting in the spool")
                return None
            quiet = ("unknown_job_config",) if register is not None else ()
            outcome, answer = self._send(path, body, attempts=self.retries + 1, quiet=quiet)
            if outcome == REFUSED and answer.get("error") in quiet:
                registered, _ = self._send(
                    "/job_configurations", register.as_dict(), attempts=self.retries + 1
                )
                if registered == SENT:
                    log.info("registered the job configuration %r with the tracker", register.tag)
                outcome, answer = self._send(path, body, attempts=self.retries + 1)
            if outcome == FAILED:
                self._down_until = time.monotonic() + self.cooldown
                self._spool(path, body, answer)
                return None
            return answer if outcome == SENT else None
        except Exception:  # the one place that may not raise: the tracked job must go on
            log.exception("tracking request POST %s failed; the job goes on", path)
            return None

    def _send(
        self, path: str, body: dict, *, attempts: int, quiet: tuple[str, ...] = ()
    ) -> tuple[str, dict | str]:
        """One request with retries: (SENT, answer), (REFUSED, answer) or (FAILED, reason).
        A refusal is logged unless its error code is in ``quiet``."""
        reason = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._client.post(path, json=body)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code >= 500 or response.status_code in (408, 429):
                reason = f"HTTP {response.status_code}"
                continue
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                answer = {"message": response.text[:200]}
            if response.is_success:
                return SENT, answer
            if answer.get("error") not in quiet:
                log.error(
                    "the tracker at %s refused POST %s (HTTP %s): %s; not resent",
                    self.base_url,
                    path,
                    response.status_code,
                    answer.get("message", answer),
                )
            return REFUSED, answer
        return FAILED, reason

    # --- the spool -----------------------------------------------------------------------

    def _mine(self, entry: dict) -> bool:
        return entry.get("url") == self.base_url and entry.get("key") == self._key_id

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the spool's lock file: appends and flushes of all processes take turns."""
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.spool}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _spool(self, path: str, body: dict, reason: str) -> None:
        entry = {
            "url": self.base_url,
            "key": self._key_id,
            "path": path,
            "body": body,
            "spooled_at": int(time.time() * 1000),
        }
        try:
            with self._locked():
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
                with os.fdopen(os.open(self.spool, flags, 0o600), "ab") as file:
                    file.write((json.dumps(entry) + "\n").encode("utf-8"))
                    file.flush()
                    os.fsync(file.fileno())
        except OSError as exc:
            log.error(
                "tracker unreachable (%s) and POST %s cannot be spooled: %s", reason, path, exc
            )
            return
        log.warning(
            "tracker at %s unreachable (%s): POST %s spooled in %s",
            self.base_url,
            reason,
            path,
            self.spool,
        )

    def _flush(self) -> int:
        """Resend this tracker's spooled requests; return how many of them remain."""
        if not self.spool.exists():
            return 0
        with self._locked():
            try:
                lines = self.spool.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                return 0
            kept: list[str] = []
            remaining = sent = 0
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    log.warning("dropping an unreadable line of the tracker spool %s", self.spool)
                    continue
                if not isinstance(entry, dict) or not self._mine(entry):
                    kept.append(line)
                    continue
                if not isinstance(entry.get("path"), str) or not isinstance(
                    entry.get("body"), dict
                ):
                    log.warning("dropping a malformed entry of the tracker spool %s", self.spool)
                    continue
                if remaining:  # keep the order: nothing goes out after a failure
                    kept.append(line)
                    remaining += 1
                    continue
                outcome, _answer = self._send(entry["path"], entry["body"], attempts=1)
                if outcome == FAILED:
                    kept.append(line)
                    remaining += 1
                elif outcome == SENT:
                    sent += 1
            if len(kept) != len(lines):
                self._rewrite(kept)
        if sent:
            log.info("sent %d spooled tracking requests to %s", sent, self.base_url)
        if remaining:
            self._down_until = time.monotonic() + self.cooldown
        else:
            self._down_until = 0.0
        return remaining

    def _rewrite(self, lines: list[str]) -> None:
        if not lines:
            self.spool.unlink(missing_ok=True)
            return
        temporary = self.spool.with_name(f".{self.spool.name}.{os.getpid()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        with os.fdopen(os.open(temporary, flags, 0o600), "wb") as file:
            file.write(("\n".join(lines) + "\n").encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.spool)
