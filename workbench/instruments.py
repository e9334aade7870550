"""Questionnaire instruments as data, and scoring them.

An instrument is a JSON file in ``data_templates/instruments/`` (schema:
``data_templates/schemas/instrument.schema.json``): its items and the columns they are read
from, the response range, reverse-keyed items, codes that mean missing, the minimum number of
answered items and the proration rule, subscales, severity bands, citation and licence. Adding
an instrument needs no code.

Scoring adds, for instrument ``phq9``: ``phq9_total``, ``phq9_<subscale>`` for each subscale
(with ``phq9_<subscale>_band`` when it has bands), ``phq9_band``, ``phq9_missing`` (items blank,
coded missing, out of range or not whole) and ``phq9_valid``; an instrument with safety items
(PHQ-9: item 9 at 1 or more) also gets ``phq9_safety``: true when any safety item is at or above
its threshold, null when a safety item is missing (blank, a missing code, invalid: proration
never fills it in), false otherwise.

Example::

    scored = score(combine_table(config, "mindtrails", "PHQ9"), "phq9")
    instrument("phq9").items  # ['interest', 'depressed', ...]
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import polars as pl

from workbench.errors import InvalidDefinition, UnknownInstrument, WorkbenchError
from workbench.templates import TEMPLATES_DIR, load_schema, schema_validator

INSTRUMENTS_DIR = TEMPLATES_DIR / "instruments"


@dataclass(frozen=True)
class Scale:
    """The total or a subscale: its name, item columns, minimum answered and bands."""

    id: str
    columns: tuple[str, ...]
    min_answered: int
    bands: tuple[tuple[float, float, str], ...] = ()


@dataclass(frozen=True)
class SafetyItem:
    """A safety item: its column, the threshold that calls for action, what that means and
    what to do."""

    item: str
    threshold: float
    label: str
    action: str


@dataclass(frozen=True)
class Instrument:
    """A loaded instrument definition (see the module docstring)."""

    id: str
    name: str
    definition: dict
    scales: tuple[Scale, ...]  # the total first, when the instrument has one

    @property
    def items(self) -> list[str]:
        """The item column names, in order."""
        return [item["column"] for item in self.definition["items"]]

    @property
    def safety(self) -> tuple[SafetyItem, ...]:
        """The safety items (none for most instruments)."""
        return tuple(
            SafetyItem(s["item"], s["threshold"], s["label"], s["action"])
            for s in self.definition.get("safety", [])
        )

    @property
    def minimum(self) -> int:
        return self.definition["response"]["min"]

    @property
    def maximum(self) -> int:
        return self.definition["response"]["max"]

    @property
    def missing_codes(self) -> list[float]:
        return [float(code) for code in self.definition.get("missing_codes", [])]

    @property
    def reverse(self) -> set[str]:
        return {i["column"] for i in self.definition["items"] if i.get("reverse")}

    @property
    def has_total(self) -> bool:
        return self.definition["scoring"].get("total", True)

    def score_range(self, scale: Scale) -> tuple[float, float]:
        """Lowest and highest possible score of a scale."""
        rule = self.definition["scoring"]
        factor = rule.get("multiplier", 1)
        n = len(scale.columns)
        return self.minimum * n * factor, self.maximum * n * factor


def list_instruments() -> list[str]:
    """Ids of the instruments in ``data_templates/instruments/``."""
    return sorted(p.stem for p in INSTRUMENTS_DIR.glob("*.json"))


@functools.cache
def instrument(name: str) -> Instrument:
    """The instrument ``name`` (e.g. ``"phq9"``), validated against its schema.

    Example: ``instrument("gad7").items``.
    """
    path = INSTRUMENTS_DIR / f"{name}.json"
    if not path.is_file():
        raise UnknownInstrument(
            f"no instrument {name!r}; known: {', '.join(list_instruments()) or 'none'}"
        )
    definition = json.loads(path.read_text(encoding="utf-8"))
    errors = list(schema_validator(load_schema("instrument")).iter_errors(definition))
    if errors:
        raise InvalidDefinition(f"{path.name}: {errors[0].message}")
    if definition["id"] != name:
        raise InvalidDefinition(f"{path.name}: its id is {definition['id']!r}, not {name!r}")
    columns = [i["column"] for i in definition["items"]]
    rule = definition["scoring"]
    scales = []
    if rule.get("total", True):
        scales.append(
            Scale(
                "total", tuple(columns), rule["min_answered"], _bands(definition.get("bands", []))
            )
        )
    for sub in definition.get("subscales", []):
        unknown = set(sub["items"]) - set(columns)
        if unknown:
            raise InvalidDefinition(
                f"{path.name}: subscale {sub['id']} names unknown items {sorted(unknown)}"
            )
        scales.append(
            Scale(sub["id"], tuple(sub["items"]), sub["min_answered"], _bands(sub.get("bands", [])))
        )
    if not scales:
        raise InvalidDefinition(f"{path.name}: neither a total nor subscales to score")
    unsafe = {s["item"] for s in definition.get("safety", [])} - set(columns)
    if unsafe:
        raise InvalidDefinition(f"{path.name}: safety names unknown items {sorted(unsafe)}")
    return Instrument(id=name, name=definition["name"], definition=definition, scales=tuple(scales))


def _bands(raw: list[dict]) -> tuple[tuple[float, float, str], ...]:
    return tuple((b["min"], b["max"], b["label"]) for b in raw)


def score(table, name: str | Instrument):
    """``table`` with the instrument's score columns added (see the module docstring).

    Takes a polars or a pandas DataFrame and returns the same kind. Item columns the table
    lacks count as unanswered; a table with none of them is an error.

    Example: ``score(pl.DataFrame({"interest": [1], ...}), "phq9")["phq9_total"]``.
    """
    inst = name if isinstance(name, Instrument) else instrument(name)
    was_pandas = not isinstance(table, pl.DataFrame)
    frame = _from_pandas(table) if was_pandas else table
    present = [c for c in inst.items if c in frame.columns]
    if not present:
        raise WorkbenchError(
            f"the table has none of {inst.id}'s item columns ({', '.join(inst.items)})"
        )
    scored = _score_frame(frame, inst)
    return _to_pandas(scored) if was_pandas else scored


def _from_pandas(table) -> pl.DataFrame:
    try:
        return pl.from_pandas(table)
    except ImportError:  # polars converts through pyarrow when it is installed
        return pl.DataFrame({str(c): table[c].tolist() for c in table.columns}, strict=False)


def _to_pandas(frame: pl.DataFrame):
    try:
        return frame.to_pandas()
    except ImportError:
        import pandas as pd

        return pd.DataFrame(frame.to_dict(as_series=False))


def _score_frame(frame: pl.DataFrame, inst: Instrument) -> pl.DataFrame:
    """Add the score columns in stages, each reading the columns of the one before.

    Each usable answer is coded as ``answer - min + M`` (0 when missing), with M larger than any
    sum of ``answer - min`` over the items: one horizontal sum per scale then carries both the
    number of answered items (``sum // M``) and their sum (``sum % M``), so the data is read
    once for both.
    """
    rule = inst.definition["scoring"]
    mean = rule.get("proration", "mean") == "mean"
    factor = rule.get("multiplier", 1)
    rounding = rule.get("round", True)
    low = inst.minimum
    big = (inst.maximum - low) * len(inst.items) + 1
    tag = f"__{inst.id}_"
    code = {c: f"{tag}item_{i}" for i, c in enumerate(inst.items)}
    stage1 = [_code(inst, c, frame.schema.get(c), big).alias(name) for c, name in code.items()]
    packed = {s.id: pl.sum_horizontal([pl.col(code[c]) for c in s.columns]) for s in inst.scales}
    if not any(len(s.columns) == len(code) for s in inst.scales):
        packed["__all"] = pl.sum_horizontal(list(code.values()))
    stage2 = [value.alias(f"{tag}{key}") for key, value in packed.items()]
    everything = next((s.id for s in inst.scales if len(s.columns) == len(code)), "__all")
    stage3 = [(len(inst.items) - pl.col(f"{tag}{everything}") // big).alias(f"{inst.id}_missing")]
    whole = rounding and float(factor).is_integer()
    for scale in inst.scales:
        p = pl.col(f"{tag}{scale.id}")
        answered = p // big
        total = p % big + answered * low  # the sum of the answered items
        items = len(scale.columns)
        if whole and mean:  # floor(m * total * items / answered + 1/2) in integers
            value = (2 * int(factor) * items * total + answered) // (2 * answered)
        elif whole:
            value = int(factor) * total
        else:
            value = total.cast(pl.Float64) * factor
            if mean:
                value = value * items / answered
            if rounding:
                value = (value + 0.5).floor().cast(pl.Int64)
        stage3.append(
            pl.when(answered >= scale.min_answered).then(value).alias(f"{inst.id}_{scale.id}")
        )
    stage4 = []
    for scale in inst.scales:
        if scale.bands:
            name = f"{inst.id}_band" if scale.id == "total" else f"{inst.id}_{scale.id}_band"
            stage4.append(_band(inst, scale, pl.col(f"{inst.id}_{scale.id}"), rounding).alias(name))
    scored = [pl.col(f"{inst.id}_{s.id}").is_not_null() for s in inst.scales]
    valid = scored[0] if inst.has_total else pl.all_horizontal(scored)
    stage4.append(valid.alias(f"{inst.id}_valid"))
    if inst.safety:
        stage4.append(_safety(inst, frame.schema).alias(f"{inst.id}_safety"))
    return (
        frame.lazy()
        .with_columns(stage1)
        .with_columns(stage2)
        .with_columns(stage3)
        .with_columns(stage4)
        .select(pl.exclude(f"^{tag}.*$"))
        .collect()
    )


def _code(inst: Instrument, column: str, dtype, big: int) -> pl.Expr:
    """An item's usable answer (reverse-keyed if need be) as ``answer - min + big``, or 0 when
    it is missing: blank, a missing code, out of range or not a whole number."""
    if dtype is None:
        return pl.lit(0, dtype=pl.Int64)
    if dtype.is_integer():
        value = pl.col(column).cast(pl.Int64)
        usable = value.is_between(inst.minimum, inst.maximum)
    else:
        number = pl.col(column).cast(pl.Float64, strict=False)
        usable = number.is_between(inst.minimum, inst.maximum) & (number == number.floor())
        value = number.cast(pl.Int64, strict=False)
    codes = [c for c in inst.missing_codes if inst.minimum <= c <= inst.maximum]
    if codes:  # a code inside the response range (codes outside it fail the range check)
        usable = usable & ~value.cast(pl.Float64).is_in(codes)
    if column in inst.reverse:
        value = inst.minimum + inst.maximum - value
    return pl.when(usable).then(value - inst.minimum + big).otherwise(0)


def _safety(inst: Instrument, schema) -> pl.Expr:
    """True when any safety item is at or above its threshold; else null when one is missing
    (blank, a missing code, out of range, not whole, or no such column); else false."""
    positive, missing = [], []
    for rule in inst.safety:
        if rule.item not in schema:
            missing.append(pl.lit(True))
            continue
        number = pl.col(rule.item).cast(pl.Float64, strict=False)
        usable = number.is_between(inst.minimum, inst.maximum) & (number == number.floor())
        if inst.missing_codes:
            usable = usable & ~number.is_in(inst.missing_codes)
        usable = usable.fill_null(False)
        positive.append(usable & (number >= rule.threshold))
        missing.append(~usable)
    return (
        pl.when(pl.any_horizontal(positive) if positive else pl.lit(False))
        .then(pl.lit(True))
        .when(pl.any_horizontal(missing))
        .then(pl.lit(None, dtype=pl.Boolean))
        .otherwise(pl.lit(False))
    )


def _band(inst: Instrument, scale: Scale, value: pl.Expr, whole: bool) -> pl.Expr:
    labels = list(dict.fromkeys(label for _low, _high, label in scale.bands))
    if whole:  # whole scores: one lookup per row, into an enum of the band labels
        low, high = inst.score_range(scale)
        mapping = {
            k: next((b[2] for b in scale.bands if b[0] <= k <= b[1]), None)
            for k in range(int(math.floor(low)), int(math.ceil(high)) + 1)
        }
        return value.replace_strict(mapping, default=None, return_dtype=pl.Enum(labels))
    band = pl.lit(None, dtype=pl.String)
    for low, high, label in reversed(scale.bands):
        band = pl.when(value.is_between(low, high)).then(pl.lit(label)).otherwise(band)
    return band.cast(pl.Enum(labels))


def reverse_key(values: pl.Series, inst: Instrument) -> pl.Series:
    """Reverse-keyed answers on the instrument's response range (min + max - value)."""
    return inst.minimum + inst.maximum - values


# ---------------------------------------------------------------------------- transforms


def last_per_session(
    table: pl.DataFrame,
    *,
    participant: str = "participant",
    session: str = "session",
    order: str = "date",
) -> pl.DataFrame:
    """One row per participant and session: the last answer (by ``order``, then id).

    Example: ``last_per_session(combine_table(config, "mindtrails", "PHQ9"))``.
    """
    keys = [order] + (["id"] if "id" in table.columns and order != "id" else [])
    return (
        table.sort(keys, nulls_last=False)
        .unique(subset=[participant, session], keep="last", maintain_order=True)
        .sort(participant, session)
    )


def wide_by_session(
    table: pl.DataFrame,
    columns: list[str],
    *,
    participant: str = "participant",
    session: str = "session",
    order: str = "date",
) -> pl.DataFrame:
    """One row per participant, one column per ``<column>_<session>`` (the last answer).

    Example: ``wide_by_session(score(t, "phq9"), ["phq9_total"])``.
    """
    last = last_per_session(table, participant=participant, session=session, order=order)
    wide = last.pivot(on=session, index=participant, values=columns)
    if len(columns) == 1:  # polars names single-value pivots by the session alone
        wide = wide.rename({c: f"{columns[0]}_{c}" for c in wide.columns if c != participant})
    return wide.sort(participant)
