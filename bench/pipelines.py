"""Pipeline overhead: a trivial notebook run as a pipeline against the same code in plain Python.

Prints, in the same run:

- the per-run overhead: ``run_pipeline`` of a one-cell notebook (papermill subprocess, kernel
  start, run record, executed notebook written, job tracking) minus ``python -c`` running the
  same cell, medians of 5 (target: under 1.5 s);
- how many queued runs per minute two consumer workers (``workbench scheduler --workers 2``)
  complete, with 12 runs queued at once.

    python bench/pipelines.py
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench.catalog import open_catalog  # noqa: E402
from workbench.config import init_home, load_config  # noqa: E402
from workbench.pipelines import list_runs, run_pipeline  # noqa: E402
from workbench.scheduler import open_queue  # noqa: E402

CODE = "total = sum(range(1000))"
QUEUED = 12


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-pipelines-"))
    try:
        home = work / "home"
        init_home(home)
        folder = work / "pipes"
        folder.mkdir()
        notebook = new_notebook(
            cells=[
                new_code_cell("home = None", metadata={"tags": ["parameters"]}),
                new_markdown_cell("## Work"),
                new_code_cell(CODE),
            ],
            metadata={
                "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
            },
        )
        nbformat.write(notebook, folder / "trivial.ipynb")
        for n in range(QUEUED):
            (folder / f"t{n}.toml").write_text(
                f'name = "t{n}"\nnotebook = "pipes/trivial.ipynb"\ncron = "0 0 1 1 *"\n'
            )
        path = home / "workbench.toml"
        path.write_text(re.sub(r"(?m)^folder = .*$", f'folder = "{folder}"', path.read_text()))
        config = load_config(home)

        plain, piped = [], []
        for _ in range(5):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", CODE], check=True)
            plain.append(time.perf_counter() - started)
            started = time.perf_counter()
            record = run_pipeline(config, "t0")
            piped.append(time.perf_counter() - started)
            assert record.status == "succeeded", record.error
        p, q = statistics.median(plain), statistics.median(piped)
        print(f"plain python -c:            {p:6.2f} s")
        print(f"run_pipeline (papermill):   {q:6.2f} s")
        overhead = q - p
        print(
            f"overhead per run: {overhead:.2f} s (target < 1.5 s: {'met' if overhead < 1.5 else 'not met'})"
        )

        catalog = open_catalog(config)
        before = len(list_runs(catalog, limit=1000))
        queue = open_queue(config)
        for n in range(QUEUED):
            queue.enqueue("run_pipeline", f"t{n}", None, "bench")
        started = time.perf_counter()
        consumer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workbench.cli",
                "--home",
                str(home),
                "scheduler",
                "--workers",
                "2",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            while True:
                runs = list_runs(catalog, limit=1000)
                done = [r for r in runs[: len(runs) - before] if r["status"] != "running"]
                if len(done) >= QUEUED:
                    break
                if time.perf_counter() - started > 600:
                    raise SystemExit(
                        f"only {len(done)} of {QUEUED} queued runs finished in 10 minutes"
                    )
                time.sleep(0.2)
            seconds = time.perf_counter() - started
        finally:
            os.killpg(consumer.pid, signal.SIGTERM)
            consumer.wait(timeout=30)
            catalog.dispose()
        assert all(r["status"] == "succeeded" for r in done)
        print(
            f"queued runs, 2 consumer workers: {QUEUED} in {seconds:.1f} s = "
            f"{QUEUED / seconds * 60:.0f} runs/minute (consumer start included)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
