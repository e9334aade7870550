"""Every shipped notebook is thin, parameterized, stripped, and passes nbval on a demo pool."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import nbformat
import pytest

from tests.conftest import REPO
from workbench.simulators.study_server import StudyServer, demo_tables, start_in_thread

SHIPPED = REPO / "workbench" / "shipped" / "notebooks"
NOTEBOOKS = sorted(SHIPPED.glob("*.ipynb")) + sorted((SHIPPED / "dashboards").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_parameterized_and_stripped(path):
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert notebook.metadata["language_info"]["name"] == "python"
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "home = None" in code[0].source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert "import workbench" in code[1].source


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_notebook_passes_nbval_on_the_demo_pool(tmp_path):
    home = tmp_path / "demo-home"
    env = {**os.environ, "MT_USER": "demo", "MT_PASSWORD": "demo"}
    subprocess.run(
        [sys.executable, "-m", "workbench.cli", "--home", str(home), "init"],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    config = home / "workbench.toml"
    config.write_text(config.read_text().replace(":9000", f":{free_port()}"))
    demo = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "--home", str(home), "demo", "--exit",
         "--port", str(free_port()), "--subjects", "5", "--days", "3"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    # the export notebook needs a study server: one more, serving new rows
    tables, deleteable = demo_tables(
        home / "keys" / "public_key.pem", participants=4, days=3, seed=9
    )
    server = StudyServer(tables, deleteable=deleteable, user="demo", password="demo")
    with start_in_thread(server) as running:
        config.write_text(
            re.sub(
                r'^url = "http://127\.0\.0\.1:\d+"',
                f'url = "{running.url}"',
                config.read_text(),
                flags=re.M,
            )
        )
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
             "--nbval-sanitize-with", str(REPO / "tests" / "nbval_sanitize.cfg"),
             *map(str, NOTEBOOKS)],
            capture_output=True, text=True, timeout=600, cwd=REPO,
            env={**env, "WORKBENCH_HOME": str(home)},
        )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(NOTEBOOKS)} passed" in result.stdout or "passed" in result.stdout
