"""The job tracking client, with trackerapi's calls: tracking never makes the tracked job fail.

Example::

    import uuid

    from workbench.jobs import JobConfigManager
    from workbench.tracker import TrackerApi

    job_config = JobConfigManager(configurations_file="./job_configurations.json").get_job_config("my_job")
    tracker = TrackerApi(api_key="<key>", base_url="http://127.0.0.1:8080")
    job = tracker.create_job(provider_job_id=str(uuid.uuid4()), customer_id=142, tag=job_config.tag)
    job.send_event(kind="step", name=job_config.step_configurations[0].tag, metadata={"n": 1})
    job.send_event(kind="complete")

Every request has a timeout and is retried (with a short backoff) when the tracker cannot be
reached or answers 5xx. If it still fails, the request is appended to a local spool (JSON lines,
by default ``~/.cache/workbench/tracker-spool.jsonl``) and the call returns normally with a
logged warning; for ``cooldown`` seconds after that, requests go straight to the spool. Every
request first resends what this tracker (same URL and key) spooled, in order, and while some of
it still fails, the new request is spooled behind it. Events carry an ``event_id`` made here, so
a request that reached the tracker but whose answer was lost counts once however often it is
resent. A refusal (4xx: wrong key, unknown tag, ...) is logged as an error and dropped.
The spool stores a fingerprint of the key, never the key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("workbench.tracker")

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

    The constructor makes no network call. ``transport`` replaces httpx's network transport,
    e.g. ``httpx.WSGITransport(app=app)`` to talk to an app in-process.

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
        transport: httpx.BaseTransport | None = None,
    ) -> None:
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
            # trackerapi's header, and the same key in a header gunicorn does not drop.
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
        """Tell the tracker about a new job of the configuration ``tag``; never raises.

        Example: ``job = tracker.create_job(provider_job_id=str(uuid.uuid4()), customer_id=142, tag="my_job")``.
        """
        provider_job_id = str(provider_job_id)
        body = {"provider_job_id": provider_job_id, "customer_id": customer_id, "tag": tag}
        self._post("/jobs", body)
        return TrackedJob(self, provider_job_id, customer_id, tag)

    def post_job_configurations(self, configs_or_file) -> dict | None:
        """Send job configurations: a file, a parsed dict, a ``JobConfigManager`` or a list of
        ``JobConfig``. They are checked here first (``InvalidJobConfig`` for bad ones, before
        anything is sent); sending them never raises.

        Example: ``tracker.post_job_configurations("job_configurations.json")``.
        """
        from workbench.jobs import JobConfig, JobConfigManager, parse_job_configs

        if isinstance(configs_or_file, JobConfigManager):
            configs = configs_or_file.job_configs
        elif isinstance(configs_or_file, list | tuple) and all(
            isinstance(c, JobConfig) for c in configs_or_file
        ):
            document = {"job_configs": [c.as_dict() for c in configs_or_file]}
            configs = parse_job_configs(document)
        else:
            configs = JobConfigManager(configs_or_file).job_configs
        return self._post("/job_configurations", {"job_configs": [c.as_dict() for c in configs]})

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

    def _post(self, path: str, body: dict) -> dict | None:
        """Send now or spool; log, never raise: tracking must not fail the tracked job."""
        try:
            body = json.loads(json.dumps(body, default=str))  # e.g. datetimes in metadata
            if time.monotonic() < self._down_until:
                self._spool(path, body, "the tracker failed moments ago")
                return None
            if self._flush():
                self._spool(path, body, "earlier requests are still waiting in the spool")
                return None
            outcome, answer = self._send(path, body, attempts=self.retries + 1)
            if outcome == FAILED:
                self._down_until = time.monotonic() + self.cooldown
                self._spool(path, body, answer)
                return None
            return answer if outcome == SENT else None
        except Exception:  # the one place that may not raise: the tracked job must go on
            log.exception("tracking request POST %s failed; the job goes on", path)
            return None

    def _send(self, path: str, body: dict, *, attempts: int) -> tuple[str, dict | None]:
        """One request with retries: (SENT, answer), (REFUSED, None) or (FAILED, reason)."""
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
                answer = {"message": response.text[:200]}
            if response.is_success:
                return SENT, answer
            log.error(
                "the tracker at %s refused POST %s (HTTP %s): %s; not resent",
                self.base_url,
                path,
                response.status_code,
                answer.get("message", answer) if isinstance(answer, dict) else answer,
            )
            return REFUSED, None
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
