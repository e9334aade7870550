"""`make run` as a user sees it: `workbench demo` keeps serving the upload server, the
scheduler, the dashboards and JupyterLab over the demo pool, prints their addresses (the
dashboards' and JupyterLab's with their tokens), and stops them all on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import free_port
from workbench.config import init_home
from workbench.simulators.demo import DEMO_SENSING_SUBJECTS

pytestmark = pytest.mark.slow


def read_until(process: subprocess.Popen, marker: str, timeout: float) -> str:
    """The demo's output up to the line containing ``marker``."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} in the demo's output:\n{''.join(seen)[-3000:]}")


def test_demo_serves_dashboards_over_the_demo_pool(tmp_path):
    home = tmp_path / "demo-home"
    init_home(home)
    config = home / "workbench.toml"  # the template's local servers, on ports free here
    config.write_text(
        config.read_text().replace(":9000", f":{free_port()}").replace(":9100", f":{free_port()}")
    )
    port, dashboards_port, lab_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "--home", str(home), "demo", "--port", str(port),
         "--dashboards-port", str(dashboards_port), "--lab-port", str(lab_port),
         "--subjects", "4", "--days", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        env={**os.environ, "MT_USER": "demo", "MT_PASSWORD": "demo"},
    )  # fmt: skip
    try:
        output = read_until(process, "(Ctrl-C to stop)", timeout=300)
        urls = dict(re.findall(r"^dashboards, ([a-z ]+): (\S+)$", output, re.M))
        assert set(urls) == {"landing page", "study status", "attrition"}, output
        assert f"upload server: http://127.0.0.1:{port}" in output
        assert "scheduler running" in output
        assert "sync: queued on the scheduler" in output
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        landing = httpx.get(urls["landing page"], timeout=30).text
        assert "study_status.ipynb" in landing and "attrition.ipynb" in landing
        # the printed addresses carry the start's token; without it a page is not served
        tokens = {re.search(r"\?token=([\w-]+)$", url).group(1) for url in urls.values()}
        assert len(tokens) == 1 and len(tokens.pop()) >= 40, urls
        for url in urls.values():
            bare = httpx.get(url.split("?")[0], timeout=30)
            assert bare.status_code == 302 and "/login" in bare.headers["location"]
        # JupyterLab on the demo home's notebooks, behind a token of its own
        lab = re.search(r"^JupyterLab: (http://127\.0\.0\.1:(\d+)/lab)\?token=([\w-]+)$",
                        output, re.M)  # fmt: skip
        assert lab and int(lab.group(2)) == lab_port, output
        lab_root, lab_token = f"http://127.0.0.1:{lab_port}", lab.group(3)
        assert len(lab_token) >= 40 and lab_token not in urls["landing page"]
        listing = httpx.get(f"{lab_root}/api/contents", params={"token": lab_token}, timeout=30)
        assert "status.ipynb" in {item["name"] for item in listing.json()["content"]}
        assert httpx.get(f"{lab_root}/api/contents", timeout=30).status_code == 403
        bare = httpx.get(lab.group(1), timeout=30)
        assert bare.status_code == 302 and "/login" in bare.headers["location"]

        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page()
            page.route(lambda u: not u.startswith("http://127.0.0.1"), lambda r: r.abort())
            page.goto(urls["study status"])
            enrolled = page.wait_for_selector(
                ".wb-card[data-key='enrolled'] .wb-value", timeout=120_000
            )
            # the demo's four simulated phones and the subjects of its simulated days
            assert enrolled.inner_text() == str(4 + DEMO_SENSING_SUBJECTS)
            page.goto(urls["attrition"])
            page.wait_for_selector(".bqplot path.line", timeout=120_000)
            browser.close()

        # the demo's account on the provider simulator syncs through the scheduler
        deadline, accounts = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            listed = subprocess.run(
                [sys.executable, "-m", "workbench.cli", "--home", str(home), "sync", "accounts",
                 "--json"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            accounts = json.loads(listed.stdout or "[]")
            if accounts and all(a["last_synced_at"] for a in accounts):
                break
            time.sleep(1)
        assert accounts and all(a["last_synced_at"] for a in accounts), accounts
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    # every server the demo started stopped with it (within a minute on a loaded machine)
    lab_status = f"http://127.0.0.1:{lab_port}/api/status"
    for url in (f"http://127.0.0.1:{port}/health", urls.get("landing page", ""), lab_status):
        deadline = time.monotonic() + 60
        while url and time.monotonic() < deadline:
            try:
                httpx.get(url, timeout=2)
            except httpx.HTTPError:
                break
            time.sleep(0.5)
        if url:
            with pytest.raises(httpx.HTTPError):
                httpx.get(url, timeout=2)
