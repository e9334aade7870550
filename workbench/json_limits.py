"""Limits on the JSON the workbench accepts from the network, checked in one compiled pass.

A body is accepted only if every reader downstream can read it back: the standard ``json``
module, orjson, polars and pandas. So besides being valid JSON it must be

* valid UTF-8, with no lone surrogate escapes (``"\\ud800"``);
* nested at most :data:`MAX_DEPTH` levels (the top-level array or object counts as one);
* free of numbers outside signed 64-bit integers (``2**63``) and of numbers that overflow a
  double (``1e400``).

The check is a msgspec decoder whose type is a union of JSON values nested exactly
:data:`MAX_DEPTH` deep, so it runs in C and never recurses past the limit (Python's own
recursion limit, met at about 1,000 levels, used to surface as a 500).
"""

from __future__ import annotations

import functools
from typing import Annotated, Union

import msgspec

from workbench.errors import BadRequest

# Sensor records are flat (array → record → value: 2 levels); job metadata and EMA answers
# nest a little. Each level doubles the work of building the decoder (about 0.1 s at 10).
MAX_DEPTH = 10

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]


@functools.cache
def _decoder() -> msgspec.json.Decoder:
    value = Union[str, Int64, float, bool, None]  # noqa: UP007 (a runtime type expression)
    for _ in range(MAX_DEPTH):
        value = Union[str, Int64, float, bool, None, list[value], dict[str, value]]  # noqa: UP007
    return msgspec.json.Decoder(value)


def check_json(body: bytes) -> None:
    """Raise :class:`BadRequest` unless ``body`` is JSON within the limits above.

    Example: ``check_json(b'[{"x": 1}]')``.
    """
    try:
        _decoder().decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"the body is outside the server's JSON limits: {_explain(exc)}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # cannot happen with the typed decoder; kept as a guard
        raise BadRequest(f"the body nests deeper than {MAX_DEPTH} levels") from None


def _explain(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    where = text.rpartition(" - at ")[2] if " - at " in text else "$"
    if "Number out of range" in text:
        return f"a number overflows a double at {where}"
    if "Expected `int`" in text:
        return f"an integer is outside signed 64-bit at {where}"
    if "got `array`" in text or "got `object`" in text:
        return f"values nest deeper than {MAX_DEPTH} levels at {where[:120]}"
    return text[:300]


def decode_checked(body: bytes, *, error: type[Exception] = BadRequest) -> object:
    """Decode ``body`` (any depth up to Python's own limit) and check what
    :func:`check_json` checks but depth, which the caller limits itself: valid UTF-8, no number
    outside signed 64-bit or a double. Raises ``error`` with the reason.

    Example: ``decode_checked(b'{"a": 1}')``.
    """
    try:
        value = msgspec.json.decode(body)
    except msgspec.ValidationError as exc:
        raise error(f"the body is outside the server's JSON limits: {_explain(exc)}") from None
    except msgspec.DecodeError as exc:
        raise error(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise error("the body nests arrays and objects too deeply") from None
    pending = [value]
    while pending:  # without recursion, so any depth is walked
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif type(item) is int and not INT64_MIN <= item <= INT64_MAX:
            raise error(
                "the body is outside the server's JSON limits: an integer is outside signed 64-bit"
            )
    return value
