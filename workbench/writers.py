"""The table writers: CSV (the one writer every CSV of the workbench goes through), atomic
CSV and Parquet files, tables rendered for a terminal or as JSON, and HTML reports.

A spreadsheet runs a cell that begins with ``=``, ``+``, ``-`` or ``@`` as a formula (and some
also after a leading tab or carriage return), so an answer such as ``=HYPERLINK(...)`` in a
questionnaire could act on the machine of whoever opens the file. As OWASP recommends
(CSV injection), every text cell, and every column name, that begins with one of those
characters is written with a single quote in front: ``'=HYPERLINK(...)``. Numeric columns are
never touched (``-3`` in an integer column stays ``-3``); a text cell ``"-3"`` is text, and is
neutralised like any other. Parquet files keep the values exactly as they are.

Example::

    write_file_atomically(path, csv_bytes(frame))
    write_report(folder, "demo", {"status": table}, title="Status of demo")
"""

from __future__ import annotations

import html
import io
import re
from pathlib import Path

import polars as pl

from workbench.errors import InvalidName
from workbench.pool import make_folders, write_file_atomically

_TIME = pl.Datetime("ms", "UTC")  # the times of status and history tables
CSV_TIME = "%Y-%m-%dT%H:%M:%SZ"
REPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

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


# ---------------------------------------------------------------------------- atomic files


def write_parquet_atomically(frame, path: Path, *, durable: bool = True, **options) -> Path:
    """Write a polars DataFrame as Parquet the way :func:`write_file_atomically` writes bytes."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer, **options)
    return write_file_atomically(path, buffer.getvalue(), durable=durable)


def write_csv_atomically(table: pl.DataFrame, path: Path, *, durable: bool = True) -> Path:
    """Write ``table`` as CSV so that a reader sees the old file or the new one, never a part
    (``durable`` also fsyncs it, for a file that could not be written again)."""
    return write_file_atomically(path, _csv(table), durable=durable)


def _csv(table: pl.DataFrame) -> bytes:
    # The times are UTC: formatting them without a time zone is twice as fast.
    naive = table.with_columns(pl.col(_TIME).dt.replace_time_zone(None))
    return csv_bytes(naive, datetime_format=CSV_TIME)


def render(table: pl.DataFrame, fmt: str) -> bytes:
    """A status (or history) table as ``csv``, ``json`` (a list of objects) or ``table``
    (readable text for a terminal)."""
    if fmt == "csv":
        return _csv(table)
    if fmt == "json":
        import orjson

        plain = table.with_columns(pl.col(_TIME).dt.strftime(CSV_TIME))
        return orjson.dumps(plain.to_dicts(), option=orjson.OPT_INDENT_2) + b"\n"
    if fmt == "table":
        return (_terminal_table(table) + "\n").encode()
    raise ValueError(f"unknown format {fmt!r}")


def _terminal_table(table: pl.DataFrame) -> str:
    if "activity" in table.columns:  # a status table: the columns a coordinator scans
        completeness = [c for c in table.columns if c.endswith("_completeness")]
        view = table.select(
            *(["study"] if "study" in table.columns else []),
            pl.col("subject_name").alias("subject"),
            "app",
            pl.col("device_id").alias("device"),
            pl.col("date_registered").dt.strftime("%Y-%m-%d").alias("registered"),
            pl.col("time_in_study").alias("days"),
            pl.col("status_code").alias("status"),
            "activity",
            pl.col("hours_since_last_data").alias("hours silent"),
            *(pl.col(c).alias(c.removesuffix("_completeness") + " %") for c in completeness),
        )
    else:
        view = table.with_columns(pl.col(_TIME).dt.strftime("%Y-%m-%d %H:%M"))
    with pl.Config(
        tbl_rows=-1,
        tbl_cols=-1,
        tbl_width_chars=1000,
        fmt_str_lengths=120,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        tbl_formatting="ASCII_MARKDOWN",
    ):
        return str(view)


# ---------------------------------------------------------------------------- HTML reports


def write_report(
    folder: Path,
    name: str,
    tables: dict[str, pl.DataFrame],
    *,
    title: str,
    notes: list[str] = (),
    methods: str | None = None,
) -> list[Path]:
    """Write each table as ``<name>_<table>.csv`` and ``.parquet`` and all of them on one HTML
    page ``<name>.html`` in ``folder``; return the paths. ``name`` (a study or source, often
    typed by an operator) is checked before anything is written. ``methods`` (paragraphs
    separated by blank lines) ends the page as its "Methods" section."""
    if not REPORT_NAME.fullmatch(name) or (folder / name).resolve().parent != folder.resolve():
        raise InvalidName(
            f"invalid report name {name[:80]!r}: use letters, digits, '_', '-' and '.', "
            f"starting with a letter or digit (pattern {REPORT_NAME.pattern})"
        )
    make_folders(folder)
    written = []
    for key, table in tables.items():
        stem = f"{name}_{key}" if len(tables) > 1 else name
        written.append(write_file_atomically(folder / f"{stem}.csv", csv_bytes(table)))
        written.append(write_parquet_atomically(table, folder / f"{stem}.parquet", durable=False))
    page = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    page += [f"<p>{html.escape(n)}</p>" for n in notes]
    for key, table in tables.items():
        page.append(f"<h2>{html.escape(key.replace('_', ' '))}</h2>")
        if key == "retention" and table.height > 1:
            page.append(retention_svg(table))
        page.append(_html_table(table))
    if methods:
        page.append("<h2 id='methods'>Methods</h2>")
        page += [
            "<p>" + "<br>".join(html.escape(line) for line in para.splitlines()) + "</p>"
            for para in methods.split("\n\n")
            if para.strip()
        ]
    page.append("</body></html>")
    written.append(write_file_atomically(folder / f"{name}.html", "\n".join(page).encode()))
    return written


def _html_table(table: pl.DataFrame, limit: int = 2000) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = []
    for row in table.head(limit).iter_rows():
        cells = "".join(
            f"<td>{'' if v is None else html.escape(f'{v:.3g}' if isinstance(v, float) else str(v))}</td>"
            for v in row
        )
        body.append(f"<tr>{cells}</tr>")
    more = f"<p>{table.height - limit} more rows in the CSV</p>" if table.height > limit else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


def retention_svg(curve: pl.DataFrame, width: int = 480, height: int = 240) -> str:
    """The Kaplan-Meier curve and its band as an inline SVG step plot."""
    end = max(curve["time"].max() or 1.0, 1.0)

    def point(t: float, s: float) -> str:
        return f"{40 + t / end * (width - 50):.1f},{10 + (1 - s) * (height - 40):.1f}"

    def steps(column: str) -> str:
        out, previous = [], None
        for t, s in curve.select("time", column).iter_rows():
            if previous is not None:
                out.append(point(t, previous))
            out.append(point(t, s))
            previous = s
        return " ".join(out)

    return (
        f"<svg width='{width}' height='{height}' role='img' aria-label='retention'>"
        f"<polyline fill='none' stroke='#9ecae1' points='{steps('upper')}'/>"
        f"<polyline fill='none' stroke='#9ecae1' points='{steps('lower')}'/>"
        f"<polyline fill='none' stroke='#08519c' stroke-width='2' points='{steps('survival')}'/>"
        f"<text x='40' y='{height - 8}' font-size='11'>days in study (0 to {end:.0f}); "
        "survival with 95 % band</text></svg>"
    )
