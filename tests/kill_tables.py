"""Run ``workbench tables build`` and kill it with SIGKILL at the Nth step of one kind.

Usage: ``python tests/kill_tables.py KIND N -- --home HOME tables build demo --processes 1``.
The kinds (each counted from 1 in the order the build meets them):

    before-write    before the Nth Parquet file (part, merged part or quarantine) is written
    after-write     after the Nth Parquet file is written, before anything else
    after-delete    after the Nth superseded part is deleted
    before-mark     before the Nth watermark is recorded in the catalog
    after-mark      after the Nth watermark is recorded

``WORKBENCH_COMPACT_PARTS`` (if set) lowers the number of parts after which a partition is
merged, so that merging is reached and killed too. The build carries no hook: this runner wraps
its functions from outside.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import workbench.cli
from workbench.sensors import chunks, tables

KINDS = ("before-write", "after-write", "after-delete", "before-mark", "after-mark")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def counting(original, n: int, *, before: bool):
    seen = 0

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal seen
        seen += 1
        if before and seen == n:
            die()
        result = original(*args, **kwargs)
        if not before and seen == n:
            die()
        return result

    return wrapper


def arm(kind: str, n: int) -> None:
    if kind in ("before-write", "after-write"):
        chunks.write_parquet_atomically = counting(
            chunks.write_parquet_atomically, n, before=kind == "before-write"
        )
    elif kind == "after-delete":
        original = Path.unlink
        seen = 0

        def unlink(self, *args, **kwargs):
            nonlocal seen
            result = original(self, *args, **kwargs)
            if self.name.startswith("part-"):
                seen += 1
                if seen == n:
                    die()
            return result

        Path.unlink = unlink
    elif kind in ("before-mark", "after-mark"):
        tables._set_watermark = counting(tables._set_watermark, n, before=kind == "before-mark")
    else:
        raise SystemExit(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    if os.environ.get("WORKBENCH_COMPACT_PARTS"):
        chunks.COMPACT_PARTS = int(os.environ["WORKBENCH_COMPACT_PARTS"])


if __name__ == "__main__":
    kind, n, separator, *arguments = sys.argv[1:]
    assert separator == "--", "usage: kill_tables.py KIND N -- WORKBENCH-ARGUMENTS"
    arm(kind, int(n))
    sys.argv = ["workbench", *arguments]
    workbench.cli.main()
