"""Enroll subjects: JTrack-style ids, a secret token each (only its hash is kept), QR codes."""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from workbench.catalog import Catalog, subjects
from workbench.errors import StudyArchived
from workbench.pool import make_folders, write_file_atomically
from workbench.studies import get_study
from workbench.times import now_ms


@dataclass(frozen=True)
class Enrollment:
    """A newly enrolled subject and its secret token (shown once, never stored)."""

    study: str
    subject: str
    token: str


def hash_token(token: str) -> str:
    """The stored form of a token: SHA-256 hex (tokens carry 256 random bits)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def enroll(catalog: Catalog, study_id: str, count: int) -> list[Enrollment]:
    """Enroll ``count`` new subjects ``<study>_00001``, … with a fresh token each.

    Example: ``[e.subject for e in enroll(catalog, "demo", 2)]`` → ``["demo_00001", "demo_00002"]``.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    study = get_study(catalog, study_id)
    if not study.active:
        raise StudyArchived(f"study {study_id!r} is archived; it enrolls nobody")
    numbered = re.compile(rf"{re.escape(study_id)}_(\d+)")
    for _attempt in range(5):
        with catalog.engine.connect() as conn:
            ids = conn.execute(
                select(subjects.c.subject_id).where(subjects.c.study_id == study_id)
            ).scalars()
            taken = [int(m.group(1)) for s in ids if (m := numbered.fullmatch(s))]
        start = max(taken, default=0) + 1
        made = [
            Enrollment(study_id, f"{study_id}_{n:05d}", secrets.token_urlsafe(32))
            for n in range(start, start + count)
        ]
        try:
            with catalog.writing() as conn:
                conn.execute(
                    subjects.insert(),
                    [
                        {
                            "study_id": study_id,
                            "subject_id": e.subject,
                            "token_hash": hash_token(e.token),
                            "enrolled_at": now_ms(),
                        }
                        for e in made
                    ],
                )
            return made
        except IntegrityError:
            continue  # another enrollment took the same numbers; count again
    raise RuntimeError("could not allocate subject numbers after 5 attempts")


def list_subjects(catalog: Catalog, study_id: str) -> list[str]:
    """Ids of the subjects enrolled in a study."""
    with catalog.engine.connect() as conn:
        return list(
            conn.execute(
                select(subjects.c.subject_id)
                .where(subjects.c.study_id == study_id)
                .order_by(subjects.c.subject_id)
            ).scalars()
        )


def qr_payload(enrollment: Enrollment, server_url: str) -> str:
    """What a subject's QR code holds: server URL, study, subject and token as JSON."""
    return json.dumps(
        {
            "server": server_url,
            "study": enrollment.study,
            "subject": enrollment.subject,
            "token": enrollment.token,
        },
        separators=(",", ":"),
    )


def write_enrollment_sheets(
    enrollments: list[Enrollment], folder: Path, *, server_url: str
) -> Path:
    """Write one QR code PNG per subject and a printable HTML sheet; return the sheet's path."""
    import segno

    make_folders(folder)
    cards = []
    for e in enrollments:
        qr = segno.make(qr_payload(e, server_url), error="m")
        png = io.BytesIO()
        qr.save(png, kind="png", scale=8, border=4)
        write_file_atomically(folder / f"{e.subject}.png", png.getvalue())
        cards.append(
            f'<div class="card">{qr.svg_inline(scale=3)}'
            f"<p><b>{html.escape(e.subject)}</b><br>study {html.escape(e.study)}<br>"
            f"<small>{html.escape(server_url)}</small></p></div>"
        )
    stamp = now_ms()
    sheet = folder / f"sheet-{stamp}.html"
    page = (
        "<!doctype html><meta charset='utf-8'><title>Enrollment sheet</title>"
        "<style>body{font-family:sans-serif}.card{display:inline-block;width:30%;"
        "margin:1%;padding:8px;border:1px dashed #999;text-align:center;"
        "page-break-inside:avoid}</style>"
        f"<h1>Enrollment: {html.escape(enrollments[0].study)}</h1>"
        "<p>Each code holds the subject's secret token: hand it to that subject only, "
        "then destroy this sheet.</p>" + "".join(cards)
    )
    write_file_atomically(sheet, page.encode())
    return sheet
