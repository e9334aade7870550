"""`workbench demo` (what `make run` calls) end to end, and the commands a team runs after it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import polars as pl
import pytest

from workbench.config import init_home, load_config
from workbench.pool import DataPool
from workbench.sensors.loading import sensor_data
from workbench.simulators.demo import DEMO_SENSING_DAYS, DEMO_SENSING_SUBJECTS
from workbench.status import status_csv_path

pytestmark = pytest.mark.slow


def workbench(home, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_then_status_alerts_sanity_and_questionnaires(tmp_path):
    home = tmp_path / "demo-home"
    init_home(home)
    config = home / "workbench.toml"  # the template's source, on a port free here
    config.write_text(
        config.read_text().replace(":9000", f":{free_port()}").replace(":9100", f":{free_port()}")
    )
    port = free_port()
    run = workbench(home, "demo", "--port", str(port), "--exit", "--subjects", "6", "--days", "3")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verify: ledger and files agree" in run.stdout
    assert "status of 'demo'" in run.stdout and "| subject" in run.stdout
    csv = status_csv_path(DataPool(home / "pool"), "demo")
    assert csv.read_text().startswith("app,subject_name,device_id,date_registered")

    rows = json.loads(workbench(home, "status", "demo", "--format", "json").stdout)
    assert len(rows) == 6 + DEMO_SENSING_SUBJECTS  # the phones, and the subjects of whole days
    assert sum(r["accelerometer_n_batches"] for r in rows) > 0
    # the simulator lets some subjects fall silent part-way and some leave
    assert {r["activity_code"] for r in rows} & {0, 1}
    listed = workbench(home, "alerts", "demo", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert all(a["action"] for a in json.loads(listed.stdout))
    sanity = workbench(home, "sanity", "--full")
    assert sanity.returncode == 0, sanity.stdout + sanity.stderr
    assert "0 failed" in sanity.stdout

    # the demo built its sensor tables, in the study's zone, from both kinds of simulated data
    assert "demo: sensor tables built to ledger id" in run.stdout
    assert "data yield per sensor" in run.stdout
    demo_config = load_config(home)
    for sensor in ("accelerometer", "activity", "location", "application_usage", "ema"):
        frame = sensor_data(demo_config, "demo", sensor).collect()
        assert frame["subject"].n_unique() >= DEMO_SENSING_SUBJECTS, sensor
    days = (
        sensor_data(demo_config, "demo", "location")
        .group_by("subject")
        .agg(pl.col("day").n_unique())
        .collect()
    )
    assert days["day"].max() >= DEMO_SENSING_DAYS  # whole days to analyse
    built = workbench(home, "tables", "build", "demo")
    assert built.returncode == 0 and "up to date" in built.stdout, built.stderr
    shared = workbench(home, "tables", "export", "demo", "--out", str(tmp_path / "share"),
                       "--format", "csv", "--sensor", "location")  # fmt: skip
    assert shared.returncode == 0, shared.stderr
    listed = json.loads((tmp_path / "share" / "manifest.json").read_text())
    assert listed["timezone"] == "Europe/Berlin" and len(listed["files"]) >= DEMO_SENSING_DAYS
    # ... and its behavioural features, meaningful on the whole simulated days
    assert "features, mean of" in run.stdout and "minutes at home" in run.stdout
    features = pl.read_parquet(home / "pool" / "features" / "demo" / "features.parquet")
    simulated = features["subject"].unique().sort().to_list()[-DEMO_SENSING_SUBJECTS:]
    valid = features.filter(pl.col("valid_day") & pl.col("subject").is_in(simulated))
    assert valid.height >= DEMO_SENSING_SUBJECTS
    assert valid["location_home_minutes"].mean() > 300  # nights at home
    assert valid["location_places"].min() >= 1

    # the template's questionnaire source, served by the local study server, was exported
    assert "questionnaires exported: mindtrails:" in run.stdout
    # a demo subject linked to the provider simulator through the callback, then synced
    assert "(demo_00001 on google_health) active after the callback (200)" in run.stdout
    assert "sync: account 1: succeeded" in run.stdout
    combined = workbench(home, "combine", "PHQ9")
    assert combined.returncode == 0, combined.stderr
    header, *rows = combined.stdout.splitlines()
    assert "participant" in header.split(",") and len(rows) > 10
    assert "RSA" not in header

    # scoring and every report on the demo pool (sensing and questionnaire data)
    scored = workbench(home, "score", "PHQ9", "--instrument", "phq9", "--format", "csv")
    assert scored.returncode == 0 and "phq9_total" in scored.stdout.splitlines()[0]
    for args in (
        ("report", "questionnaire"),
        ("report", "participant"),
        ("report", "attrition", "demo"),
        ("report", "attrition", "mindtrails"),
    ):
        done = workbench(home, *args)
        assert done.returncode == 0 and "report: " in done.stdout, (args, done.stderr)

    # the demo's participant P0001 answered PHQ-9 item 9 at its first assessment: a safety
    # alert, listed first, whose acknowledgement needs a note
    assert "safety alerts:" in run.stdout
    assert "safety alert #" in run.stdout and "participant P0001, session PRE" in run.stdout
    every = json.loads(workbench(home, "alerts", "--no-refresh", "--format", "json").stdout)
    kinds = [a["kind"] for a in every]
    assert kinds[0] == "safety" and kinds == sorted(kinds, key=lambda k: k != "safety")
    first = next(a for a in every if (a["subject"], a["device"]) == ("P0001", "PRE"))
    assert (first["kind"], first["study"]) == ("safety", "mindtrails")
    assert "better off dead" in first["detail"] and "safety protocol" in first["action"]
    refused = workbench(home, "alerts", "ack", str(first["id"]))
    assert refused.returncode == 2 and "note" in refused.stderr + refused.stdout
    done = workbench(home, "alerts", "ack", str(first["id"]), "--note", "called; safe")
    assert done.returncode == 0 and "acknowledged and closed" in done.stdout
