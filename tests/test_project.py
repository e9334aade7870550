"""The project's own files agree with each other."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def names(requirements) -> set[str]:
    return {
        re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements
    }


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = names(project["dependencies"]) | names(project["optional-dependencies"]["dev"])
    text = (ROOT / "environment.yml").read_text()
    pip_section = text.split("- pip:", 1)[1]
    listed = names(
        line.strip()[2:]
        for line in pip_section.splitlines()
        if line.strip().startswith("- ") and not line.strip().startswith("- -e")
    )
    assert listed == wanted
    requires = project["requires-python"].lstrip(">=")
    assert f"python={requires}" in text


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:30]
    assert any("make run" in line for line in head) and any("make test" in line for line in head)


def test_workbench_never_imports_server_or_pipelines():
    for path in (ROOT / "workbench").rglob("*.py"):
        text = path.read_text()
        assert not re.search(
            r"^\s*(from|import) (workbench_server|server|pipelines)\b", text, re.M
        ), path


# The command line may start the stand-ins (`workbench simulate`, `demo`, `study-server`).
CLI_MODULES = {"cli.py", "cli_jobs.py", "cli_sync.py"}


def test_the_library_never_imports_the_simulators():
    library = [
        path
        for path in (ROOT / "workbench").rglob("*.py")
        if "simulators" not in path.parts and path.name not in CLI_MODULES
    ]
    assert len(library) > 20
    for path in library:
        text = path.read_text()
        assert not re.search(r"(from|import) workbench\.simulators\b", text), path
        assert not re.search(r"from workbench import simulators\b", text), path


def test_simulate_is_not_public_api():
    import workbench

    assert "simulate" not in workbench.__all__ and not hasattr(workbench, "simulate")
    assert not hasattr(workbench, "StudyServer")


def test_the_library_holds_no_kill_switch():
    """Crash tests kill the exporter from outside (tests/kill_at.py); no module kills itself."""
    for path in (ROOT / "workbench").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"os\.kill\(\s*os\.getpid\(\)", text), path
        assert "_FAULT" not in text, path


def test_public_api_example_runs(tmp_path):
    import workbench

    config = workbench.init_home(tmp_path / "lab")
    catalog = workbench.open_catalog(config)
    workbench.create_study(catalog, workbench.definition_from_options("sleep", duration_days=28))
    people = workbench.enroll(catalog, "sleep", 2)
    assert [p.subject for p in people] == ["sleep_00001", "sleep_00002"]
    assert workbench.verify(config) == []
    assert workbench.refresh_status(config).studies == ["sleep"]
    table = workbench.study_status(catalog, "sleep")
    assert table["subject_name"].to_list() == ["sleep_00001", "sleep_00002"]
    assert workbench.list_alerts(catalog, "sleep") == []  # enrolled just now: nothing overdue
    assert workbench.sanity_check(config).ok
    assert set(workbench.__all__) <= set(dir(workbench))


def test_import_workbench_leaves_heavy_libraries_until_used():
    import subprocess
    import sys

    code = (
        "import sys, workbench; heavy = ['polars', 'sqlalchemy', 'jsonschema', 'httpx', 'msgspec']; "
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert loaded == ""


def test_every_public_name_and_error_type_is_exported():
    import workbench
    from workbench import errors

    missing = [name for name in workbench.__all__ if not hasattr(workbench, name)]
    assert missing == []
    error_types = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.WorkbenchError)
    }
    assert error_types <= set(workbench.__all__)
    assert workbench.UnknownStudy is errors.UnknownStudy


def test_the_error_tree_names_every_error_type():
    from workbench import errors

    tree = errors.__doc__
    types = [
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.WorkbenchError)
    ]
    assert [name for name in types if f" {name} " not in tree] == []
