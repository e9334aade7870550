"""Strict patterns for every identifier that may become part of a path.

Checked before any path is built: an identifier that does not match never reaches the disk.
"""

from __future__ import annotations

import re

from workbench.errors import BadRequest

PATTERNS: dict[str, re.Pattern[str]] = {
    "study": re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"),
    "subject": re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}"),
    "device": re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}"),
    "sensor": re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}"),
}


def is_identifier(kind: str, value: object) -> bool:
    """True if ``value`` is a string matching the pattern for ``kind``."""
    return isinstance(value, str) and PATTERNS[kind].fullmatch(value) is not None


def check_identifier(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid ``kind`` identifier, else raise :class:`BadRequest`.

    Example: ``check_identifier("study", "demo")``.
    """
    if not is_identifier(kind, value):
        shown = value if isinstance(value, str) else type(value).__name__
        raise BadRequest(
            f"invalid {kind} identifier {str(shown)[:80]!r}: use letters, digits, '_' and '-' "
            f"(pattern {PATTERNS[kind].pattern})",
            field=kind,
        )
    return value
