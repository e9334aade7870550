"""CSV output of tables: the one writer every CSV of the workbench goes through.

A spreadsheet runs a cell that begins with ``=``, ``+``, ``-`` or ``@`` as a formula (and some
also after a leading tab or carriage return), so an answer such as ``=HYPERLINK(...)`` in a
questionnaire could act on the machine of whoever opens the file. As OWASP recommends
(CSV injection), every text cell, and every column name, that begins with one of those
characters is written with a single quote in front: ``'=HYPERLINK(...)``. Numeric columns are
never touched (``-3`` in an integer column stays ``-3``); a text cell ``"-3"`` is text, and is
neutralised like any other. Parquet files keep the values exactly as they are.

Example::

    write_file_atomically(path, csv_bytes(frame))
"""

from __future__ import annotations

import polars as pl

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_FORMULA_PATTERN = r"^[=+\-@\t\r]"


def neutralise_text(value: str) -> str:
    """``value`` with a single quote in front if a spreadsheet would run it as a formula.

    Example: ``neutralise_text("=1+1")`` -> ``"'=1+1"``.
    """
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def neutralise_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with every text cell and column name that starts like a formula quoted;
    numbers, dates and booleans untouched.

    Example: ``neutralise_frame(pl.DataFrame({"a": ["=1", "x"]}))["a"]`` -> ``["'=1", "x"]``.
    """
    text = [
        name
        for name, dtype in frame.schema.items()
        if dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)
    ]
    if text:
        frame = frame.with_columns(
            pl.when(pl.col(name).cast(pl.String).str.contains(_FORMULA_PATTERN))
            .then(pl.lit("'") + pl.col(name).cast(pl.String))
            .otherwise(pl.col(name).cast(pl.String))
            .alias(name)
            for name in text
        )
    renamed: dict[str, str] = {}
    used = set(frame.columns)
    for name in frame.columns:
        if name.startswith(FORMULA_STARTS):
            new = "'" + name
            while new in used:  # a header "'=x" beside "=x" stays distinct
                new = "'" + new
            used.add(new)
            renamed[name] = new
    return frame.rename(renamed) if renamed else frame


def csv_bytes(frame: pl.DataFrame, *, datetime_format: str | None = None) -> bytes:
    """``frame`` as CSV bytes (UTF-8, a header line) with formula-like text neutralised.

    Example: ``csv_bytes(pl.DataFrame({"a": ["@SUM(A1)"], "b": [-3]}))`` ->
    ``b"a,b\\n'@SUM(A1),-3\\n"``.
    """
    return neutralise_frame(frame).write_csv(datetime_format=datetime_format).encode()
