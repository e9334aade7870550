"""File modes: what the workbench writes is private to its user (0600 files, 0700 folders)
whatever the umask, or readable by the ``[pool] group`` (0640 files, 0750 setgid folders)."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import httpx
import nbformat
import orjson
import pytest
from click.testing import CliRunner

from tests.conftest import Phone, ServerProcess
from workbench.catalog import open_catalog
from workbench.cli import cli
from workbench.config import init_home, load_config
from workbench.enrollment import enroll
from workbench.logs import close_logging, setup_logging
from workbench.pool import DataPool
from workbench.simulators.study_server import (
    StudyServer,
    demo_tables,
    generate_keypair,
    start_in_thread,
)


@pytest.fixture
def loose_umask():
    """The umask most accounts have: new files 0644 and folders 0755 unless told otherwise."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def run(home: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--home", str(home), *args])
    assert result.exit_code == 0, result.output
    return result.output


def offenders(root: Path, *, file_mode: int, folder_mode: int, gid: int | None = None) -> list:
    """Every entry under ``root`` (and root) whose mode, or group, is not the expected one."""
    found = []
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        mode = stat.S_IMODE(info.st_mode)
        want = folder_mode if stat.S_ISDIR(info.st_mode) else file_mode
        if stat.S_ISLNK(info.st_mode) or mode != want or (gid is not None and info.st_gid != gid):
            found.append(f"{path.relative_to(root.parent)} {oct(mode)} gid={info.st_gid}")
    return found


def set_option(home: Path, key: str, value: str) -> None:
    """Set ``key = value`` in workbench.toml (in every table holding the key)."""
    path = home / "workbench.toml"
    lines = path.read_text().splitlines()
    path.write_text(
        "\n".join(f"{key} = {value}" if ln.startswith(f"{key} =") else ln for ln in lines)
    )


def pipeline(folder: Path) -> Path:
    """A one-cell pipeline definition and notebook in ``folder``."""
    folder.mkdir()
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell("print(6 * 7)")]
    book.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(book, folder / "answer.ipynb")
    (folder / "answer.toml").write_text(
        'name = "answer"\nnotebook = "pipes/answer.ipynb"\ncron = "0 0 1 1 *"\n'
    )
    return folder


def test_everything_in_the_home_is_private_whatever_the_umask(loose_umask, tmp_path, monkeypatch):
    config = init_home(tmp_path / "home")
    home = config.home
    run(home, "study", "create", "demo", "--sensors", "accelerometer,location")
    run(home, "enroll", "demo", "--count", "2")  # QR codes and the sheet, with the tokens
    generate_keypair(home / "keys", bits=1024)
    tables, deleteable = demo_tables(home / "keys" / "public_key.pem", participants=3, days=3)
    study_server = StudyServer(tables, deleteable=deleteable, user="mt", password="secret")
    monkeypatch.setenv("MT_USER", "mt")
    monkeypatch.setenv("MT_PASSWORD", "secret")
    set_option(home, "folder", f'"{pipeline(tmp_path / "pipes")}"')

    catalog = open_catalog(load_config(home))
    people = enroll(catalog, "demo", 1)  # through the library, as from JupyterLab
    catalog.dispose()
    server = ServerProcess(home)
    server.log = tmp_path / "server.log"  # the test's own file, not the workbench's
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            phone = Phone(client, people[0])
            registered = phone.register()
            assert registered.status_code == 200, registered.text
            assert phone.upload().status_code == 200
            assert phone.upload(phone.batch("location")).status_code == 200
            elsewhere = Phone(client, people[0], study="no-such-study").batch()
            stranger = client.post(
                "/", content=orjson.dumps(elsewhere), headers={"ACTION": "write_data"}
            )
            assert 400 <= stranger.status_code < 500  # kept in junk
    finally:
        server.stop()

    with start_in_thread(study_server) as running:
        path = home / "workbench.toml"
        path.write_text(path.read_text().replace('"http://127.0.0.1:9000"', f'"{running.url}"'))
        assert "new rows" in run(home, "export")
    run(home, "report", "questionnaire", "mindtrails")
    run(home, "refresh", "--no-mail")
    run(home, "tables", "build", "demo", "--processes", "1")  # sensor tables and quarantine
    run(home, "features", "demo")
    run(home, "run", "answer")
    log = setup_logging(load_config(home))
    log.getChild("test").critical("a critical event")  # every tier's file is written
    close_logging()

    pool = config.pool
    for made in (
        "catalog.sqlite",
        "enrollment/demo",
        "junk",
        "questionnaires/mindtrails/raw",
        "questionnaires/mindtrails/decoded",
        "reports/questionnaires",
        "logs/critical.log",
        "runs/answer",
        "studies/demo",
        "tables/demo/accelerometer",
        "features/demo/features.parquet",
    ):
        assert list(pool.glob(made)), f"the flow made no {made}"
    assert list((pool / "enrollment" / "demo").glob("*.png"))
    assert list((pool / "junk").rglob("*.*"))
    assert list((pool / "runs" / "answer").glob("*.ipynb"))
    found = offenders(home, file_mode=0o600, folder_mode=0o700)
    assert not found, "not private:\n" + "\n".join(found)


def test_an_older_pool_is_made_private(loose_umask, tmp_path):
    pool = DataPool(tmp_path / "pool")
    (pool.studies / "demo" / "s1").mkdir(parents=True)
    (pool.studies / "demo" / "s1" / "batch.json").write_text("[]")
    (pool.root / "catalog.sqlite").write_text("")
    assert offenders(pool.root, file_mode=0o600, folder_mode=0o700)  # 0644 and 0755 now
    pool.create()
    found = offenders(pool.root, file_mode=0o600, folder_mode=0o700)
    assert not found, "not private:\n" + "\n".join(found)


def team_group() -> grp.struct_group:
    """A group of this user's: a supplementary one if there is one, else the primary."""
    others = [g for g in os.getgroups() if g != os.getgid()]
    for gid in others + [os.getgid()]:
        try:
            return grp.getgrgid(gid)
        except KeyError:
            continue
    pytest.skip("this user's groups have no names")


def test_a_pool_group_reads_the_pool(loose_umask, tmp_path):
    config = init_home(tmp_path / "home")
    home = config.home
    group = team_group()
    path = home / "workbench.toml"
    path.write_text(
        path.read_text().replace('path = "pool"', f'path = "pool"\ngroup = "{group.gr_name}"')
    )
    run(home, "study", "create", "demo", "--sensors", "accelerometer")
    run(home, "enroll", "demo", "--count", "1")
    catalog = open_catalog(load_config(home))
    people = enroll(catalog, "demo", 1)
    catalog.dispose()
    server = ServerProcess(home)
    server.log = tmp_path / "server.log"
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            phone = Phone(client, people[0])
            assert phone.register().status_code == 200
            assert phone.upload().status_code == 200
            elsewhere = Phone(client, people[0], study="no-such-study").batch()
            client.post("/", content=orjson.dumps(elsewhere), headers={"ACTION": "write_data"})
    finally:
        server.stop()
    log = setup_logging(load_config(home))
    log.getChild("test").critical("a critical event")
    close_logging()

    assert list((config.pool / "studies" / "demo").rglob("*.json"))
    assert list((config.pool / "junk").rglob("*.json"))
    found = offenders(config.pool, file_mode=0o640, folder_mode=0o2750, gid=group.gr_gid)
    assert not found, f"not shared with {group.gr_name}:\n" + "\n".join(found)
    assert stat.S_IMODE(os.stat(home / "workbench.toml").st_mode) == 0o600


def test_an_unknown_pool_group_is_a_clear_error(tmp_path):
    config = init_home(tmp_path / "home")
    path = config.home / "workbench.toml"
    path.write_text(
        path.read_text().replace('path = "pool"', 'path = "pool"\ngroup = "no-such-team-x"')
    )
    result = CliRunner().invoke(cli, ["--home", str(config.home), "study", "list"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: [pool] group 'no-such-team-x' does not exist on this host"
    )


def test_making_a_database_private_never_drops_the_locks_sqlite_holds(tmp_path):
    """Closing any descriptor of a file drops the process's POSIX locks on it; SQLite's locks
    must survive the workbench making its database private again (as opening a catalog does)."""
    import sqlite3
    import subprocess
    import sys

    from workbench.pool import create_private_file

    path = tmp_path / "catalog.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")  # a lock SQLite holds with fcntl
    create_private_file(path)  # what opening a second catalog in this process does
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0); "
            "c.execute('BEGIN EXCLUSIVE')",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    assert other.returncode != 0 and "locked" in other.stderr
    holder.execute("ROLLBACK")
    holder.close()
