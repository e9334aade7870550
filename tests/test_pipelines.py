"""Pipelines: papermill runs with timeouts, run records, one run at a time, the scheduler."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import nbformat
import orjson
import pytest
from click.testing import CliRunner
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from tests.conftest import START_MS
from workbench.cli import cli
from workbench.config import load_config
from workbench.enrollment import enroll
from workbench.errors import ConfigError, PipelineBusy
from workbench.pipelines import (
    crontab_lines,
    list_runs,
    load_pipelines,
    notebook_sections,
    run_pipeline,
)
from workbench.scheduler import open_queue
from workbench.sensors.loading import sensor_data
from workbench.simulators.days import simulate_days
from workbench.simulators.phones import IngestPhones
from workbench.studies import create_study, definition_from_options

pytestmark = pytest.mark.slow

META = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def notebook(path, *cells):
    parts = [new_code_cell("home = None\nvalue = 1", metadata={"tags": ["parameters"]})]
    for cell in cells:
        parts.append(new_markdown_cell(cell[3:]) if cell.startswith("md:") else new_code_cell(cell))
    nbformat.write(new_notebook(cells=parts, metadata=META), path)


@pytest.fixture
def lab(home, tmp_path):
    """A home whose pipelines folder holds small notebooks: ok, fails, hangs, slow."""
    folder = tmp_path / "pipes"
    folder.mkdir()
    notebook(folder / "ok.ipynb", "md:## First", "x = value * 2", "md:## Second", "print(x)")
    notebook(folder / "fails.ipynb", "md:## Good", "a = 1", "md:## Bad", "1 / 0")
    notebook(folder / "hangs.ipynb", "import time", "time.sleep(120)")
    notebook(folder / "slow.ipynb", "import time", "time.sleep(3)")
    for name, extra in {
        "ok": "",
        "fails": "retries = 1\n",
        "hangs": "timeout = 60\ncell_timeout = 2\n",
        "slow": "",
    }.items():
        # a schedule that is not due while tests run (1 January, midnight UTC): the consumer
        # of the Redis test must see only what the test queues
        (folder / f"{name}.toml").write_text(
            f'name = "{name}"\nnotebook = "pipes/{name}.ipynb"\ncron = "0 0 1 1 *"\n{extra}'
        )
    path = home.home / "workbench.toml"
    path.write_text(path.read_text().replace('folder = "pipelines"', f'folder = "{folder}"'))
    return load_config(home.home)


def test_a_run_leaves_its_notebook_and_record(lab, catalog):
    record = run_pipeline(lab, "ok", parameters={"value": 21}, catalog=catalog)
    assert record.status == "succeeded" and record.attempts == 1
    executed = nbformat.read(lab.pool / record.notebook, as_version=4)
    outputs = [o.get("text", "") for c in executed.cells for o in c.get("outputs", [])]
    assert "42\n" in outputs
    assert record.notebook.startswith("runs/ok/") and record.notebook.endswith(".ipynb")
    row = list_runs(catalog, "ok")[0]
    assert row["status"] == "succeeded" and '"value": 21' in row["parameters"]
    assert row["papermill_version"] and row["code_version"] and "ipykernel" in row["kernel"]
    assert row["duration_ms"] > 0


def test_a_failing_cell_is_recorded_with_its_error_and_retried(lab, catalog):
    record = run_pipeline(lab, "fails", catalog=catalog)
    assert record.status == "failed" and record.attempts == 2
    assert record.failing_cell == 4 and "ZeroDivisionError" in record.error
    rows = list_runs(catalog, "fails")
    assert [r["attempt"] for r in rows] == [2, 1]
    assert all(r["status"] == "failed" and r["failing_cell"] == 4 for r in rows)


def test_a_hanging_cell_is_stopped_by_the_cell_timeout(lab, catalog):
    started = time.monotonic()
    record = run_pipeline(lab, "hangs", catalog=catalog)
    assert time.monotonic() - started < 100  # the cell sleeps 120 s
    assert record.status == "failed" and record.failing_cell == 2
    assert record.error == "CellTimeoutError: the cell ran longer than 2 seconds"


def test_a_hanging_run_is_killed_at_the_wall_clock_timeout(lab, catalog):
    # the run's timeout counts from the kernel's first answer: however long a loaded machine
    # takes to start the kernel, 10 s is ample for the three short cells before the hanging one
    path = lab.pipelines.folder / "hangs.toml"
    path.write_text(
        path.read_text().replace(
            "timeout = 60\ncell_timeout = 2", "timeout = 10\ncell_timeout = 600"
        )
    )
    started = time.monotonic()
    record = run_pipeline(lab, "hangs", catalog=catalog)
    assert time.monotonic() - started < 100  # the cell sleeps 120 s
    assert record.status == "timeout" and record.failing_cell == 2
    assert "timeout of 10 s" in record.error
    # the kernel runs in a session of its own: it must have been killed with the run
    assert not kernels_in(lab.pipelines.folder)


def test_never_two_runs_of_one_pipeline_at_once(lab, catalog):
    outcomes = []

    def go():
        try:
            outcomes.append(run_pipeline(lab, "slow").status)
        except PipelineBusy as exc:
            outcomes.append(exc.message)

    threads = [threading.Thread(target=go) for _ in range(2)]
    threads[0].start()
    deadline = time.monotonic() + 120  # the second starts while the first one's run is recorded
    while not list_runs(catalog, "slow") and threads[0].is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r["status"] for r in list_runs(catalog, "slow")] == ["running"]
    threads[1].start()
    for t in threads:
        t.join()
    assert sorted(outcomes, key=len) == [
        "succeeded",
        "pipeline 'slow' is running already; this run is skipped",
    ]


def python3_kernelspec(folder, script: str) -> None:
    """Install, first on a JUPYTER_PATH, a ``python3`` kernel that runs ``script`` (given the
    connection file as its argument)."""
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    (folder / "kernel.py").write_text(script)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, str(folder / "kernel.py"), "{connection_file}"],
                "display_name": "Python 3",
                "language": "python",
            }
        )
    )


def test_a_kernel_that_fails_to_start_is_retried_as_an_infrastructure_failure(
    lab, catalog, tmp_path, monkeypatch
):
    # a kernel that dies at once the first time it is started, and works the second time
    marker = tmp_path / "failed-once"
    python3_kernelspec(
        tmp_path / "jupyter",
        f"""import os, sys
if not os.path.exists({str(marker)!r}):
    open({str(marker)!r}, "w").close()
    sys.exit(3)
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", "-f", sys.argv[1]])
""",
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    record = run_pipeline(lab, "ok", parameters={"value": 21}, catalog=catalog)
    assert record.status == "succeeded" and record.infra_retries == 1 and record.attempts == 1
    retried, failed = list_runs(catalog, "ok")
    assert failed["status"] == "kernel_failed" and failed["trigger"] == "manual"
    assert failed["error"] == (
        "the kernel did not start: RuntimeError: Kernel died before replying to kernel_info"
    )
    assert retried["status"] == "succeeded" and retried["trigger"] == "infra_retry"
    assert retried["attempt"] == failed["attempt"] == 1  # not one of the pipeline's retries
    assert retried["notebook"] == record.notebook and (lab.pool / record.notebook).is_file()


def test_a_kernel_that_never_starts_ends_the_run_after_two_infrastructure_retries(
    lab, catalog, tmp_path, monkeypatch
):
    python3_kernelspec(tmp_path / "jupyter", "raise SystemExit(3)\n")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    record = run_pipeline(lab, "fails", catalog=catalog)  # which has retries = 1 of its own
    assert record.status == "kernel_failed" and record.infra_retries == 2
    assert record.attempts == 1  # the notebook never ran: its own retries are not spent
    assert "Kernel died before replying to kernel_info" in record.error
    rows = list_runs(catalog, "fails")
    assert [r["trigger"] for r in rows] == ["infra_retry", "infra_retry", "manual"]
    assert {r["status"] for r in rows} == {"kernel_failed"} and {r["attempt"] for r in rows} == {1}
    failed = CliRunner().invoke(cli, ["--home", str(lab.home), "run", "fails"])
    assert failed.exit_code == 1 and "kernel_failed" in failed.output


def test_old_runs_are_pruned(lab, catalog):
    path = lab.home / "workbench.toml"
    path.write_text(path.read_text().replace("keep_runs = 100", "keep_runs = 2"))
    config = load_config(lab.home)
    records = [run_pipeline(config, "ok", catalog=catalog) for _ in range(3)]
    kept = list_runs(catalog, "ok")
    assert [r["id"] for r in kept] == [records[2].id, records[1].id]
    assert not (config.pool / records[0].notebook).exists()
    from workbench.jobs import list_jobs

    tracked = {j["provider_job_id"] for j in list_jobs(catalog, limit=100)}
    assert tracked == {r["provider_job_id"] for r in kept}  # the pruned run's job went too


def test_runs_are_tracked_jobs_with_a_step_per_section(lab, catalog):
    jobs = pytest.importorskip("workbench.jobs")
    sections = notebook_sections(lab.pipelines.folder / "ok.ipynb")
    assert sections == [("setup", 1), ("First", 1), ("Second", 1)]
    run_pipeline(lab, "ok", catalog=catalog)
    job = jobs.get_job(catalog, list_runs(catalog, "ok")[0]["provider_job_id"])
    assert job["progress"] == 1.0 and job["status"] == "complete"
    run_pipeline(lab, "fails", catalog=catalog)
    failed = jobs.get_job(catalog, list_runs(catalog, "fails")[0]["provider_job_id"])
    assert failed["status"] == "error" and 0 < failed["progress"] < 1


def test_definitions_are_validated(lab):
    (lab.pipelines.folder / "bad.toml").write_text(
        'name = "bad"\nnotebook = "pipes/ok.ipynb"\ncron = "every day"\n'
    )
    with pytest.raises(ConfigError, match="five fields"):
        load_pipelines(lab)
    (lab.pipelines.folder / "bad.toml").write_text(
        'name = "bad"\nnotebook = "pipes/ok.ipynb"\ncron = "* * * * *"\nspeed = 3\n'
    )
    with pytest.raises(ConfigError, match="Additional properties"):
        load_pipelines(lab)


def test_the_shipped_definitions_schedule_every_notebook(home):
    pipelines = load_pipelines(home)
    assert set(pipelines) == {
        *("status", "sanity", "export", "reports", "attrition", "features"),
        *("sync", "sync_maintenance", "poll", "tables"),
    }
    assert all(p.notebook.is_file() and p.enabled for p in pipelines.values())


def test_scheduler_tasks_and_crontab(lab):
    queue = open_queue(lab, immediate=True)
    periodic = {t.__name__ for t in queue.huey._registry._periodic_tasks}
    assert periodic == {"pipeline.ok", "pipeline.fails", "pipeline.hangs", "pipeline.slow"}
    assert queue.enqueue("run_pipeline", "ok").get()["status"] == "succeeded"
    lines = crontab_lines(lab)
    assert len(lines) == 5 and all(" -m workbench.cli --home " in line for line in lines[1:])
    assert lines[1].startswith("0 0 1 1 * /")  # not due while the tests run


def test_cli_run_runs_and_crontab(lab):
    runner = CliRunner()
    done = runner.invoke(cli, ["--home", str(lab.home), "run", "ok", "-p", "value", "5"])
    assert done.exit_code == 0, done.output
    assert "succeeded" in done.output and "notebook: " in done.output
    failed = runner.invoke(cli, ["--home", str(lab.home), "run", "fails"])
    assert failed.exit_code == 1 and "ZeroDivisionError" in failed.output
    history = runner.invoke(cli, ["--home", str(lab.home), "runs"])
    assert "ok" in history.output and "cell 4: ZeroDivisionError" in history.output
    assert "workbench.cli" in runner.invoke(cli, ["--home", str(lab.home), "crontab"]).output


def test_the_queue_can_be_redis(lab, redis_url, monkeypatch, catalog):
    import os
    import signal
    import subprocess
    import sys

    monkeypatch.setenv("WORKBENCH_REDIS_URL", redis_url)
    config = load_config(lab.home)
    queue = open_queue(config)
    assert type(queue.huey).__name__ == "RedisHuey"
    queue.enqueue("run_pipeline", "ok", None, "queue")
    assert queue.huey.pending_count() == 1
    consumer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workbench.cli",
            "--home",
            str(lab.home),
            "scheduler",
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = [r for r in list_runs(catalog, "ok") if r["status"] != "running"]
            if runs:
                break
            time.sleep(0.2)
    finally:
        os.killpg(consumer.pid, signal.SIGTERM)
        consumer.wait(timeout=30)
    assert runs and runs[0]["status"] == "succeeded" and runs[0]["trigger"] == "queue"
    assert queue.huey.pending_count() == 0


def kernels_in(folder):
    """Kernel processes working in ``folder`` (the runs of this test's pipelines)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if b"ipykernel_launcher" in command and cwd.startswith(str(folder)):
            found.append(int(entry))
    return found


def test_the_tables_pipeline_builds_the_tables_and_reports_refused_records(home, catalog):
    create_study(
        catalog,
        definition_from_options("demo", sensors=["location", "activity"], timezone="Europe/Berlin"),
    )
    simulate_days(home, "demo", subjects=2, days=1, seed=5)
    (person,) = enroll(catalog, "demo", 1)
    bad = {"studyId": "demo", "username": person.subject, "deviceid": "phone-x",
           "sensorname": "location", "timestamp": START_MS, "lat": "north", "lon": 6.9,
           "alt": 50.9, "accuracy": 5.0, "provider": "gps"}  # fmt: skip
    phones = IngestPhones(home)
    try:
        phones.register("demo", person.subject, "phone-x", person.token, joined=START_MS)
        phones.send(orjson.dumps([bad]), person.token)
    finally:
        phones.close()
    assert sensor_data(home, "demo", "location").collect().is_empty()  # nothing built yet

    record = run_pipeline(home, "tables", parameters={"processes": 1}, catalog=catalog)
    assert record.status == "succeeded", record.error
    printed = "".join(
        output.get("text", "")
        for cell in nbformat.read(home.pool / record.notebook, as_version=4).cells
        for output in cell.get("outputs", [])
    )
    assert "demo: sensor tables built" in printed
    assert "demo: 1 records quarantined" in printed
    location = sensor_data(home, "demo", "location").collect()
    assert location["subject"].n_unique() == 2 and location.height > 50
    assert sensor_data(home, "demo", "activity").collect().height > 50
    again = run_pipeline(home, "tables", parameters={"processes": 1}, catalog=catalog)
    assert again.status == "succeeded"
    assert "sensor tables up to date" in (home.pool / again.notebook).read_text()
