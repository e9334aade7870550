"""The example notebooks for researchers (``notebooks/explore/``) on a demo pool.

The pool is a home as ``workbench init`` makes it, with a study in Europe/Berlin: three
subjects simulated for a week, a fourth whose phone went silent after three days, the sensor
tables built, and questionnaires exported from a study server (PHQ-9 of four participants).
Each notebook of the home runs with papermill against it (``WORKBENCH_HOME``); what it shows is
checked against the simulation's truth, and nbval runs the executed notebooks again to check
that the outputs of their tagged cells come out the same.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import httpx
import nbformat
import polars as pl
import pytest

from tests.conftest import REPO, configure
from workbench.catalog import open_catalog
from workbench.config import init_home
from workbench.decoded import combine_table
from workbench.export import export_source
from workbench.instruments import score
from workbench.sensors.tables import build_tables
from workbench.simulators.days import simulate_days
from workbench.simulators.study_server import StudyServer, demo_tables
from workbench.studies import create_study, definition_from_options

EXPLORE = REPO / "workbench" / "shipped" / "notebooks" / "explore"
NOTEBOOKS = sorted(EXPLORE.glob("*.ipynb"))
ZONE = "Europe/Berlin"
SENSORS = ["accelerometer", "location", "activity", "application_usage"]


def test_the_three_examples_are_shipped():
    assert {p.name for p in NOTEBOOKS} == {
        "one_subject_week.ipynb",
        "data_yield.ipynb",
        "sensors_and_questionnaires.ipynb",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_an_example_is_parameterized_stripped_and_explained(path):
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert notebook.metadata["language_info"]["name"] == "python"
    assert notebook.cells[0].cell_type == "markdown"
    assert notebook.cells[0].source.startswith("# ")
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "home = None" in code[0].source and 'study = "demo"' in code[0].source
    assert "import workbench" in code[1].source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    # markdown between the steps tells the researcher what they see
    assert sum(c.cell_type == "markdown" for c in notebook.cells) >= 4


@pytest.fixture(scope="module")
def pool(tmp_path_factory, keys):
    """The demo home: sensor tables of four subjects and decoded PHQ-9 answers."""
    config = init_home(tmp_path_factory.mktemp("explore") / "home")
    catalog = open_catalog(config)
    try:
        create_study(
            catalog,
            definition_from_options("demo", duration_days=28, sensors=SENSORS, timezone=ZONE),
        )
    finally:
        catalog.dispose()
    today = dt.datetime.now(ZoneInfo(ZONE)).date()
    week = simulate_days(config, "demo", subjects=3, days=7, seed=17)
    # a fourth subject whose phone sent three days, then nothing (still in the study)
    silent = simulate_days(
        config, "demo", subjects=1, days=3, seed=18, start=today - dt.timedelta(days=7)
    )
    summary = build_tables(config, "demo", processes=1)
    assert summary.quarantined == 0, summary.summary()
    with pytest.MonkeyPatch.context() as env:
        config = configure(config, keys, env)
        tables, deleteable = demo_tables(keys / "public_key.pem", participants=4, days=7, seed=17)
        server = StudyServer(tables, deleteable=deleteable, user="mt", password="secret")
        exported = export_source(
            config, "mindtrails", transport=httpx.WSGITransport(app=server.app())
        )
    assert exported.ok, exported.summary()
    return SimpleNamespace(
        config=config,
        home=config.home,
        today=today,
        truth=pl.concat([week.days, silent.days], how="diagonal"),
        silent=silent.days["subject"][0],
    )


@pytest.fixture(scope="module")
def executed(pool, tmp_path_factory):
    """Each example of the home run with papermill against the pool: name -> notebook."""
    import papermill

    out = tmp_path_factory.mktemp("executed")
    notebooks = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WORKBENCH_HOME", str(pool.home))
        env.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        for path in sorted((pool.home / "notebooks" / "explore").glob("*.ipynb")):
            target = out / path.name
            papermill.execute_notebook(
                str(path), str(target), kernel_name="python3", cwd=str(path.parent),
                progress_bar=False, start_timeout=180,
            )  # fmt: skip
            notebooks[path.stem] = nbformat.read(target, as_version=4)
    return SimpleNamespace(folder=out, notebooks=notebooks)


def printed(notebook) -> str:
    """Everything the notebook's cells printed to standard output."""
    return "".join(
        output["text"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output["output_type"] == "stream" and output["name"] == "stdout"
    )


def html_rows(html: str) -> list[dict]:
    """The rows of a polars DataFrame's HTML display, as text by column name."""
    head, body = html.split("</thead>")
    names = re.findall(r"<th>(.*?)</th>", head)
    rows = re.findall(r"<tr>(.*?)</tr>", body)
    return [
        dict(
            zip(
                names,
                (v.replace("&quot;", "") for v in re.findall(r"<td>(.*?)</td>", r)),
                strict=True,
            )
        )
        for r in rows
    ]


def images(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


@pytest.mark.slow
def test_one_subject_week_shows_the_first_subjects_last_week(pool, executed):
    notebook = executed.notebooks["one_subject_week"]
    text = printed(notebook)
    last = pool.today - dt.timedelta(days=1)  # the simulation ends yesterday
    first = last - dt.timedelta(days=6)
    assert f"subject demo_00001: local days {first} to {last}\n" in text
    truth = pool.truth.filter(
        pl.col("subject") == "demo_00001", pl.col("day").is_between(first, last)
    )
    assert f"{truth['records_accelerometer'].sum()} accelerometer records in " in text
    fixes = truth["records_location"]
    assert f"{fixes.sum()} location fixes on {(fixes > 0).sum()} days\n" in text
    assert images(notebook) == 3  # magnitude per minute, fixes, distance from the first fix


@pytest.mark.slow
def test_data_yield_lists_the_subjects_below_the_target(pool, executed):
    notebook = executed.notebooks["data_yield"]
    text = printed(notebook)
    assert "4 subjects, 4 sensors" in text and "target: 50 % of the hours" in text
    listed = dict(re.findall(r"^  (demo_\d+): (.*)$", text, flags=re.M))
    # the accelerometer records only while the phone moves: everyone is under on it ...
    assert set(listed) == {"demo_00001", "demo_00002", "demo_00003", pool.silent}
    assert all(line.startswith("accelerometer ") for line in listed.values())
    # ... but only the silent phone is under on location
    assert "location" in listed[pool.silent]
    assert not [s for s, line in listed.items() if "location" in line and s != pool.silent]
    assert images(notebook) == 2  # yield per sensor, valid hours per subject and day


@pytest.mark.slow
def test_sensors_and_questionnaires_joins_scores_to_subject_days(pool, executed):
    notebook = executed.notebooks["sensors_and_questionnaires"]
    text = printed(notebook)
    # the demo has no link between the two: participants are paired with subjects in order
    pairs = re.findall(r"^(P\d{4}) -> (demo_\d+)$", text, flags=re.M)
    assert pairs == [(f"P000{i}", f"demo_0000{i}") for i in range(1, 5)]
    answers = combine_table(pool.config, "mindtrails", "PHQ9")
    days = answers["date"].str.to_datetime(time_zone="UTC").dt.convert_time_zone(ZONE).dt.date()
    on_sensed_days = int((days >= pool.today - dt.timedelta(days=7)).sum())
    assert on_sensed_days > 0
    assert (
        f"{on_sensed_days} of {answers.height} questionnaires of linked participants fall on a "
        "day of sensor data" in text
    )
    # each answered day: its score, and the sensor summary of that subject's day
    joined = next(c for c in notebook.cells if "per_day = (" in c.source)
    rows = html_rows(joined.outputs[-1]["data"]["text/html"])
    assert len(rows) == on_sensed_days
    scored = score(answers, "phq9").with_columns(day=days)
    for row in rows:
        answer = scored.filter(
            pl.col("participant") == row["participant"],
            pl.col("session") == row["session"],
            pl.col("day") == dt.date.fromisoformat(row["day"]),
        )
        assert answer["phq9_total"].to_list() == [int(row["phq9_total"])], row
        sensed = pool.truth.filter(
            pl.col("subject") == row["subject"], pl.col("day") == answer["day"][0]
        )
        assert int(row["location_fixes"]) == sensed["records_location"].sum(), row
    assert images(notebook) == 1


@pytest.mark.slow
def test_nbval_reproduces_the_examples_on_the_pool(pool, executed):
    paths = sorted(executed.folder.glob("*.ipynb"))
    assert len(paths) == len(NOTEBOOKS)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
         "--nbval-kernel-startup-timeout", "180",
         "--nbval-sanitize-with", str(REPO / "tests" / "nbval_sanitize.cfg"), *map(str, paths)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "WORKBENCH_HOME": str(pool.home),
             "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    cells = sum(1 for nb in executed.notebooks.values() for c in nb.cells if c.cell_type == "code")
    assert f"{cells} passed" in result.stdout, result.stdout[-2000:]
