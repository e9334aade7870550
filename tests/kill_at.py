"""Run ``workbench`` and kill it with SIGKILL (as a power cut would) at one step of the export.

Usage: ``python tests/kill_at.py STEP -- --home HOME export``. The steps:

    after-fetch     rows fetched, before their raw snapshot is written
    before-record   the raw snapshot durable on disk, before the catalog records it
    after-raw       the snapshot written and recorded, before it is decoded
    during-decode   the first day's decoded Parquet and CSV written, the rest not
    during-delete   the first row deleted on the study server, before the deletion is recorded

The exporter itself carries no hook: this runner wraps the library's functions from outside.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import sqlalchemy

import workbench.cli
import workbench.export

STEPS = ("after-fetch", "before-record", "after-raw", "during-decode", "during-delete")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def replace_everywhere(name: str, wrap) -> int:
    """Replace the function ``name`` in every loaded workbench module that imported it."""
    replaced = 0
    originals = {}
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("workbench"):
            continue
        original = getattr(module, name, None)
        if callable(original):
            wrapper = originals.setdefault(id(original), wrap(original))
            setattr(module, name, wrapper)
            replaced += 1
    return replaced


def kill_before(original):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        die()

    return wrapper


def kill_after(original):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        die()
        return result

    return wrapper


def kill_after_decoded_csv(original):
    @functools.wraps(original)
    def wrapper(path, *args, **kwargs):
        result = original(path, *args, **kwargs)
        if Path(path).suffix == ".csv" and "decoded" in Path(path).parts:
            die()
        return result

    return wrapper


def kill_after_a_deletion(original):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        deleted = original(*args, **kwargs)
        if deleted:
            die()
        return deleted

    return wrapper


def arm(step: str) -> None:
    """Set the kill at ``step``; raise SystemExit if the step cannot be reached."""
    if step == "after-fetch":
        found = replace_everywhere("write_raw", kill_before)
    elif step == "after-raw":
        found = replace_everywhere("write_raw", kill_after)
    elif step == "before-record":

        def before(conn, cursor, statement, parameters, context, executemany):
            if statement.lstrip().upper().startswith("INSERT INTO EXPORT_RAW"):
                die()

        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", before)
        found = 1
    elif step == "during-decode":
        found = replace_everywhere("write_file_atomically", kill_after_decoded_csv)
        found += replace_everywhere("write_csv_atomically", kill_after_decoded_csv)
    elif step == "during-delete":
        client = workbench.export.ExportClient
        client.delete = kill_after_a_deletion(client.delete)
        found = 1
    else:
        raise SystemExit(f"unknown step {step!r}; one of {', '.join(STEPS)}")
    if not found:
        raise SystemExit(f"step {step!r}: nothing to wrap in the exporter")


if __name__ == "__main__":
    step, separator, *arguments = sys.argv[1:]
    assert separator == "--", "usage: kill_at.py STEP -- WORKBENCH-ARGUMENTS"
    arm(step)
    sys.argv = ["workbench", *arguments]
    workbench.cli.main()
