"""The built wheel works without a checkout: installed into a fresh virtual environment, it
runs `workbench init` and `workbench demo --exit` from an empty folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow

NOT_SOURCES = ("build", "dist", "site", "*.egg-info", ".venv", ".git", "__pycache__", "*-home")


def run(command, **options):
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, **options)
    assert result.returncode == 0, (command, result.stdout[-4000:], result.stderr[-4000:])
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A virtual environment outside the checkout with the wheel installed; the other
    dependencies come from this environment's site-packages (a .pth), not the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    sources = root / "sources"  # built from a copy, so the checkout gains no build/ folder
    shutil.copytree(REPO, sources, ignore=shutil.ignore_patterns(*NOT_SOURCES, "test-output"))
    wheels = root / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(sources)])  # fmt: skip
    [wheel] = wheels.glob("workbench-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    target = run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    # after the wheel: the installed workbench comes first, the dependencies after it
    (Path(target) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORKBENCH_HOME")}
    return {**env, "PYTHONNOUSERSITE": "1"}


def test_the_wheel_holds_no_package_named_server_and_the_checkout_is_not_used(installed, tmp_path):
    python = installed / "bin" / "python"
    found = run(
        [python, "-c",
         "import importlib.util as u, workbench, workbench_server.app, workbench.templates as t; "
         "print(workbench.__file__); print(workbench_server.__file__); "
         "print(u.find_spec('server')); print(t.SHIPPED)"],
        cwd=tmp_path, env=environment(),
    ).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(installed) for p in (found[0], found[1], found[3])), found
    assert found[2] == "None"  # no top-level `server` package installed (nor the checkout's)
    assert not any(Path(p).is_relative_to(REPO) for p in found if p != "None")
    sensors = run(
        [python, "-c",
         "import workbench, workbench.features as f; s = workbench.sensor_schema('location'); "
         "print(s.known, s.interval_s, len(f.list_families()))"],
        cwd=tmp_path, env=environment(),
    ).stdout.split()  # fmt: skip
    assert sensors[:2] == ["True", "600"] and int(sensors[2]) >= 6, sensors


def test_init_and_demo_run_from_an_empty_folder(installed, tmp_path):
    workbench = installed / "bin" / "workbench"
    folder = tmp_path / "empty"
    folder.mkdir()
    env = {**environment(), "WORKBENCH_HOME": str(folder / "lab")}
    run([workbench, "init"], cwd=folder, env=env)
    home = folder / "lab"
    assert (home / "pipelines" / "status.toml").is_file()
    assert (home / "notebooks" / "status.ipynb").is_file()
    assert (home / "notebooks" / "dashboards" / "study_status.ipynb").is_file()
    assert (home / "notebooks" / "explore" / "one_subject_week.ipynb").is_file()
    # the schedule is the home's own: a pipeline removed there is no longer scheduled
    (home / "pipelines" / "sanity.toml").unlink()
    schedule = run([workbench, "crontab"], cwd=folder, env=env).stdout
    assert " run status " in schedule and " run sanity " not in schedule
    port = free_port()
    demo = run(
        [workbench, "--home", str(folder / "demo"), "demo", "--exit", "--dashboards-port", "0",
         "--port", str(port), "--subjects", "3", "--days", "1"],
        cwd=folder, env=environment(),
    )  # fmt: skip
    assert "created study 'demo'" in demo.stdout and "data pool:" in demo.stdout, demo.stdout
    assert (folder / "demo" / "pipelines" / "status.toml").is_file()
    assert (folder / "demo" / "notebooks" / "export.ipynb").is_file()
