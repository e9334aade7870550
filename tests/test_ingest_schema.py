"""The compiled batch validator on the hot path agrees with the batch JSON Schema."""

from __future__ import annotations

import json

import jsonschema
import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from workbench.ingest import MAX_TIMESTAMP, _decode_batch
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
