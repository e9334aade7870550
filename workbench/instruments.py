"""Questionnaire instruments as data, and scoring them.

An instrument is a JSON file (schema: ``data_templates/schemas/instrument.schema.json``): its
items and the columns they are read from, the response range, reverse-keyed items, codes that
mean missing, the minimum number of answered items and the proration rule, subscales, severity
bands, what counts as change (remission, reliability, normative SD), citation and licence.
The workbench ships some in ``data_templates/instruments/``; a study team adds its own, or
overrides a shipped one, with ``<home>/instruments/<id>.json`` (pass the home's ``config``).
Adding an instrument needs no code.

Scoring adds, for instrument ``phq9``: ``phq9_total``, ``phq9_<subscale>`` for each subscale
(with ``phq9_<subscale>_band`` when it has bands), ``phq9_band``, ``phq9_missing`` (items blank,
coded missing, out of range or not whole) and ``phq9_valid``. A table that lacks any of the
instrument's item columns is refused (:class:`InstrumentMismatch`): a PHQ-8 table is scored as
``phq8``, never as a PHQ-9 with one item "missing".

Bands are half-open: a band runs from its ``min`` up to, not including, the next band's ``min``;
the last band includes its ``max``. Every score in the instrument's range has exactly one band,
whole or not (a PHQ-9 of 4.5 is "minimal", below the cut-off 5).

An instrument with safety items (PHQ-9: item 9 at 1 or more) also gets ``phq9_safety``: true
when any safety item is at or above its threshold, null when a safety item is missing (blank, a
missing code, invalid: proration never fills it in), false otherwise.

Example::

    scored = score(combine_table(config, "mindtrails", "PHQ9"), "phq9", config=config)
    instrument("phq9").items  # ['interest', 'depressed', ...]
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from workbench.errors import InstrumentMismatch, InvalidDefinition, UnknownInstrument
from workbench.templates import TEMPLATES_DIR, load_schema, schema_validator

if TYPE_CHECKING:
    from workbench.config import Config

INSTRUMENTS_DIR = TEMPLATES_DIR / "instruments"
HOME_FOLDER = "instruments"  # <home>/instruments/<id>.json
INSTRUMENT_ID = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class Scale:
    """The total or a subscale: its name, item columns, minimum answered and bands."""

    id: str
    columns: tuple[str, ...]
    min_answered: int
    bands: tuple[tuple[float, float, str], ...] = ()

    def band_intervals(self) -> list[tuple[float, float, bool, str]]:
        """Each band as (lower, upper, upper included, label): [min, next min), the last
        [min, max]."""
        out = []
        for i, (low, high, label) in enumerate(self.bands):
            last = i == len(self.bands) - 1
            out.append((low, high if last else self.bands[i + 1][0], last, label))
        return out


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
    path: Path | None = None  # the file it was read from

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

    @property
    def change(self) -> dict:
        """What counts as change: ``better``, ``response_drop_pct``, ``remission_below``,
        ``reliability`` and ``sd`` (each optional; see the schema)."""
        return self.definition.get("change", {})

    def scale(self, name: str) -> Scale:
        """The scale ``name`` ("total" or a subscale id)."""
        for s in self.scales:
            if s.id == name:
                return s
        raise UnknownInstrument(
            f"{self.id} has no scale {name!r}; it has {', '.join(s.id for s in self.scales)}"
        )

    def score_range(self, scale: Scale) -> tuple[float, float]:
        """Lowest and highest possible score of a scale."""
        rule = self.definition["scoring"]
        factor = rule.get("multiplier", 1)
        n = len(scale.columns)
        return self.minimum * n * factor, self.maximum * n * factor


def home_instruments_dir(config: Config) -> Path:
    """The home's folder of instrument definitions, ``<home>/instruments``."""
    return Path(config.home) / HOME_FOLDER


def _folders(config: Config | None) -> list[Path]:
    """Where definitions are looked up, the first found winning: the home, then shipped."""
    return ([home_instruments_dir(config)] if config is not None else []) + [INSTRUMENTS_DIR]


def list_instruments(*, config: Config | None = None) -> list[str]:
    """Ids of the shipped instruments and, with ``config``, those in ``<home>/instruments/``.

    Example: ``list_instruments(config=load_config("~/lab"))``.
    """
    return sorted(
        {p.stem for folder in _folders(config) if folder.is_dir() for p in folder.glob("*.json")}
    )


def instrument(name: str, *, config: Config | None = None) -> Instrument:
    """The instrument ``name`` (e.g. ``"phq9"``), validated against its schema; with
    ``config``, ``<home>/instruments/<name>.json`` overrides the shipped definition.

    Example: ``instrument("gad7").items``.
    """
    if INSTRUMENT_ID.fullmatch(name or ""):
        for folder in _folders(config):
            path = folder / f"{name}.json"
            if path.is_file():
                stat = path.stat()
                return _load(str(path), stat.st_mtime_ns, stat.st_size)
    raise UnknownInstrument(
        f"no instrument {name[:40]!r}; known: "
        f"{', '.join(list_instruments(config=config)) or 'none'}"
    )


@functools.lru_cache(maxsize=256)
def _load(location: str, _mtime_ns: int, _size: int) -> Instrument:
    """Read and check one definition (cached while the file is unchanged)."""
    path = Path(location)
    name = path.stem
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidDefinition(f"{path}: not a readable JSON file ({exc})") from exc
    errors = list(schema_validator(load_schema("instrument")).iter_errors(definition))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "top level"
        raise InvalidDefinition(f"{path}: {where}: {errors[0].message}")
    if definition["id"] != name:
        raise InvalidDefinition(f"{path}: its id is {definition['id']!r}, not {name!r}")
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
                f"{path}: subscale {sub['id']} names unknown items {sorted(unknown)}"
            )
        scales.append(
            Scale(sub["id"], tuple(sub["items"]), sub["min_answered"], _bands(sub.get("bands", [])))
        )
    if not scales:
        raise InvalidDefinition(f"{path}: neither a total nor subscales to score")
    unsafe = {s["item"] for s in definition.get("safety", [])} - set(columns)
    if unsafe:
        raise InvalidDefinition(f"{path}: safety names unknown items {sorted(unsafe)}")
    inst = Instrument(
        id=name, name=definition["name"], definition=definition, scales=tuple(scales), path=path
    )
    for scale in scales:
        _check_bands(inst, scale, path)
    return inst


def _bands(raw: list[dict]) -> tuple[tuple[float, float, str], ...]:
    return tuple((b["min"], b["max"], b["label"]) for b in raw)


def _check_bands(inst: Instrument, scale: Scale, path: Path) -> None:
    """Bands in order, not overlapping, covering the scale's whole range."""
    if not scale.bands:
        return
    low, high = inst.score_range(scale)
    where = f"{path}: bands of {scale.id}"
    for (a_min, a_max, a_label), (b_min, _b_max, b_label) in itertools.pairwise(scale.bands):
        if not a_min <= a_max < b_min:
            raise InvalidDefinition(
                f"{where}: {a_label!r} ({a_min}-{a_max}) must end before {b_label!r} ({b_min})"
            )
    if scale.bands[0][0] > low or scale.bands[-1][1] < high or scale.bands[-1][0] > high:
        raise InvalidDefinition(
            f"{where}: must cover the possible scores {low:g}-{high:g}, "
            f"not {scale.bands[0][0]:g}-{scale.bands[-1][1]:g}"
        )


def score(table, name: str | Instrument, *, config: Config | None = None):
    """``table`` with the instrument's score columns added (see the module docstring).

    Takes a polars or a pandas DataFrame and returns the same kind. Every item column of the
    instrument must be in the table (blank answers are fine): a table that lacks one raises
    :class:`InstrumentMismatch` naming them. ``config`` finds the home's own instruments.

    Example: ``score(pl.DataFrame({"interest": [1], ...}), "phq9")["phq9_total"]``.
    """
    inst = name if isinstance(name, Instrument) else instrument(name, config=config)
    was_pandas = not isinstance(table, pl.DataFrame)
    frame = _from_pandas(table) if was_pandas else table
    check_columns(frame.columns, inst, config=config)
    scored = _score_frame(frame, inst)
    return _to_pandas(scored) if was_pandas else scored


def check_columns(columns, inst: Instrument, *, config: Config | None = None) -> None:
    """Raise :class:`InstrumentMismatch` unless every item column of ``inst`` is present,
    naming the missing ones and the instruments the columns do fit."""
    have = set(columns)
    missing = [c for c in inst.items if c not in have]
    if not missing:
        return
    fits = []
    for other in list_instruments(config=config):
        try:
            if set(instrument(other, config=config).items) <= have:
                fits.append(other)
        except InvalidDefinition:
            continue  # a broken definition is reported when it is used, not here
    hint = f"; the table fits {', '.join(fits)}" if fits else ""
    raise InstrumentMismatch(
        f"the table lacks {len(missing)} of {inst.id}'s {len(inst.items)} item columns: "
        f"{', '.join(missing)}{hint}",
        missing=missing,
        fits=fits,
    )


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


def _usable(inst: Instrument, column: str, dtype) -> tuple[pl.Expr, pl.Expr]:
    """(is the answer usable, the answer reverse-keyed if need be) for one item column; an
    answer is unusable when blank, a missing code, out of range or not a whole number."""
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
    return usable.fill_null(False), value


def _code(inst: Instrument, column: str, dtype, big: int) -> pl.Expr:
    """An item's usable answer as ``answer - min + big``, or 0 when it is missing."""
    usable, value = _usable(inst, column, dtype)
    return pl.when(usable).then(value - inst.minimum + big).otherwise(0)


def usable_answers(table: pl.DataFrame, inst: Instrument) -> pl.DataFrame:
    """The item columns of ``table`` as scored: reverse-keyed where the instrument says so,
    null where the answer is blank, coded missing, out of range or not whole.

    Example: ``usable_answers(phq9_table, instrument("phq9")).drop_nulls()``.
    """
    check_columns(table.columns, inst)
    return table.select(
        pl.when(usable).then(value).otherwise(None).alias(c)
        for c in inst.items
        for usable, value in [_usable(inst, c, table.schema[c])]
    )


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
    intervals = scale.band_intervals()

    def label_of(x: float) -> str | None:
        return next(
            (b for lo, up, closed, b in intervals if lo <= x and (x < up or (closed and x == up))),
            None,
        )

    if whole:  # whole scores: one lookup per row, into an enum of the band labels
        low, high = inst.score_range(scale)
        mapping = {k: label_of(k) for k in range(int(math.floor(low)), int(math.ceil(high)) + 1)}
        return value.replace_strict(mapping, default=None, return_dtype=pl.Enum(labels))
    band = pl.lit(None, dtype=pl.String)
    for low, up, closed, label in reversed(intervals):
        inside = (value >= low) & ((value <= up) if closed else (value < up))
        band = pl.when(inside).then(pl.lit(label)).otherwise(band)
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
