"""Sensor schemas as data: ``data_templates/sensors/<sensor>.json`` give each sensor's fields
with types, units and descriptions. They validate records, type the tables and make the data
dictionary. A sensor without a file of its own takes the generic shape.

Decoding is one compiled msgspec pass per batch (strict types: ``1.5`` is not an integer);
only a batch that fails is decoded again record by record, to keep the good records and
quarantine the others with the reason.
"""

from __future__ import annotations

import functools
import json
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import orjson

from workbench.templates import TEMPLATES_DIR

if TYPE_CHECKING:
    import polars as pl

SENSORS_DIR = TEMPLATES_DIR / "sensors"
GENERIC = "generic"
COMMON_FIELDS = ("studyId", "username", "deviceid", "sensorname", "timestamp")
# Columns every table starts with, before the sensor's own fields, and the provenance after.
KEY_COLUMNS = ("subject", "device", "time", "local_time", "day")
BATCH_COLUMN = "batch"
GENERIC_COLUMN = "data"
_PYTHON_TYPES = {"float64": float, "int64": int, "string": str, "bool": bool}


@dataclass(frozen=True)
class FieldSpec:
    """One field of a sensor's records."""

    name: str
    type: str  # float64 | int64 | string | bool
    unit: str | None
    description: str
    required: bool = True
    nullable: bool = False
    identifying: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    encoding: str | None = None


@dataclass(frozen=True)
class SensorSchema:
    """A sensor's schema: its fields, nominal interval and what the app sends per batch."""

    sensor: str
    shape: str  # typed | generic
    description: str
    interval_s: float | None
    batch_records: int | None
    fields: tuple[FieldSpec, ...]
    known: bool = True  # False: the sensor has no schema file and takes the generic shape

    @property
    def generic(self) -> bool:
        return self.shape == GENERIC

    @property
    def table_fields(self) -> tuple[FieldSpec, ...]:
        """The fields that go into derived tables (identifying fields stay in raw)."""
        return tuple(f for f in self.fields if not f.identifying)

    @property
    def slot_minutes(self) -> int:
        """Minutes of one sampling slot for data yield: a minute, or the nominal interval when
        that is longer."""
        if self.interval_s is None or self.interval_s <= 60:
            return 1
        return max(1, round(self.interval_s / 60))

    def columns(self) -> dict[str, pl.DataType]:
        """The table's columns and their polars types, in order."""
        import polars as pl

        types = {"float64": pl.Float64, "int64": pl.Int64, "string": pl.String, "bool": pl.Boolean}
        columns: dict[str, pl.DataType] = {
            "subject": pl.String,
            "device": pl.String,
            "time": pl.Datetime("ms", "UTC"),
            "local_time": pl.Datetime("ms"),
            "day": pl.Date,
        }
        if self.generic:
            columns[GENERIC_COLUMN] = pl.String
        for spec in self.table_fields:
            columns[spec.name] = types[spec.type]
        columns[BATCH_COLUMN] = pl.Int64
        return columns

    def dictionary(self) -> list[dict]:
        """Rows of the data dictionary for this sensor's table: column, type, unit, description."""
        rows = [
            {"column": "subject", "type": "string", "unit": "", "description": "Subject id."},
            {"column": "device", "type": "string", "unit": "", "description": "Device id."},
            {
                "column": "time",
                "type": "datetime (UTC, ms)",
                "unit": "",
                "description": "When the phone created the record (the record's timestamp), in UTC.",
            },
            {
                "column": "local_time",
                "type": "datetime (local, ms)",
                "unit": "",
                "description": "The same instant in the study's (or the subject's) time zone.",
            },
            {
                "column": "day",
                "type": "date",
                "unit": "",
                "description": "Local day of the record.",
            },
        ]
        if self.generic:
            rows.append(
                {
                    "column": GENERIC_COLUMN,
                    "type": "string (JSON)",
                    "unit": "",
                    "description": "The record's fields after the common ones, as a JSON object.",
                }
            )
        for spec in self.table_fields:
            rows.append(
                {
                    "column": spec.name,
                    "type": spec.type,
                    "unit": spec.unit or "",
                    "description": spec.description,
                }
            )
        rows.append(
            {
                "column": BATCH_COLUMN,
                "type": "int64",
                "unit": "",
                "description": "Ledger id of the stored batch the row came from (workbench ledger).",
            }
        )
        return [{"sensor": self.sensor, **row} for row in rows]


def known_sensors() -> list[str]:
    """The sensors with a schema file of their own."""
    return sorted(p.stem for p in SENSORS_DIR.glob("*.json") if p.stem != GENERIC)


@functools.cache
def sensor_schema(sensor: str) -> SensorSchema:
    """The schema of ``sensor``; a sensor without a file of its own gets the generic shape.
    (The files are checked against ``schemas/sensor.schema.json`` by the tests, not here:
    importing jsonschema would cost every build process a second or more.)

    Example: ``sensor_schema("location").slot_minutes == 10``.
    """
    path = SENSORS_DIR / f"{sensor}.json"
    known = path.is_file()
    data = json.loads((path if known else SENSORS_DIR / f"{GENERIC}.json").read_text("utf-8"))
    fields = tuple(
        FieldSpec(
            name=f["name"],
            type=f["type"],
            unit=f["unit"],
            description=f["description"],
            required=f.get("required", True),
            nullable=f.get("nullable", False),
            identifying=f.get("identifying", False),
            labels=dict(f.get("labels", {})),
            encoding=f.get("encoding"),
        )
        for f in data["fields"]
    )
    return SensorSchema(
        sensor=sensor,
        shape=data["shape"],
        description=data["description"],
        interval_s=data["interval_s"],
        batch_records=data["batch_records"],
        fields=fields,
        known=known,
    )


class RecordError(ValueError):
    """A record that does not fit its sensor's schema (the message says why)."""


@dataclass
class Decoded:
    """A batch decoded against its schema: columns of the good records (``timestamp`` and the
    table fields), and the refused records as (index, reason, record JSON)."""

    columns: dict[str, list[Any]]
    refused: list[tuple[int, str, str]]

    @property
    def count(self) -> int:
        return len(self.columns["timestamp"])


class _Decoder:
    """The compiled decoders of one schema."""

    def __init__(self, schema: SensorSchema) -> None:
        self.schema = schema
        specs = [("timestamp", int, msgspec.NODEFAULT)]
        for spec in schema.table_fields if not schema.generic else ():
            kind: Any = _PYTHON_TYPES[spec.type]
            if spec.labels:
                kind = int | str
            if spec.encoding == "string":
                kind = str | int
            if spec.nullable or not spec.required:
                kind = kind | None
            default = msgspec.NODEFAULT if spec.required else None
            specs.append((spec.name, kind, default))
        # Required fields first, as Python demands of defaults.
        specs.sort(key=lambda s: s[2] is not msgspec.NODEFAULT)
        self.names = [s[0] for s in specs]
        self.struct = msgspec.defstruct(
            f"Record_{schema.sensor}",
            [(n, k) if d is msgspec.NODEFAULT else (n, k, d) for n, k, d in specs],
            gc=False,
        )
        self.batch = msgspec.json.Decoder(list[self.struct])
        self.converted = [s for s in schema.table_fields if s.labels or s.encoding]
        self.labels = {
            s.name: {label: int(code) for code, label in s.labels.items()}
            for s in self.converted
            if s.labels
        }
        self.codes = {s.name: {int(code) for code in s.labels} for s in self.converted if s.labels}
        self.identifying = {s.name for s in schema.fields if s.identifying}

    def _quarantined(self, record: Any) -> str:
        """A refused record as JSON for the quarantine table, without identifying fields."""
        if isinstance(record, dict) and self.identifying:
            record = {k: v for k, v in record.items() if k not in self.identifying}
        return orjson.dumps(record).decode()

    def decode(self, body: bytes) -> Decoded:
        if self.schema.generic:
            return self._generic(body)
        try:
            records = self.batch.decode(body)
        except msgspec.ValidationError:
            return self._one_by_one(body)
        columns = {name: list(map(operator.attrgetter(name), records)) for name in self.names}
        if self.converted:
            try:
                for spec in self.converted:
                    columns[spec.name] = [self._convert(spec, v) for v in columns[spec.name]]
            except RecordError:
                return self._one_by_one(body)
        return Decoded(columns, [])

    def _convert(self, spec: FieldSpec, value: Any) -> Any:
        if value is None:
            return None
        if spec.encoding == "string":
            if isinstance(value, str):
                if not value.strip().lstrip("-").isdigit():
                    raise RecordError(f"{spec.name}: {value[:40]!r} is not an integer")
                return int(value)
            return value
        if isinstance(value, str):
            code = self.labels[spec.name].get(value.upper())
            if code is None:
                raise RecordError(f"{spec.name}: unknown label {value[:40]!r}")
            return code
        if value not in self.codes[spec.name]:
            raise RecordError(f"{spec.name}: unknown code {value}")
        return value

    def _one_by_one(self, body: bytes) -> Decoded:
        raw = _array(body)
        columns: dict[str, list[Any]] = {name: [] for name in self.names}
        refused = []
        for index, record in enumerate(raw):
            try:
                try:
                    item = msgspec.convert(record, self.struct, strict=True)
                except msgspec.ValidationError as exc:
                    raise RecordError(str(exc)) from None
                values = {name: getattr(item, name) for name in self.names}
                for spec in self.converted:
                    values[spec.name] = self._convert(spec, values[spec.name])
            except RecordError as exc:
                refused.append((index, str(exc), self._quarantined(record)))
                continue
            for name in self.names:
                columns[name].append(values[name])
        return Decoded(columns, refused)

    def _generic(self, body: bytes) -> Decoded:
        raw = _array(body)
        columns: dict[str, list[Any]] = {"timestamp": [], GENERIC_COLUMN: []}
        refused = []
        for index, record in enumerate(raw):
            ts = record.get("timestamp") if isinstance(record, dict) else None
            if type(ts) is not int:
                reason = "timestamp: expected an integer"
                refused.append((index, reason, self._quarantined(record)))
                continue
            rest = {k: v for k, v in record.items() if k not in COMMON_FIELDS}
            columns["timestamp"].append(ts)
            columns[GENERIC_COLUMN].append(orjson.dumps(rest, option=orjson.OPT_SORT_KEYS).decode())
        return Decoded(columns, refused)


def _array(body: bytes) -> list:
    """The records of a body: a JSON array, else ValueError (the batch cannot be parsed)."""
    raw = orjson.loads(body)
    if not isinstance(raw, list):
        raise ValueError(f"a batch is a JSON array of records, not a {type(raw).__name__}")
    return raw


@functools.cache
def _decoder(sensor: str) -> _Decoder:
    return _Decoder(sensor_schema(sensor))


def decode_batch(sensor: str, body: bytes) -> Decoded:
    """Decode a stored batch of ``sensor`` against its schema.

    Example: ``decode_batch("location", body).refused == []`` for a valid batch.
    """
    return _decoder(sensor).decode(body)


def check_batch(sensor: str, body: bytes) -> str | None:
    """Why a stored batch does not fit its sensor's schema, or None when it does (for sanity)."""
    decoded = decode_batch(sensor, body)
    if not decoded.refused:
        return None
    index, reason, _record = decoded.refused[0]
    more = len(decoded.refused) - 1
    extra = f" (and {more} more record{'s' if more != 1 else ''})" if more else ""
    return f"sensor schema: record {index}: {reason}{extra}"
