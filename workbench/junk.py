"""Junk: bodies the upload server refused but kept, so that nothing sent is lost unseen.

Each kept body has its rejection row in the catalog (reason, claimed study and subject, client
address, size, SHA-256). :func:`list_junk` shows them; :func:`prune_junk` deletes the files and
marks their rows pruned, so ``workbench verify`` stays consistent. Pruning first commits the
marks, then deletes the files: a prune interrupted in between leaves files whose rows say pruned,
and the next prune removes them.

Example::

    list_junk(config, older_than_days=30)
    prune_junk(config, older_than_days=30)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from sqlalchemy import select

from workbench.catalog import Catalog, borrowed_catalog, rejections
from workbench.config import Config
from workbench.errors import InvalidName
from workbench.identifiers import check_name, resolve_inside
from workbench.pool import DataPool
from workbench.times import DAY_MS, now_ms


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_junk` removed (or would remove, with ``dry_run``)."""

    files: int
    bytes: int
    dry_run: bool

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return f"{verb} {self.files} junk files ({self.bytes:,} bytes)"


def list_junk(
    config: Config,
    *,
    older_than_days: float | None = None,
    reason: str | None = None,
    study: str | None = None,
    include_pruned: bool = False,
    catalog: Catalog | None = None,
) -> pl.DataFrame:
    """Kept junk as a table (id, received_at, reason, status, study, subject, remote_addr,
    bytes, sha256, path, pruned_at), oldest first.

    Example: ``list_junk(config, reason="unknown_study")``.
    """
    query = _selection(older_than_days, reason, study)
    if not include_pruned:
        query = query.where(rejections.c.pruned_at.is_(None))
    with borrowed_catalog(config, catalog) as cat, cat.engine.connect() as conn:
        rows = conn.execute(query.order_by(rejections.c.id)).all()
    schema = {
        "id": pl.Int64,
        "received_at": pl.Int64,
        "reason": pl.Utf8,
        "status": pl.Int64,
        "study": pl.Utf8,
        "subject": pl.Utf8,
        "remote_addr": pl.Utf8,
        "bytes": pl.Int64,
        "sha256": pl.Utf8,
        "path": pl.Utf8,
        "pruned_at": pl.Int64,
    }
    frame = pl.DataFrame([tuple(r) for r in rows], schema=schema, orient="row")
    return frame.with_columns(
        pl.from_epoch("received_at", time_unit="ms").dt.replace_time_zone("UTC"),
        pl.from_epoch("pruned_at", time_unit="ms").dt.replace_time_zone("UTC"),
    )


def prune_junk(
    config: Config,
    *,
    older_than_days: float | None = None,
    reason: str | None = None,
    study: str | None = None,
    dry_run: bool = False,
    catalog: Catalog | None = None,
) -> PruneResult:
    """Delete kept junk received more than ``older_than_days`` ago (all, when None) and mark
    its rows pruned; with ``dry_run`` only count.

    Example: ``prune_junk(config, older_than_days=30).summary()``.
    """
    pool = DataPool.of(config)
    chosen = _selection(older_than_days, reason, study)
    with borrowed_catalog(config, catalog) as cat:
        with cat.engine.connect() as conn:
            fresh = conn.execute(chosen.where(rejections.c.pruned_at.is_(None))).all()
        if dry_run:
            return PruneResult(len(fresh), sum(r.bytes or 0 for r in fresh), True)
        paths = [_junk_file(pool, r.path) for r in fresh]  # every path checked before any change
        if fresh:
            with cat.writing() as conn:
                conn.execute(
                    rejections.update()
                    .where(rejections.c.id.in_([r.id for r in fresh]))
                    .values(pruned_at=now_ms())
                )
        with cat.engine.connect() as conn:  # files an interrupted prune left behind, too
            leftover = conn.execute(
                select(rejections.c.path).where(
                    rejections.c.path.is_not(None), rejections.c.pruned_at.is_not(None)
                )
            ).scalars()
            paths += [_junk_file(pool, p) for p in leftover]
    removed = 0
    for path in dict.fromkeys(paths):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return PruneResult(removed, sum(r.bytes or 0 for r in fresh), False)


def _selection(older_than_days: float | None, reason: str | None, study: str | None):
    r = rejections
    query = select(
        r.c.id,
        r.c.received_at,
        r.c.reason,
        r.c.status,
        r.c.study_id,
        r.c.subject_id,
        r.c.remote_addr,
        r.c.bytes,
        r.c.sha256,
        r.c.path,
        r.c.pruned_at,
    ).where(r.c.path.is_not(None))
    if older_than_days is not None:
        if older_than_days < 0:
            raise ValueError("older_than_days must be 0 or more")
        query = query.where(r.c.received_at < now_ms() - int(older_than_days * DAY_MS))
    if reason is not None:
        query = query.where(r.c.reason == reason)
    if study is not None:
        query = query.where(r.c.study_id == check_name("study", study))
    return query


def _junk_file(pool: DataPool, relative: str) -> Path:
    """The junk file a row names, refused unless it lies inside the pool's junk folder."""
    path = resolve_inside(pool.root, relative, what="junk file")
    if pool.junk.resolve() not in path.parents:
        raise InvalidName(f"the junk row's file {relative!r} is not inside junk/; not touched")
    return path
