"""Reliability and change over time: hand-computed cases, an independent formula, the report."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

import workbench
from tests import test_reports
from workbench.instruments import instrument
from workbench.psychometrics import (
    change_over_time,
    corrected_item_total,
    cronbach_alpha,
    item_total,
    reliability,
)
from workbench.reports import questionnaire_methods
from workbench.writers import write_report

# Four complete rows and one incomplete (left out): worked by hand in the comments below.
HAND = pl.DataFrame(
    {"a": [1, 2, 3, 4, 4], "b": [2, 2, 3, 3, None], "c": [1, 3, 2, 4, 1]},
    schema={"a": pl.Int64, "b": pl.Int64, "c": pl.Int64},
)


def test_cronbach_alpha_by_hand():
    # item variances (n - 1): a 5/3, b 1/3, c 5/3, sum 11/3; row sums 4, 7, 8, 11: variance 25/3
    # alpha = 3/2 * (1 - (11/3) / (25/3)) = 3/2 * 14/25 = 21/25
    assert cronbach_alpha(HAND) == pytest.approx(0.84, abs=1e-12)


def test_corrected_item_total_by_hand():
    # a against b+c (3, 5, 5, 7): 6 / sqrt(5 * 8); b against a+c (2, 5, 5, 8): 3 / sqrt(1 * 18);
    # c against a+b (3, 4, 6, 7): 5 / sqrt(5 * 10)
    r = corrected_item_total(HAND)
    assert r["a"] == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    assert r["b"] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert r["c"] == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_alpha_and_item_total_equal_the_covariance_matrix_formulas():
    rng = np.random.default_rng(7)
    common = rng.normal(size=200)
    data = np.clip(np.round(1.5 + common[:, None] + rng.normal(size=(200, 6))), 0, 3)
    frame = pl.DataFrame(data, schema=[f"i{j}" for j in range(6)])
    cov = np.cov(data, rowvar=False)
    k = cov.shape[0]
    assert cronbach_alpha(frame) == pytest.approx(
        k / (k - 1) * (1 - np.trace(cov) / cov.sum()), abs=1e-12
    )
    for j, r in enumerate(corrected_item_total(frame).values()):
        rest = [m for m in range(k) if m != j]
        expected = cov[j, rest].sum() / math.sqrt(cov[j, j] * cov[np.ix_(rest, rest)].sum())
        assert r == pytest.approx(expected, abs=1e-12)


def test_undefined_cases_are_none():
    assert cronbach_alpha(HAND.head(1)) is None  # one row
    assert cronbach_alpha(HAND.select("a")) is None  # one item
    assert cronbach_alpha(pl.DataFrame({"a": [1, 1], "b": [2, 2]})) is None  # no variance
    assert corrected_item_total(pl.DataFrame({"a": [1, 1, 1], "b": [1, 2, 3]}))["a"] is None


def test_reliability_per_session_uses_answers_as_scored():
    # GAD-2, PRE: (0,1) (1,1) (2,3) (3,3) and (1, 555) left out; POST: one row.
    # variances 5/3 and 4/3, sums 1, 2, 5, 6: 17/3; alpha = 2 * (1 - 9/17) = 16/17;
    # with two items the corrected item-total r is their correlation, 4 / sqrt(5 * 4).
    table = pl.DataFrame(
        {
            "session": ["PRE"] * 5 + ["POST"],
            "nervous": [0, 1, 2, 3, 1, 2],
            "control": [1, 1, 3, 3, 555, 2],
        }
    )
    alpha = {r["session"]: r for r in reliability(table, "gad2").iter_rows(named=True)}
    assert alpha["PRE"]["alpha"] == pytest.approx(16 / 17, abs=1e-12)
    assert alpha["PRE"]["n_complete"] == 4 and alpha["PRE"]["items"] == 2
    assert alpha["POST"]["alpha"] is None and alpha["POST"]["n_complete"] == 1
    items = item_total(table, "gad2").filter(pl.col("session") == "PRE")
    assert items["corrected_item_total_r"].to_list() == pytest.approx([2 / math.sqrt(5)] * 2)


def test_reliability_reverse_keys_first():
    # PSS-10 answers where the four positive items run opposite to the six negative ones:
    # reverse-keyed, every item equals the row's level, so alpha is exactly 1.
    inst = instrument("pss10")
    rows = [
        {c: (4 - level if c in inst.reverse else level) for c in inst.items} for level in range(5)
    ]
    out = reliability(pl.DataFrame(rows), inst)
    assert out["alpha"].to_list() == [pytest.approx(1.0)]
    assert out["session"].to_list() == [None]


def _phq9(participant: str, session: str, date: str, total: int | None) -> dict:
    """A PHQ-9 answer summing to ``total`` (None: three items blank, so not scored)."""
    row = {"participant": participant, "session": session, "date": date}
    items = instrument("phq9").items
    if total is None:
        return row | {c: (None if i < 3 else 1) for i, c in enumerate(items)}
    left = total
    for c in items:
        row[c] = min(left, 3)
        left -= row[c]
    return row


S_DIFF_PHQ9 = math.sqrt(2) * 3.5 * math.sqrt(1 - 0.84)  # 1.9799: Kroenke 2001 r, Kocalevent SD


def test_change_over_time_by_hand():
    rows = [
        _phq9("P1", "PRE", "2026-01-01", 15),
        _phq9("P1", "MID", "2026-01-15", 9),
        _phq9("P1", "POST", "2026-02-01", 6),
        _phq9("P2", "PRE", "2026-01-01", 10),
        _phq9("P2", "MID", "2026-01-15", None),  # not scored: left out
        _phq9("P2", "POST", "2026-02-01", 7),
        _phq9("P3", "PRE", "2026-01-01", 5),
        _phq9("P3", "POST", "2026-02-01", 9),
        _phq9("P4", "PRE", "2026-01-01", 8),
        _phq9("P4", "POST", "2026-01-20", 12),
        _phq9("P4", "POST", "2026-02-01", 4),  # the later answer of the session counts
        _phq9("P5", "PRE", "2026-01-01", 12),
        _phq9("P6", "PRE", "2026-01-01", 0),
        _phq9("P6", "POST", "2026-02-01", 0),
    ]
    out = change_over_time(pl.DataFrame(rows), "phq9")
    got = {r["participant"]: r for r in out.iter_rows(named=True)}
    p1 = got["P1"]  # first by date is PRE, though "MID" < "POST" < "PRE" by name
    assert (p1["first_session"], p1["last_session"], p1["scores"]) == ("PRE", "POST", 3)
    assert (p1["first"], p1["last"], p1["change"], p1["pct_change"]) == (15, 6, -9, -60)
    assert p1["response"] is True and p1["remission"] is False  # 6 <= 7.5, but 6 >= 5
    assert p1["rci"] == pytest.approx(-9 / S_DIFF_PHQ9) and p1["reliable_change"] == "improved"
    p2 = got["P2"]  # -3 / 1.98 = -1.52
    assert (p2["scores"], p2["change"], p2["response"], p2["remission"]) == (2, -3, False, False)
    assert p2["reliable_change"] == "no reliable change"
    p3 = got["P3"]  # +4 / 1.98 = 2.02
    assert p3["rci"] == pytest.approx(4 / S_DIFF_PHQ9) and p3["reliable_change"] == "deteriorated"
    assert p3["pct_change"] == 80 and p3["response"] is False
    p4 = got["P4"]  # 8 -> 4: exactly a 50 % drop, and below 5
    assert (p4["last"], p4["response"], p4["remission"]) == (4, True, True)
    assert p4["reliable_change"] == "improved"  # -4 / 1.98 = -2.02
    p5 = got["P5"]  # one score: no change to speak of
    assert p5["scores"] == 1 and p5["first"] == p5["last"] == 12
    assert all(p5[k] is None for k in ("change", "response", "remission", "rci"))
    p6 = got["P6"]  # 0 -> 0: no percentage of 0, in remission
    assert (p6["change"], p6["pct_change"], p6["response"], p6["remission"]) == (
        0,
        None,
        None,
        True,
    )
    assert p6["reliable_change"] == "no reliable change"


def test_change_over_time_follows_each_instruments_definition():
    inst = instrument("pss10")  # SD 6.35, alpha .78 (Cohen & Williamson 1988): S_diff 4.21
    first = {c: (0 if c in inst.reverse else 4) for c in inst.items}  # 40
    last = dict(first) | {"pss_1": 0, "pss_2": 0, "pss_3": 2}  # 40 - 10 = 30
    table = pl.DataFrame(
        [first | {"participant": "A", "date": "1"}, last | {"participant": "A", "date": "2"}]
    )
    row = change_over_time(table, inst).row(0, named=True)
    s_diff = math.sqrt(2) * 6.35 * math.sqrt(1 - 0.78)
    assert (row["first"], row["last"]) == (40, 30)
    assert row["rci"] == pytest.approx(-10 / s_diff) and row["reliable_change"] == "improved"
    assert row["response"] is None and row["remission"] is None  # PSS-10 defines neither

    who = instrument("who5")  # higher is better; no SD or reliability cited: no RCI
    rows = [{c: 1 for c in who.items}, {c: 4 for c in who.items}]
    table = pl.DataFrame([r | {"participant": "B", "date": str(i)} for i, r in enumerate(rows)])
    row = workbench.change_over_time(table, "who5").row(0, named=True)
    assert (row["first"], row["last"], row["change"]) == (20, 80, 60)
    assert row["rci"] is None and row["reliable_change"] is None


def test_methods_name_the_rules_and_sources_and_end_the_page(tmp_path):
    text = questionnaire_methods([instrument("phq9"), instrument("pss10")])
    for needed in [
        "Kroenke K, Spitzer RL, Williams JBW. The PHQ-9",
        "at least 7 of its 9 items answered was prorated",
        "minimal 0 to below 5",
        "severe 20 to 27",
        "pss_4, pss_5, pss_7, pss_8 reverse-keyed",
        "r = 0.84",
        "SD = 3.5",
        "below 5",
        "Jacobson NS, Truax P",
        "Cronbach LJ",
        "sqrt(2) * SD * sqrt(1 - r)",
    ]:
        assert needed in text, needed
    write_report(tmp_path, "q", {"t": pl.DataFrame({"x": [1]})}, title="Q", methods=text + " <b>")
    page = (tmp_path / "q.html").read_text()
    assert page.index("<h2 id='methods'>Methods</h2>") > page.index("<table>")
    assert "Jacobson NS, Truax P" in page and "&lt;b&gt;" in page and " <b>" not in page
    write_report(tmp_path, "plain", {"t": pl.DataFrame({"x": [1]})}, title="Q")
    assert "Methods" not in (tmp_path / "plain.html").read_text()


# --- the questionnaire report, from tables exported through a study server ------------------

exported = test_reports.exported  # the fixture: a source exported from a study server


def test_questionnaire_report_has_reliability_change_and_methods(exported):
    from click.testing import CliRunner

    from workbench.cli import cli
    from workbench.decoded import combine_table
    from workbench.instruments import last_per_session
    from workbench.reports import change_report, reliability_report

    config, _tables = exported
    phq9 = last_per_session(combine_table(config, "mindtrails", "PHQ9"))
    report = reliability_report(config, "mindtrails")
    alpha = report["reliability"].filter((pl.col("table") == "PHQ9") & (pl.col("session") == "PRE"))
    assert alpha["instrument"].to_list() == ["phq9"]
    items = instrument("phq9").items
    answers = (
        phq9.filter(pl.col("session") == "PRE")
        .select(pl.col(items).cast(pl.Float64))
        .select(
            pl.when(pl.col(c).is_in([0.0, 1.0, 2.0, 3.0])).then(pl.col(c)).alias(c) for c in items
        )
        .drop_nulls()  # the out-of-range 7, the 1.5, blanks and 555/-1 codes leave their row out
        .to_numpy()
    )
    cov = np.cov(answers, rowvar=False)
    by_formula = 9 / 8 * (1 - np.trace(cov) / cov.sum())
    assert alpha["alpha"][0] == pytest.approx(by_formula, abs=1e-12)
    assert alpha["n_complete"][0] == answers.shape[0]
    items = report["item_total"].filter((pl.col("table") == "PHQ9") & (pl.col("session") == "PRE"))
    assert items["item"].to_list() == instrument("phq9").items

    change = change_report(config, "mindtrails").filter(pl.col("table") == "PHQ9")
    expected = change_over_time(combine_table(config, "mindtrails", "PHQ9"), "phq9")
    assert change.drop("source", "table", "instrument").equals(expected)
    assert set(change["participant"]) == set(phq9["participant"])

    result = CliRunner().invoke(cli, ["--home", str(config.home), "report", "questionnaire"])
    assert result.exit_code == 0, result.output
    assert "with alpha below 0.7" in result.output
    folder = config.pool / "reports" / "questionnaires"
    page = (folder / "quality_all.html").read_text()
    for section in ["reliability", "item total", "change", "Methods"]:
        assert f">{section}</h2>" in page, section
    assert "Patient Health Questionnaire-9" in page and "Jacobson NS, Truax P" in page
    assert (folder / "quality_all_change.csv").exists()


def test_cli_score_refuses_the_wrong_instrument(exported):
    from click.testing import CliRunner

    from workbench.cli import cli

    config, _tables = exported
    result = CliRunner().invoke(
        cli, ["--home", str(config.home), "score", "GAD7", "--instrument", "phq9"]
    )
    assert result.exit_code == 2
    assert "lacks 9 of phq9's 9 item columns" in result.output and "gad7" in result.output
    assert len(result.output.strip().splitlines()) == 1
