"""Find and read the workbench configuration (``workbench.toml``)."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import ConfigError
from workbench.pool import DataPool, group_modes, make_folders, open_new_file
from workbench.templates import SHIPPED_PIPELINES, copy_into_home, template_path

CONFIG_NAME = "workbench.toml"
HOME_ENV = "WORKBENCH_HOME"


@dataclass(frozen=True)
class ServerConfig:
    """Settings of the upload server."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 2
    threads: int = 8
    public_url: str = "http://127.0.0.1:8080"
    max_body_bytes: int = 16 * 1024 * 1024
    # Bodies refused before their sender was authenticated (e.g. an unknown study) are kept in
    # junk only up to these many bytes per UTC day, per client address and in all.
    junk_quota_per_address: int = 64 * 1024 * 1024
    junk_quota_total: int = 1024 * 1024 * 1024
    # Below this much free space in the pool, uploads are refused with 507 and /health says so.
    min_free_bytes: int = 1024 * 1024 * 1024
    # A request's header must arrive whole within header_timeout seconds of the connection
    # opening or the previous answer (idle keep-alive connections close then too), and its
    # body within body_timeout seconds of the header; slower clients are disconnected.
    header_timeout: float = 10.0
    body_timeout: float = 60.0


@dataclass(frozen=True)
class SmtpConfig:
    """Where alert digests and critical events are mailed; the password comes from the
    environment variable named by ``password_env``."""

    host: str
    port: int = 25
    sender: str = "workbench@localhost"
    recipients: tuple[str, ...] = ()
    starttls: bool = False
    ssl: bool = False
    username: str = ""
    password_env: str = "WORKBENCH_SMTP_PASSWORD"
    timeout: float = 30.0

    @property
    def password(self) -> str | None:
        return os.environ.get(self.password_env) or None


@dataclass(frozen=True)
class SourceConfig:
    """A study server whose questionnaire tables are exported (MindTrails export protocol).

    Credentials and the key's passphrase come from the environment variables named here.
    """

    name: str
    url: str
    user_env: str = ""
    password_env: str = ""
    private_key: Path | None = None  # PEM file, resolved against the home
    passphrase_env: str = ""
    padding: str = "pkcs1v15"  # or "oaep"
    delete_mode: bool = False
    include: tuple[str, ...] = ()  # tables to export; empty means all
    exclude: tuple[str, ...] = ()
    timeout: float = 60.0  # seconds per request
    retries: int = 4  # further attempts after a failed request
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    max_answer_mb: float = 64.0  # a table's answer above this is refused (memory stays bounded)
    max_id_jump: int = 1_000_000  # a row id this far above the last one does not move the mark
    # The sessions each table is expected to hold per participant: {"PHQ9": ["PRE", "POST"]}.
    schedule: dict = field(default_factory=dict)
    # Each session's due day from the participant's first answer: {"PRE": 0, "POST": 56}; a
    # participant who misses a due session by more than grace_days is lost to follow-up.
    session_days: dict = field(default_factory=dict)
    grace_days: float = 7.0
    # The instrument each table holds: {"PHQ9": "phq9"}. Tables of instruments with safety
    # items (PHQ-9 item 9) are checked at each export and open safety alerts.
    instruments: dict = field(default_factory=dict)
    # Who is mailed a safety alert at once; empty: the [smtp] recipients.
    safety_contacts: tuple[str, ...] = ()

    def credentials(self) -> tuple[str, str]:
        """(user, password) from the environment, or :class:`ConfigError`."""
        missing = [v for v in (self.user_env, self.password_env) if not os.environ.get(v)]
        if not self.user_env or not self.password_env or missing:
            raise ConfigError(
                f"source {self.name!r} needs its credentials in the environment: set "
                + " and ".join(missing or ["user_env and password_env in workbench.toml"])
            )
        return os.environ[self.user_env], os.environ[self.password_env]

    def passphrase(self) -> bytes | None:
        """The private key's passphrase from the environment, if one is named."""
        if not self.passphrase_env:
            return None
        value = os.environ.get(self.passphrase_env)
        if value is None:
            raise ConfigError(
                f"source {self.name!r}: the key's passphrase is read from "
                f"{self.passphrase_env}, which is not set"
            )
        return value.encode()

    def wants(self, table: str) -> bool:
        """Whether ``table`` is exported (include list, then exclude list)."""
        if self.include and table not in self.include:
            return False
        return table not in self.exclude


@dataclass(frozen=True)
class PipelinesConfig:
    """Where pipeline definitions are, how the scheduler queues runs and how long runs stay."""

    folder: Path = SHIPPED_PIPELINES  # a home without its own copies runs the shipped ones
    workers: int = 2
    keep_runs: int = 100  # executed notebooks and records kept per pipeline
    keep_days: int = 30  # and none older than this


@dataclass(frozen=True)
class RedisConfig:
    """The ``[redis]`` section: the variable holding the Redis URL that the scheduler's queue
    and the sync rate-limit buckets use (unset: SQLite files in the pool)."""

    url_env: str = "WORKBENCH_REDIS_URL"

    @property
    def url(self) -> str | None:
        """The Redis URL from the environment, or None."""
        return os.environ.get(self.url_env) or None


@dataclass(frozen=True)
class JobsConfig:
    """Limits of the job tracking API: what one job may store and one answer may carry."""

    max_events: int = 1000  # events stored per job (past it: 413, unless the event moves the job)
    max_metadata_bytes: int = 16 * 1024  # an event's metadata, as stored JSON
    max_metadata_depth: int = 32  # arrays and objects nested in an event's metadata
    page_size: int = 100  # events in a GET /jobs/<id> answer without ?limit=
    max_page_size: int = 1000  # the largest ?limit= accepted


@dataclass(frozen=True)
class Config:
    """One workbench home: where the pool is and how to reach the catalog."""

    home: Path
    pool: Path
    catalog_url: str
    server: ServerConfig = field(default_factory=ServerConfig)
    smtp: SmtpConfig | None = None  # None: mail is off
    sources: tuple[SourceConfig, ...] = ()
    pipelines: PipelinesConfig = field(default_factory=PipelinesConfig)
    # The [sync] section as written; workbench.sync.settings reads and checks it.
    sync: dict = field(default_factory=dict)
    # A group given read access to the pool (0640 files, 0750 folders); None: private (0600/0700).
    pool_group: str | None = None
    jobs: JobsConfig = field(default_factory=JobsConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)

    @property
    def redis_url(self) -> str | None:
        """The one Redis URL (``[redis] url_env``), or None: the queue and the rate-limit
        buckets then live in SQLite files in the pool."""
        return self.redis.url

    def source(self, name: str) -> SourceConfig:
        """The source called ``name``, or :class:`ConfigError`."""
        for source in self.sources:
            if source.name == name:
                return source
        known = ", ".join(s.name for s in self.sources) or "none"
        raise ConfigError(f"no source {name!r} in workbench.toml (sources: {known})")


def find_home(home: str | os.PathLike | None = None) -> Path:
    """The home folder: ``home`` if given, else ``$WORKBENCH_HOME``, else the current directory.

    Example: ``find_home("/srv/study-lab")``.
    """
    chosen = home or os.environ.get(HOME_ENV) or os.getcwd()
    return Path(chosen).expanduser().resolve()


def load_config(home: str | os.PathLike | None = None) -> Config:
    """Read ``workbench.toml`` from the home folder and return a :class:`Config`.

    Example: ``cfg = load_config("~/demo"); cfg.pool``.
    """
    root = find_home(home)
    path = root / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"no {CONFIG_NAME} in {root}; run `workbench init --home {root}` first")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return config_from_dict(raw, home=root)


def config_from_dict(raw: dict, *, home: Path) -> Config:
    """Build a :class:`Config` from parsed TOML, resolving paths against ``home``."""
    pool_section = _section(raw, "pool")
    catalog = _section(raw, "catalog")
    server = _section(raw, "server")
    pool = (home / str(pool_section.get("path", "pool"))).resolve()
    group = pool_section.get("group", "")
    if not isinstance(group, str):
        raise ConfigError("[pool] group must be the name of a group")
    group_modes(group)  # a group that does not exist is an error now, not at the first write
    url = str(catalog.get("url", "") or "")
    url_env = str(catalog.get("url_env", "WORKBENCH_CATALOG_URL"))
    url = os.environ.get(url_env) or url or f"sqlite:///{pool / 'catalog.sqlite'}"
    known = set(ServerConfig.__dataclass_fields__)
    unknown = set(server) - known
    if unknown:
        raise ConfigError(f"unknown keys in [server]: {', '.join(sorted(unknown))}")
    try:
        server_cfg = ServerConfig(**{**server})
        for name in ("port", "workers", "threads", "max_body_bytes"):
            if not isinstance(getattr(server_cfg, name), int) or getattr(server_cfg, name) < 1:
                raise ConfigError(f"[server] {name} must be a positive integer")
        for name in ("junk_quota_per_address", "junk_quota_total", "min_free_bytes"):
            if not isinstance(getattr(server_cfg, name), int) or getattr(server_cfg, name) < 0:
                raise ConfigError(f"[server] {name} must be a whole number of bytes, 0 or more")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(server_cfg, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"[server] {name} must be a positive number of seconds")
    except TypeError as exc:
        raise ConfigError(f"bad [server] section: {exc}") from exc
    pipelines, sync = dict(_section(raw, "pipelines")), dict(_section(raw, "sync"))
    redis = _redis(_section(raw, "redis"), pipelines, sync)  # takes the older keys out first
    return Config(
        home=home,
        pool=pool,
        catalog_url=url,
        server=server_cfg,
        smtp=_smtp(_section(raw, "smtp")),
        sources=_sources(raw.get("sources", []), home),
        pipelines=_pipelines(pipelines, home),
        sync=sync,
        redis=redis,
        pool_group=group or None,
        jobs=_jobs(_section(raw, "jobs")),
    )


def _redis(section: dict, pipelines: dict, sync: dict) -> RedisConfig:
    """``[redis] url_env``, or the older ``[pipelines]`` and ``[sync] redis_url_env`` (still
    read, and taken out of their sections, for homes made before ``[redis]``)."""
    unknown = set(section) - set(RedisConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown keys in [redis]: {', '.join(sorted(unknown))}")
    older = {
        name: part.pop("redis_url_env")
        for name, part in (("pipelines", pipelines), ("sync", sync))
        if "redis_url_env" in part
    }
    if "url_env" not in section and len(set(older.values())) > 1:
        raise ConfigError(
            "[pipelines] and [sync] redis_url_env name different variables: one Redis serves "
            "both now; set [redis] url_env"
        )
    url_env = section.get("url_env") or next(iter(older.values()), RedisConfig.url_env)
    if not isinstance(url_env, str):
        raise ConfigError("[redis] url_env must be the name of an environment variable")
    return RedisConfig(url_env=url_env)


def _jobs(section: dict) -> JobsConfig:
    unknown = set(section) - set(JobsConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown keys in [jobs]: {', '.join(sorted(unknown))}")
    jobs = JobsConfig(**section)
    for name in JobsConfig.__dataclass_fields__:
        value = getattr(jobs, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"[jobs] {name} must be a positive integer")
    if jobs.page_size > jobs.max_page_size:
        raise ConfigError("[jobs] page_size must not be over max_page_size")
    return jobs


def _pipelines(section: dict, home: Path) -> PipelinesConfig:
    unknown = set(section) - set(PipelinesConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown keys in [pipelines]: {', '.join(sorted(unknown))}")
    values = dict(section)
    if values.get("folder"):
        values["folder"] = (home / str(values["folder"])).resolve()
    else:
        values.pop("folder", None)
    try:
        pipelines = PipelinesConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"bad [pipelines] section: {exc}") from exc
    for name in ("workers", "keep_runs", "keep_days"):
        if not isinstance(getattr(pipelines, name), int) or getattr(pipelines, name) < 1:
            raise ConfigError(f"[pipelines] {name} must be a positive integer")
    return pipelines


def _sources(raw: object, home: Path) -> tuple[SourceConfig, ...]:
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        raise ConfigError("sources must be written as [[sources]] tables")
    known = set(SourceConfig.__dataclass_fields__)
    found = []
    for entry in raw:
        name = entry.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
            raise ConfigError(f"[[sources]] needs a name of letters, digits, '-' and '_': {name!r}")
        unknown = set(entry) - known
        if unknown:
            raise ConfigError(f"unknown keys in source {name!r}: {', '.join(sorted(unknown))}")
        if not str(entry.get("url", "")).startswith(("http://", "https://")):
            raise ConfigError(f"source {name!r} needs an http(s) url")
        if entry.get("padding", "pkcs1v15") not in ("pkcs1v15", "oaep"):
            raise ConfigError(f"source {name!r}: padding must be 'pkcs1v15' or 'oaep'")
        values = dict(entry)
        schedule = values.get("schedule", {})
        if not isinstance(schedule, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in schedule.values()
        ):
            raise ConfigError(f"source {name!r}: schedule maps tables to lists of sessions")
        _check_session_days(name, values, schedule)
        instruments = values.get("instruments", {})
        if not isinstance(instruments, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[a-z][a-z0-9_]{0,31}", v)
            for k, v in instruments.items()
        ):
            raise ConfigError(
                f"source {name!r}: instruments maps tables to instrument ids, e.g. "
                '{PHQ9 = "phq9"}'
            )
        contacts = values.get("safety_contacts", [])
        if not isinstance(contacts, list) or not all(
            isinstance(c, str) and "@" in c for c in contacts
        ):
            raise ConfigError(f"source {name!r}: safety_contacts must list e-mail addresses")
        values["safety_contacts"] = tuple(contacts)
        for key in ("include", "exclude"):
            values[key] = tuple(values.get(key, ()))
        if values.get("private_key"):
            values["private_key"] = (home / str(values["private_key"])).resolve()
        try:
            source = SourceConfig(**values)
        except TypeError as exc:
            raise ConfigError(f"bad source {name!r}: {exc}") from exc
        if source.retries < 0 or source.timeout <= 0 or source.backoff < 0:
            raise ConfigError(
                f"source {name!r}: timeout must be positive, retries and backoff not negative"
            )
        if source.max_answer_mb <= 0 or source.max_id_jump < 1:
            raise ConfigError(f"source {name!r}: max_answer_mb and max_id_jump must be positive")
        found.append(source)
    names = [s.name for s in found]
    if len(set(names)) != len(names):
        raise ConfigError("two [[sources]] share a name")
    return tuple(found)


def _check_session_days(name: str, values: dict, schedule: dict) -> None:
    """``session_days`` maps sessions to due days (numbers >= 0) and names every session of
    ``schedule``; ``grace_days`` is a number >= 0."""
    days = values.get("session_days", {})
    number = (int, float)
    if not isinstance(days, dict) or not all(
        isinstance(v, number) and not isinstance(v, bool) and v >= 0 for v in days.values()
    ):
        raise ConfigError(
            f"source {name!r}: session_days maps sessions to due days (numbers >= 0), "
            "e.g. {PRE = 0, POST = 56}"
        )
    undated = sorted({s for v in schedule.values() for s in v} - set(days)) if days else []
    if undated:
        raise ConfigError(
            f"source {name!r}: session_days gives no due day for {', '.join(undated)}"
        )
    grace = values.get("grace_days", 7.0)
    if not isinstance(grace, number) or isinstance(grace, bool) or grace < 0:
        raise ConfigError(f"source {name!r}: grace_days must be a number >= 0")


def _smtp(section: dict) -> SmtpConfig | None:
    unknown = set(section) - set(SmtpConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown keys in [smtp]: {', '.join(sorted(unknown))}")
    if not section.get("host"):
        return None
    recipients = section.get("recipients", [])
    if isinstance(recipients, str):
        recipients = [recipients]
    if not recipients or not all(isinstance(r, str) and "@" in r for r in recipients):
        raise ConfigError("[smtp] recipients must list at least one e-mail address")
    try:
        smtp = SmtpConfig(**{**section, "recipients": tuple(recipients)})
    except TypeError as exc:
        raise ConfigError(f"bad [smtp] section: {exc}") from exc
    if not isinstance(smtp.port, int) or not 0 < smtp.port < 65536:
        raise ConfigError("[smtp] port must be a port number")
    return smtp


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table in {CONFIG_NAME}")
    return value


def init_home(home: str | os.PathLike | None = None, *, force: bool = False) -> Config:
    """Write a commented ``workbench.toml`` into the home, create the pool there and copy the
    shipped pipelines and notebooks into ``pipelines/`` and ``notebooks/`` (files the home has
    already are kept).

    Example: ``init_home("~/demo")``.
    """
    root = find_home(home)
    make_folders(root)
    target = root / CONFIG_NAME
    if target.exists() and not force:
        raise ConfigError(f"{target} exists already; use --force to overwrite it")
    # Private like the pool: the operator may put a catalog URL with its password here.
    template = template_path("workbench.toml").read_bytes()
    fd = open_new_file(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as handle:
        handle.write(template)
    config = load_config(root)
    DataPool.of(config).create()
    copy_into_home(root)
    return config
