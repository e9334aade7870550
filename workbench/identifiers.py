"""Strict patterns for every identifier that may become part of a path.

Checked before any path is built: an identifier that does not match never reaches the disk.
"""

from __future__ import annotations

import re
from pathlib import Path

from workbench.errors import BadRequest, InvalidName

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


def check_name(kind: str, value: object) -> str:
    """Like :func:`check_identifier` for what an operator typed: :class:`InvalidName` (exit 2).

    Example: ``check_name("study", "demo")``.
    """
    try:
        return check_identifier(kind, value)
    except BadRequest as exc:
        raise InvalidName(
            exc.message.replace(f"invalid {kind} identifier", f"invalid {kind} name", 1)
        ) from None


def resolve_inside(folder: Path, relative: str, *, what: str) -> Path:
    """``folder / relative`` resolved, or :class:`InvalidName` if it leaves ``folder``.

    Example: ``resolve_inside(home, "resources/demo", what="resources folder")``.
    """
    base = Path(folder).resolve()
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        raise InvalidName(f"the {what} must be a path relative to {base.name}/, not {relative!r}")
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise InvalidName(f"the {what} {relative!r} leaves {base.name}/")
    return target
