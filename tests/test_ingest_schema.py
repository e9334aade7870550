"""The compiled batch validator on the hot path agrees with the batch JSON Schema."""

from __future__ import annotations

import json

import jsonschema
import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from workbench.errors import BadRequest
from workbench.ingest import MAX_TIMESTAMP, SourceDecoders, _decode_batch, span_of_batch
from workbench.templates import load_schema

SCHEMA = jsonschema.Draft202012Validator(load_schema("batch"))
FIELDS = ("studyId", "username", "deviceid", "sensorname", "timestamp")

values = st.one_of(
    st.text(max_size=8),
    st.integers(min_value=-5, max_value=MAX_TIMESTAMP + 5),
    st.sampled_from([0, MAX_TIMESTAMP, MAX_TIMESTAMP + 1, 2**63, -1]),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def records(draw):
    record = {}
    for field in FIELDS:
        if draw(st.integers(0, 9)) == 0:
            continue  # field missing
        good = draw(st.booleans())
        if good:
            record[field] = draw(
                st.integers(0, MAX_TIMESTAMP)
                if field == "timestamp"
                else st.text(min_size=1, max_size=8)
            )
        else:
            record[field] = draw(values)
    if draw(st.booleans()):
        record["x"] = draw(values)
    return record


GOOD = {"studyId": "s", "username": "u", "deviceid": "d", "sensorname": "acc"}


@settings(max_examples=400, deadline=None)
@example(batch=[{**GOOD, "timestamp": MAX_TIMESTAMP}])
@example(batch=[{**GOOD, "timestamp": MAX_TIMESTAMP + 1}])
@example(batch=[{**GOOD, "timestamp": 0}])
@example(batch=[{**GOOD, "timestamp": -1}])
@example(batch=[])
@given(batch=st.one_of(st.lists(records(), max_size=4), records(), st.integers()))
def test_hot_path_accepts_what_the_schema_accepts(batch):
    body = json.dumps(batch).encode()
    try:
        _decode_batch(body)
        fast = True
    except msgspec.MsgspecError:
        fast = False
    slow = SCHEMA.is_valid(batch)
    whole_floats = isinstance(batch, list) and any(
        isinstance(r, dict)
        and isinstance(r.get("timestamp"), float)
        and r["timestamp"].is_integer()
        for r in batch
    )
    if whole_floats:
        assert not fast  # stricter on purpose: a timestamp of 1.0 is refused
    else:
        assert fast == slow


SOURCE = ("s", "u", "d", "acc")
OTHERS = {"studyId": "t", "username": "u2", "deviceid": "\u00e9", "sensorname": "acc "}


@st.composite
def source_batches(draw):
    """Batches of one source, with now and then a record naming another, a bad timestamp or
    an extra field, written compact or not."""
    batch = []
    for _ in range(draw(st.integers(0, 4))):
        record = {**GOOD, "timestamp": draw(st.integers(0, MAX_TIMESTAMP))}
        kind = draw(st.integers(0, 9))
        if kind == 0:
            field = draw(st.sampled_from(sorted(OTHERS)))
            record[field] = OTHERS[field]
        elif kind == 1:
            record["timestamp"] = draw(values)
        elif kind == 2:
            record[draw(st.sampled_from(FIELDS))] = draw(values)
        elif kind == 3:
            del record[draw(st.sampled_from(FIELDS))]
        if draw(st.booleans()):
            record["x"] = draw(values)
        batch.append(record)
    compact = draw(st.booleans())
    return json.dumps(batch, separators=(",", ":") if compact else None).encode(), compact


@settings(max_examples=400, deadline=None)
@given(case=source_batches())
def test_known_source_decoder_agrees_with_the_general_path(case):
    body, compact = case
    decoders = SourceDecoders()
    decoders.learn(*SOURCE)
    fast = decoders.decode(body)
    try:
        general = _decode_batch(body)
        span = span_of_batch(general, *SOURCE)
    except (msgspec.MsgspecError, BadRequest):
        general = None
    if general is None:
        assert fast is None
    else:
        stamps = [r.timestamp for r in general]
        assert span == (min(stamps), max(stamps))
        if compact:
            assert fast is not None  # the fast path is taken whenever it can be
        if fast is not None:
            assert [r.timestamp for r in fast] == stamps
            assert {(r.studyId, r.username, r.deviceid, r.sensorname) for r in fast} == {SOURCE}


def test_source_decoders_keep_the_first_size_sources_and_no_more():
    decoders = SourceDecoders(size=2)
    for subject in ("a", "b", "c"):
        decoders.learn("s", subject, "d", "acc")
    body = json.dumps([{**GOOD, "username": "a", "timestamp": 1}], separators=(",", ":"))
    assert decoders.decode(body.encode()) is not None  # kept: no decoder is ever rebuilt
    assert decoders.decode(body.replace('"a"', '"b"').encode()) is not None
    assert decoders.decode(body.replace('"a"', '"c"').encode()) is None  # the general path
