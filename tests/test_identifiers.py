"""Identifiers are checked against strict patterns before any path is built."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workbench.errors import BadRequest
from workbench.identifiers import PATTERNS, check_identifier, is_identifier


@given(kind=st.sampled_from(sorted(PATTERNS)), value=st.text(max_size=200))
def test_an_accepted_identifier_is_one_plain_path_component(kind, value):
    if is_identifier(kind, value):
        assert "/" not in value and "\\" not in value and "\x00" not in value
        assert value not in (".", "..") and not value.startswith(".")
        assert len(value) <= 128


@pytest.mark.parametrize(
    "value", ["../x", "..", ".", "a/b", "/etc", "a\\b", "a\x00b", "", " a", "x" * 200, 7, None]
)
@pytest.mark.parametrize("kind", sorted(PATTERNS))
def test_bad_identifiers_are_refused(kind, value):
    with pytest.raises(BadRequest) as info:
        check_identifier(kind, value)
    assert f"invalid {kind} identifier" in info.value.message


@pytest.mark.parametrize(
    "kind, value",
    [
        ("study", "demo"),
        ("subject", "demo_00001"),
        ("device", "a1b2:c3.d4-e5"),
        ("sensor", "lockUnlock"),
    ],
)
def test_jtrack_identifiers_are_accepted(kind, value):
    assert check_identifier(kind, value) == value
