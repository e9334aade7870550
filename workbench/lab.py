"""JupyterLab on a home: ``workbench lab``, where researchers open the study's data.

:func:`serve_lab` starts JupyterLab from this interpreter, so the default kernel (ipykernel's
``python3``) imports this workbench and finds the home through ``$WORKBENCH_HOME``, as the
notebooks and dashboards do: ``workbench.load_config()`` in a cell is the home's configuration.
Its root folder is the home's ``notebooks/`` (the copies ``workbench init`` made).

Sign-in is a token, random per start unless ``$WORKBENCH_LAB_TOKEN`` sets it, passed to the
server in its environment (never on its command line) and printed in the URL
(:func:`lab_url`). JupyterLab's configuration, settings, workspaces, runtime files (which hold
the token) and IPython's profile live in the home's private ``.lab/`` (:func:`lab_folders`),
not in the user's ``~/.jupyter``: the user's own Jupyter configuration does not change what
the lab serves, and nothing of a study's lab leaks into it. The lab fetches no news and checks
for no updates on the internet (unless a researcher turns that on in its settings).

Starting, waiting for and stopping the server are the dashboards' (:mod:`workbench.dashboards`).

Example::

    from workbench.lab import lab_access, lab_url, serve_lab
    access = lab_access()
    process = serve_lab(config, port=8888, access=access)
    print(lab_url("http://127.0.0.1:8888", access))
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from workbench.config import Config
from workbench.dashboards import (
    DashboardAccess,
    dashboard_environment,
    start_server,
    wait_for_dashboards,
)
from workbench.errors import PortInUse
from workbench.pool import make_folders, write_file_atomically

TOKEN_ENV = "WORKBENCH_LAB_TOKEN"
LAB_FOLDER = ".lab"  # in the home, private to its user
# Where Jupyter and IPython keep their state, each a subfolder of the lab's private folder.
STATE_ENV = {
    "JUPYTER_CONFIG_DIR": "config",
    "JUPYTER_DATA_DIR": "data",
    "JUPYTER_RUNTIME_DIR": "runtime",
    "JUPYTERLAB_SETTINGS_DIR": "settings",
    "JUPYTERLAB_WORKSPACES_DIR": "workspaces",
    "IPYTHONDIR": "ipython",
}
# Settings a new lab starts with, by file of its settings folder (a researcher may change them):
# no news or update checks from the internet, and so no question about them at every start.
FIRST_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def lab_access(*, environ: Mapping[str, str] = os.environ) -> DashboardAccess:
    """The sign-in of a start of the lab: the token in ``$WORKBENCH_LAB_TOKEN``, else a
    random one.

    Example: ``lab_access().url("http://127.0.0.1:8888/lab")`` → ``"...?token=Jx3…"``.
    """
    return DashboardAccess(token=environ.get(TOKEN_ENV, "") or secrets.token_urlsafe(32))


def lab_url(url: str, access: DashboardAccess) -> str:
    """The address that opens JupyterLab of the server at ``url`` signed in.

    Example: ``lab_url("http://127.0.0.1:8888", access)`` → ``".../lab?token=..."``.
    """
    return access.url(f"{url}/lab")


def notebooks_folder(config: Config) -> Path:
    """The lab's root: the home's ``notebooks/`` (made, empty, if the home has none).

    Example: ``notebooks_folder(config) / "status.ipynb"``.
    """
    return make_folders(config.home / "notebooks")


def lab_folders(config: Config) -> dict[str, Path]:
    """The private folders (0700, whatever the umask or the home's modes) where the lab's
    Jupyter and IPython keep their state, by the environment variable that points there; a
    new settings folder gets :data:`FIRST_SETTINGS`.

    Example: ``lab_folders(config)["JUPYTER_RUNTIME_DIR"]`` → ``<home>/.lab/runtime``.
    """
    root = config.home / LAB_FOLDER
    folders = {name: root / sub for name, sub in STATE_ENV.items()}
    for folder in (root, *folders.values()):
        make_folders(folder)
        os.chmod(folder, 0o700)
    for name, values in FIRST_SETTINGS.items():
        path = folders["JUPYTERLAB_SETTINGS_DIR"] / name
        if not path.exists():
            write_file_atomically(path, json.dumps(values, indent=2).encode(), durable=False)
    return folders


def lab_command(
    *, port: int, host: str = "127.0.0.1", root: Path, browser: bool = False
) -> list[str]:
    """The command line serving JupyterLab on ``host``:``port`` with ``root`` as its root
    folder, on that port only (never another one when it is taken), without news or update
    checks from the internet. The token comes from the environment (:func:`lab_environment`).
    """
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={root}",
        f"--ServerApp.ip={host}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.open_browser={browser}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        # no language servers looked for (autodetection runs npm at every start)
        "--LanguageServerManager.autodetect=False",
    ]
    if os.geteuid() == 0:
        # Jupyter refuses root unless told; the workbench runs as whoever runs it (a container's
        # root too), and the token guards the kernels whoever that is.
        command.append("--ServerApp.allow_root=True")
    return command


def lab_environment(
    config: Config, access: DashboardAccess, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The environment of the JupyterLab process and its kernels: the home, the token of
    ``access`` as ``$JUPYTER_TOKEN`` (the caller's ``$WORKBENCH_LAB_TOKEN`` does not pass on)
    and Jupyter's folders in the home (:func:`lab_folders`)."""
    inherited = {name: value for name, value in environ.items() if name != TOKEN_ENV}
    env = dashboard_environment(config, access, inherited)
    env.update({name: str(folder) for name, folder in lab_folders(config).items()})
    return env


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUse` when something listens on ``host``:``port`` already."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # as the server will bind: a port left in TIME_WAIT by a stopped server is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {port} on {host} is in use already: stop what serves there or "
                    "choose another port"
                ) from exc
            raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def serve_lab(
    config: Config,
    *,
    port: int,
    access: DashboardAccess,
    host: str = "127.0.0.1",
    browser: bool = False,
    log: Path | None = None,
) -> subprocess.Popen:
    """Start JupyterLab on ``config``'s home behind the token of ``access``
    (:func:`lab_access`), in its own process group, its output appended to ``log`` (default:
    this process's); :class:`PortInUse` if ``port`` is taken. The caller waits for it
    (:func:`wait_for_lab`) and stops it (:func:`workbench.dashboards.stop_process`).

    Example: ``serve_lab(config, port=8888, access=lab_access())``.
    """
    if not access.token:
        raise ValueError("the lab is served only behind a token")
    check_port_free(host, port)
    root = notebooks_folder(config)
    return start_server(
        config,
        lab_command(port=port, host=host, root=root, browser=browser),
        env=lab_environment(config, access),
        cwd=root,
        log=log,
    )


def wait_for_lab(
    url: str, *, process: subprocess.Popen, access: DashboardAccess, timeout: float = 180
) -> None:
    """Wait until the JupyterLab server at ``url`` answers ``/api/status`` with the token
    of ``access``; raise :class:`WorkbenchError` if it exits or times out."""
    wait_for_dashboards(
        url,
        process=process,
        timeout=timeout,
        token=access.token,
        path="/api/status",
        name="JupyterLab",
    )
