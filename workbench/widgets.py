"""The coordinators' dashboards as ipywidgets with bqplot charts, for Voila.

Each dashboard notebook in ``notebooks/dashboards/`` is one line, e.g.
``StatusDashboard(home).show()``; everything it shows comes from :mod:`workbench.dashboards`.
The pages work in Voila and in JupyterLab alike. Charts are bqplot marks (plain ipywidgets,
so nothing extra to install in the browser); tables are HTML, paged, so a study of 10,000
subjects costs what one page costs.

Example (in a notebook)::

    from workbench.widgets import StatusDashboard
    StatusDashboard("demo-home", study="demo").show()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import getpass
import html
import time
from collections.abc import Callable

import bqplot as bq
import ipywidgets as w
import numpy as np
import polars as pl
from IPython.display import display

from workbench.alerts import ack_alert
from workbench.catalog import open_catalog
from workbench.config import Config, load_config
from workbench.dashboards import (
    COUNTS,
    STATES,
    SUBJECT_PAGE,
    attrition_choices,
    attrition_view,
    daily_completeness,
    daily_yield,
    dashboards_folder,
    status_view,
    study_choices,
    subject_page_url,
)
from workbench.errors import WorkbenchError
from workbench.refresh import refresh_status
from workbench.reports import COMPLIANCE_TARGET
from workbench.status import yield_columns
from workbench.times import MINUTES, format_ms
from workbench.writers import render

STYLE = """<style>
.wb-title{font-size:22px;font-weight:600;margin:4px 0 8px}
.wb-cards{display:flex;gap:10px;flex-wrap:wrap;margin:6px 0}
.wb-card{border:1px solid #d0d7de;border-radius:6px;padding:6px 14px;min-width:96px}
.wb-card .wb-value{font-size:26px;font-weight:600;line-height:1.2}
.wb-card .wb-label{color:#57606a;font-size:12px}
.wb-card.stale .wb-value,.wb-card.never-started .wb-value{color:#b35900}
table.wb-table{border-collapse:collapse;font-size:12.5px}
table.wb-table th{background:#f3f4f6;text-align:left;padding:3px 8px;border-bottom:1px solid #ccc}
table.wb-table td{padding:2px 8px;border-bottom:1px solid #eee;white-space:nowrap}
.wb-fresh-ok{background:#d9f0d3}.wb-fresh-warn{background:#fee8c8}
.wb-fresh-stale{background:#fcbba1}.wb-fresh-none{background:#eee;color:#888}
.wb-yield-low{background:#fee8c8}
.wb-heat-tip{font-size:12px;padding:4px 6px;background:#fff;border:1px solid #ccc;pointer-events:none}
.wb-heat rect.heatmapcell{fill:#f0f0f0}
.wb-empty{color:#57606a;font-style:italic;padding:6px 0}
.wb-error{color:#b00020;padding:6px 0}
.wb-section{font-size:16px;font-weight:600;margin:14px 0 4px}
.wb-muted{color:#57606a;font-size:12px}
.wb-alert-safety{border-left:5px solid #b00020;background:#fdecea;padding:4px 8px}
.wb-safety-badge{color:#fff;background:#b00020;padding:0 6px;border-radius:3px;font-weight:600}
</style>"""

REFRESH_CHOICES = [
    ("off", 0),
    ("every minute", 60),
    ("every 5 minutes", 300),
    ("every 15 minutes", 900),
]


def _cards(counts: dict[str, int | str], labels: dict[str, str] | None = None) -> str:
    labels = labels or {}
    cards = "".join(
        f"<div class='wb-card {html.escape(key.replace(' ', '-'))}' data-key='{html.escape(key)}'>"
        f"<div class='wb-value'>{html.escape(str(value))}</div>"
        f"<div class='wb-label'>{html.escape(labels.get(key, key))}</div></div>"
        for key, value in counts.items()
    )
    return f"<div class='wb-cards'>{cards}</div>"


def _empty(text: str) -> str:
    return f"<div class='wb-empty'>{text}</div>"


def _section_html(title: str) -> str:
    return f"<div class='wb-section'>{html.escape(title)}</div>"


def _section(title: str) -> w.HTML:
    return w.HTML(_section_html(title))


def _heat_matrix(frame: pl.DataFrame, values: str, subjects: list[str], labels: list[str]):
    """``values`` of ``frame`` (subject_name, day as text) as a subjects x labels matrix."""
    wide = frame.pivot(on="day", index="subject_name", values=values)
    order = pl.DataFrame({"subject_name": subjects}, schema={"subject_name": pl.String})
    return order.join(wide, on="subject_name", how="left", maintain_order="left").select(labels)


def _time(ms: int | None) -> str:
    if ms is None:
        return ""
    return format_ms(ms, MINUTES)


class _Dashboard:
    """What both dashboards share: a home, a catalog, a place for errors."""

    def __init__(self, home) -> None:
        self.config = home if isinstance(home, Config) else load_config(home)
        self.catalog = open_catalog(self.config)
        self.error = w.HTML()
        self.root = w.VBox(layout=w.Layout(padding="4px 12px"))

    def show(self) -> None:
        """Display the dashboard in the notebook (or Voila page)."""
        display(self.root)

    def _picker(self, title: str, choices: list[str], chosen: str | None, empty: str):
        """The study picker, or None with the page saying ``empty`` when there is no choice."""
        if not choices:
            self.root.children = [
                w.HTML(STYLE + f"<div class='wb-title'>{title}</div>"),
                w.HTML(_empty(empty)),
            ]
            return None
        return w.Dropdown(
            options=choices,
            value=chosen if chosen in choices else choices[0],
            description="Study",
        )

    def _guard(self, action: Callable[[], None]) -> None:
        """Run ``action``; a workbench error becomes a message on the page, not a traceback."""
        try:
            action()
            self.error.value = ""
        except WorkbenchError as exc:
            self.error.value = f"<div class='wb-error'>{html.escape(str(exc))}</div>"


# ---------------------------------------------------------------------------- study status


class StatusDashboard(_Dashboard):
    """Who needs attention today: headline counts, subjects with per-sensor freshness and
    data yield, a heat map of data yield by day (valid hours per sensor on hover; batch
    completeness for a study without sensor tables), open alerts with what to do, CSV
    download, refresh."""

    PAGE = 25
    ALERTS = 20
    HEAT_DAYS = 28
    TICK = 5.0  # seconds between two checks of the automatic refresh

    def __init__(self, home=None, *, study: str | None = None, refresh_seconds: int = 300):
        super().__init__(home)
        self.view = None
        self.page = 0
        self.loaded_at = 0.0
        studies = study_choices(self.config, catalog=self.catalog)
        self.picker = self._picker(
            "Study status",
            studies,
            study,
            "No studies yet. Create one with <code>workbench study create</code> and enroll "
            "subjects with <code>workbench enroll</code>.",
        )
        if self.picker is None:
            return
        self.refresh_button = w.Button(description="Refresh", icon="refresh")
        self.interval = w.Dropdown(
            options=REFRESH_CHOICES,
            value=refresh_seconds if refresh_seconds in dict(REFRESH_CHOICES).values() else 300,
            description="Auto refresh",
            style={"description_width": "initial"},
        )
        self.updated = w.HTML()
        self.cards = w.HTML()
        self.state_filter = w.Dropdown(options=["all", *STATES], value="all", description="Show")
        self.search = w.Text(
            placeholder="part of a subject id", description="Find", continuous_update=False
        )
        self.sort = w.Dropdown(
            options=[
                ("needs attention", "attention"),
                ("subject", "subject_name"),
                ("hours since last data", "hours_since_last_data"),
                ("completeness", "completeness"),
            ],
            value="attention",
            description="Sort by",
        )
        self.descending = w.Checkbox(value=False, description="descending", indent=False)
        self.previous = w.Button(description="previous", icon="arrow-left")
        self.next = w.Button(description="next", icon="arrow-right")
        self.page_label = w.HTML()
        self.table = w.HTML()
        self.heat_note = w.HTML()
        self.heat_title = _section(f"Data yield by day (last {self.HEAT_DAYS} days)")
        self.heat_tip = w.HTML()
        self.heat_tip.add_class("wb-heat-tip")
        self.heat_text: list[list[str]] = []  # the hover text of each cell, row by row
        self.heat = self._heat_figure()
        self.heat_box = w.VBox([self.heat_note])
        self.alert_note = w.HTML()
        self.alert_rows = w.VBox()
        self.download = w.Button(description="Status as CSV", icon="download")
        self.download_link = w.HTML()

        self.picker.observe(lambda _: self._guard(self.load), "value")
        self.refresh_button.on_click(lambda _: self._guard(self.refresh))
        for control in (self.state_filter, self.search, self.sort, self.descending):
            control.observe(lambda _: self._guard(self._first_page), "value")
        self.previous.on_click(lambda _: self._guard(lambda: self._turn(-1)))
        self.next.on_click(lambda _: self._guard(lambda: self._turn(1)))
        self.download.on_click(lambda _: self._guard(self._offer_csv))

        self.root.children = [
            w.HTML(STYLE + "<div class='wb-title'>Study status</div>"),
            w.HBox([self.picker, self.refresh_button, self.interval]),
            self.updated,
            self.error,
            self.cards,
            _section("Subjects"),
            w.HBox([self.state_filter, self.search, self.sort, self.descending]),
            self.table,
            w.HBox([self.previous, self.next, self.page_label]),
            w.HBox([self.download, self.download_link]),
            self.heat_title,
            self.heat_box,
            _section("Open alerts"),
            self.alert_note,
            self.alert_rows,
        ]
        self._guard(self.load)
        self._ticker = None
        with contextlib.suppress(RuntimeError):  # no running loop (a script): no auto refresh
            self._ticker = asyncio.get_running_loop().create_task(self._auto_refresh())

    # -- data

    def load(self) -> None:
        """Read the chosen study again and redraw everything."""
        self.view = status_view(self.config, self.picker.value, catalog=self.catalog)
        self.loaded_at = time.monotonic()
        self.download_link.value = ""
        view = self.view
        self.updated.value = (
            f"<div class='wb-muted'>{html.escape(view.study.definition.get('name', view.study.id))}"
            f" &middot; as of {_time(view.now)} &middot; stale after "
            f"{view.study.definition['staleness_hours']} h without data</div>"
        )
        self.cards.value = _cards(view.counts)
        self.page = 0
        self._draw_table()
        self._draw_alerts()

    def refresh(self) -> None:
        """Fold new uploads, update status history and alerts, then redraw."""
        refresh_status(self.config, catalog=self.catalog, studies=[self.picker.value], mail=False)
        self.load()

    async def _auto_refresh(self) -> None:
        while True:
            await asyncio.sleep(self.TICK)
            every = self.interval.value
            if every and time.monotonic() - self.loaded_at >= every:
                self._guard(self.load)

    # -- subjects

    def _rows(self) -> pl.DataFrame:
        view = self.view
        table = view.table.with_columns(
            pl.mean_horizontal([pl.col(f"{s}_completeness") for s in view.sensors])
            .round(1)
            .alias("completeness"),
            pl.col("state")
            .replace_strict({s: i for i, s in enumerate(STATES)}, return_dtype=pl.Int8)
            .alias("_rank"),
        ).with_columns(view.freshness.rename({s: f"_fresh_{s}" for s in view.sensors}))
        if self.state_filter.value != "all":
            table = table.filter(pl.col("state") == self.state_filter.value)
        if self.search.value.strip():
            table = table.filter(
                pl.col("subject_name").str.contains(self.search.value.strip(), literal=True)
            )
        key, descending = self.sort.value, self.descending.value
        if key == "attention":
            return table.sort(
                ["_rank", "hours_since_last_data", "subject_name"],
                descending=[descending, not descending, False],
                nulls_last=True,
            )
        return table.sort([key, "subject_name"], descending=[descending, False], nulls_last=True)

    def _first_page(self) -> None:
        self.page = 0
        self._draw_table()

    def _turn(self, step: int) -> None:
        self.page += step
        self._draw_table()

    def _draw_table(self) -> None:
        view = self.view
        if view.table.is_empty():
            self.table.value = _empty(
                "No subjects enrolled yet: <code>workbench enroll "
                f"{html.escape(view.study.id)} N</code> makes their QR codes."
            )
            self.page_label.value = ""
            self.previous.disabled = self.next.disabled = True
            self._draw_heat([])
            return
        rows = self._rows()
        pages = max(1, -(-rows.height // self.PAGE))
        self.page = min(max(self.page, 0), pages - 1)
        shown = rows.slice(self.page * self.PAGE, self.PAGE)
        self.previous.disabled = self.page == 0
        self.next.disabled = self.page >= pages - 1
        first = self.page * self.PAGE + 1
        self.page_label.value = (
            f"<span class='wb-muted'>rows {first}&ndash;{first + shown.height - 1} "
            f"of {rows.height:,}</span>"
            if rows.height
            else ""
        )
        if shown.is_empty():
            self.table.value = _empty("No subject matches.")
        else:
            self.table.value = self._table_html(shown)
        self._draw_heat(list(dict.fromkeys(shown["subject_name"].to_list())))

    def _table_html(self, rows: pl.DataFrame) -> str:
        sensors = self.view.sensors
        stale = float(self.view.study.definition["staleness_hours"])
        head = [
            "subject",
            "state",
            "app",
            "device",
            "activity",
            "hours since data",
            "completeness %",
        ]
        head += [f"{s} (h)" for s in sensors]
        head += [f"{s} yield 7d %" for s in sensors]
        target = float(self.view.study.definition.get("yield_target_pct", 50))
        out = ["<table class='wb-table'><thead><tr>"]
        out += [f"<th>{html.escape(h)}</th>" for h in head]
        out.append("</tr></thead><tbody>")
        for row in rows.iter_rows(named=True):
            cells = [
                row["subject_name"],
                row["state"],
                row["app"] or "",
                (row["device_id"] or "")[:12],
                row["activity"],
                "" if row["hours_since_last_data"] is None else f"{row['hours_since_last_data']:g}",
                "" if row["completeness"] is None else f"{row['completeness']:g}",
            ]
            out.append(
                f"<tr>{self._subject_cell(row['subject_name'])}"
                + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells[1:])
            )
            for sensor in sensors:
                hours = row[f"_fresh_{sensor}"]
                if hours is None:
                    out.append("<td class='wb-fresh-none'>never</td>")
                    continue
                kind = "ok" if hours < stale / 2 else "warn" if hours < stale else "stale"
                out.append(f"<td class='wb-fresh-{kind}'>{hours:g}</td>")
            for column in yield_columns(sensors):
                value = row[column]
                low = " class='wb-yield-low'" if value is not None and value < target else ""
                out.append(f"<td{low}>{'' if value is None else f'{value:g}'}</td>")
            out.append("</tr>")
        out.append("</tbody></table>")
        return "".join(out)

    def _subject_cell(self, subject: str) -> str:
        """The subject's id, a link to its page when the home has the subject page."""
        if not (dashboards_folder(self.config) / SUBJECT_PAGE).is_file():
            return f"<td>{html.escape(subject)}</td>"
        url = html.escape(subject_page_url(self.view.study.id, subject))
        return (
            f"<td><a class='wb-subject-link' href='{url}' target='_blank' rel='noopener'>"
            f"{html.escape(subject)}</a></td>"
        )

    # -- heat map

    def _heat_figure(self) -> bq.Figure:
        self.heat_rows = bq.OrdinalScale(reverse=True)
        self.heat_columns = bq.OrdinalScale()
        colors = bq.ColorScale(min=0, max=100, colors=["#fff5eb", "#fd8d3c", "#238b45"])
        self.heat_map = bq.GridHeatMap(
            color=np.zeros((2, 2)),  # a placeholder: 1 x 1 is squeezed to a scalar
            row=["", " "],
            column=["", " "],
            scales={"row": self.heat_rows, "column": self.heat_columns, "color": colors},
            tooltip=self.heat_tip,  # filled on hover: the values of each sensor
            anchor_style={"fill": "none"},
            stroke="white",
        )
        self.heat_map.on_hover(self._heat_hover)
        figure = bq.Figure(
            marks=[self.heat_map],
            axes=[
                bq.Axis(
                    scale=self.heat_columns,
                    tick_rotate=-45,
                    tick_style={"text-anchor": "end"},  # below the axis, not under the cells
                    num_ticks=8,
                ),
                bq.Axis(scale=self.heat_rows, side="left"),
            ],
            fig_margin={"top": 10, "bottom": 70, "left": 120, "right": 20},
            layout=w.Layout(width="100%", height="520px"),
            display_toolbar=False,  # it would cover the newest days of the first subjects
        )
        # days outside the subject's time in the study are NaN, which bqplot leaves unfilled
        # (its null_color is for nulls, which a numeric array cannot carry): grey them in CSS
        figure.add_class("wb-heat")
        return figure

    def _heat_hover(self, _mark, content: dict) -> None:
        # bqplot's GridHeatMap sends {"event": "hover", "data": {"rowNum", "columnNum", ...}}
        point = content.get("data") or {}
        row, column = point.get("rowNum"), point.get("columnNum")
        if isinstance(row, int) and isinstance(column, int) and row < len(self.heat_text):
            cells = self.heat_text[row]
            self.heat_tip.value = cells[column] if column < len(cells) else ""

    def _show_heat(self, matrix, subjects: list[str], labels: list[str], text) -> None:
        self.heat_box.children = [self.heat_note, self.heat]
        self.heat_text = text
        with self.heat_map.hold_sync():
            self.heat_map.color = matrix  # first: row and column are checked against it
            self.heat_map.row = subjects
            self.heat_map.column = labels
        self.heat.layout.height = f"{max(180, 18 * len(subjects) + 90)}px"

    def _draw_heat(self, subjects: list[str]) -> None:
        days = daily_yield(
            self.config,
            self.view.study,
            subjects,
            days=self.HEAT_DAYS,
            now=self.view.now,
            catalog=self.catalog,
        )
        if days is None:
            self._draw_completeness(subjects)
            return
        self.heat_title.value = _section_html(f"Data yield by day (last {self.HEAT_DAYS} days)")
        if not subjects or days["yield_pct"].drop_nulls().is_empty():
            self.heat_note.value = _empty(
                f"No days in the study for these subjects in the last {self.HEAT_DAYS} days."
                if subjects
                else "No subjects to show."
            )
            self.heat_box.children = [self.heat_note]
            return
        sensors = self.view.sensors
        target = float(self.view.study.definition.get("yield_target_pct", 50))
        self.heat_note.value = (
            "<div class='wb-muted'>The subjects on the table's page, in its order, by local "
            "day; colour: data yield (valid hours over hours in the study) averaged over the "
            "sampled sensors, "
            "<span style='background:#fff5eb'>&nbsp;0 %&nbsp;</span> "
            "<span style='background:#fd8d3c'>&nbsp;50 %&nbsp;</span> "
            "<span style='background:#238b45;color:white'>&nbsp;100 %&nbsp;</span> "
            f"(target {target:g} %), grey: not in the study that day; hover a cell for each "
            "sensor's valid hours. From the sensor tables as last built.</div>"
        )
        labels = [str(d) for d in days["day"].unique().sort().to_list()]
        wide = days.with_columns(pl.col("day").cast(pl.String))
        matrix = _heat_matrix(wide, "yield_pct", subjects, labels).to_numpy()
        text = []
        for subject in subjects:
            cells = {}
            for row in wide.filter(pl.col("subject_name") == subject).iter_rows(named=True):
                head = f"<b>{html.escape(subject)}</b> &middot; {row['day']}"
                if row["yield_pct"] is None:
                    cells[row["day"]] = f"{head}<br>not in the study"
                    continue
                hours = "".join(
                    f"<br><span class='wb-tip-sensor'>{html.escape(s)}: "
                    f"{row[f'hours_{s}'] or 0} h</span>"
                    for s in sensors
                )
                cells[row["day"]] = f"{head}<br>data yield {row['yield_pct']:g} %{hours}"
            text.append([cells.get(label, "") for label in labels])
        self._show_heat(matrix, subjects, labels, text)

    def _draw_completeness(self, subjects: list[str]) -> None:
        """The heat map of a study whose sensor tables were never built: batches received."""
        self.heat_title.value = _section_html(f"Completeness by day (last {self.HEAT_DAYS} days)")
        days = daily_completeness(
            self.catalog, self.view.study, subjects, days=self.HEAT_DAYS, now=self.view.now
        )
        if not subjects or days["batches"].sum() == 0:
            self.heat_note.value = _empty(
                f"No data received from these subjects in the last {self.HEAT_DAYS} days."
                if subjects
                else "No subjects to show."
            )
            self.heat_box.children = [self.heat_note]
            return
        self.heat_note.value = (
            "<div class='wb-muted'>The subjects on the table's page, in its order; "
            "colour: share of the expected batches whose data is from that day, "
            "<span style='background:#fff5eb'>&nbsp;0 %&nbsp;</span> "
            "<span style='background:#fd8d3c'>&nbsp;50 %&nbsp;</span> "
            "<span style='background:#238b45;color:white'>&nbsp;100 %&nbsp;</span>, "
            "grey: not in the study that day (hover a cell for its value). Build the sensor "
            "tables (<code>workbench tables build</code>) to see data yield instead.</div>"
        )
        labels = [str(d) for d in days["day"].unique().sort().to_list()]
        wide = days.select("subject_name", pl.col("day").cast(pl.String), "completeness")
        matrix = _heat_matrix(wide, "completeness", subjects, labels).to_numpy()
        found = {
            (subject, day): f"<b>{html.escape(subject)}</b> &middot; {day}<br>"
            + ("not in the study" if value is None else f"completeness {value:g} %")
            for subject, day, value in wide.iter_rows()
        }
        text = [[found.get((subject, day), "") for day in labels] for subject in subjects]
        self._show_heat(matrix, subjects, labels, text)

    # -- alerts

    def _draw_alerts(self) -> None:
        items = self.view.alerts
        if not items:
            self.alert_note.value = _empty("No open alerts.")
            self.alert_rows.children = []
            return
        shown = items[: self.ALERTS]  # safety alerts first, then the oldest
        more = (
            f" (the first {len(shown)}; <code>workbench alerts</code> lists them all)"
            if len(items) > len(shown)
            else ""
        )
        self.alert_note.value = (
            f"<div class='wb-muted'><span class='wb-alert-count'>{len(items)}</span> open "
            f"alerts{more}</div>"
        )
        rows = []
        for alert in shown:
            if alert.is_safety:
                rows.append(self._safety_row(alert))
                continue
            text = w.HTML(
                f"<div class='wb-alert' data-id='{alert.id}'><b>{html.escape(alert.kind)}</b> "
                f"&middot; {html.escape(alert.subject)} &middot; since {_time(alert.since)}"
                f"<br>{html.escape(alert.detail)}<br><i>What to do:</i> "
                f"{html.escape(alert.action)}</div>",
                layout=w.Layout(width="70%"),
            )
            button = w.Button(description="Acknowledge", tooltip=f"alert {alert.id}")
            button.add_class(f"wb-ack-{alert.id}")
            button.on_click(lambda _, i=alert.id: self._guard(lambda: self._ack(i)))
            rows.append(w.HBox([text, button], layout=w.Layout(margin="4px 0")))
        self.alert_rows.children = rows

    def _safety_row(self, alert) -> w.HBox:
        """A safety alert, marked, acknowledged only with a note and a name."""
        text = w.HTML(
            f"<div class='wb-alert wb-alert-safety' data-id='{alert.id}'>"
            f"<span class='wb-safety-badge'>SAFETY</span> <b>#{alert.id}</b> &middot; "
            f"participant {html.escape(alert.subject)} &middot; source "
            f"{html.escape(alert.study)} &middot; session {html.escape(alert.device or 'none')}"
            f" &middot; since {_time(alert.since)}<br>{html.escape(alert.detail)}<br>"
            f"<i>What to do:</i> {html.escape(alert.action)}</div>",
            layout=w.Layout(width="60%"),
        )
        note = w.Textarea(placeholder="what was done (required)", rows=2)
        note.add_class(f"wb-note-{alert.id}")
        by = w.Text(value=getpass.getuser(), placeholder="your name", description="by")
        by.add_class(f"wb-by-{alert.id}")
        button = w.Button(description="Acknowledge", button_style="danger")
        button.add_class(f"wb-ack-{alert.id}")
        button.on_click(
            lambda _, i=alert.id: self._guard(lambda: self._ack(i, note=note.value, by=by.value))
        )
        form = w.VBox([note, by, button])
        return w.HBox([text, form], layout=w.Layout(margin="4px 0"))

    def _ack(self, alert_id: int, *, note: str | None = None, by: str | None = None) -> None:
        ack_alert(
            self.catalog,
            alert_id,
            by=(by or "").strip() or getpass.getuser(),
            note=note if note is not None else "acknowledged on dashboard",
        )
        self.view.alerts = [a for a in self.view.alerts if a.id != alert_id]
        self._draw_alerts()

    # -- download

    def _offer_csv(self) -> None:
        table = self.view.table.drop("state")
        data = base64.b64encode(render(table, "csv")).decode()
        name = f"status_{self.view.study.id}_{dt.datetime.now(dt.UTC):%Y%m%dT%H%M}.csv"
        self.download_link.value = (
            f"<a class='wb-download' download='{name}' href='data:text/csv;base64,{data}'>"
            f"save {name} ({table.height:,} rows)</a>"
        )


# ---------------------------------------------------------------------------- attrition


class AttritionDashboard(_Dashboard):
    """How retention is going: Kaplan-Meier retention with its band, CONSORT funnel, dropout
    by study week, EMA compliance, questionnaire completion by session; for a study or a
    questionnaire source, one cohort (month of start) and a range of start dates."""

    def __init__(self, home=None, *, study: str | None = None):
        super().__init__(home)
        self.picker = self._picker(
            "Attrition",
            attrition_choices(self.config),
            study,
            "No studies or questionnaire sources yet: create a study with <code>workbench "
            "study create</code> or add a <code>[[sources]]</code> entry to workbench.toml.",
        )
        if self.picker is None:
            return
        self.cohort = w.Dropdown(options=[("all", "")], value="", description="Cohort")
        self.since = w.DatePicker(
            description="Started from", style={"description_width": "initial"}
        )
        self.until = w.DatePicker(description="to")
        self.cards = w.HTML()
        self.notes = {
            key: w.HTML() for key in ("retention", "funnel", "dropout", "compliance", "completion")
        }
        self.retention = self._retention_figure()
        self.funnel = self._bars(horizontal=True, label="participants")
        self.dropout = self._bars(label="% of those at risk who dropped out")
        self.compliance = self._compliance_figure()
        self.completion = self._bars(label="% of participants")

        self.picker.observe(lambda _: self._guard(self._new_study), "value")
        for control in (self.cohort, self.since, self.until):
            control.observe(lambda _: self._guard(self.load), "value")

        self.boxes = {key: w.VBox([note]) for key, note in self.notes.items()}
        self.figures = {
            "retention": self.retention,
            "funnel": self.funnel[0],
            "dropout": self.dropout[0],
            "compliance": self.compliance,
            "completion": self.completion[0],
        }

        def figure(key, _fig):
            return self.boxes[key]

        self.root.children = [
            w.HTML(STYLE + "<div class='wb-title'>Attrition</div>"),
            w.HBox([self.picker, self.cohort]),
            w.HBox([self.since, self.until]),
            self.error,
            self.cards,
            _section("Retention (Kaplan-Meier, 95 % band)"),
            figure("retention", self.retention),
            _section("CONSORT flow"),
            figure("funnel", self.funnel[0]),
            _section("Dropout by study week"),
            figure("dropout", self.dropout[0]),
            _section(f"EMA compliance (line at {COMPLIANCE_TARGET:g} %)"),
            figure("compliance", self.compliance),
            _section("Questionnaire completion by session"),
            figure("completion", self.completion[0]),
        ]
        self._guard(self._new_study)

    def _new_study(self) -> None:
        self.view = attrition_view(self.config, self.picker.value)
        with self.cohort.hold_trait_notifications():
            self.cohort.options = [("all", "")] + [(c, c) for c in self.view.cohorts]
            self.cohort.value = ""
        self.since.value = self.until.value = None
        self._draw()

    def load(self) -> None:
        """Recompute for the chosen study, cohort and dates and redraw."""
        self.view = attrition_view(
            self.config,
            self.picker.value,
            cohort=self.cohort.value or None,
            since=self.since.value,
            until=self.until.value,
        )
        self._draw()

    def _draw(self) -> None:
        result = self.view.result
        counts = dict(result.consort.iter_rows())
        half = result.half_life_days
        self.cards.value = _cards(
            {**counts, "median retention": "not reached" if half is None else f"{half:.0f} d"}
        )
        self._draw_retention()
        self._draw_bars(
            self.funnel,
            "funnel",
            result.consort["stage"].to_list(),
            result.consort["n"].to_list(),
            "No participants in this selection.",
        )
        weeks = result.dropout_by_week.filter(pl.col("at_risk") > 0)
        self._draw_bars(
            self.dropout,
            "dropout",
            [f"week {k + 1}" for k in weeks["week"].to_list()],
            (100 * weeks["dropped"] / weeks["at_risk"]).round(1).to_list(),
            "No one has started yet.",
        )
        self._draw_compliance()
        completion = self.view.completion
        if completion.is_empty():
            note = (
                "Sessions belong to questionnaire sources: choose one above."
                if self.view.kind == "sensing"
                else "No answers with a session yet."
            )
            self._draw_bars(self.completion, "completion", [], [], note)
        else:
            self._draw_bars(
                self.completion,
                "completion",
                [f"{s} {q}" for s, q in completion.select("session", "questionnaire").iter_rows()],
                completion["pct"].to_list(),
                "",
            )

    # -- charts

    def _retention_figure(self) -> bq.Figure:
        x, y = bq.LinearScale(min=0), bq.LinearScale(min=0, max=1)
        self.band = bq.Lines(
            x=[0.0],
            y=[[1.0], [1.0]],
            scales={"x": x, "y": y},
            fill="between",
            colors=["#9ecae1", "#9ecae1"],
            fill_colors=["#c6dbef"],
            fill_opacities=[0.5],
            stroke_width=0.5,
        )
        self.curve = bq.Lines(
            x=[0.0],
            y=[1.0],
            scales={"x": x, "y": y},
            colors=["#08519c"],
            stroke_width=2.5,
            tooltip=bq.Tooltip(
                fields=["x", "y"], labels=["day", "retained"], formats=[".1f", ".3f"]
            ),
        )
        return bq.Figure(
            marks=[self.band, self.curve],
            axes=[
                bq.Axis(scale=x, label="days in study"),
                bq.Axis(scale=y, side="left", label="retained", tick_format=".0%"),
            ],
            fig_margin={"top": 10, "bottom": 45, "left": 60, "right": 20},
            layout=w.Layout(width="100%", height="320px"),
        )

    def _draw_retention(self) -> None:
        curve = self.view.result.retention
        if curve.height < 2:
            self._show("retention", _empty("Nobody has started in this selection."), chart=False)
            return
        self._show("retention", "")
        times = curve["time"].to_list()
        xs = [times[0]]
        for t in times[1:]:
            xs += [t, t]

        def steps(column: str) -> list[float]:
            values = curve[column].to_list()
            out = [values[0]]
            for before, now in zip(values, values[1:], strict=False):
                out += [before, now]
            return out

        with self.curve.hold_sync(), self.band.hold_sync():
            self.curve.x, self.curve.y = xs, steps("survival")
            self.band.x, self.band.y = xs, [steps("lower"), steps("upper")]

    def _bars(self, *, horizontal: bool = False, label: str) -> tuple[bq.Figure, bq.Bars]:
        # horizontal bars list their categories top to bottom
        categories, values = bq.OrdinalScale(reverse=horizontal), bq.LinearScale(min=0)
        bars = bq.Bars(
            x=["-"],
            y=[0],
            scales={"x": categories, "y": values},
            orientation="horizontal" if horizontal else "vertical",
            colors=["#4c78a8"],
            tooltip=bq.Tooltip(fields=["x", "y"]),
        )
        axes = [
            bq.Axis(scale=categories, side="left" if horizontal else "bottom"),
            bq.Axis(scale=values, side="bottom" if horizontal else "left", label=label),
        ]
        figure = bq.Figure(
            marks=[bars],
            axes=axes,
            fig_margin={"top": 10, "bottom": 45, "left": 130 if horizontal else 60, "right": 20},
            layout=w.Layout(width="100%", height="300px"),
        )
        return figure, bars

    def _show(self, key: str, note: str, *, chart: bool = True) -> None:
        """Show a chart's note and, unless it is only an empty state, the chart (a chart
        never drawn is left out of the page rather than hidden: bqplot cannot lay out a
        hidden figure)."""
        self.notes[key].value = note
        self.boxes[key].children = [self.notes[key]] + ([self.figures[key]] if chart else [])

    def _draw_bars(self, chart, key: str, labels: list[str], values: list, empty: str) -> None:
        _figure, bars = chart
        if not labels:
            self._show(key, _empty(empty or "Nothing to show."), chart=False)
            return
        self._show(key, "")
        with bars.hold_sync():
            bars.x, bars.y = labels, values

    def _compliance_figure(self) -> bq.Figure:
        x, y = bq.LinearScale(min=0, max=100), bq.LinearScale(min=0)
        self.compliance_bars = bq.Bars(
            x=[5.0], y=[0], scales={"x": x, "y": y}, colors=["#72b7b2"], padding=0.05,
            tooltip=bq.Tooltip(fields=["x", "y"], labels=["compliance % (bin)", "participants"]),
        )  # fmt: skip
        self.target_line = bq.Lines(
            x=[COMPLIANCE_TARGET, COMPLIANCE_TARGET],
            y=[0, 1],
            scales={"x": x, "y": y},
            colors=["#d62728"],
            line_style="dashed",
            stroke_width=2,
        )
        return bq.Figure(
            marks=[self.compliance_bars, self.target_line],
            axes=[
                bq.Axis(scale=x, label="% of expected EMA prompts answered"),
                bq.Axis(scale=y, side="left", label="participants"),
            ],
            fig_margin={"top": 10, "bottom": 45, "left": 60, "right": 20},
            layout=w.Layout(width="100%", height="300px"),
        )

    def _draw_compliance(self) -> None:
        compliance = self.view.result.compliance
        if compliance.is_empty() or compliance["compliance_pct"].drop_nulls().is_empty():
            note = (
                "No EMA sensor in this selection."
                if self.view.kind == "sensing"
                else "EMA compliance belongs to sensing studies: choose one above."
            )
            self._show("compliance", _empty(note), chart=False)
            return
        values = compliance["compliance_pct"].drop_nulls()
        bins = (values.clip(0, 100) // 10).clip(0, 9).cast(pl.Int64).value_counts()
        counts = dict(bins.iter_rows())
        heights = [counts.get(b, 0) for b in range(10)]
        below = int((values < COMPLIANCE_TARGET).sum())
        self._show(
            "compliance",
            f"<div class='wb-muted'>{below} of {values.len()} participants below "
            f"{COMPLIANCE_TARGET:g} %</div>",
        )
        with self.compliance_bars.hold_sync(), self.target_line.hold_sync():
            self.compliance_bars.x = [b * 10 + 5.0 for b in range(10)]
            self.compliance_bars.y = heights
            self.target_line.y = [0, max(heights)]


__all__ = ["COUNTS", "AttritionDashboard", "StatusDashboard"]
