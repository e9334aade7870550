"""The upload path behind the server: check, authenticate, file durably, record in the ledger.

One :class:`Ingest` per server process. Each action takes an :class:`Upload` (the body bytes
and the few headers that matter) and returns a :class:`Receipt` (HTTP status and JSON body), or
raises a :class:`~workbench.errors.UploadRejected` after recording the rejection. Nothing here
knows about Bottle.

The order for a batch: body written to the pool's incoming folder and fsynced → ledger row
committed (grouped with concurrent uploads) → file hard-linked under its final name (never
overwriting) → answer 200. The commit and the new name are made durable by the ledger's
background sync, which only then removes the incoming name; :func:`recover_incoming` finishes
whatever a crash or power loss interrupted from that incoming copy (docs/decisions.md).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import io
import json
import logging
import operator
import os
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import orjson
from sqlalchemy import and_, bindparam, func, select
from sqlalchemy.exc import IntegrityError

from workbench.catalog import (
    Catalog,
    Prepared,
    devices,
    dialect_insert,
    junk_usage,
    rejections,
    studies,
    subjects,
    uploads,
)
from workbench.config import Config
from workbench.enrollment import hash_token
from workbench.errors import (
    BadRequest,
    BodyTooLarge,
    ChecksumMismatch,
    Conflict,
    InsufficientStorage,
    InvalidName,
    StudyArchived,
    SubjectNotActive,
    Unauthorized,
    UnknownSensor,
    UnknownStudy,
    UnknownSubject,
    UploadRejected,
    WorkbenchError,
)
from workbench.identifiers import check_identifier, is_identifier, resolve_inside
from workbench.json_limits import check_json
from workbench.ledger import LedgerWriter, insert_ignore
from workbench.pool import RAW_TAG, DataPool, incoming_tag, sync_folders
from workbench.subject_state import DeviceStatus
from workbench.templates import load_schema, schema_validator
from workbench.times import DAY_MS, MINUTES, format_ms, now_ms

log = logging.getLogger("workbench.ingest")

# What the server refuses on purpose: recorded as a rejection (and kept in junk when flagged).
REFUSALS = (UploadRejected, UnknownStudy, StudyArchived)

# A stored file is named <study>_<subject>_<device>_<sensor>_<UTC second>_<16 hex>.json; file
# systems allow 255 bytes, and the fixed part takes NAME_EXTRA of them.
MAX_NAME = 255
NAME_EXTRA = len("_____2000-01-01T00-00-00_0123456789abcdef.json")

# Sample times are milliseconds since the epoch, at most the end of year 9999 (the schemas agree).
MAX_TIMESTAMP = 253_402_300_799_999

ACTIVE, LEFT_CLIENT_TIME, REMOVED = (
    DeviceStatus.ACTIVE,
    DeviceStatus.LEFT_CLIENT_TIME,
    DeviceStatus.REMOVED,
)
# What the app may send; only the coordinator removes (3) a subject, and only it restores one.
APP_STATUSES = (ACTIVE, LEFT_CLIENT_TIME, DeviceStatus.LEFT_SERVER_TIME)
# How far ahead of the server a phone's clock may run before its times count as "the future".
CLOCK_SKEW_MS = 5 * 60_000

# Each upload row dirties a few scattered index pages (its SHA-256 and path are random keys),
# so the write-ahead log grows fast: at SQLite's default of 1,000 pages a commit stops every
# writer for a checkpoint several times a second. 10,000 pages (40 MiB) checkpoint a tenth as
# often, and pages written again meanwhile (the ends of the table and of its indexes) once.
LEDGER_CHECKPOINT_PAGES = 10_000


@dataclass
class Upload:
    """One request as the ingest path sees it."""

    body: bytes
    md5: str | None = None
    content_digest: str | None = None
    authorization: str | None = None
    remote_addr: str | None = None


@dataclass
class Receipt:
    """What to answer: an HTTP status and a JSON body."""

    status: int
    body: dict = field(default_factory=dict)


@dataclass
class _Claimed:
    """Identifiers the sender claims, kept for the rejection record."""

    study: object = None
    subject: object = None
    device: object = None
    sensor: object = None
    authenticated: bool = False  # the subject's token (or legacy enrolment) was checked


class Ingest:
    """The upload service's logic for one workbench home.

    Example: ``Ingest(load_config()).write_data(Upload(body=b'[...]', authorization="Bearer …"))``.
    """

    def __init__(self, config: Config, *, catalog: Catalog | None = None) -> None:
        self.config = config
        self.pool = DataPool.of(config)
        self.pool.create()
        self.catalog = catalog or Catalog(
            config.catalog_url, checkpoint_pages=LEDGER_CHECKPOINT_PAGES
        )
        self.catalog.upgrade()
        self._incoming_lock = self.pool.hold_incoming()  # recovery waits while we write
        self.ledger = LedgerWriter(self.catalog)
        self._user_schema = load_schema("user")
        self._check_user = schema_validator(self._user_schema).is_valid
        self._definitions: dict[str, tuple[int, dict, frozenset]] = {}
        self._sources = SourceDecoders()
        self._zips: dict[str, tuple[str, bytes]] = {}
        self._storage = (float("-inf"), True)  # (when checked, enough free space)
        self._lookup = (
            select(
                studies.c.status,
                studies.c.revision,
                studies.c.definition,
                subjects.c.token_hash,
                subjects.c.removed_at,
                subjects.c.devices_reset_at,
            )
            .select_from(studies)
            .outerjoin(
                subjects,
                and_(
                    subjects.c.study_id == studies.c.study_id,
                    subjects.c.subject_id == bindparam("subject"),
                ),
            )
            .where(studies.c.study_id == bindparam("study"))
        )
        # The same, with the states of one device (one row per app it is registered for).
        self._lookup_device = Prepared(
            self.catalog.engine,
            self._lookup.add_columns(
                devices.c.status.label("device_status"), devices.c.time_left
            ).outerjoin(
                devices,
                and_(
                    devices.c.study_id == studies.c.study_id,
                    devices.c.subject_id == subjects.c.subject_id,
                    devices.c.device_id == bindparam("device"),
                ),
            ),
        )

    # ------------------------------------------------------------------ write_data

    def write_data(self, upload: Upload) -> Receipt:
        """File one batch of sensor records (JTrack ``write_data``)."""
        return self._refusals_recorded("write_data", self._write_data, upload)

    def _write_data(self, upload: Upload, claimed: _Claimed) -> Receipt:
        self._check_storage()
        has_checksum = _verify_checksum(upload)
        check_json(upload.body)  # depth, number range and UTF-8, on every body in one C pass
        # A source that stored batches before has a decoder that also checks, while parsing,
        # that every record names it; anything else (or any doubt) takes the general path.
        records = self._sources.decode(upload.body)
        known_source = records is not None
        if records is None:
            records = parse_batch(upload.body)
        first = records[0]
        claimed.study, claimed.subject = first.studyId, first.username
        claimed.device, claimed.sensor = first.deviceid, first.sensorname
        study_id = check_identifier("study", claimed.study)
        subject_id = check_identifier("subject", claimed.subject)
        device_id = check_identifier("device", claimed.device)
        sensor = check_identifier("sensor", claimed.sensor)
        if len(study_id) + len(subject_id) + len(device_id) + len(sensor) > MAX_NAME - NAME_EXTRA:
            raise BadRequest(
                "study, subject, device and sensor ids are too long together to name the file "
                f"(at most {MAX_NAME - NAME_EXTRA} characters in all)"
            )

        with self.catalog.raw_cursor() as cursor:
            rows = self._lookup_device.all(
                cursor, {"study": study_id, "subject": subject_id, "device": device_id}
            )
        if not rows:
            raise _keep(UnknownStudy(f"unknown study {study_id!r}"))
        row = rows[0]
        definition, sensors = self._definition(study_id, row.revision, row.definition)
        self._authenticate(definition, row.token_hash, upload, subject_id)
        claimed.authenticated = True
        if row.status != "active":
            raise _keep(StudyArchived(f"study {study_id!r} is archived"))
        if row.removed_at is not None:
            raise _keep(
                SubjectNotActive(f"{subject_id!r} was removed from the study by the investigator")
            )
        if known_source:  # its decoder checked that every record names this source
            first_ts, last_ts = sample_span(records)
        else:
            first_ts, last_ts = span_of_batch(records, study_id, subject_id, device_id, sensor)
        if definition["checksum_required"] and not has_checksum:
            raise BadRequest(
                f"study {study_id!r} requires an md5 or Content-Digest header on uploads"
            )
        if len(upload.body) > definition["max_body_bytes"]:
            raise BodyTooLarge(
                f"body of {len(upload.body)} bytes is over study {study_id!r}'s limit of "
                f"{definition['max_body_bytes']}"
            )
        if sensor not in sensors:
            raise _keep(UnknownSensor(f"sensor {sensor!r} is not recorded by study {study_id!r}"))
        self._check_device_active(definition, rows, subject_id, device_id)

        sha = hashlib.sha256(upload.body).hexdigest()
        row = batch_row(
            study_id,
            subject_id,
            device_id,
            sensor,
            upload.body,
            sha,
            len(records),
            first_ts,
            last_ts,
            received=now_ms(),
        )
        try:
            incoming = self.pool.write_incoming(upload.body, tag=f"b{sha}")
        except OSError as exc:
            if _disk_full(exc):
                raise InsufficientStorage(_DISK_FULL) from exc
            raise
        try:
            row_id = self.ledger.record(row)
        except BaseException as exc:
            os.unlink(incoming)  # not acknowledged: the phone keeps the batch and retries
            if _disk_full(exc):
                raise InsufficientStorage(_DISK_FULL) from exc
            raise
        if not known_source:
            self._sources.learn(study_id, subject_id, device_id, sensor)
        if row_id is None:
            return self._duplicate(incoming, row)
        # A resent copy arriving meanwhile may have linked the same bytes already: that is fine.
        self._place(incoming, row["path"])
        return Receipt(
            200,
            {
                "ok": True,
                "message": f"stored {len(records)} records",
                "duplicate": False,
                "id": row_id,
                "records": len(records),
                "sha256": sha,
            },
        )

    def _place(self, incoming: Path, relative: str) -> None:
        """Link an incoming batch under its recorded name, unless those bytes are there already."""
        try:
            self.ledger.published(incoming, self.pool.link(incoming, relative))
        except FileExistsError:
            os.unlink(incoming)

    def _duplicate(self, incoming: Path, row: dict) -> Receipt:
        """A retried batch: answer 200 once the first copy is surely in place."""
        with self.catalog.engine.connect() as conn:
            first = conn.execute(
                select(uploads.c.id, uploads.c.path, uploads.c.n_records).where(
                    uploads.c.study_id == row["study_id"],
                    uploads.c.subject_id == row["subject_id"],
                    uploads.c.device_id == row["device_id"],
                    uploads.c.sensor == row["sensor"],
                    uploads.c.sha256 == row["sha256"],
                )
            ).one()
        # The first attempt may have been committed and then interrupted before its file was
        # linked: this retry carries the same bytes, so it completes the first attempt.
        self._place(incoming, first.path)
        return Receipt(
            200,
            {
                "ok": True,
                "message": "this batch was stored before; nothing new was written",
                "duplicate": True,
                "id": first.id,
                "records": first.n_records,
                "sha256": row["sha256"],
            },
        )

    # ------------------------------------------------------------------ add_user / update_user

    def add_user(self, upload: Upload) -> Receipt:
        """Attach a device to an enrolled subject (JTrack ``add_user``)."""
        return self._refusals_recorded("add_user", self._add_user, upload)

    def _add_user(self, upload: Upload, claimed: _Claimed) -> Receipt:
        user = self._user_message(upload, claimed)
        study_id, subject_id, device_id, app, definition, subject = self._registration(
            upload, user, claimed
        )
        status = user["status"] if user["status"] is not None else ACTIVE
        if status != ACTIVE:
            raise BadRequest("add_user registers an active device: status must be 0")
        if subject.removed_at is not None:
            raise SubjectNotActive(
                f"{subject_id!r} was removed from the study by the investigator; "
                "no device can be registered"
            )
        now = now_ms()
        if user["time_joined"] is not None and user["time_joined"] > now + CLOCK_SKEW_MS:
            raise BadRequest("time_joined is in the future")
        try:
            with self.catalog.writing() as conn:
                existing = conn.execute(
                    select(devices.c.device_id, devices.c.status, devices.c.registered_at).where(
                        devices.c.study_id == study_id,
                        devices.c.subject_id == subject_id,
                        devices.c.app == app,
                    )
                ).all()
                mine = [d for d in existing if d.device_id == device_id]
                if mine:
                    if mine[0].status != ACTIVE:
                        raise SubjectNotActive(
                            f"device {device_id!r} of {subject_id!r} has left the study; "
                            "it cannot be registered again"
                        )
                    return _already_registered()
                # Every device ever attached counts, so leaving and re-adding does not get
                # round the limit; those attached before the coordinator's last reset count
                # only while still active.
                reset = subject.devices_reset_at
                counted = sum(
                    1
                    for d in existing
                    if d.status == ACTIVE or reset is None or d.registered_at > reset
                )
                if counted >= definition["max_devices"]:
                    raise Conflict(
                        f"subject {subject_id!r} has attached {counted} {app} devices, the "
                        "study's maximum; the coordinator can allow more with "
                        "`workbench subject reset-devices`"
                    )
                conn.execute(
                    devices.insert().values(
                        study_id=study_id,
                        subject_id=subject_id,
                        app=app,
                        device_id=device_id,
                        status=ACTIVE,
                        time_joined=user["time_joined"] or now,
                        time_left=None,
                        registered_at=now,
                        updated_at=now,
                    )
                )
        except IntegrityError:  # the same device registered by a concurrent request
            return _already_registered()
        return Receipt(
            200,
            {"ok": True, "message": f"device {device_id} registered for {subject_id}", "app": app},
        )

    def update_user(self, upload: Upload) -> Receipt:
        """Change a device's status, e.g. when the subject leaves (JTrack ``update_user``)."""
        return self._refusals_recorded("update_user", self._update_user, upload)

    def _update_user(self, upload: Upload, claimed: _Claimed) -> Receipt:
        user = self._user_message(upload, claimed)
        study_id, subject_id, device_id, app, _definition, subject = self._registration(
            upload, user, claimed
        )
        status = user["status"]
        if status is None:
            raise BadRequest("update_user needs a status: 0 active, 1 or 2 left")
        if status not in APP_STATUSES:
            raise BadRequest(
                f"the app may set status 0, 1 or 2, not {status}: only the coordinator removes "
                "a subject (workbench subject remove)"
            )
        if subject.removed_at is not None:
            raise SubjectNotActive(f"{subject_id!r} was removed from the study by the investigator")
        now = now_ms()
        if status == ACTIVE:
            time_left = None
        elif status == LEFT_CLIENT_TIME:
            time_left = user["time_left"] or now
            if time_left > now + CLOCK_SKEW_MS:
                raise BadRequest("time_left is in the future")
        else:
            time_left = now
        with self.catalog.writing() as conn:
            key = (
                (devices.c.study_id == study_id)
                & (devices.c.subject_id == subject_id)
                & (devices.c.app == app)
                & (devices.c.device_id == device_id)
            )
            joined = conn.execute(select(devices.c.time_joined).where(key)).scalar()
            if time_left is not None and joined is not None and time_left < joined:
                raise BadRequest("time_left is before the device's time_joined")
            updated = conn.execute(
                devices.update()
                .where(key & (devices.c.status != REMOVED))
                .values(status=status, time_left=time_left, updated_at=now)
            ).rowcount
            if not updated:
                current = conn.execute(select(devices.c.status).where(key)).scalar()
                if current is None:
                    raise UnknownSubject(
                        f"device {device_id!r} is not registered for {subject_id!r}; send add_user first"
                    )
                raise SubjectNotActive(
                    f"{subject_id!r} was removed from the study by the investigator"
                )
        return Receipt(
            200, {"ok": True, "message": f"status of {device_id} set to {status}", "status": status}
        )

    def _user_message(self, upload: Upload, claimed: _Claimed) -> dict:
        _verify_checksum(upload)
        check_json(upload.body)
        raw = _parse_json(upload.body, self._check_user, self._user_schema, "a JSON object")
        app = "ema" if "deviceid_ema" in raw else "main"
        suffix = "_ema" if app == "ema" else ""
        user = {
            "app": app,
            "studyId": raw["studyId"],
            "username": raw["username"],
            "deviceid": raw.get(f"deviceid{suffix}"),
            "status": raw.get(f"status{suffix}"),
            "time_joined": raw.get(f"time_joined{suffix}"),
            "time_left": raw.get(f"time_left{suffix}"),
        }
        claimed.study, claimed.subject, claimed.device = (
            user["studyId"],
            user["username"],
            user["deviceid"],
        )
        if user["deviceid"] is None:
            raise BadRequest("the message names no device: send deviceid or deviceid_ema")
        for key in ("time_joined", "time_left"):
            if user[key] is not None and type(user[key]) is not int:
                raise BadRequest(f"{key} must be a whole number of milliseconds")
        return user

    def _registration(self, upload: Upload, user: dict, claimed: _Claimed):
        study_id = check_identifier("study", user["studyId"])
        subject_id = check_identifier("subject", user["username"])
        device_id = check_identifier("device", user["deviceid"])
        with self.catalog.engine.connect() as conn:
            row = conn.execute(self._lookup, {"study": study_id, "subject": subject_id}).first()
        if row is None:
            raise _keep(UnknownStudy(f"unknown study {study_id!r}"))
        definition, _sensors = self._definition(study_id, row.revision, row.definition)
        self._authenticate(definition, row.token_hash, upload, subject_id)
        claimed.authenticated = True
        if row.status != "active":
            raise _keep(StudyArchived(f"study {study_id!r} is archived"))
        return study_id, subject_id, device_id, user["app"], definition, row

    # ------------------------------------------------------------------ resources

    def resources(
        self, study_id: object, *, authorization: str | None, if_none_match: str | None
    ) -> tuple[int, str, bytes]:
        """The study's resources archive as ``(status, etag, zip bytes)``; 304 when unchanged."""
        study_id = check_identifier("study", study_id)
        with self.catalog.engine.connect() as conn:
            row = conn.execute(
                select(studies.c.status, studies.c.revision, studies.c.definition).where(
                    studies.c.study_id == study_id
                )
            ).first()
            if row is None:
                raise UnknownStudy(f"unknown study {study_id!r}")
            definition, _ = self._definition(study_id, row.revision, row.definition)
            if definition["auth"] == "token":
                token = _bearer(authorization)
                found = conn.execute(
                    select(func.count()).where(
                        subjects.c.study_id == study_id,
                        subjects.c.token_hash == hash_token(token),
                    )
                ).scalar()
                if not found:
                    raise Unauthorized("the Bearer token belongs to no subject of this study")
        if not definition.get("resources"):
            raise UnknownSensor(f"study {study_id!r} has no resources folder")
        try:
            folder = resolve_inside(
                self.config.home, definition["resources"], what="resources folder"
            )
        except InvalidName:
            log.error("study %s: its resources folder is outside the home", study_id)
            raise UnknownSensor(f"study {study_id!r} has no usable resources folder") from None
        etag, data = self._zip(study_id, folder)
        if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
            return 304, etag, b""
        return 200, etag, data

    def _zip(self, study_id: str, folder: Path) -> tuple[str, bytes]:
        """The archive of ``folder`` and its ETag, which is a hash of every file's name and
        content (so an edit that keeps size and modification time still changes it)."""
        if not folder.is_dir():
            log.error("study %s: resources folder %s does not exist", study_id, folder)
            raise UnknownSensor(f"the resources folder of study {study_id!r} does not exist")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        contents = [(str(p.relative_to(folder)), p.read_bytes()) for p in files]
        digest = hashlib.sha256()
        for name, data in contents:
            digest.update(hashlib.sha256(name.encode()).digest())
            digest.update(hashlib.sha256(data).digest())
        etag = '"' + digest.hexdigest()[:32] + '"'
        cached = self._zips.get(study_id)
        if cached and cached[0] == etag:
            return etag, cached[1]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in contents:
                info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, data)
        self._zips[study_id] = (etag, buffer.getvalue())
        return etag, self._zips[study_id][1]

    # ------------------------------------------------------------------ shared steps

    def close(self) -> None:
        """Make everything recorded durable and stop the background threads."""
        self.ledger.close()
        self.catalog.dispose()
        if self._incoming_lock is not None:
            os.close(self._incoming_lock)
            self._incoming_lock = None

    def _refusals_recorded(self, action: str, handler, upload: Upload) -> Receipt:
        """Run an action; a refusal is recorded (and kept in junk when flagged), then raised."""
        claimed = _Claimed()
        try:
            return handler(upload, claimed)
        except REFUSALS as exc:
            raise self._rejected(action, upload, claimed, exc) from None

    def reject_unread(self, action: str, upload: Upload, exc: UploadRejected) -> UploadRejected:
        """Record a rejection made before the body was read (e.g. 413)."""
        return self._rejected(action, upload, _Claimed(), exc)

    def _definition(self, study_id: str, revision: int, text: str) -> tuple[dict, frozenset]:
        cached = self._definitions.get(study_id)
        if cached is None or cached[0] != revision:
            definition = json.loads(text)
            cached = (revision, definition, frozenset(definition["sensors"]))
            self._definitions[study_id] = cached
        return cached[1], cached[2]

    def _authenticate(self, definition: dict, token_hash, upload: Upload, subject_id: str) -> None:
        if token_hash is None:
            raise UnknownSubject(f"subject {subject_id!r} is not enrolled in this study")
        if definition["auth"] == "legacy":
            return
        token = _bearer(upload.authorization)
        if not hmac.compare_digest(hash_token(token), token_hash):
            raise Unauthorized(f"wrong token for subject {subject_id!r}")

    def _check_device_active(self, definition, states, subject_id, device_id) -> None:
        states = [r for r in states if r.device_status is not None]
        if not states:
            raise _keep(
                UnknownSubject(
                    f"device {device_id!r} is not registered for {subject_id!r}; send add_user "
                    "first"
                )
            )
        if any(s.device_status == ACTIVE for s in states):
            return
        if any(s.device_status == REMOVED for s in states):
            raise _keep(
                SubjectNotActive(f"{subject_id!r} was removed from the study by the investigator")
            )
        grace_ms = definition["left_grace_hours"] * 3_600_000
        left = max((s.time_left or 0) for s in states)
        if now_ms() - left > grace_ms:
            raise _keep(
                SubjectNotActive(f"{subject_id!r} left the study on {format_ms(left, MINUTES)}")
            )

    def _rejected(
        self, action: str, upload: Upload, claimed: _Claimed, exc: WorkbenchError
    ) -> WorkbenchError:
        """Record a refusal in the catalog (and keep the body in junk when flagged)."""
        try:
            self._record_rejection(action, upload, claimed, exc)
        except Exception as error:  # the refusal stands even when it cannot be recorded
            log.error("could not record a %s refusal (%s): %s", action, exc.code, error)
        return exc

    def _record_rejection(
        self, action: str, upload: Upload, claimed: _Claimed, exc: WorkbenchError
    ) -> None:
        received = now_ms()
        sha = hashlib.sha256(upload.body).hexdigest() if upload.body else None
        path = None
        incoming = None
        address = (upload.remote_addr or "")[:64] or None
        keep = bool(getattr(exc, "keep_body", False) and upload.body)
        if keep and not self.storage_ok():
            keep, why_not = False, "the server's disk is nearly full"
        if keep:
            stamp = format_ms(received, "%Y-%m-%d/%H%M%S")
            path = f"junk/{stamp}-{exc.code}-{sha[:16]}-{os.urandom(4).hex()}.json"
            incoming = self.pool.write_incoming(upload.body, tag=f"j{sha}")
        try:
            with self.catalog.writing(serialize="junk_usage") as conn:
                if keep and not claimed.authenticated:
                    why_not = self._use_junk_quota(conn, address, len(upload.body), received)
                    if why_not is not None:
                        keep, path = False, None
                conn.execute(
                    rejections.insert().values(
                        received_at=received,
                        action=action,
                        status=exc.status,
                        reason=exc.code,
                        message=exc.message[:2000],
                        study_id=_claim(claimed.study),
                        subject_id=_claim(claimed.subject),
                        device_id=_claim(claimed.device),
                        sensor=_claim(claimed.sensor),
                        bytes=len(upload.body),
                        sha256=sha,
                        path=path,
                        remote_addr=address,
                    )
                )
        except BaseException:
            if incoming is not None:
                os.unlink(incoming)
            raise
        if keep:
            self.pool.publish(incoming, path)
            exc.details["kept_in_junk"] = True
            exc.message += "; the body is kept in junk"
        elif getattr(exc, "keep_body", False) and upload.body:
            if incoming is not None:
                os.unlink(incoming)
            exc.details["kept_in_junk"] = False
            exc.message += f"; the body was not kept: {why_not}"

    def _use_junk_quota(self, conn, address: str | None, size: int, received: int) -> str | None:
        """Count ``size`` bytes of unauthenticated junk against today's quotas; None if they
        fit (and were counted), else why not."""
        day = received // DAY_MS
        key = address or "unknown"
        used = dict(
            conn.execute(
                select(junk_usage.c.address, junk_usage.c.bytes).where(
                    junk_usage.c.day == day, junk_usage.c.address.in_([key, "*"])
                )
            ).all()
        )
        server = self.config.server
        if used.get(key, 0) + size > server.junk_quota_per_address:
            return "today's junk quota for this address is used up"
        if used.get("*", 0) + size > server.junk_quota_total:
            return "today's junk quota for unauthenticated senders is used up"
        upsert = dialect_insert(self.catalog.engine, junk_usage)
        for name in (key, "*"):
            conn.execute(
                upsert.values(day=day, address=name, bytes=size).on_conflict_do_update(
                    index_elements=["day", "address"],
                    set_={"bytes": junk_usage.c.bytes + size},
                )
            )
        return None

    def storage_ok(self) -> bool:
        """True while the pool's file system has more free space than ``min_free_bytes``
        (looked up at most once a second)."""
        checked, ok = self._storage
        now = time.monotonic()
        if now - checked < 1.0:
            return ok
        try:
            stats = os.statvfs(self.pool.root)
            ok = stats.f_bavail * stats.f_frsize >= self.config.server.min_free_bytes
        except OSError:
            ok = False
        self._storage = (now, ok)
        return ok

    def _check_storage(self) -> None:
        if not self.storage_ok():
            raise InsufficientStorage(_DISK_FULL)


def batch_row(
    study: str,
    subject: str,
    device: str,
    sensor: str,
    body: bytes,
    sha: str,
    n_records: int,
    first_ts: int,
    last_ts: int,
    *,
    received: int,
) -> dict:
    """The ledger row of a batch, with the pool-relative path it is filed under."""
    stamp = format_ms(received, "%Y-%m-%dT%H-%M-%S")
    return {
        "study_id": study,
        "subject_id": subject,
        "device_id": device,
        "sensor": sensor,
        "received_at": received,
        "path": (
            f"studies/{study}/{subject}/{device}/{sensor}/"
            f"{study}_{subject}_{device}_{sensor}_{stamp}_{sha[:16]}.json"
        ),
        "bytes": len(body),
        "sha256": sha,
        "n_records": n_records,
        "first_ts": first_ts,
        "last_ts": last_ts,
    }


def recover_incoming(config: Config, *, all_hosts: bool = False) -> dict[str, int]:
    """Finish the writes a crash or power loss interrupted; return counts of what was done.

    Every batch file in the incoming folder was checked and fsynced before it was recorded.
    Its ledger row is inserted again if it was lost (the sender's retry then answers
    ``duplicate``) and its final name linked if missing; then the incoming name goes. A file
    cut short by the crash (its hash does not match) was never answered and is discarded; a
    complete one that can no longer be filed goes to ``junk/recovered/``. A junk file whose
    rejection was never recorded was never answered: it is discarded.

    Only this host's incoming folder is read, unless ``all_hosts`` (for a pool whose server
    moved to a machine with another name). Refuses to run while a server on this host writes.
    """
    pool = DataPool.of(config)
    catalog = Catalog(config.catalog_url)
    catalog.upgrade()
    done = {"completed": 0, "reledgered": 0, "discarded": 0, "junk": 0}
    folders: set[Path] = set()
    finished: list[Path] = []
    try:
        with pool.exclusive_incoming():
            for incoming in pool.incoming_files(all_hosts=all_hosts):
                outcome, linked = _recover_one(pool, catalog, incoming)
                done[outcome] += 1
                if outcome == "reledgered":
                    done["completed"] += 1
                folders.update(linked)
                finished.append(incoming)
            # Rows and links durable first; only then do the incoming copies go.
            catalog.sync()
            sync_folders(folders)
            for incoming in finished:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(incoming)
    finally:
        catalog.dispose()
    return done


def _recover_one(pool: DataPool, catalog: Catalog, incoming: Path) -> tuple[str, set[Path]]:
    tag = incoming_tag(incoming)
    kind, sha = tag[:1], tag[1:]
    if tag == RAW_TAG:
        return "discarded", set()  # a snapshot or sync window not yet recorded: fetched again
    table = uploads if kind == "b" else rejections
    with catalog.engine.connect() as conn:
        paths = [
            p
            for p in conn.execute(select(table.c.path).where(table.c.sha256 == sha)).scalars()
            if p
        ]
    outcome = "completed"
    if not paths and kind == "b":
        body = incoming.read_bytes()
        if hashlib.sha256(body).hexdigest() != sha:
            return "discarded", set()  # cut short: never answered
        row = _row_from_body(body, sha, received=incoming.stat().st_mtime_ns // 1_000_000)
        if row is None:
            relative = f"junk/recovered/{incoming.name.removesuffix('.part')}.json"
            pool.link(incoming, relative)
            with catalog.writing(durable=False) as conn:
                conn.execute(
                    rejections.insert().values(
                        received_at=now_ms(),
                        action="recover",
                        status=422,
                        reason="unfileable",
                        message="a complete batch found by recovery no longer passes the checks",
                        bytes=len(body),
                        sha256=sha,
                        path=relative,
                    )
                )
            return "junk", {(pool.root / relative).parent}
        with catalog.writing(durable=False) as conn:
            conn.execute(insert_ignore(catalog), row)
        paths, outcome = [row["path"]], "reledgered"
    if not paths:
        return "discarded", set()
    linked = set()
    for relative in paths:
        with contextlib.suppress(FileExistsError):
            pool.link(incoming, relative)
        linked.add((pool.root / relative).parent)
    return outcome, linked


def _row_from_body(body: bytes, sha: str, *, received: int) -> dict | None:
    """Rebuild a batch's ledger row from its bytes (None if they no longer pass the checks)."""
    try:
        records = _decode_batch(body)
        first = records[0]
        ids = [first.studyId, first.username, first.deviceid, first.sensorname]
        kinds = ("study", "subject", "device", "sensor")
        if not all(is_identifier(kind, value) for kind, value in zip(kinds, ids, strict=True)):
            return None
        if sum(map(len, ids)) > MAX_NAME - NAME_EXTRA:
            return None
        first_ts, last_ts = span_of_batch(records, *ids)
    except (msgspec.MsgspecError, BadRequest):
        return None
    return batch_row(*ids, body, sha, len(records), first_ts, last_ts, received=received)


_DISK_FULL = "the server's disk is nearly full; nothing was stored, retry later"


def _disk_full(exc: BaseException) -> bool:
    """True if ``exc`` says the disk (or the catalog's database) is full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return "disk is full" in str(exc) or "No space left" in str(exc)


def _already_registered() -> Receipt:
    return Receipt(
        200, {"ok": True, "message": "device already registered", "already_registered": True}
    )


def _keep(exc: UploadRejected) -> UploadRejected:
    """Mark a rejection whose body is kept in junk."""
    exc.keep_body = True  # type: ignore[attr-defined]
    return exc


Timestamp = Annotated[int, msgspec.Meta(ge=0, le=MAX_TIMESTAMP)]


class BatchRecord(msgspec.Struct, gc=False):
    """The fields of a write_data record the server checks (the rest is stored as sent).

    The compiled twin of ``data_templates/schemas/batch.schema.json``; tests/test_ingest_schema.py
    checks that both accept the same records.
    """

    studyId: str
    username: str
    deviceid: str
    sensorname: str
    timestamp: Timestamp


_decode_batch = msgspec.json.Decoder(
    Annotated[list[BatchRecord], msgspec.Meta(min_length=1)]
).decode


class SourceDecoders:
    """Batch decoders for sources (study, subject, device, sensor) that stored batches before.

    Such a decoder is a msgspec type whose four identifier fields are literals: it accepts a
    body only if it is valid and every record names that one source, which it checks in C while
    parsing instead of in four passes over the records. The source is guessed from the first
    record's bytes; a wrong guess, an unknown source or an invalid body gives None, and the
    caller takes the general path, which says what is wrong. Only a source whose batch passed
    every check and was stored is learned. The first ``size`` sources are kept (about 3.5 KiB
    each) and no more: evicting would make a worker that sees more sources than that build a
    decoder for nearly every upload, so further sources simply keep the general path.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._decoders: dict[tuple[str, str, str, str], object] = {}
        self._lock = threading.Lock()

    def decode(self, body: bytes) -> list | None:
        """The records of ``body`` if its source is known and every record names it, else None."""
        source = _first_source(body)
        decode = self._decoders.get(source) if source is not None else None
        if decode is None:
            return None
        try:
            return decode(body)
        except msgspec.MsgspecError:
            return None

    def learn(self, study: str, subject: str, device: str, sensor: str) -> None:
        """Keep a decoder for a source whose batch was just stored, while there is room."""
        source = (study, subject, device, sensor)
        if source in self._decoders or len(self._decoders) >= self.size:
            return
        decode = _source_decoder(*source)
        with self._lock:
            if len(self._decoders) < self.size:
                self._decoders.setdefault(source, decode)


_SOURCE_KEYS = (b'"studyId":"', b'"username":"', b'"deviceid":"', b'"sensorname":"')


def _first_source(body: bytes) -> tuple[str, str, str, str] | None:
    """A guess at a batch's source from the first value of each identifier field in its first
    few KiB, as compact JSON writes them; None when they are not found there."""
    found = []
    for key in _SOURCE_KEYS:
        start = body.find(key, 0, 4096)
        if start < 0:
            return None
        start += len(key)
        end = body.find(b'"', start, start + 129)
        if end < 0:
            return None
        found.append(body[start:end].decode("latin-1"))
    return tuple(found)  # type: ignore[return-value]


def _source_decoder(study: str, subject: str, device: str, sensor: str):
    """A decoder of batches that is :data:`_decode_batch` with the four identifiers fixed."""
    record = msgspec.defstruct(
        "SourceRecord",
        [
            ("studyId", Literal[study]),
            ("username", Literal[subject]),
            ("deviceid", Literal[device]),
            ("sensorname", Literal[sensor]),
            ("timestamp", Timestamp),
        ],
        gc=False,
    )
    return msgspec.json.Decoder(Annotated[list[record], msgspec.Meta(min_length=1)]).decode


def parse_batch(body: bytes) -> list[BatchRecord]:
    """Parse and validate a write_data body in one compiled step (msgspec); only a body that
    fails is parsed again, by jsonschema, to say why in the schema's terms (:class:`BadRequest`).
    """
    try:
        return _decode_batch(body)
    except msgspec.ValidationError as exc:
        _parse_json(body, None, load_schema("batch"), "a JSON array", fallback=str(exc))
    except msgspec.DecodeError:
        _parse_json(body, None, load_schema("batch"), "a JSON array")
    raise AssertionError("unreachable: _parse_json raises for a body msgspec refused")


def _parse_json(body: bytes, check, schema: dict, expected: str, fallback: str | None = None):
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if check is None or not check(data):
        from jsonschema.exceptions import best_match

        error = best_match(schema_validator(schema).iter_errors(data))
        if error is not None:
            where = "/".join(map(str, error.absolute_path))
            message = f"{where + ': ' if where else ''}{error.message[:300]}"
        else:  # stricter than the schema: e.g. a timestamp of 1.0
            message = fallback or "does not match the schema"
        raise BadRequest(f"the body must be {expected}: {message}")
    return data


def span_of_batch(records: list[BatchRecord], study: str, subject: str, device: str, sensor: str):
    """First and last sample time of a batch whose records must all name the same source."""
    for getter, expected in zip(_SOURCE_FIELDS, (study, subject, device, sensor), strict=True):
        if set(map(getter, records)) != {expected}:
            raise _keep(
                BadRequest(
                    "every record of a batch must name the same study, subject, device and sensor"
                )
            )
    return sample_span(records)


def sample_span(records) -> tuple[int, int]:
    """First and last sample time of a batch."""
    stamps = list(map(_timestamp_of, records))
    return min(stamps), max(stamps)


# attrgetter runs in C: one set per field is about twice as fast as a loop over the records.
_SOURCE_FIELDS = tuple(
    operator.attrgetter(name) for name in ("studyId", "username", "deviceid", "sensorname")
)
_timestamp_of = operator.attrgetter("timestamp")


def _claim(value: object) -> str | None:
    if value is None:
        return None
    return str(value)[:128]


def _bearer(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise Unauthorized(
            "this study needs the subject's token: send Authorization: Bearer <token>"
        )
    return authorization[7:].strip()


def _verify_checksum(upload: Upload) -> bool:
    """Check the md5 and Content-Digest headers against the body; True if one was given."""
    given = False
    if upload.md5:
        given = True
        if upload.md5.strip().lower() != hashlib.md5(upload.body).hexdigest():
            raise ChecksumMismatch("md5 header does not match the body; nothing was stored, retry")
    if upload.content_digest:
        expected = _sha256_digest(upload.content_digest)
        if expected is not None:
            given = True
            if not hmac.compare_digest(expected, hashlib.sha256(upload.body).digest()):
                raise ChecksumMismatch(
                    "Content-Digest sha-256 does not match the body; nothing was stored, retry"
                )
    return given


def _sha256_digest(header: str) -> bytes | None:
    """The sha-256 value of an RFC 9530 Content-Digest header, or None if it has none."""
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() != "sha-256":
            continue
        value = value.strip()
        if not (value.startswith(":") and value.endswith(":") and len(value) > 2):
            raise BadRequest("Content-Digest sha-256 must be a byte sequence, :base64:")
        try:
            return base64.b64decode(value[1:-1], validate=True)
        except ValueError:
            raise BadRequest("Content-Digest sha-256 is not valid base64") from None
    return None
