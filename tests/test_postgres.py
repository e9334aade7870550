"""The catalog on a real PostgreSQL server: the same tests as on SQLite, run against it.

A private PostgreSQL cluster is started for the session (Debian's `postgresql`, which `make test`
installs when missing) and every test gets a database of its own. The tests below are imported
from the SQLite suite; only the `home` fixture differs: its catalog URL points at PostgreSQL.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from sqlalchemy import inspect

from tests.conftest import free_port
from tests.test_alerts import (
    smtp_server,  # noqa: F401
    test_each_kind_opens_with_since_and_action,  # noqa: F401
)
from tests.test_crash import test_sigkill_mid_burst_loses_no_acknowledged_upload  # noqa: F401
from tests.test_dashboards import (  # noqa: F401
    test_daily_completeness_counts_batches_by_day_of_their_data,
    test_status_view_counts_and_alerts,
    test_subject_states_one_per_subject,
)
from tests.test_export import (  # noqa: F401
    config,
    server,
    test_a_server_failing_mid_export_keeps_progress_and_the_next_run_resumes,
    test_exports_decrypts_and_decodes_every_table,
    test_second_run_fetches_only_new_rows,
)
from tests.test_jobs import (  # noqa: F401
    saved,
    test_a_version_is_registered_once_and_jobs_keep_theirs,
    test_an_error_event_marks_the_job_failed,
    test_steps_move_progress_by_their_points_once,
)
from tests.test_ledger import (  # noqa: F401
    stored,
    test_a_bad_row_does_not_fail_the_rows_it_shares_a_commit_with,
    test_counts,
    test_recovery_links_or_reledgers_an_interrupted_batch,
)
from tests.test_outcomes import (  # noqa: F401
    ema_study,
    test_ema_compliance_counts_answered_prompts_across_both_apps,
)
from tests.test_reports import (  # noqa: F401
    exported,
    test_questionnaire_attrition_and_the_html_page,
    test_sensing_attrition_consort_adds_up,
)
from tests.test_server import (  # noqa: F401
    test_add_user_is_idempotent_and_limits_devices,
    test_batch_mixing_sources_goes_to_junk_with_400,
    test_identical_retry_is_stored_once,
    test_left_subject_within_grace_is_filed_then_refused,
    test_same_second_uploads_get_distinct_files,
    test_unknown_study_goes_to_junk_with_409,
    test_write_data_stores_file_and_ledger_row,
)
from tests.test_status import (  # noqa: F401
    test_cli_refresh_and_alerts,
    test_left_early_subject,
    test_refresh_after_new_uploads_equals_full_recomputation,
    test_sending_subject,
    test_several_devices,
)
from tests.test_sync import (  # noqa: F401
    lab,
    simulator,
    sync_env,
    test_a_limit_mid_sync_keeps_the_data_and_resumes_where_it_stopped,
    test_link_sync_and_the_next_run_fetches_only_the_partial_window,
    test_two_queued_syncs_of_one_account_never_overlap,
    test_two_workers_refreshing_one_account_make_one_refresh,
    test_verify_checks_the_sync_ledger,
)
from workbench.catalog import SCHEMA_VERSION, Catalog
from workbench.config import init_home

# The imported tests' modules mark them slow; the mark does not travel with the functions.
# Fixtures imported above (e.g. test_export's `server`, a questionnaire server) take the place of
# conftest's fixtures of the same name in this module.
pytestmark = pytest.mark.slow


def _binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    if not initdb:
        pytest.fail("PostgreSQL's initdb was not found: `make test` installs Debian's postgresql")
    return Path(initdb).parent


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL cluster reached only through a Unix socket in a folder of its own
    (no TCP listener, so no other local user can reach it); yields a function that gives the
    SQLAlchemy URL of a database."""
    binaries = _binaries()
    root = Path(tempfile.mkdtemp(prefix="workbench-pg-"))  # mode 0700
    as_owner: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, log, port = root / "data", root / "log", free_port()

    def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*as_owner, *command], capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            server_log = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            pytest.fail(f"{command[0]} failed: {done.stderr[-2000:]}\n{server_log}")
        return done

    run(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "workbench", "-E", "UTF8")
    options = f"-p {port} -k {root} -c listen_addresses='' -c fsync=off"
    try:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-w", "-l", str(log), "-o", options, "start")
        yield lambda database: f"postgresql+psycopg://workbench@/{database}?host={root}&port={port}"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def home(tmp_path, postgres, monkeypatch):
    """A workbench home whose catalog is a new database on the PostgreSQL server."""
    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = postgres("postgres").replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    monkeypatch.setenv("WORKBENCH_CATALOG_URL", postgres(name))
    return init_home(tmp_path / "home")


def test_the_catalog_is_on_postgresql_and_upgrades_once(home):
    assert home.catalog_url.startswith("postgresql+psycopg://workbench@/test_")
    catalog = Catalog(home.catalog_url)
    try:
        assert not catalog.is_sqlite
        assert catalog.upgrade() == SCHEMA_VERSION
        assert catalog.upgrade() == SCHEMA_VERSION  # nothing to do the second time
        assert catalog.version() == SCHEMA_VERSION
        tables = set(inspect(catalog.engine).get_table_names())
        assert {"studies", "subjects", "devices", "uploads", "rejections"} <= tables
    finally:
        catalog.dispose()
