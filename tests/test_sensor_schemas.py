"""Sensor schemas as data: valid, complete, documented, and strict when decoding."""

from __future__ import annotations

import json

import orjson
import pytest

from tests.conftest import REPO
from workbench.sensors.schemas import (
    SENSORS_DIR,
    check_batch,
    decode_batch,
    known_sensors,
    sensor_schema,
)
from workbench.studies import JTRACK_SENSORS
from workbench.templates import load_schema, schema_validator


def test_every_sensor_of_the_app_has_a_valid_schema_file_and_a_line_in_the_docs():
    validator = schema_validator(load_schema("sensor"))
    docs = (REPO / "docs" / "sensors.md").read_text()
    for name in {*JTRACK_SENSORS, "garmin"}:
        path = SENSORS_DIR / f"{name}.json"
        assert path.is_file(), name
        data = json.loads(path.read_text())
        assert list(validator.iter_errors(data)) == [], name
        assert data["sensor"] == name
        assert f"| `{name}` |" in docs, name
    assert set(known_sensors()) >= set(JTRACK_SENSORS)


def test_the_apps_field_names_types_units_and_intervals():
    location = sensor_schema("location")
    assert [f.name for f in location.fields][:5] == ["lat", "lon", "alt", "accuracy", "provider"]
    assert location.interval_s == 600 and location.slot_minutes == 10
    assert location.batch_records == 100
    assert "alt" not in location.columns()  # identifying: raw only
    accelerometer = sensor_schema("accelerometer")
    assert {f.name: f.unit for f in accelerometer.fields if f.name in "xyz"} == {
        "x": "m/s^2",
        "y": "m/s^2",
        "z": "m/s^2",
    }
    assert accelerometer.batch_records == 6000 and accelerometer.slot_minutes == 1
    usage = sensor_schema("application_usage")
    assert usage.slot_minutes == 60
    assert {f.name for f in usage.fields} >= {
        "appName",
        "beginTimeStamp",
        "endTimeStamp",
        "lastTimeUsed",
        "totalTimeinForeground",
    }
    assert sensor_schema("barometer").generic and sensor_schema("barometer").known
    unknown = sensor_schema("thermometer")
    assert unknown.generic and not unknown.known
    dictionary = location.dictionary()
    assert {"column": "lat", "type": "float64", "unit": "degree"}.items() <= dictionary[5].items()
    assert all(row["description"] for row in dictionary)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"timestamp": 1.5, "activityType": 3, "confidence": 80}, "int"),
        ({"timestamp": 1, "activityType": 3, "confidence": "80"}, "float"),
        ({"timestamp": 1, "activityType": "FLYING", "confidence": 80}, "unknown label"),
        ({"timestamp": 1, "activityType": 6, "confidence": 80}, "unknown code"),
        ({"timestamp": 1, "confidence": 80}, "activityType"),
        ({"timestamp": 1, "activityType": None, "confidence": 80}, "int"),
    ],
)
def test_decoding_is_strict_and_names_the_reason(record, reason):
    good = {"timestamp": 2, "activityType": "walking", "confidence": 90}
    decoded = decode_batch("activity", orjson.dumps([good, record]))
    assert decoded.columns["activityType"] == [7]  # a label is stored as its code
    assert decoded.count == 1 and len(decoded.refused) == 1
    index, why, content = decoded.refused[0]
    assert index == 1 and reason in why
    assert orjson.loads(content) == record
    assert check_batch("activity", orjson.dumps([good, record])).startswith(
        "sensor schema: record 1"
    )
    assert check_batch("activity", orjson.dumps([good])) is None


def test_numbers_sent_as_text_are_read_where_the_schema_says_so():
    record = {
        "timestamp": 1,
        "subjectId": "s",
        "questionId": 2,
        "answerId": 3,
        "surveyVersion": 1,
        "startTime": "1700000000000",
        "endTime": "1700000060000",
        "freeText": "my name is Ann",
    }
    decoded = decode_batch("ema", orjson.dumps([record]))
    assert decoded.columns["startTime"] == [1_700_000_000_000]
    assert "freeText" not in decoded.columns  # identifying
    bad = decode_batch("ema", orjson.dumps([{**record, "startTime": "soon"}]))
    assert bad.count == 0 and "startTime" in bad.refused[0][1]
    assert "Ann" not in bad.refused[0][2]  # the quarantine never holds identifying fields


def test_location_quarantine_leaves_the_true_latitude_out():
    decoded = decode_batch(
        "location", orjson.dumps([{"timestamp": 1, "lat": 200.0, "lon": -300.0, "alt": 50.93}])
    )
    assert "accuracy" in decoded.refused[0][1]
    assert "alt" not in orjson.loads(decoded.refused[0][2])
    kept = decode_batch(
        "location",
        orjson.dumps([{"timestamp": 1, "lat": 200.0, "lon": -300.0, "alt": 50.9, "accuracy": 5}]),
    )
    assert kept.columns["lat"] == [200.0]  # out of range after the rotation: kept


def test_a_body_that_is_not_json_cannot_be_decoded():
    for body in (b"[{", b'{"timestamp": 1}', b"[1, 2"):
        with pytest.raises(ValueError):
            decode_batch("location", body)
        with pytest.raises(ValueError):
            decode_batch("thermometer", body)
