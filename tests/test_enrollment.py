"""Enrollment: JTrack-style ids, secret tokens stored only as hashes, QR codes."""

from __future__ import annotations

import json

from click.testing import CliRunner
from sqlalchemy import select

from workbench.catalog import subjects as subjects_table
from workbench.cli import cli
from workbench.enrollment import enroll, hash_token, list_subjects, qr_payload


def test_ids_continue_the_numbering(catalog, study):
    first = enroll(catalog, "demo", 2)
    second = enroll(catalog, "demo", 2)
    assert [e.subject for e in first + second] == [
        "demo_00001",
        "demo_00002",
        "demo_00003",
        "demo_00004",
    ]
    assert list_subjects(catalog, "demo") == [e.subject for e in first + second]


def test_tokens_are_random_and_only_their_hash_is_stored(catalog, study, home):
    made = enroll(catalog, "demo", 5)
    assert len({e.token for e in made}) == 5 and all(len(e.token) >= 40 for e in made)
    with catalog.engine.connect() as conn:
        stored = dict(
            conn.execute(select(subjects_table.c.subject_id, subjects_table.c.token_hash)).all()
        )
    for e in made:
        assert stored[e.subject] == hash_token(e.token) != e.token
    catalog.sync()
    raw = b"".join(p.read_bytes() for p in home.pool.glob("catalog.sqlite*"))
    assert not any(e.token.encode() in raw for e in made)


def test_enroll_json_for_scripts(home, study):
    result = CliRunner().invoke(
        cli, ["--home", str(home.home), "enroll", "demo", "--count", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    people = json.loads(result.output)
    assert [p["subject"] for p in people] == ["demo_00001", "demo_00002", "demo_00003"]
    assert all(p["token"] for p in people)


def test_enroll_writes_qr_codes_and_a_sheet(home, study):
    result = CliRunner().invoke(cli, ["--home", str(home.home), "enroll", "demo", "--count", "2"])
    assert result.exit_code == 0, result.output
    folder = home.pool / "enrollment" / "demo"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == ["demo_00001.png", "demo_00002.png"]
    assert all((folder / p).read_bytes().startswith(b"\x89PNG") for p in pngs)
    [sheet] = folder.glob("sheet-*.html")
    text = sheet.read_text()
    assert text.count("<svg") == 2 and "demo_00002" in text
    assert "enrolled 2 subjects (demo_00001 to demo_00002)" in result.output


def test_qr_payload_names_server_study_subject_and_token(catalog, study):
    [e] = enroll(catalog, "demo", 1)
    payload = json.loads(qr_payload(e, "https://uploads.example.org"))
    assert payload == {
        "server": "https://uploads.example.org",
        "study": "demo",
        "subject": e.subject,
        "token": e.token,
    }


def test_archived_study_enrolls_nobody(home, catalog, study):
    from workbench.studies import archive_study

    archive_study(catalog, "demo")
    result = CliRunner().invoke(cli, ["--home", str(home.home), "enroll", "demo", "--count", "1"])
    assert result.exit_code == 4 and "archived" in result.output
