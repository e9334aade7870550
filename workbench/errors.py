"""Errors raised by the workbench.

Every failure a user can cause or meet has a named type here; anything else is a bug and
keeps its traceback. The CLI turns these into a one-line message and an exit code, the
upload server into an HTTP status and a JSON body (``status`` and ``code`` attributes).

    WorkbenchError                 base of everything below (exit 1, HTTP 500)
    ├── ConfigError                workbench.toml missing, unreadable or invalid (exit 2)
    ├── CatalogError               the catalog cannot be opened or upgraded (exit 3)
    ├── InvalidDefinition          a study definition fails its JSON Schema (exit 2)
    ├── UnknownStudy               no such study (HTTP 409, exit 4)
    ├── StudyExists                a study of that id already exists (exit 4)
    ├── StudyArchived              the study no longer takes data (HTTP 409, exit 4)
    ├── UploadRejected             base of the upload server's refusals (HTTP 400)
    │   ├── BadRequest             malformed body, header or identifier (HTTP 400)
    │   ├── ChecksumMismatch       md5 / Content-Digest does not match the body (HTTP 400)
    │   ├── Unauthorized           missing or wrong Bearer token (HTTP 401)
    │   ├── SubjectNotActive       subject or device has left or was removed (HTTP 403)
    │   ├── UnknownSubject         subject not enrolled or device not attached (HTTP 403)
    │   ├── UnknownSensor          sensor not in the study's list (HTTP 422)
    │   ├── Conflict               e.g. too many devices for one subject (HTTP 409)
    │   ├── BodyTooLarge           body over the configured limit (HTTP 413)
    │   └── InsufficientStorage    the pool's disk is (nearly) full; retry later (HTTP 507)
    ├── VerifyFailed               ledger and files disagree (exit 5)
    ├── UnknownAlert               no alert of that id (exit 4)
    ├── NoteRequired               a safety alert is acknowledged only with a note (exit 2)
    ├── AlreadyAcknowledged        a safety alert's acknowledgement is never replaced (exit 4)
    ├── MailError                  the SMTP server refused or could not be reached (exit 6)
    ├── SourceUnavailable          a study server cannot be reached or keeps failing (exit 7)
    ├── ExportFailed               an export stored what it could but some tables failed (exit 8)
    ├── UnknownInstrument          no instrument definition of that name (exit 4)
    ├── UnknownFeatureFamily       no feature family of that name (exit 4)
    ├── PipelineBusy               a run of that pipeline is in progress (exit 9)
    ├── InvalidJobRequest          a malformed job-tracking request (HTTP 400, exit 2)
    │   ├── InvalidJobConfig       job configurations that fail their schema (HTTP 400, exit 2)
    │   └── MetadataTooDeep        event metadata nested deeper than [jobs] allows (HTTP 400, exit 2)
    ├── UnknownJobConfig           no job configuration of that tag (HTTP 400, exit 4)
    ├── UnknownJob                 no tracked job of that id (HTTP 404, exit 4)
    ├── JobConflict                a job id already used with another tag (HTTP 409, exit 4)
    ├── JobConfigConflict          a changed configuration under a tag and version already registered (HTTP 409, exit 4)
    ├── InvalidApiKey              missing or wrong tracking API key (HTTP 401, exit 2)
    ├── NotAllowed                 the API key's customer may not do this (HTTP 403, exit 2)
    ├── UnknownProvider            no sync provider of that name (exit 4)
    ├── UnknownAccount             no linked sync account of that id (HTTP 404, exit 4)
    ├── AuthorizationFailed        an OAuth2 callback with an unknown state or a refused code (HTTP 400, exit 10)
    ├── TokenRevoked               the provider refused an account's token: expired or revoked (exit 10)
    ├── DestinationFailed          an upload to a destination failed; its old file is untouched (exit 12)
    ├── TableRefused               a table's answer cannot be stored: row ids outside signed 64-bit, or too large (exit 8)
    ├── InvalidName                a name that would become a file or folder fails its pattern (exit 2)
    ├── InvalidTimezone            a study's or subject's time zone is not a known IANA name (exit 2)
    ├── NoSensorTable              the study neither records this sensor nor has a table of it (exit 3)
    ├── TablesError                a sensor table cannot be built, e.g. a consumer failed (exit 1)
    ├── OutputRefused              an output folder that is a file, holds files of others or lies in the pool (exit 2)
    ├── FeaturesError              features cannot be computed, e.g. a consumer failed (exit 1)
    ├── JobLimitExceeded           a job-tracking limit of [jobs] is reached (HTTP 413, exit 2)
    │   ├── TooManyEvents          the job holds [jobs] max_events events already
    │   └── MetadataTooLarge       event metadata over [jobs] max_metadata_bytes
    ├── UnprotectedDashboards      dashboards without sign-in on a non-loopback address (exit 2)
    ├── PortInUse                  a server's port is taken already, or cannot be listened on (exit 2)
    ├── InstrumentMismatch         a table lacks item columns of the instrument it is scored with (exit 2)
    └── JobConfigConflict          a job configuration's tag and version registered with other steps (HTTP 409, exit 4)
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base of every error the workbench raises on purpose."""

    status = 500
    exit_code = 1
    code = "error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict:
        """The JSON body the upload server answers with."""
        return {"ok": False, "error": self.code, "message": self.message, **self.details}


class ConfigError(WorkbenchError):
    exit_code = 2
    code = "config"


class CatalogError(WorkbenchError):
    exit_code = 3
    code = "catalog"


class InvalidDefinition(WorkbenchError):
    status = 400
    exit_code = 2
    code = "invalid_definition"


class UnknownStudy(WorkbenchError):
    status = 409
    exit_code = 4
    code = "unknown_study"


class StudyExists(WorkbenchError):
    status = 409
    exit_code = 4
    code = "study_exists"


class StudyArchived(WorkbenchError):
    status = 409
    exit_code = 4
    code = "study_archived"


class UploadRejected(WorkbenchError):
    status = 400
    code = "rejected"


class BadRequest(UploadRejected):
    status = 400
    code = "bad_request"


class ChecksumMismatch(UploadRejected):
    status = 400
    code = "checksum_mismatch"


class Unauthorized(UploadRejected):
    status = 401
    code = "unauthorized"


class SubjectNotActive(UploadRejected):
    status = 403
    code = "subject_not_active"


class UnknownSubject(UploadRejected):
    status = 403
    code = "unknown_subject"


class UnknownSensor(UploadRejected):
    status = 422
    code = "unknown_sensor"


class Conflict(UploadRejected):
    status = 409
    code = "conflict"


class BodyTooLarge(UploadRejected):
    status = 413
    code = "body_too_large"


class InsufficientStorage(UploadRejected):
    status = 507
    code = "insufficient_storage"


class VerifyFailed(WorkbenchError):
    exit_code = 5
    code = "verify_failed"


class UnknownAlert(WorkbenchError):
    exit_code = 4
    code = "unknown_alert"


class NoteRequired(WorkbenchError):
    exit_code = 2
    code = "note_required"


class AlreadyAcknowledged(WorkbenchError):
    exit_code = 4
    code = "already_acknowledged"


class MailError(WorkbenchError):
    exit_code = 6
    code = "mail"


class SourceUnavailable(WorkbenchError):
    exit_code = 7
    code = "source_unavailable"


class ExportFailed(WorkbenchError):
    exit_code = 8
    code = "export_failed"


class UnknownInstrument(WorkbenchError):
    exit_code = 4
    code = "unknown_instrument"


class UnknownFeatureFamily(WorkbenchError):
    exit_code = 4
    code = "unknown_feature_family"


class PipelineBusy(WorkbenchError):
    exit_code = 9
    code = "pipeline_busy"


class InvalidJobRequest(WorkbenchError):
    status = 400
    exit_code = 2
    code = "invalid_request"


class InvalidJobConfig(InvalidJobRequest):
    code = "invalid_job_config"


class UnknownJobConfig(WorkbenchError):
    status = 400
    exit_code = 4
    code = "unknown_job_config"


class UnknownJob(WorkbenchError):
    status = 404
    exit_code = 4
    code = "unknown_job"


class JobConflict(WorkbenchError):
    status = 409
    exit_code = 4
    code = "job_conflict"


class InvalidApiKey(WorkbenchError):
    status = 401
    exit_code = 2
    code = "unauthorized"


class NotAllowed(WorkbenchError):
    status = 403
    exit_code = 2
    code = "forbidden"


class UnknownProvider(WorkbenchError):
    exit_code = 4
    code = "unknown_provider"


class UnknownAccount(WorkbenchError):
    status = 404
    exit_code = 4
    code = "unknown_account"


class AuthorizationFailed(WorkbenchError):
    status = 400
    exit_code = 10
    code = "authorization_failed"


class TokenRevoked(WorkbenchError):
    exit_code = 10
    code = "token_revoked"


class DestinationFailed(WorkbenchError):
    exit_code = 12
    code = "destination_failed"


class TableRefused(WorkbenchError):
    exit_code = 8
    code = "table_refused"


class NoSensorTable(WorkbenchError):
    """The study neither records this sensor nor has a table of it."""

    status = 404
    exit_code = 3
    code = "no_sensor_table"


class TablesError(WorkbenchError):
    """A sensor table cannot be built (the message says why)."""

    status = 409
    exit_code = 1
    code = "tables_error"


class OutputRefused(WorkbenchError):
    """An output folder the workbench will not write to: a file, a folder holding files that
    are not a previous export (without ``--overwrite``), a folder inside the pool or holding
    it, or a sub-folder that is a symbolic link out of it."""

    status = 400
    exit_code = 2
    code = "output_refused"


class FeaturesError(WorkbenchError):
    """Behavioural features cannot be computed (the message says why)."""

    status = 409
    exit_code = 1
    code = "features_error"


class InvalidTimezone(WorkbenchError):
    """A study's or a subject's time zone is not an IANA name this machine knows."""

    status = 400
    exit_code = 2
    code = "invalid_timezone"


class InvalidName(WorkbenchError):
    status = 400
    exit_code = 2
    code = "invalid_name"


class MetadataTooDeep(InvalidJobRequest):
    code = "metadata_too_deep"


class JobLimitExceeded(WorkbenchError):
    status = 413
    exit_code = 2
    code = "job_limit_exceeded"


class TooManyEvents(JobLimitExceeded):
    code = "too_many_events"


class MetadataTooLarge(JobLimitExceeded):
    code = "metadata_too_large"


class UnprotectedDashboards(WorkbenchError):
    exit_code = 2
    code = "unprotected_dashboards"


class PortInUse(WorkbenchError):
    exit_code = 2
    code = "port_in_use"


class InstrumentMismatch(WorkbenchError):
    exit_code = 2
    code = "instrument_mismatch"


class JobConfigConflict(WorkbenchError):
    status = 409
    exit_code = 4
    code = "job_config_conflict"
