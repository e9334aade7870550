"""Instruments as data and scoring: hand-worked cases, properties, transforms."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.errors import UnknownInstrument
from workbench.instruments import (
    instrument,
    last_per_session,
    list_instruments,
    reverse_key,
    score,
    wide_by_session,
)
from workbench.templates import TEMPLATES_DIR, load_schema

CASES = json.loads((Path(__file__).parent / "data" / "instrument_cases.json").read_text())


def test_the_shipped_instruments_are_valid_and_complete():
    assert {"phq9", "phq8", "gad7", "dass21"} <= set(list_instruments())
    validator = jsonschema.Draft202012Validator(load_schema("instrument"))
    for path in (TEMPLATES_DIR / "instruments").glob("*.json"):
        definition = json.loads(path.read_text())
        assert not list(validator.iter_errors(definition)), path
        assert definition["citation"] and definition["licence"]
    assert instrument("phq9").items == [
        "interest", "depressed", "sleep", "tired", "appetite",
        "failure", "concentration", "slow", "suicidal",
    ]  # fmt: skip
    assert [s.id for s in instrument("dass21").scales] == ["depression", "anxiety", "stress"]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['instrument']}-{i}" for i, c in enumerate(CASES)])
def test_hand_worked_cases(case):
    inst = instrument(case["instrument"])
    row = {column: case["answers"].get(column) for column in inst.items}
    table = pl.DataFrame([row], schema={c: pl.Float64 for c in inst.items})
    got = score(table, inst).row(0, named=True)
    for key, expected in case["expected"].items():
        assert got[key] == expected, (key, case.get("why"))


def test_unknown_instrument():
    with pytest.raises(UnknownInstrument, match="no instrument 'bdi'"):
        instrument("bdi")


def test_pandas_in_pandas_out():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({c: [1, 3] for c in instrument("gad7").items})
    out = score(frame, "gad7")
    assert isinstance(out, pd.DataFrame)
    assert out["gad7_total"].tolist() == [7, 21] and out["gad7_band"].tolist() == ["mild", "severe"]


answers = st.one_of(st.none(), st.integers(-2, 6), st.sampled_from([555, -1, 1.5]))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["phq9", "phq8", "gad7", "dass21"]), st.data())
def test_scores_stay_in_range(name, data):
    inst = instrument(name)
    rows = data.draw(
        st.lists(st.fixed_dictionaries({c: answers for c in inst.items}), min_size=1, max_size=5)
    )
    table = pl.DataFrame(rows, schema={c: pl.Float64 for c in inst.items})
    out = score(table, inst)
    for scale in inst.scales:
        low, high = inst.score_range(scale)
        values = out[f"{inst.id}_{scale.id}"].drop_nulls()
        assert ((values >= low) & (values <= high)).all()
    assert out[f"{inst.id}_missing"].is_between(0, len(inst.items)).all()


@given(st.lists(st.integers(0, 3), min_size=1, max_size=30))
def test_reverse_keying_twice_is_the_identity(values):
    inst = instrument("phq9")
    series = pl.Series(values)
    assert reverse_key(reverse_key(series, inst), inst).to_list() == values
    assert reverse_key(series, inst).is_between(0, 3).all()


def test_reverse_keyed_items_are_scored_reversed(tmp_path, monkeypatch):
    from workbench import instruments as module

    definition = json.loads((TEMPLATES_DIR / "instruments" / "gad7.json").read_text())
    definition["id"] = "gad7r"
    definition["items"][3]["reverse"] = True  # "trouble relaxing" read the other way round
    monkeypatch.setattr(module, "INSTRUMENTS_DIR", tmp_path)
    (tmp_path / "gad7r.json").write_text(json.dumps(definition))
    module.instrument.cache_clear()
    try:
        row = {c: 0 for c in instrument("gad7r").items}
        assert score(pl.DataFrame([row]), "gad7r")["gad7r_total"].to_list() == [3]
    finally:
        module.instrument.cache_clear()


def test_last_per_session_and_wide_by_session():
    table = pl.DataFrame(
        {
            "id": [1, 2, 3, 4],
            "participant": ["P1", "P1", "P1", "P2"],
            "session": ["PRE", "PRE", "POST", "PRE"],
            "date": ["2026-01-01", "2026-01-02", "2026-02-01", "2026-01-05"],
            "x": [1, 2, 3, 4],
        }
    )
    last = last_per_session(table)
    assert last.select("participant", "session", "x").rows() == [
        ("P1", "POST", 3),
        ("P1", "PRE", 2),
        ("P2", "PRE", 4),
    ]
    wide = wide_by_session(table, ["x"])
    assert wide.columns == ["participant", "x_PRE", "x_POST"] or set(wide.columns) == {
        "participant",
        "x_PRE",
        "x_POST",
    }
    assert wide.filter(pl.col("participant") == "P1").select("x_PRE", "x_POST").row(0) == (2, 3)
