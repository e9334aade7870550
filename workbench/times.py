"""Time in the workbench: milliseconds since the epoch, UTC, and how they are written.

Every time the catalog stores is an integer of milliseconds since the epoch (``now_ms``); the
constants turn durations into milliseconds, the formatters turn a time into text.
"""

from __future__ import annotations

import datetime
import time
import zoneinfo

from workbench.errors import InvalidTimezone

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

ISO = "%Y-%m-%dT%H:%M:%SZ"  # 2024-05-01T13:45:00Z: JSON and CSV columns
READABLE = "%Y-%m-%d %H:%M:%SZ"  # 2024-05-01 13:45:00Z: CLI tables
MINUTES = "%Y-%m-%d %H:%M UTC"  # 2024-05-01 13:45 UTC: dashboards
STAMP = "%Y%m%dT%H%M%S"  # 20240501T134500: file names


def now_ms() -> int:
    """Current time in milliseconds since the epoch.

    Example: ``now_ms() - started < 5 * MINUTE_MS``.
    """
    return time.time_ns() // 1_000_000


def utc_datetime(ms: int) -> datetime.datetime:
    """An aware UTC datetime for a time in milliseconds.

    Example: ``utc_datetime(0).year == 1970``.
    """
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)


def format_ms(ms: int, pattern: str = ISO) -> str:
    """A time in milliseconds as UTC text in a ``strftime`` pattern (ISO 8601 by default).

    Example: ``format_ms(0) == "1970-01-01T00:00:00Z"``; ``format_ms(0, STAMP)``.
    """
    return utc_datetime(ms).strftime(pattern)


def iso_or_none(ms: int | None) -> str | None:
    """A time in milliseconds as ISO 8601 UTC text, or None for no time.

    Example: ``iso_or_none(None) is None``.
    """
    return None if ms is None else format_ms(ms)


def check_timezone(name: str) -> str:
    """``name`` if it is an IANA time zone this machine knows, else :class:`InvalidTimezone`.

    Example: ``check_timezone("Europe/Berlin")``.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise InvalidTimezone(f"{name!r} is not an IANA time zone name such as 'Europe/Berlin'")
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise InvalidTimezone(
            f"unknown time zone {name!r}: give an IANA name such as 'Europe/Berlin' or 'UTC'"
        ) from None
    return name
