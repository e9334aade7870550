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
from workbench.decoded import combine_table, decoded_ids, source_folder
from workbench.errors import ConfigError, SourceUnavailable, TableRefused
from workbench.export import export_source, high_water, rebuild_decoded
from workbench.simulators.study_server import Faults, StudyServer, demo_tables, generate_keypair


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
    from workbench.simulators.study_server import start_in_thread

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


# ---------------------------------------------------------------------------- odd rows and answers


def _template(server, table="PHQ9"):
    return {k: v for k, v in server.tables[table][0].items() if k != "id"}


def test_an_id_beyond_signed_64_bit_refuses_only_its_table(config, server, catalog):
    from workbench.ledger import verify

    server.add_rows("PHQ9", [{**_template(server), "id": 2**63}], keep_ids=True)
    for _ in range(2):  # the same clear refusal on every run, never a traceback
        report = run(config, server, catalog=catalog)
        errors = {t.table: t.error for t in report.tables}
        assert not report.ok and "outside signed 64-bit" in errors["PHQ9"]
        assert "9223372036854775808" in errors["PHQ9"]
        assert {t for t, e in errors.items() if e} == {"PHQ9"}
    gad7 = combine_table(config, "mindtrails", "GAD7")
    assert gad7.height == len(server.tables["GAD7"])  # the other tables are exported
    assert not (source_folder(config, "mindtrails") / "raw" / "PHQ9").exists()
    assert high_water(catalog, "mindtrails", "PHQ9") == 0
    assert verify(config, settle=0) == []


def test_cli_export_exit_status_says_a_table_was_refused(home, keys, monkeypatch, server):
    from workbench.simulators.study_server import start_in_thread

    server.add_rows("GAD7", [{**_template(server, "GAD7"), "id": 2**63 + 5}], keep_ids=True)
    with start_in_thread(server) as running:
        config = configure(home, keys, monkeypatch, url=f'"{running.url}"')
        done = cli(config, "export")
    assert done.exit_code == 8, done.output
    assert "GAD7: 1 rows have ids outside signed 64-bit integers" in done.output
    assert "Traceback" not in done.output
    assert combine_table(config, "mindtrails", "PHQ9").height == len(server.tables["PHQ9"])


@pytest.mark.parametrize(
    ("mark", "stored", "top"),
    [
        (0, set(), 0),
        (0, {1, 2, 3}, 3),
        (100, {101, 102, 10**15}, 102),
        (100, {10**15}, 100),
        (100, {101, 900_000, 1_800_000, 10**15}, 1_800_000),
        (0, {1_000_001}, 0),
    ],
)
def test_reachable_mark(mark, stored, top):
    from workbench.export import reachable_mark

    assert reachable_mark(mark, stored, 1_000_000) == top


def test_a_row_far_ahead_does_not_hide_later_rows(config, server, catalog):
    run(config, server, catalog=catalog)
    top = server.last_id("PHQ9")
    server.add_rows("PHQ9", [{**_template(server), "id": 10**15, "session": "FAR"}], keep_ids=True)
    second = run(config, server, catalog=catalog)
    assert {t.table: (t.new_rows, t.ahead) for t in second.tables}["PHQ9"] == (1, 1)
    assert "1 stored rows far ahead" in second.summary()
    assert high_water(catalog, "mindtrails", "PHQ9") == top  # the mark does not jump
    server.add_rows("PHQ9", [{**_template(server), "session": "POST"}] * 3)
    third = run(config, server, catalog=catalog)
    assert {t.table: t.new_rows for t in third.tables}["PHQ9"] == 3  # not the far row again
    assert high_water(catalog, "mindtrails", "PHQ9") == top + 3
    ids = combine_table(config, "mindtrails", "PHQ9")["id"].to_list()
    assert ids[-4:] == [top + 1, top + 2, top + 3, 10**15] and len(ids) == len(set(ids))
    assert {t.table: t.new_rows for t in run(config, server, catalog=catalog).tables}["PHQ9"] == 0


def test_a_row_far_ahead_is_deleted_once_stored_in_delete_mode(
    home, keys, monkeypatch, server, catalog
):
    config = configure(home, keys, monkeypatch, delete_mode="true", max_id_jump="10")
    server.add_rows("PHQ9", [{**_template(server), "id": 10**15}], keep_ids=True)
    report = run(config, server, catalog=catalog)
    assert report.ok, report.summary()
    assert server.tables["PHQ9"] == []
    assert 10**15 in decoded_ids(config, "mindtrails", "PHQ9")
    assert high_water(catalog, "mindtrails", "PHQ9") < 10**15


def test_an_answer_above_max_answer_mb_is_refused_for_its_table(home, keys, monkeypatch, server):
    from workbench.simulators.study_server import start_in_thread

    server.add_rows("PHQ9", [{**_template(server), "note": "x" * 300_000}])
    with start_in_thread(server) as running:
        config = configure(home, keys, monkeypatch, url=f'"{running.url}"', max_answer_mb="0.2")
        done = cli(config, "export")
    assert done.exit_code == 8, done.output
    assert "PHQ9: the answer to GET /export/PHQ9 is larger than max_answer_mb = 0.2 MB" in (
        done.output
    )
    assert not (source_folder(config, "mindtrails") / "raw" / "PHQ9").exists()
    assert combine_table(config, "mindtrails", "GAD7").height == len(server.tables["GAD7"])


def test_an_answer_without_a_length_is_cut_off_at_the_limit(config, server, monkeypatch):
    from workbench.export import ExportClient

    server.add_rows("PHQ9", [{**_template(server), "note": "x" * 600_000}])
    app = server.app()

    def chunked(environ, start_response):  # no Content-Length: the limit counts as it reads
        def without_length(status, headers, exc_info=None):
            kept = [(k, v) for k, v in headers if k.lower() != "content-length"]
            return start_response(status, kept, exc_info)

        body = b"".join(app(environ, without_length))
        yield from (body[i : i + 65536] for i in range(0, len(body), 65536))

    source = config.source("mindtrails")
    client = ExportClient(
        type(source)(**{**source.__dict__, "max_answer_mb": 0.2}),
        transport=httpx.WSGITransport(app=chunked),
    )
    try:
        with pytest.raises(TableRefused, match=r"at least 0\.2\d MB"):
            client.rows("PHQ9", 0)  # refused after reading a little past 0.2 MB of 0.6
        assert len(client.rows("GAD7", 0)) == len(server.tables["GAD7"])
    finally:
        client.close()


# ---------------------------------------------------------------------------- decryption


def test_values_that_decrypt_are_kept_when_most_of_their_column_fails(
    config, server, catalog, tmp_path, caplog
):
    from workbench.simulators.study_server import encrypt_value

    other = tmp_path / "rotated"
    generate_keypair(other, bits=1024)
    template = _template(server)
    server.add_rows(
        "PHQ9",
        [
            {**template, "participantRSA": encrypt_value(other / "public_key.pem", f"Q{i}")}
            for i in range(3 * len(server.tables["PHQ9"]))
        ],
    )  # most of the column is encrypted with a key the workbench does not have
    with caplog.at_level(logging.CRITICAL, logger="workbench"):
        report = run(config, server, catalog=catalog)
    phq9 = combine_table(config, "mindtrails", "PHQ9")
    good = phq9.filter(~pl.col("participant_undecryptable"))
    bad = phq9.filter(pl.col("participant_undecryptable"))
    assert good["participant"].str.starts_with("P").all() and good.height > 0
    assert bad.height == 3 * good.height and bad["participant"].null_count() == bad.height
    assert {t.table: t.undecryptable for t in report.tables}["PHQ9"] == bad.height
    assert "corrupt ciphertext" in caplog.text


def test_confirm_refuses_a_plaintext_the_padding_does_not_hold(keys):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from workbench.export import confirm_pkcs1v15, decrypt_values
    from workbench.simulators.study_server import encrypt_value

    key = load_pem_private_key((keys / "private_key.pem").read_bytes(), password=None)
    values = [encrypt_value(keys / "public_key.pem", f"P{i}") for i in range(5)]
    plain = decrypt_values(key, values, "pkcs1v15")
    assert confirm_pkcs1v15(key, values, plain) == [f"P{i}" for i in range(5)]
    forged = ["noise", None, "P2", "P3", "P9"]  # what implicit rejection could hand back
    assert confirm_pkcs1v15(key, values, forged) == [None, None, "P2", "P3", None]


def test_a_server_column_named_like_the_flag_is_kept(config, server, catalog):
    template = _template(server)
    server.add_rows("PHQ9", [{**template, "participant_undecryptable": "server says"}])
    assert run(config, server, catalog=catalog).ok
    phq9 = combine_table(config, "mindtrails", "PHQ9")
    assert phq9["participant_undecryptable"].drop_nulls().to_list() == ["server says"]
    assert phq9["participantRSA_undecryptable"].dtype == pl.Boolean
    assert not phq9["participantRSA_undecryptable"].any()
    assert phq9["participant"].str.starts_with("P").all()


# ---------------------------------------------------------------------------- verify


def test_verify_checks_raw_snapshots_against_their_rows(config, server, catalog):
    from workbench.ledger import verify

    run(config, server, catalog=catalog)
    assert verify(config, settle=0) == []
    raw = source_folder(config, "mindtrails") / "raw"
    phq9 = next((raw / "PHQ9").glob("*.json"))
    gad7 = next((raw / "GAD7").glob("*.json"))
    demographics = next((raw / "Demographics").glob("*.json"))
    phq9.unlink()
    gad7.write_bytes(gad7.read_bytes() + b" ")
    body = demographics.read_bytes()
    demographics.write_bytes(body.replace(b'"rows"', b'"ROWS"'))
    stray = raw / "GAD7" / "GAD7_20990101T000000_000000000000.json"
    stray.write_bytes(b'{"rows": []}')
    found = {(d.kind, d.path.rsplit("/", 2)[-2]) for d in verify(config, settle=0)}
    assert found == {
        ("missing", "PHQ9"),
        ("size", "GAD7"),
        ("hash", "Demographics"),
        ("unrecorded", "GAD7"),
    }


# ---------------------------------------------------------------------------- names from the operator


def _pool_state(config):
    return sorted(
        (str(p.relative_to(config.pool)), p.stat().st_size)
        for p in config.pool.rglob("*")
        if p.is_file() and "logs" not in p.parts
    )


@pytest.mark.parametrize(
    "args",
    [
        ["decode", "mindtrails", "../raw"],
        ["decode", "mindtrails", "../../.."],
        ["decode", "mindtrails", "/tmp"],
        ["decode", "../questionnaires", "."],
        ["decode", "/abs", "PHQ9"],
        ["export", "mindtrails", "../raw"],
        ["export", "mindtrails", "/etc"],
        ["export", "../mindtrails"],
        ["combine", "../raw/PHQ9"],
        ["combine", "/etc/passwd"],
        ["combine", "PHQ9", "--source", "../mindtrails"],
        ["score", "../raw", "--instrument", "phq9"],
        ["score", "/tmp", "--instrument", "phq9"],
        ["report", "questionnaire", "../../x"],
        ["report", "questionnaire", "/tmp/x"],
        ["report", "participant", "../x"],
        ["report", "attrition", "../../catalog"],
        ["report", "attrition", "/tmp/x"],
    ],
    ids=lambda args: " ".join(args),
)
def test_cli_refuses_names_that_leave_their_folder(config, server, catalog, args, tmp_path):
    run(config, server, catalog=catalog)
    before = _pool_state(config)
    done = cli(config, *args)
    assert done.exit_code != 0, done.output
    assert "Traceback" not in done.output
    assert done.output.startswith("error: ")
    assert "invalid" in done.output or "no source" in done.output, done.output
    assert _pool_state(config) == before  # nothing deleted, nothing written


def test_library_functions_check_the_names_they_turn_into_paths(config, server, catalog, tmp_path):
    from workbench.errors import InvalidName
    from workbench.writers import write_report

    run(config, server, catalog=catalog)
    before = _pool_state(config)
    with pytest.raises(InvalidName, match="invalid table name '../raw'"):
        rebuild_decoded(config, "mindtrails", "../raw", catalog=catalog)
    with pytest.raises(InvalidName):
        combine_table(config, "mindtrails", "..")
    with pytest.raises(InvalidName):
        decoded_ids(config, "mindtrails", "../../..")
    with pytest.raises(InvalidName, match="invalid report name"):
        write_report(tmp_path, "../up", {"t": pl.DataFrame({"a": [1]})}, title="t")
    assert not (tmp_path.parent / "up.html").exists()
    assert _pool_state(config) == before
    assert recover_leaves_raw(config)


def recover_leaves_raw(config) -> bool:
    """`workbench recover` takes no names; it rebuilds decoded tables and keeps every raw file."""
    raw = sorted((source_folder(config, "mindtrails") / "raw").rglob("*.json"))
    done = cli(config, "recover", "--no-uploads")
    return (
        done.exit_code == 0
        and sorted((source_folder(config, "mindtrails") / "raw").rglob("*.json")) == raw
    )
