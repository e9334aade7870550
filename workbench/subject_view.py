"""One subject's days: data yield per sensor and the main behavioural features, for Voila.

The status dashboard's subject ids link to ``subject.ipynb?study=<id>&subject=<id>`` in
``notebooks/dashboards/``; that notebook is thin, ``SubjectDashboard(home, study=...,
subject=...).show()``, with the study and subject read from the page's address
(:func:`page_query`). What it shows comes from :func:`subject_view`, a read of the pool:

- the valid hours per sensor and local day (:func:`workbench.data_yield`, the subject's best
  device), against the study's target (``yield_target_pct`` of the hours in the study);
- the day table's main features (home minutes, places, distance, walking minutes, app
  minutes, EMA prompts) from the last ``workbench features`` run, or computed now when that
  run holds no day of this subject (the page says which); valid and thin days are marked.

The study and subject come from the network: both are checked against their patterns before
anything is read, and an unknown one is a message on the page, never a traceback.

Example (in a notebook)::

    from workbench.subject_view import SubjectDashboard
    SubjectDashboard("demo-home", study="demo", subject="demo_00001").show()
"""

from __future__ import annotations

import html
import itertools
import os
from dataclasses import dataclass
from urllib.parse import parse_qs

import bqplot as bq
import ipywidgets as w
import polars as pl
from IPython.display import display
from sqlalchemy import select

from workbench.catalog import Catalog, borrowed_catalog, subjects
from workbench.config import Config, load_config
from workbench.errors import UnknownSubject, WorkbenchError
from workbench.features.build import features, read_features
from workbench.identifiers import check_name
from workbench.sensors.yields import data_yield
from workbench.studies import Study, get_study
from workbench.widgets import STYLE

# The features the page plots, in order: column, title, unit.
MAIN_FEATURES = (
    ("location_home_minutes", "Minutes at home", "min"),
    ("location_places", "Places visited", "places"),
    ("location_distance_km", "Distance travelled", "km"),
    ("activity_walking_minutes", "Walking", "min"),
    ("app_minutes_total", "App use", "min"),
    ("ema_prompts_answered", "EMA prompts answered", "prompts"),
)
# Sensors recording answers, not samples: no valid hours to chart (their counts are features).
ANSWERED_SENSORS = ("ema", "active_labeling")
VALID_COLOR, THIN_COLOR = "#4c78a8", "#c9c9c9"
SENSOR_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2", "#9d755d")
TARGET_COLOR = "#d62728"
PAGE_STYLE = """<style>
.wb-null{color:#999}
tr.wb-thin td{color:#888}
.wb-note{background:#fff8c5;border:1px solid #e6d57a;border-radius:4px;padding:4px 8px}
</style>"""


@dataclass
class SubjectView:
    """What the subject page shows of one subject of one study."""

    study: Study
    subject: str
    days: list[str]  # every local day shown (ISO dates), in order
    yields: pl.DataFrame  # sensor, day, in_study_hours, valid_hours, yield_pct (best device)
    features: pl.DataFrame  # the subject's rows of the day table
    stored: bool  # True: from the last features run; False: computed for this page

    @property
    def target_pct(self) -> float:
        """The study's daily yield target, in percent of the hours in the study."""
        return float(self.study.definition.get("yield_target_pct", 50))

    @property
    def sensors(self) -> list[str]:
        """The sampled sensors with a yield row, in the study's order first (answers, such as
        EMA and labels, have no sampling to yield: their counts are features)."""
        found = set(self.yields["sensor"].to_list()) - set(ANSWERED_SENSORS)
        ordered = [s for s in self.study.sensors if s in found]
        return ordered + sorted(found - set(ordered))


def page_query(study: str | None = None, subject: str | None = None) -> tuple[str | None, ...]:
    """The study and subject of the Voila page's address (``?study=...&subject=...``); outside
    Voila, or when the address names none, ``study`` and ``subject`` as given.

    Example: ``study, subject = page_query()`` in a dashboard notebook.
    """
    if "VOILA_KERNEL_ID" in os.environ:  # set by Voila in each of its kernels
        # A kernel started ahead of the page (Voila's preheating) waits here for its request.
        from voila.utils import get_query_string

        query = parse_qs(get_query_string() or "")
        study = query.get("study", [study])[0]
        subject = query.get("subject", [subject])[0]
    return study, subject


def subject_view(
    config: Config, study: str, subject: str, *, catalog: Catalog | None = None
) -> SubjectView:
    """One subject's yield per sensor and day and its day table (stored, else computed now).

    Raises :class:`InvalidName` for a study or subject id that fails its pattern,
    :class:`UnknownStudy` and :class:`UnknownSubject` for ids the catalog does not hold.

    Example: ``subject_view(config, "demo", "demo_00001").features["location_places"]``.
    """
    study = check_name("study", study)
    subject = check_name("subject", subject)
    with borrowed_catalog(config, catalog) as catalog:
        found = get_study(catalog, study)
        with catalog.engine.connect() as conn:
            enrolled = conn.execute(
                select(subjects.c.subject_id).where(
                    subjects.c.study_id == study, subjects.c.subject_id == subject
                )
            ).scalar()
    if enrolled is None:
        raise UnknownSubject(f"no subject {subject!r} is enrolled in study {study!r}")
    yields = best_device_yield(data_yield(config, study, subjects=[subject]))
    table = read_features(config, study, subjects=[subject])
    stored = table.height > 0
    if not stored:
        table = features(config, study, subjects=[subject], processes=1)
    table = table.sort("day")
    days = sorted(
        {d.isoformat() for d in yields["day"].to_list()}
        | {d.isoformat() for d in table["day"].to_list()}
    )
    return SubjectView(
        study=found, subject=subject, days=days, yields=yields, features=table, stored=stored
    )


def best_device_yield(rows: pl.DataFrame) -> pl.DataFrame:
    """Per sensor and day of :func:`workbench.data_yield` rows, the device with the most valid
    hours (as the day table counts a subject with several phones)."""
    return (
        rows.sort("valid_hours", descending=True, nulls_last=True)
        .group_by("sensor", "day", maintain_order=True)
        .agg(pl.col("in_study_hours", "valid_hours", "yield_pct").first())
        .sort("sensor", "day")
    )


# ---------------------------------------------------------------------------- figures


def _chart(marks: list, axes: list, *, height: str) -> bq.Figure:
    return bq.Figure(
        marks=marks,
        axes=axes,
        fig_margin={"top": 10, "bottom": 40, "left": 55, "right": 20},
        layout=w.Layout(width="100%", height=height),
    )


def yield_figure(view: SubjectView) -> bq.Figure:
    """Valid hours per sensor and day as grouped bars, with the study's target as a dashed
    line (``yield_target_pct`` of the hours of each day the subject was in the study)."""
    days, sensors = view.days, view.sensors
    x, y = bq.OrdinalScale(domain=days), bq.LinearScale(min=0, max=24)
    hours = {
        (sensor, day.isoformat()): value
        for sensor, day, value in view.yields.select("sensor", "day", "valid_hours").iter_rows()
    }
    bars = bq.Bars(
        x=days,
        y=[[hours.get((s, d)) or 0 for d in days] for s in sensors],
        scales={"x": x, "y": y},
        type="grouped",
        labels=sensors,
        colors=list(itertools.islice(_cycle(SENSOR_COLORS), len(sensors))),
        tooltip=bq.Tooltip(fields=["x", "y"], labels=["day", "valid hours"]),
    )
    in_study = (
        view.yields.group_by("day")
        .agg(pl.col("in_study_hours").max())
        .with_columns(pl.col("day").dt.to_string("%Y-%m-%d"))
    )
    study_hours = dict(in_study.iter_rows())
    target = bq.Lines(
        x=days,
        y=[round(view.target_pct / 100 * (study_hours.get(d) or 0), 2) for d in days],
        scales={"x": x, "y": y},
        colors=[TARGET_COLOR],
        line_style="dashed",
        stroke_width=2,
    )
    return _chart(
        [bars, target],
        [bq.Axis(scale=x, label="local day"), bq.Axis(scale=y, side="left", label="valid hours")],
        height="300px",
    )


def feature_figure(view: SubjectView, column: str, title: str, unit: str) -> bq.Figure:
    """One feature over the days as bars, valid days in colour and thin days in grey; a day
    without a value has no bar (never a zero)."""
    x, y = bq.OrdinalScale(domain=view.days), bq.LinearScale(min=0)
    rows = view.features.select("day", column, "valid_day").drop_nulls(column)
    tooltip = bq.Tooltip(fields=["x", "y"], labels=["day", f"{title} ({unit})"])
    marks = []
    for valid, color in ((True, VALID_COLOR), (False, THIN_COLOR)):
        part = rows.filter(pl.col("valid_day") == valid)
        days = [d.isoformat() for d in part["day"].to_list()]
        marks.append(
            bq.Bars(
                # a mark needs a bar: an invisible one when no day of this kind has a value
                x=days or view.days[:1],
                y=[round(float(v), 2) for v in part[column].to_list()] or [0],
                scales={"x": x, "y": y},
                colors=[color],
                opacities=[1.0 if days else 0.0],
                tooltip=tooltip,
            )
        )
    axes = [bq.Axis(scale=x), bq.Axis(scale=y, side="left", label=unit)]
    figure = _chart(marks, axes, height="220px")
    figure.title = title
    figure.fig_margin = {"top": 30, "bottom": 40, "left": 55, "right": 10}
    return figure


def day_table_html(view: SubjectView) -> str:
    """The subject's days as an HTML table: validity, valid hours and the main features;
    thin days marked, missing values shown as a dash."""
    head = ["day", "valid day", "valid hours", *(f"{t} ({u})" for _c, t, u in MAIN_FEATURES)]
    out = ["<table class='wb-table wb-days'><thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    present = [c for c, _t, _u in MAIN_FEATURES if c in view.features.columns]
    for row in view.features.iter_rows(named=True):
        valid = bool(row["valid_day"])
        out.append(
            f"<tr class='{'wb-valid' if valid else 'wb-thin'}' data-day='{row['day'].isoformat()}'>"
            f"<td>{row['day'].isoformat()}</td><td>{'yes' if valid else 'no'}</td>"
            f"<td>{_number(row['valid_hours_max'])}</td>"
        )
        for column, _title, _unit in MAIN_FEATURES:
            value = row[column] if column in present else None
            out.append(f"<td data-feature='{column}'>{_number(value)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _cycle(colors: tuple[str, ...]):
    return itertools.cycle(colors)


def _number(value) -> str:
    if value is None:
        return "<span class='wb-null'>&ndash;</span>"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


# ---------------------------------------------------------------------------- the page


class SubjectDashboard:
    """The subject page: heading, counts, yield chart, feature charts and the day table; a
    bad or unknown study or subject is a message instead."""

    def __init__(self, home=None, *, study: str | None = None, subject: str | None = None):
        self.config = home if isinstance(home, Config) else load_config(home)
        self.view: SubjectView | None = None
        self.title = w.HTML(STYLE + PAGE_STYLE + "<div class='wb-title'>Subject</div>")
        self.error = w.HTML()
        self.root = w.VBox([self.title, self.error], layout=w.Layout(padding="4px 12px"))
        if not study or not subject:
            self.error.value = (
                "<div class='wb-error'>No subject chosen: open one from the table of the "
                "Study status dashboard (its subject ids are links to this page).</div>"
            )
            return
        try:
            self.view = subject_view(self.config, study, subject)
        except WorkbenchError as exc:
            self.error.value = f"<div class='wb-error'>{html.escape(str(exc))}</div>"
            return
        self._draw()

    def show(self) -> None:
        """Display the page in the notebook (or Voila page)."""
        display(self.root)

    def _draw(self) -> None:
        view = self.view
        name = view.study.definition.get("name", view.study.id)
        self.title.value = (
            STYLE + PAGE_STYLE + f"<div class='wb-title'>Subject <span class='wb-subject'>"
            f"{html.escape(view.subject)}</span></div><div class='wb-muted'>study "
            f"{html.escape(name)} &middot; times in local days of the subject's zone</div>"
        )
        valid = int(view.features["valid_day"].sum()) if view.features.height else 0
        cards = w.HTML(
            "<div class='wb-cards'>"
            + "".join(
                f"<div class='wb-card' data-key='{k}'><div class='wb-value'>{v}</div>"
                f"<div class='wb-label'>{k}</div></div>"
                for k, v in (
                    ("days with data", view.features.height),
                    ("valid days", valid),
                    ("thin days", view.features.height - valid),
                )
            )
            + "</div>"
        )
        source = (
            "Features from the last <code>workbench features</code> run."
            if view.stored
            else "<div class='wb-note wb-computed'>No stored features for this subject yet "
            f"(<code>workbench features {html.escape(view.study.id)}</code> stores them): "
            "computed now from the sensor tables.</div>"
        )
        parts: list[w.Widget] = [self.title, self.error, cards]
        parts.append(w.HTML("<div class='wb-section'>Data yield by day</div>"))
        if not view.sensors:
            parts.append(w.HTML("<div class='wb-empty'>No sensor data for this subject yet.</div>"))
        else:
            keys = "".join(
                f"<span class='wb-key'><span style='color:{color}'>&#9632;</span> "
                f"{html.escape(sensor)}</span> &nbsp; "
                for sensor, color in zip(view.sensors, _cycle(SENSOR_COLORS), strict=False)
            )
            parts.append(
                w.HTML(
                    f"<div class='wb-muted'>Valid hours per sensor (the best device): {keys}"
                    f"<span style='color:{TARGET_COLOR}'>- - -</span> the study's target, "
                    f"{view.target_pct:g} % of the hours in the study.</div>"
                )
            )
            parts.append(yield_figure(view))
        parts.append(w.HTML("<div class='wb-section'>Features by day</div>"))
        parts.append(w.HTML(f"<div class='wb-muted wb-source'>{source}</div>"))
        if view.features.is_empty():
            parts.append(w.HTML("<div class='wb-empty'>No day with features yet.</div>"))
        else:
            parts.append(
                w.HTML(
                    f"<div class='wb-muted'><span style='color:{VALID_COLOR}'>&#9632;</span> "
                    f"valid day &nbsp; <span style='color:{THIN_COLOR}'>&#9632;</span> thin day "
                    "(fewer valid hours than the study asks for); no bar: no value that day"
                    "</div>"
                )
            )
            charts = [
                feature_figure(view, c, t, u)
                for c, t, u in MAIN_FEATURES
                if c in view.features.columns
            ]
            parts.append(w.GridBox(charts, layout=w.Layout(grid_template_columns="repeat(3, 33%)")))
            parts.append(w.HTML(day_table_html(view)))
        self.root.children = parts


__all__ = [
    "MAIN_FEATURES",
    "SubjectDashboard",
    "SubjectView",
    "day_table_html",
    "feature_figure",
    "page_query",
    "subject_view",
    "yield_figure",
]
