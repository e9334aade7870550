"""Study status dashboard: time from navigation to a fully rendered page, against a trivial
Voila notebook with one widget served by the same server in the same run.

Builds a synthetic study of 10,000 subjects (four sensors, up to 14 days of data each, every
state present), serves the status dashboard and a one-widget notebook with Voila exactly as
``workbench dashboards`` does, and opens each in headless Chromium, alternating, ``--rounds``
times. "Fully rendered" means the headline counts, the subject table, the heat map's cells
and the alerts are on the page (for the trivial notebook: its widget). Between two openings
the script waits for Voila to have a kernel ready again. It then does the same with kernels
started on demand (``workbench dashboards --cold``) and prints both.

    python bench/dashboards.py [--subjects 10000] [--days 14] [--rounds 5]

Target: the status dashboard in at most 1.5 times the trivial notebook's time.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.synthetic import synthetic_study  # noqa: E402
from workbench.config import init_home  # noqa: E402
from workbench.dashboards import (  # noqa: E402
    DASHBOARDS,
    serve_dashboards,
    status_view,
    stop_process,
    wait_for_dashboards,
)

TARGET = 1.5
STATUS_READY = (".wb-cards", "table.wb-table tbody tr", ".bqplot rect.heatmapcell", ".wb-alert")
TRIVIAL_READY = ("#trivial-widget",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trivial_notebook(path: Path) -> None:
    """A notebook with one ipywidget, the baseline of a Voila page."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata = nbformat.read(DASHBOARDS / "study_status.ipynb", 4).metadata
    notebook.cells = [
        nbformat.v4.new_code_cell(
            "import ipywidgets\n\nipywidgets.HTML(\"<b id='trivial-widget'>ready</b>\")"
        )
    ]
    nbformat.write(notebook, path)


def open_once(browser, url: str, ready: tuple[str, ...], interactions: dict | None) -> float:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.route(lambda u: not u.startswith("http://127.0.0.1"), lambda route: route.abort())
    started = time.perf_counter()
    page.goto(url)
    for selector in ready:
        page.wait_for_selector(selector, timeout=180_000)
    seconds = time.perf_counter() - started
    if interactions is not None:
        interact(page, interactions)
    page.close()
    return seconds


def interact(page, times: dict) -> None:
    """How long the page takes to answer what a coordinator does first on a big study."""

    def timed(name: str, action, condition: str) -> None:
        started = time.perf_counter()
        action()
        page.wait_for_function(condition, timeout=60_000)
        times.setdefault(name, []).append(time.perf_counter() - started)

    first_state = "document.querySelector('table.wb-table tbody tr td:nth-child(2)').innerText"
    timed(
        "next page",
        lambda: page.click("text=next"),
        "() => document.body.innerText.includes('rows 26')",
    )
    timed(
        "show only who left",
        lambda: page.select_option("select >> nth=2", label="left"),
        f"() => {first_state} === 'left' && document.body.innerText.includes('rows 1')",
    )
    timed(
        "switch to another study",
        lambda: page.select_option("select >> nth=0", label="small"),
        "() => document.querySelector(\"[data-key='enrolled'] .wb-value\").innerText === '40'",
    )


def measure(browser, base: str, rounds: int, settle: float, interactions: dict | None):
    trivial, status = [], []
    for k in range(rounds):
        order = ["trivial", "status"] if k % 2 == 0 else ["status", "trivial"]
        for name in order:
            if name == "trivial":
                url = f"{base}/voila/render/trivial.ipynb"
                trivial.append(open_once(browser, url, TRIVIAL_READY, None))
            else:
                url = f"{base}/voila/render/study_status.ipynb"
                status.append(open_once(browser, url, STATUS_READY, interactions))
            time.sleep(settle)  # Voila starts and runs the next kernel of this notebook
    return trivial, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=15.0, help="seconds between openings")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if not chromium:
        sys.exit("needs Debian's chromium (make test installs it)")
    with tempfile.TemporaryDirectory(prefix="wb-bench-dash-") as tmp:
        config = init_home(Path(tmp) / "home")
        started = time.perf_counter()
        built = synthetic_study(config, "big", subjects=args.subjects, days=args.days)
        synthetic_study(config, "small", subjects=40, seed=2)  # the study switched to
        view = status_view(config, "big")
        print(
            f"study: {args.subjects} subjects, {built.uploads} ledger rows, "
            f"{len(view.alerts)} open alerts (built in {time.perf_counter() - started:.1f} s)"
        )
        print(f"counts: {view.counts}")
        folder = Path(tmp) / "dashboards"
        folder.mkdir()
        shutil.copy(DASHBOARDS / "study_status.ipynb", folder)
        trivial_notebook(folder / "trivial.ipynb")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, headless=True, args=["--no-sandbox"]
            )
            results, interactions = {}, {}
            for mode, preheat in (("kernel kept ready (as served)", True), ("cold", False)):
                port = free_port()
                process = serve_dashboards(
                    config, port=port, folder=folder, preheat=preheat, log=Path(tmp) / "voila.log"
                )
                try:
                    base = f"http://127.0.0.1:{port}"
                    wait_for_dashboards(base, process=process)
                    time.sleep(args.settle * 2 if preheat else 2)  # the first kernels run
                    results[mode] = measure(
                        browser, base, args.rounds, args.settle, interactions if preheat else None
                    )
                finally:
                    stop_process(process)
            browser.close()
    print(f"navigation to fully rendered page, median of {args.rounds} (seconds):")
    for mode, (trivial, status) in results.items():
        t, s = statistics.median(trivial), statistics.median(status)
        print(
            f"  {mode:<30} trivial notebook {t:5.2f}   status dashboard {s:5.2f}   "
            f"ratio {s / t:.2f}"
        )
        print(
            f"    all: trivial {[round(x, 2) for x in trivial]}  status {[round(x, 2) for x in status]}"
        )
    print("responsiveness of the 10,000-subject page, median (seconds from action to new content):")
    for name, times in interactions.items():
        print(f"  {name:<26} {statistics.median(times):5.2f}")
    trivial, status = results["kernel kept ready (as served)"]
    ratio = statistics.median(status) / statistics.median(trivial)
    verdict = "met" if ratio <= TARGET else "not met"
    print(f"target: status dashboard <= {TARGET} x trivial notebook, as served: {verdict}")


if __name__ == "__main__":
    main()
