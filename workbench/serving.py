"""Run the upload server as a process: the command line of ``workbench serve`` and the wait
until it answers. The demo, the tests and the benchmarks start the server this way."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from workbench.errors import WorkbenchError


def serve_command(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int,
    workers: int | None = None,
    threads: int | None = None,
) -> list[str]:
    """The command line that runs ``workbench serve`` for ``home`` with this Python."""
    command = [
        sys.executable,
        "-m",
        "workbench.cli",
        "--home",
        str(home),
        "serve",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if workers:
        command += ["--workers", str(workers)]
    if threads:
        command += ["--threads", str(threads)]
    return command


def wait_for_server(
    url: str, *, timeout: float = 30.0, process: subprocess.Popen | None = None
) -> None:
    """Wait until ``url``/health answers (healthy, or degraded by a nearly full disk), or
    raise :class:`WorkbenchError`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise WorkbenchError(f"the upload server exited with status {process.returncode}")
        try:
            answer = httpx.get(f"{url}/health", timeout=1.0)
            if answer.status_code == 200 or (
                answer.status_code == 503 and answer.json().get("status") == "degraded"
            ):
                return
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.2)
    raise WorkbenchError(f"the upload server did not answer at {url} within {timeout:.0f} s")
