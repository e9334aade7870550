"""Questionnaire export: incremental, decrypted, decoded, deleted only when safe, rebuilt."""

from __future__ import annotations

import base64
import logging
import shutil

import httpx
import polars as pl
import pytest
from sqlalchemy import select

from tests.conftest import configure
from workbench import export as export_module
from workbench.catalog import export_deletions, export_raw
from workbench.config import load_config
from workbench.errors import ConfigError, SourceUnavailable
from workbench.export import (
    combine_table,
    decoded_ids,
    export_source,
    high_water,
    rebuild_decoded,
    source_folder,
)
from workbench.study_server import Faults, StudyServer, demo_tables, generate_keypair


@pytest.fixture
def server(keys):
    tables, deleteable = demo_tables(keys / "public_key.pem", participants=8, days=5, seed=1)
    return StudyServer(tables, deleteable=deleteable, user="mt", password="secret")


@pytest.fixture
def config(home, keys, monkeypatch):
    return configure(home, keys, monkeypatch)


def run(config, server, transport=None, **options):
    transport = transport or httpx.WSGITransport(app=server.app())
    return export_source(config, "mindtrails", transport=transport, **options)


def test_exports_decrypts_and_decodes_every_table(config, server, catalog):
    report = run(config, server, catalog=catalog)
    assert report.ok, report.summary()
    for table, rows in server.tables.items():
        assert {t.table: t.new_rows for t in report.tables}[table] == len(rows)
        combined = combine_table(config, "mindtrails", table)
        assert combined["id"].to_list() == [r["id"] for r in rows]
        assert not [c for c in combined.columns if c.endswith("RSA")]  # no ciphertext column
        assert combined["participant"].str.starts_with("P").all()
        assert not combined["participant_undecryptable"].any()
        assert high_water(catalog, "mindtrails", table) == rows[-1]["id"]
    phq9 = combine_table(config, "mindtrails", "PHQ9")
    items = {v for c in ("interest", "depressed", "suicidal") for v in phq9[c].to_list()}
    assert items <= {0, 1, 2, 3, 555} and 555 in items
    folder = source_folder(config, "mindtrails") / "decoded" / "PHQ9"
    days = sorted(p.stem.removeprefix("PHQ9_") for p in folder.glob("PHQ9_*.csv"))
    assert len(days) > 1 and days == sorted(
        p.stem.removeprefix("PHQ9_") for p in folder.glob("*.parquet")
    )
    with catalog.engine.connect() as conn:
        raws = conn.execute(select(export_raw)).all()
    assert len(raws) == len(server.tables)
    assert all(r.decoded_at and len(r.sha256) == 64 for r in raws)


def test_second_run_fetches_only_new_rows(config, server, catalog):
    run(config, server, catalog=catalog)
    again = run(config, server, catalog=catalog)
    assert sum(t.new_rows for t in again.tables) == 0 and again.ok
    server.add_rows("PHQ9", [{**server.tables["PHQ9"][0], "session": "POST"}])
    third = run(config, server, catalog=catalog)
    assert {t.table: t.new_rows for t in third.tables}["PHQ9"] == 1
    assert combine_table(config, "mindtrails", "PHQ9").height == len(server.tables["PHQ9"])


def test_a_server_ignoring_greater_than_still_gives_only_new_rows(config, server, catalog):
    run(config, server, catalog=catalog)
    server.faults.ignore_greater_than = True
    again = run(config, server, catalog=catalog)
    assert sum(t.new_rows for t in again.tables) == 0
    ids = combine_table(config, "mindtrails", "GAD7")["id"]
    assert ids.is_unique().all() and ids.len() == len(server.tables["GAD7"])


def test_delete_mode_deletes_only_verified_rows_of_deleteable_tables(
    home, keys, monkeypatch, server, catalog
):
    config = configure(home, keys, monkeypatch, delete_mode="true")
    before = {t: [r["id"] for r in rows] for t, rows in server.tables.items()}
    report = run(config, server, catalog=catalog)
    assert report.ok, report.summary()
    for table, ids in before.items():
        if server.deleteable[table]:
            assert server.tables[table] == []
            assert decoded_ids(config, "mindtrails", table) == set(ids)
        else:
            assert [r["id"] for r in server.tables[table]] == ids  # do-not-delete: untouched
    with catalog.engine.connect() as conn:
        deleted = conn.execute(select(export_deletions)).all()
    assert len(deleted) == sum(len(ids) for t, ids in before.items() if server.deleteable[t])


def test_rows_left_at_or_below_the_mark_raise_a_critical_alert(
    home, keys, monkeypatch, server, catalog, caplog
):
    config = configure(home, keys, monkeypatch, delete_mode="true")
    run(config, server, catalog=catalog)
    assert server.tables["PHQ9"] == []
    server.tables["PHQ9"].append({"id": 2, "date": "2026-01-01T00:00:00Z", "interest": 1})
    with caplog.at_level(logging.CRITICAL, logger="workbench"):
        report = run(config, server, catalog=catalog)
    assert {t.table: t.left_on_server for t in report.tables}["PHQ9"] == 1
    assert "sensitive data found on server: 1 rows at or below" in caplog.text
    assert {t.table: t.left_on_server for t in report.tables}["GAD7"] == 0


def test_rebuild_from_raw_equals_the_incremental_path(config, server, catalog):
    run(config, server, catalog=catalog)
    server.add_rows("GAD7", [{**server.tables["GAD7"][0], "extra_question": "new column"}])
    run(config, server, catalog=catalog)
    folder = source_folder(config, "mindtrails") / "decoded"
    before = {p.relative_to(folder): pl.read_parquet(p) for p in sorted(folder.rglob("*.parquet"))}
    csvs = {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*.csv"))}
    shutil.rmtree(folder)
    done = rebuild_decoded(config, catalog=catalog)
    assert sum(done.values()) == sum(len(rows) for rows in server.tables.values())
    after = {p.relative_to(folder): pl.read_parquet(p) for p in sorted(folder.rglob("*.parquet"))}
    assert before.keys() == after.keys()
    assert all(before[k].equals(after[k]) for k in before)
    assert csvs == {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*.csv"))}


def test_a_table_that_changes_its_columns(config, server, catalog):
    run(config, server, catalog=catalog)
    row = {k: v for k, v in server.tables["GAD7"][0].items() if k not in ("id", "afraid")}
    server.add_rows("GAD7", [{**row, "sleep_quality": 2}])
    run(config, server, catalog=catalog)
    gad7 = combine_table(config, "mindtrails", "GAD7")
    assert gad7["sleep_quality"].drop_nulls().to_list() == [2]
    assert gad7["afraid"].null_count() == 1


def test_combine_matches_the_exact_table_name(config, server, catalog):
    server.tables["PHQ9_2025"] = [dict(r) for r in server.tables["PHQ9"][:3]]
    server.deleteable["PHQ9_2025"] = True
    run(config, server, catalog=catalog)
    assert combine_table(config, "mindtrails", "PHQ9").height == len(server.tables["PHQ9"])
    assert combine_table(config, "mindtrails", "PHQ9_2025").height == 3


def test_unicode_answers_survive(config, server, catalog):
    run(config, server, catalog=catalog)
    countries = set(combine_table(config, "mindtrails", "Demographics")["country"].to_list())
    sent = {r["country"] for r in server.tables["Demographics"]}
    assert countries == sent and any(not c.isascii() for c in sent)
    folder = source_folder(config, "mindtrails") / "decoded" / "Demographics"
    text = "".join(p.read_text(encoding="utf-8") for p in folder.glob("*.csv"))
    assert any(c in text for c in sent if not c.isascii())


def test_empty_table(config, server, catalog):
    server.tables["Empty"] = []
    server.deleteable["Empty"] = True
    report = run(config, server, catalog=catalog)
    assert {t.table: t.new_rows for t in report.tables}["Empty"] == 0 and report.ok


def test_wrong_key_leaves_values_empty_and_flagged(
    home, keys, monkeypatch, server, catalog, caplog, tmp_path
):
    other = tmp_path / "other"
    generate_keypair(other, bits=1024)
    config = configure(home, keys, monkeypatch)
    shutil.copy(other / "private_key.pem", home.home / "keys" / "private_key.pem")
    with caplog.at_level(logging.CRITICAL, logger="workbench"):
        run(config, server, catalog=catalog)
    phq9 = combine_table(config, "mindtrails", "PHQ9")
    assert phq9["participant"].null_count() == phq9.height
    assert phq9["participant_undecryptable"].all()
    assert "wrong private key or padding" in caplog.text


def test_corrupt_ciphertext_is_flagged_never_stored(config, server, catalog, caplog, keys):
    # a ciphertext larger than the key's modulus can never decrypt (a merely altered one may,
    # by OpenSSL's implicit rejection, decrypt to noise that is then judged by its shape)
    corrupt = base64.b64encode(b"\xff" * 128).decode()
    row = {k: v for k, v in server.tables["PHQ9"][0].items() if k != "id"}
    server.add_rows(
        "PHQ9", [{**row, "participantRSA": corrupt}, {**row, "participantRSA": "not base64!"}]
    )
    with caplog.at_level(logging.CRITICAL, logger="workbench"):
        report = run(config, server, catalog=catalog)
    assert {t.table: t.undecryptable for t in report.tables}["PHQ9"] == 2
    phq9 = combine_table(config, "mindtrails", "PHQ9")
    assert phq9["participant_undecryptable"].sum() == 2
    for column in phq9.select(pl.col(pl.String)).columns:
        assert not set(phq9[column].to_list()) & {corrupt, "not base64!"}
    assert "corrupt ciphertext" in caplog.text


def test_parallel_decryption_gives_the_same_values(config, server, monkeypatch, catalog):
    monkeypatch.setattr(export_module, "PARALLEL_FROM", 5)
    run(config, server, catalog=catalog)
    phq9 = combine_table(config, "mindtrails", "PHQ9")
    assert not phq9["participant_undecryptable"].any()
    assert phq9["participant"].str.starts_with("P").all()


def test_retries_ride_out_transient_errors(config, server, catalog):
    server.faults.error_rate = 0.3
    server.faults.seed = 5
    report = run(config, server, catalog=catalog)
    assert report.ok
    assert combine_table(config, "mindtrails", "PHQ9").height == len(server.tables["PHQ9"])


class FailingTable(httpx.BaseTransport):
    """Passes requests to the app, except that one table's requests fail like a dead server."""

    def __init__(self, app, table):
        self.inner = httpx.WSGITransport(app=app)
        self.table = table

    def handle_request(self, request):
        if request.url.path == f"/export/{self.table}":
            raise httpx.ConnectError("connection refused")
        return self.inner.handle_request(request)


def test_a_server_failing_mid_export_keeps_progress_and_the_next_run_resumes(
    config, server, catalog, caplog
):
    with caplog.at_level(logging.ERROR, logger="workbench"):
        first = run(config, server, FailingTable(server.app(), "PHQ9"), catalog=catalog)
    failed = {t.table: t.error for t in first.tables if t.error}
    assert list(failed) == ["PHQ9"] and "failed 3 times" in failed["PHQ9"]
    assert "progress so far is kept" in caplog.text
    assert high_water(catalog, "mindtrails", "GAD7") == server.tables["GAD7"][-1]["id"]
    assert high_water(catalog, "mindtrails", "PHQ9") == 0
    second = run(config, server, catalog=catalog)
    assert {t.table: t.new_rows for t in second.tables} == {
        t: (len(r) if t == "PHQ9" else 0) for t, r in server.tables.items()
    }


def test_a_dead_server_is_a_clear_error(config, server, catalog):
    server.faults.error_rate = 1.0
    with pytest.raises(SourceUnavailable, match="failed 3 times, last with HTTP 500"):
        run(config, server, catalog=catalog)


def test_missing_credentials_are_a_clear_error(config, server, monkeypatch):
    monkeypatch.delenv("MT_PASSWORD")
    with pytest.raises(ConfigError, match="MT_PASSWORD"):
        run(config, server)


def test_wrong_credentials_are_a_clear_error(config, server, monkeypatch):
    monkeypatch.setenv("MT_PASSWORD", "wrong")
    with pytest.raises(SourceUnavailable, match="refused the credentials"):
        run(config, server)


def test_faults_dataclass_defaults_are_off():
    assert Faults().error_rate == 0 and not Faults().ignore_greater_than


def cli(config, *args):
    from click.testing import CliRunner

    from workbench.cli import cli as command

    return CliRunner().invoke(command, ["--home", str(config.home), *args])


def test_cli_export_decode_combine_recover(home, keys, monkeypatch, server, tmp_path):
    from workbench.study_server import start_in_thread

    with start_in_thread(server) as running:
        config = configure(home, keys, monkeypatch, url=f'"{running.url}"')
        done = cli(config, "export", ".", "PHQ9")
        assert done.exit_code == 0, done.output
        assert f"mindtrails: {len(server.tables['PHQ9'])} new rows from 1 tables" in done.output
        assert cli(config, "export").exit_code == 0
        missing = cli(config, "export", "mindtrails", "Nope")
        assert missing.exit_code == 8 and "no such table" in missing.output
    assert (home.pool / "logs" / "daily.log").read_text().count("new rows") >= 2
    out = tmp_path / "phq9.csv"
    combined = cli(config, "combine", "PHQ9", "--out", str(out))
    assert combined.exit_code == 0, combined.output
    assert pl.read_csv(out).height == len(server.tables["PHQ9"])
    decoded = cli(config, "decode", "mindtrails", "GAD7")
    assert f"mindtrails/GAD7: {len(server.tables['GAD7'])} rows decoded" in decoded.output
    folder = source_folder(config, "mindtrails") / "decoded"
    shutil.rmtree(folder)
    recovered = cli(config, "recover", "--no-uploads")
    assert recovered.exit_code == 0, recovered.output
    assert "decoded tables rebuilt from raw" in recovered.output
    assert pl.read_csv(out).equals(
        combine_table(config, "mindtrails", "PHQ9").pipe(
            lambda f: pl.read_csv(f.write_csv().encode())
        )
    )


def test_oaep_and_a_key_with_a_passphrase(home, monkeypatch, tmp_path, catalog):
    folder = tmp_path / "locked"
    generate_keypair(folder, bits=1024, passphrase=b"open sesame")
    tables, deleteable = demo_tables(
        folder / "public_key.pem", participants=4, days=3, padding="oaep"
    )
    server = StudyServer(tables, deleteable=deleteable, user="mt", password="secret")
    config = configure(home, folder, monkeypatch, padding='"oaep"', passphrase_env='"MT_KEY"')
    monkeypatch.delenv("MT_KEY", raising=False)
    with pytest.raises(ConfigError, match="MT_KEY, which is not set"):
        run(config, server, catalog=catalog)
    monkeypatch.setenv("MT_KEY", "wrong")
    with pytest.raises(ConfigError, match="wrong passphrase"):
        run(config, server, catalog=catalog)
    monkeypatch.setenv("MT_KEY", "open sesame")
    assert run(config, server, catalog=catalog).ok
    gad7 = combine_table(config, "mindtrails", "GAD7")
    assert gad7["participant"].str.starts_with("P").all()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('name = "a b"\nurl = "http://x"', "needs a name"),
        ('name = "s"\nurl = "ftp://x"', "needs an http"),
        ('name = "s"\nurl = "http://x"\npadding = "raw"', "padding must be"),
        ('name = "s"\nurl = "http://x"\nuser = "me"', "unknown keys in source 's': user"),
        ('name = "s"\nurl = "http://x"\nretries = -1', "retries and backoff not negative"),
    ],
)
def test_bad_sources_are_clear_errors(tmp_path, entry, message):
    (tmp_path / "workbench.toml").write_text(f"[[sources]]\n{entry}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path)


def test_source_settings_are_read(tmp_path):
    (tmp_path / "workbench.toml").write_text(
        '[[sources]]\nname = "mt"\nurl = "https://mt.example"\nprivate_key = "k/p.pem"\n'
        'include = ["PHQ9", "GAD7"]\nexclude = ["GAD7"]\ndelete_mode = true\n'
    )
    source = load_config(tmp_path).source("mt")
    assert source.private_key == tmp_path / "k" / "p.pem" and source.delete_mode
    assert [t for t in ("PHQ9", "GAD7", "Other") if source.wants(t)] == ["PHQ9"]
    with pytest.raises(ConfigError, match="no source 'nope'"):
        load_config(tmp_path).source("nope")


def test_a_rebuild_that_cannot_load_the_key_deletes_nothing(config, server, catalog):
    run(config, server, catalog=catalog)
    folder = source_folder(config, "mindtrails") / "decoded"
    before = sorted(p.name for p in folder.rglob("*.parquet"))
    (config.home / "keys" / "private_key.pem").unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        rebuild_decoded(config, catalog=catalog)
    assert sorted(p.name for p in folder.rglob("*.parquet")) == before


def test_a_source_that_is_down_does_not_stop_the_others(config, server, monkeypatch):
    from workbench.export import export_sources

    server.faults.error_rate = 1.0
    reports = export_sources(config, transport=httpx.WSGITransport(app=server.app()))
    assert len(reports) == 1 and not reports[0].ok
    assert "not exported: " in reports[0].summary() and "HTTP 500" in reports[0].summary()
