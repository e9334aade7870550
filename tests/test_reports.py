"""Data-quality reports and attrition: Kaplan-Meier against lifelines, CONSORT sums."""

from __future__ import annotations

import httpx
import polars as pl
import pytest

from tests.conftest import NOW
from workbench.export import export_source
from workbench.reports import (
    attrition,
    kaplan_meier,
    median_survival,
    participant_report,
    questionnaire_report,
)
from workbench.simulators.study_server import StudyServer, demo_tables
from workbench.writers import write_report


def test_kaplan_meier_equals_lifelines_on_the_waltons_data():
    lifelines = pytest.importorskip("lifelines")
    from lifelines.datasets import load_waltons

    data = load_waltons()
    fitted = lifelines.KaplanMeierFitter().fit(data["T"], data["E"])
    ours = kaplan_meier(data["T"].tolist(), data["E"].astype(bool).tolist())
    survival = fitted.survival_function_["KM_estimate"]
    bands = fitted.confidence_interval_
    assert ours["time"].to_list() == [float(t) for t in survival.index]
    assert ours["survival"].to_list() == pytest.approx(survival.tolist(), abs=1e-12)
    assert ours["lower"].to_list() == pytest.approx(bands.iloc[:, 0].tolist(), abs=1e-12)
    assert ours["upper"].to_list() == pytest.approx(bands.iloc[:, 1].tolist(), abs=1e-12)
    assert median_survival(ours) == fitted.median_survival_time_


def test_kaplan_meier_by_hand():
    curve = kaplan_meier([2, 3, 3, 5, 8], [True, True, False, True, False])
    # t=2: 1 of 5 -> 0.8; t=3: 1 of 4 -> 0.6; t=5: 1 of 2 -> 0.3
    assert curve.select("time", "survival").rows() == [
        (0.0, 1.0), (2.0, 0.8), (3.0, pytest.approx(0.6)), (5.0, pytest.approx(0.3)), (8.0, pytest.approx(0.3))
    ]  # fmt: skip
    assert median_survival(curve) == 5.0


def test_sensing_attrition_consort_adds_up(home, scenario, people):
    from workbench.refresh import refresh_status

    refresh_status(home, now=NOW, mail=False)  # attrition reads what the refresh produced
    result = attrition(home, "demo", now=NOW)
    consort = dict(result.consort.iter_rows())
    assert consort["enrolled"] == 7 == consort["started"] + consort["not started"]
    assert consort["started"] == sum(
        consort[d] for d in ("active", "completed", "withdrawn", "lost to follow-up")
    )
    by = dict(result.dispositions.select("participant", "disposition").iter_rows())
    a, b, c, d, e, f, g = (p.subject for p in people)
    assert (by[a], by[b], by[c], by[d], by[e], by[g]) == (
        "active", "lost to follow-up", "withdrawn", "not started", "completed", "not started"
    )  # fmt: skip  # d registered but never sent data
    assert by[f] == "active"
    days = dict(result.dispositions.select("participant", "days").iter_rows())
    assert days[c] == 5.0  # left on day 5
    assert result.retention["survival"].min() < 1
    assert result.dropout_by_week["dropped"].sum() == 2
    assert "ema_compliance" not in result.tables()  # the scenario's study has no EMA


@pytest.fixture
def exported(home, keys, monkeypatch, catalog):
    from tests.conftest import configure

    tables, deleteable = demo_tables(keys / "public_key.pem", participants=6, days=20, seed=4)
    phq9 = tables["PHQ9"]
    phq9[0]["interest"] = 7  # out of range
    phq9[1]["depressed"] = 1.5  # not a choice
    phq9[2]["sleep"] = None  # blank
    server = StudyServer(tables, deleteable=deleteable, user="mt", password="secret")
    config = configure(home, keys, monkeypatch)
    export_source(
        config, "mindtrails", transport=httpx.WSGITransport(app=server.app()), catalog=catalog
    )
    return config, tables


def test_questionnaire_report_counts_each_kind_of_problem(exported):
    config, tables = exported
    report = questionnaire_report(config, "mindtrails")
    row = {r["column"]: r for r in report.filter(pl.col("table") == "PHQ9").iter_rows(named=True)}
    sent = tables["PHQ9"]
    assert row["interest"]["instrument"] == "phq9" and row["interest"]["out_of_range"] == 1
    assert row["depressed"]["invalid_choices"] == 1
    codes = sum(1 for r in sent if r.get("suicidal") in (555, -1))
    assert row["suicidal"]["special_codes"] == codes
    blank = sum(1 for r in sent if r.get("sleep") is None)
    assert row["sleep"]["pct_blank"] == round(100 * blank / len(sent), 2)
    assert row["participant"]["instrument"] is None


def test_participant_report_against_the_schedule(exported):
    from workbench.decoded import combine_table

    config, _tables = exported
    phq9 = combine_table(config, "mindtrails", "PHQ9")
    sessions = sorted(phq9["session"].unique().to_list())
    report = participant_report(config, "mindtrails")
    people = set(combine_table(config, "mindtrails", "participant")["participant"].to_list())
    assert set(report["participant"].to_list()) == people
    for person, missing in report.select("participant", "missing_items").iter_rows():
        done = set(phq9.filter(pl.col("participant") == person)["session"].to_list())
        for session in sessions:
            assert (f"PHQ9:{session}" in missing.split(", ")) == (session not in done)
    assert report["missing"].sum() > 0  # some participants stopped early


def test_questionnaire_attrition_and_the_html_page(exported, tmp_path):
    config, _tables = exported
    result = attrition(config, "mindtrails")
    consort = dict(result.consort.iter_rows())
    assert (
        consort["started"]
        == consort["active"] + consort["completed"] + consort["lost to follow-up"]
    )
    paths = write_report(tmp_path, "mt", result.tables(), title="Attrition: mt")
    page = (tmp_path / "mt.html").read_text()
    assert "<svg" in page and "consort" in page and "retention" in page
    assert (tmp_path / "mt_consort.csv").exists() and (tmp_path / "mt_retention.parquet").exists()
    assert len(paths) == 2 * len(result.tables()) + 1


def test_cli_score_and_reports(exported, home, scenario, tmp_path):
    from click.testing import CliRunner

    from workbench.cli import cli

    config, tables = exported

    def run(*args):
        result = CliRunner().invoke(cli, ["--home", str(config.home), *args])
        assert result.exit_code == 0, result.output
        return result.output

    out = tmp_path / "phq9.csv"
    run("score", "PHQ9", "--instrument", "phq9", "--format", "csv", "--out", str(out))
    scored = pl.read_csv(out)
    assert scored.height == len(tables["PHQ9"])
    assert {"phq9_total", "phq9_band", "phq9_missing", "phq9_valid"} <= set(scored.columns)
    assert "| participant" in run("score", "GAD7", "--instrument", "gad7", "--last-per-session")
    assert "columns checked" in run("report", "questionnaire", "mindtrails")
    assert (config.pool / "reports" / "questionnaires" / "quality_mindtrails.html").exists()
    assert "participants" in run("report", "participant")
    sensing = run("report", "attrition", "demo")
    assert (
        "| enrolled" in sensing and (config.pool / "reports" / "attrition" / "demo.html").exists()
    )
    page = (config.pool / "reports" / "attrition" / "demo.html").read_text()
    methods = page[page.index("<h2 id='methods'>Methods</h2>") :]
    assert methods.endswith("</p>\n</body></html>")  # the last section of the page
    for rule in ("14-day protocol period", "staleness allowance of 48 hours", "censored"):
        assert rule in methods
    for source in ("Kaplan &amp; Meier, 1958", "Greenwood, 1926", "Kalbfleisch &amp; Prentice"):
        assert source in methods
    assert "CONSORT 2010" in methods and "EMA compliance" not in methods  # no EMA here
    assert "questionnaire study" in run("report", "attrition", "mindtrails")
    page = (config.pool / "reports" / "attrition" / "mindtrails.html").read_text()
    assert "14 days without an answer" in page  # no session_days: the fallback rule is named
