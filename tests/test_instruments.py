"""Instruments as data and scoring: hand-worked cases, properties, transforms."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.errors import InstrumentMismatch, InvalidDefinition, UnknownInstrument
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
    shipped = {"phq9", "phq8", "gad7", "dass21", "pss10", "who5", "phq2", "gad2"}
    assert shipped <= set(list_instruments())
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


def _home_instrument(config, base: str, new_id: str, change=lambda d: None) -> None:
    definition = json.loads((TEMPLATES_DIR / "instruments" / f"{base}.json").read_text())
    definition["id"] = new_id
    change(definition)
    folder = config.home / "instruments"
    folder.mkdir(exist_ok=True)
    (folder / f"{new_id}.json").write_text(json.dumps(definition))


def test_reverse_keyed_items_are_scored_reversed(home):
    def reverse_relax(d):
        d["items"][3]["reverse"] = True  # "trouble relaxing" read the other way round

    _home_instrument(home, "gad7", "gad7r", reverse_relax)
    row = {c: 0 for c in instrument("gad7r", config=home).items}
    assert score(pl.DataFrame([row]), "gad7r", config=home)["gad7r_total"].to_list() == [3]


def test_a_home_instrument_adds_to_and_overrides_the_shipped_ones(home):
    assert "gad7r" not in list_instruments(config=home)
    _home_instrument(home, "gad7", "gad7r")
    assert "gad7r" in list_instruments(config=home) and "gad7r" not in list_instruments()
    with pytest.raises(UnknownInstrument):
        instrument("gad7r")  # without the home, only the shipped ones

    def lower_cut(d):  # a study that calls 4 "mild" already
        d["bands"][0]["max"], d["bands"][1]["min"] = 3, 4

    _home_instrument(home, "phq9", "phq9", lower_cut)
    row = {c: 0 for c in instrument("phq9").items} | {"interest": 2, "depressed": 2}
    assert score(pl.DataFrame([row]), "phq9", config=home)["phq9_band"].to_list() == ["mild"]
    assert score(pl.DataFrame([row]), "phq9")["phq9_band"].to_list() == ["minimal"]
    assert instrument("phq9", config=home).path == home.home / "instruments" / "phq9.json"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not a readable JSON file"),
        ('{"id": "broken", "name": "x"}', "'items' is a required property"),
        (None, "bands of total: must cover the possible scores 0-21"),
        ("overlap", "'minimal' (0-5) must end before 'mild' (5)"),
    ],
)
def test_a_bad_home_instrument_names_its_file(home, text, message):
    folder = home.home / "instruments"
    folder.mkdir()
    if text in (None, "overlap"):
        definition = json.loads((TEMPLATES_DIR / "instruments" / "gad7.json").read_text())
        definition["id"] = "broken"
        if text is None:
            definition["bands"] = definition["bands"][:-1]  # nothing for 15-21
        else:
            definition["bands"][0]["max"] = 5
        text = json.dumps(definition)
    (folder / "broken.json").write_text(text)
    with pytest.raises(InvalidDefinition) as caught:
        instrument("broken", config=home)
    assert str(folder / "broken.json") in str(caught.value) and message in str(caught.value)


def test_an_instrument_name_never_leaves_the_folders(home):
    (home.home / "evil.json").write_text("{}")
    for name in ["../evil", "PHQ9", "phq9/../gad7", ""]:
        with pytest.raises(UnknownInstrument):
            instrument(name, config=home)


def test_a_table_missing_item_columns_is_refused_and_names_them():
    phq8 = pl.DataFrame({c: [1] for c in instrument("phq8").items})  # 8 × 1
    with pytest.raises(InstrumentMismatch) as caught:
        score(phq8, "phq9")
    assert "suicidal" in caught.value.message and "fits" in caught.value.message
    assert caught.value.details["missing"] == ["suicidal"]
    assert "phq8" in caught.value.details["fits"]
    assert score(phq8, "phq8")["phq8_total"].to_list() == [8]  # not a prorated 9
    with pytest.raises(InstrumentMismatch, match="lacks 7 of gad7's 7"):
        score(pl.DataFrame({"x": [1]}), "gad7")


def _answers_for(inst, scale, raw: int) -> dict:
    """Answers whose (reverse-keyed) sum over the scale is ``raw``; other items at minimum."""
    row = {c: inst.minimum for c in inst.items}
    left = raw
    for c in scale.columns:
        step = min(left, inst.maximum - inst.minimum)
        left -= step
        keyed = inst.minimum + step
        row[c] = inst.minimum + inst.maximum - keyed if c in inst.reverse else keyed
    for c in set(inst.items) - set(scale.columns):
        row[c] = inst.maximum if c in inst.reverse else inst.minimum
    return row


@pytest.mark.parametrize("name", ["phq9", "phq8", "gad7", "dass21", "who5", "phq2", "gad2"])
def test_every_whole_score_has_the_band_its_definition_states(name):
    inst = instrument(name)
    factor = inst.definition["scoring"].get("multiplier", 1)
    for scale in inst.scales:
        if not scale.bands:
            continue
        top = (inst.maximum - inst.minimum) * len(scale.columns)
        rows = [_answers_for(inst, scale, raw) for raw in range(top + 1)]
        out = score(pl.DataFrame(rows), inst)
        column = f"{inst.id}_band" if scale.id == "total" else f"{inst.id}_{scale.id}_band"
        got = out.select(f"{inst.id}_{scale.id}", column).rows()
        for raw, (value, band) in enumerate(got):
            assert value == raw * factor
            stated = [b["label"] for b in _raw_bands(inst, scale) if b["min"] <= value <= b["max"]]
            assert [band] == stated, (scale.id, value)


def _raw_bands(inst, scale):
    if scale.id == "total":
        return inst.definition["bands"]
    return next(s["bands"] for s in inst.definition["subscales"] if s["id"] == scale.id)


@pytest.mark.parametrize(
    ("answered", "total", "expected_score", "band"),
    [
        (8, 4, 4.5, "minimal"),  # 4 / 8 × 9: between the whole bands 0-4 and 5-9
        (9, 5, 5.0, "mild"),  # exactly at the cut-off 5
        (7, 3, 27 / 7, "minimal"),
        (7, 7, 9.0, "mild"),
        (8, 9, 10.125, "moderate"),
        (7, 15, 135 / 7, "moderately severe"),  # 19.29, between 15-19 and 20-27
        (8, 18, 20.25, "severe"),
        (9, 27, 27.0, "severe"),  # the top, included
    ],
)
def test_unrounded_scores_fall_in_half_open_bands(home, answered, total, expected_score, band):
    _home_instrument(home, "phq9", "phq9x", lambda d: d["scoring"].update(round=False))
    inst = instrument("phq9x", config=home)
    row = {c: None for c in inst.items}
    left = total
    for c in inst.items[:answered]:
        row[c] = min(left, 3)
        left -= row[c]
    out = score(pl.DataFrame([row], schema={c: pl.Float64 for c in inst.items}), inst)
    assert out["phq9x_total"][0] == pytest.approx(expected_score)
    assert out["phq9x_band"].to_list() == [band]


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
