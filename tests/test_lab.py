"""`workbench lab`: JupyterLab on the home, as a researcher meets it.

The lab runs as a real ``workbench lab`` process on a free loopback port, over a home made as
``workbench init`` makes it, with ``$HOME`` pointed at an empty folder so that anything
written to the user's own Jupyter folders shows. Code runs in its kernels through the Jupyter
server's REST and websocket API, and a notebook opens in headless Chromium (Playwright).
Screenshots go to ``test-output/lab/`` (or ``$WORKBENCH_TEST_OUTPUT/lab/``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from tests.conftest import REPO, free_port
from workbench.cli import cli
from workbench.config import init_home
from workbench.dashboards import DashboardAccess, stop_process
from workbench.lab import STATE_ENV, TOKEN_ENV, lab_access, lab_command, wait_for_lab

# The notebook of the home that the browser test opens (a path in its notebooks folder).
EXAMPLE_NOTEBOOK = "explore/one_subject_week.ipynb"
OUTPUT = os.environ.get("WORKBENCH_TEST_OUTPUT") or str(REPO / "test-output")
GUIDE = (REPO / "docs" / "guide.md").read_text()


@dataclass
class Lab:
    """A running ``workbench lab``: its address, token, home, the user's ``$HOME``, its
    process and what it printed."""

    url: str
    token: str
    home: Path
    user_home: Path
    process: subprocess.Popen
    output: Path

    def get(self, path: str, *, token: str | None = None, **kwargs) -> httpx.Response:
        params = {"token": self.token if token is None else token} if token != "" else None
        return httpx.get(self.url + path, params=params, timeout=60, **kwargs)

    def printed(self) -> str:
        return self.output.read_text(errors="replace")


def start_lab(root: Path, token: str) -> Lab:
    """``workbench lab`` on a fresh home in ``root`` with ``token``, ready to answer."""
    config = init_home(root / "home")
    user_home = root / "user"
    user_home.mkdir()
    port = free_port()
    output = root / "lab.out"
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "workbench.cli", "--home", str(config.home), "lab",
             "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
            env={**os.environ, "HOME": str(user_home), TOKEN_ENV: token,
                 "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
        )  # fmt: skip
    lab = Lab(f"http://127.0.0.1:{port}", token, config.home, user_home, process, output)
    try:
        wait_for_lab(lab.url, process=process, access=DashboardAccess(token=token), timeout=240)
        deadline = time.monotonic() + 60  # the address is printed once the server answers
        while "JupyterLab:" not in lab.printed() and time.monotonic() < deadline:
            time.sleep(0.2)
    except BaseException:
        stop_process(process)
        raise
    return lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    running = start_lab(tmp_path_factory.mktemp("lab"), secrets.token_urlsafe(24))
    yield running
    stop_process(running.process)


def run_in_kernel(lab: Lab, code: str, *, kernel: str | None = None) -> tuple[str, str]:
    """Run ``code`` in a kernel of the lab (a new ``python3`` one unless ``kernel`` is an id)
    over the kernel's websocket, as JupyterLab does; return its standard output and the
    kernel's id. A traceback in the kernel fails the test."""
    import websocket

    if kernel is None:
        started = httpx.post(
            f"{lab.url}/api/kernels",
            params={"token": lab.token},
            json={"name": "python3"},
            timeout=120,
        )
        assert started.status_code == 201, started.text
        kernel = started.json()["id"]
    ws = websocket.create_connection(
        f"ws://{lab.url.removeprefix('http://')}/api/kernels/{kernel}/channels"
        f"?token={lab.token}&session_id={uuid.uuid4().hex}",
        timeout=180,  # the kernel may take long to start on a loaded machine
    )
    msg_id = uuid.uuid4().hex
    ws.send(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "username": "test",
                    "session": uuid.uuid4().hex,
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "content": {"code": code, "silent": False, "store_history": False,
                            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
                "channel": "shell",
            }
        )
    )  # fmt: skip
    output = []
    try:
        while True:
            message = json.loads(ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream" and content["name"] == "stdout":
                output.append(content["text"])
            elif kind == "error":
                raise AssertionError("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(output), kernel
    finally:
        ws.close()


def test_lab_prints_its_address_with_the_token(lab):
    assert f"JupyterLab: {lab.url}/lab?token={lab.token}\n" in lab.printed()


@pytest.mark.parametrize("path", ["/lab", "/api/contents", "/api/kernels"])
def test_lab_needs_the_token(lab, path):
    bare = lab.get(path, token="")
    if path == "/lab":  # a page: sent to the login page
        assert bare.status_code == 302 and "/login" in bare.headers["location"]
    else:
        assert bare.status_code == 403
    assert lab.get(path, token="not-" + lab.token).status_code in (302, 403)
    assert lab.get(path).status_code == 200


def test_the_token_is_not_on_any_command_line(lab):
    servers = list((lab.home / ".lab" / "runtime").glob("jpserver-*.json"))
    assert len(servers) == 1
    pid = json.loads(servers[0].read_text())["pid"]
    for process in (pid, lab.process.pid):
        assert lab.token not in Path(f"/proc/{process}/cmdline").read_text()


def test_the_lab_shows_the_homes_notebooks_folder(lab):
    listing = lab.get("/api/contents").json()
    names = {item["name"] for item in listing["content"]}
    assert names == {p.name for p in (lab.home / "notebooks").iterdir()}
    assert {EXAMPLE_NOTEBOOK.split("/")[0], "dashboards"} <= names
    (lab.home / "notebooks" / "mine.ipynb").write_bytes(
        (lab.home / "notebooks" / EXAMPLE_NOTEBOOK).read_bytes()
    )
    assert lab.get("/api/contents/mine.ipynb").json()["type"] == "notebook"


def test_a_kernel_imports_the_workbench_and_finds_the_home(lab):
    output, kernel = run_in_kernel(
        lab,
        "import json, os, sys, workbench\n"
        "config = workbench.load_config()\n"
        "print(json.dumps({'home': str(config.home), 'pool': str(config.pool),\n"
        "                  'python': sys.executable, 'module': workbench.__file__,\n"
        "                  'cwd': os.getcwd()}))\n",
    )
    seen = json.loads(output)
    assert seen["home"] == str(lab.home)
    assert seen["pool"] == str(lab.home / "pool")
    assert seen["python"] == sys.executable  # the default kernel is this interpreter's
    assert Path(seen["module"]).is_relative_to(REPO)
    assert seen["cwd"] == str(lab.home / "notebooks")
    assert httpx.delete(
        f"{lab.url}/api/kernels/{kernel}", params={"token": lab.token}, timeout=60
    ).is_success


def test_the_lab_keeps_its_state_in_the_home_not_in_the_users_jupyter(lab):
    theme = "@jupyterlab/apputils-extension:themes"
    saved = httpx.put(
        f"{lab.url}/lab/api/settings/{theme}",
        params={"token": lab.token},
        json={"raw": json.dumps({"theme": "JupyterLab Light"})},
        timeout=60,
    )
    assert saved.status_code == 204, saved.text
    _, kernel = run_in_kernel(lab, "get_ipython().history_manager.reset()")  # IPython's files
    httpx.delete(f"{lab.url}/api/kernels/{kernel}", params={"token": lab.token}, timeout=60)
    private = lab.home / ".lab"
    settings = private / "settings" / "@jupyterlab" / "apputils-extension"
    assert "JupyterLab Light" in (settings / "themes.jupyterlab-settings").read_text()
    assert list((private / "runtime").glob("jpserver-*.json"))
    assert (private / "ipython" / "profile_default").is_dir()
    for folder in [private, *(private / sub for sub in STATE_ENV.values())]:
        # private (Jupyter adds the sticky bit to its runtime folder)
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    notification = lab.get("/lab/api/settings/@jupyterlab/apputils-extension:notification")
    assert notification.json()["settings"]["fetchNews"] == "false"  # nothing from the internet
    for own in (".jupyter", ".ipython", ".local/share/jupyter"):
        assert not (lab.user_home / own).exists(), own
    assert not (REPO / ".lab").exists()


def test_a_port_in_use_is_refused(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["--home", str(home.home), "lab", "--port", str(port)])
    assert result.exit_code == 2
    assert f"error: port {port} on 127.0.0.1 is in use already" in result.output


def test_make_run_goes_on_without_jupyterlab_when_its_port_is_taken(home, capsys):
    from workbench.simulators.demo import _start_lab

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _start_lab(home, port) is None
    printed = capsys.readouterr().out
    assert f"JupyterLab not started: port {port} on 127.0.0.1 is in use already" in printed


def test_the_token_is_random_per_start_unless_set():
    first, second = lab_access(environ={}), lab_access(environ={})
    assert first.token != second.token and len(first.token) >= 40
    assert lab_access(environ={TOKEN_ENV: "chosen"}).token == "chosen"
    assert not any("chosen" in part for part in lab_command(port=8888, root=REPO))


def test_lab_help_explains_it_and_the_guide_mentions_it():
    result = CliRunner().invoke(cli, ["lab", "--help"])
    assert result.exit_code == 0
    for words in ("JupyterLab", "notebooks/", "WORKBENCH_LAB_TOKEN", "workbench lab", "--port"):
        assert words in result.output
    assert "workbench lab" in GUIDE


@pytest.mark.slow
def test_stopping_the_lab_stops_its_kernels(tmp_path):
    running = start_lab(tmp_path, secrets.token_urlsafe(24))
    try:
        output, _ = run_in_kernel(running, "import os; print(os.getpid())")
        kernel_pid = int(output)
    finally:
        stop_process(running.process)  # SIGTERM, as Ctrl-C or a process manager does
    assert running.process.returncode == 0, running.printed()[-2000:]
    deadline = time.monotonic() + 60
    while Path(f"/proc/{kernel_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{kernel_pid}").exists(), "a kernel outlived the lab"


# ---------------------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the browser tests need Debian's chromium: `make test` installs it"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


@pytest.mark.slow
def test_jupyterlab_opens_a_notebook_of_the_home(browser, lab):
    notebook = json.loads((lab.home / "notebooks" / EXAMPLE_NOTEBOOK).read_text())
    first = next(c for c in notebook["cells"] if c["cell_type"] == "markdown")
    heading = "".join(first["source"]).splitlines()[0].lstrip("# ").strip()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.route(lambda u: not u.startswith("http://127.0.0.1"), lambda r: r.abort())
    try:
        page.goto(f"{lab.url}/lab/tree/{EXAMPLE_NOTEBOOK}?token={lab.token}")
        rendered = page.wait_for_selector(
            ".jp-NotebookPanel .jp-MarkdownCell .jp-RenderedMarkdown h1", timeout=180_000
        )
        assert rendered.inner_text().strip() == heading
        tab = page.wait_for_selector(".lm-TabBar-tab.jp-mod-current", timeout=60_000)
        assert tab.inner_text().strip() == EXAMPLE_NOTEBOOK.rsplit("/", 1)[-1]
        # the lab asks nothing about fetching news from the internet: it fetches none
        assert not page.query_selector("text=Would you like to get notified")
        folder = os.path.join(OUTPUT, "lab")
        os.makedirs(folder, exist_ok=True)
        page.screenshot(path=os.path.join(folder, "notebook.png"))
        assert not errors, errors
    finally:
        page.close()
