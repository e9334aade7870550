"""Scheduled notebook pipelines: definitions, runs with papermill, run records, the scheduler.

A pipeline is a TOML file in ``pipelines/`` (schema: ``data_templates/schemas/pipeline.schema.json``):
a notebook, its parameters, a cron expression (UTC), a timeout for the run and one per cell, a
number of retries. :func:`run_pipeline` executes the notebook with papermill in a subprocess
(the wall-clock timeout, counted from the moment the run's kernel answers, kills its whole
process group), never two runs of one pipeline at once (a lock file per pipeline), and keeps the
executed notebook as
``pool/runs/<pipeline>/<UTC time>-<params hash>.ipynb`` with a run record in the catalog
(parameters, status, duration, failing cell and error, code version, papermill and kernel
versions). Every run is also a tracked job with a step per notebook section (``##`` headings).

A kernel that dies before it answers, or does not answer within ``KERNEL_STARTUP_TIMEOUT``, is a
failure of the machine, not of the notebook: the run is recorded as ``kernel_failed`` and started
again after a short pause (``INFRA_RETRY_PAUSES``: at most two such retries, each a record of its
own with the trigger ``infra_retry``), apart from the pipeline's own ``retries``.

:func:`run_scheduler` (``workbench scheduler``) runs each enabled pipeline at its cron
expression on the queue of :mod:`workbench.scheduler`, with the ``run_pipeline`` task that
queues one run.

Example::

    record = run_pipeline(load_config("demo-home"), "status", parameters={"study": "demo"})
    record.status, record.notebook
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import selectors
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, select, update

from workbench import scheduler
from workbench.catalog import Catalog, borrowed_catalog, job_events, jobs, pipeline_runs
from workbench.config import Config
from workbench.errors import ConfigError, PipelineBusy
from workbench.pool import (
    DataPool,
    make_folders,
    modes_in,
    open_new_file,
    private_umask,
    secure_file,
)
from workbench.templates import load_schema, schema_validator
from workbench.times import DAY_MS, STAMP, format_ms, now_ms

log = logging.getLogger("workbench.pipelines")

# What the run's subprocess executes: papermill alone, without importing the workbench (which
# would add most of a second to every run). Arguments: notebook, output, parameters as JSON,
# the cell timeout and the kernel's startup timeout in seconds, and a file descriptor on which
# the runner tells its parent "kernel <pid>" once the kernel is started and "ready" once it
# answers. A kernel that does not answer ends the runner with exit status 75 (EX_TEMPFAIL).
PAPERMILL_RUNNER = r"""
import contextlib, json, os, sys
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
notebook, output, values, cell_timeout, startup_timeout, signals = sys.argv[1:7]
signals = os.fdopen(int(signals), "w", buffering=1)
# Start the kernel first: it boots while papermill is imported, which saves a third of a second.
# (An async manager, started on the loop nbclient will use, as nbclient expects.)
km = AsyncKernelManager(kernel_name="python3")
try:
    run_sync(km.start_kernel)()
    # the kernel runs in a session of its own: the parent kills it by this pid
    signals.write(f"kernel {km.provisioner.process.pid}\n")
    import papermill
    client = km.client()
    client.start_channels()
    try:
        run_sync(client.wait_for_ready)(timeout=float(startup_timeout))
    finally:
        client.stop_channels()
except Exception as exc:
    print(f"the kernel did not start: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
    sys.stdout.flush()
    with contextlib.suppress(Exception):  # it is gone already; the parent kills what remains
        run_sync(km.shutdown_kernel)(now=True)
    sys.exit(75)
signals.write("ready\n")
signals.close()
try:
    papermill.execute_notebook(
        notebook, output, parameters=json.loads(values), kernel_name="python3",
        execution_timeout=int(cell_timeout), progress_bar=False, log_output=False,
        request_save_on_cell_execute=True, km=km,
    )
except papermill.PapermillExecutionError as exc:
    print(f"{exc.ename}: {exc.evalue} (cell {exc.cell_index})")
    sys.exit(1)
except Exception as exc:
    print(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
    sys.exit(1)
finally:
    run_sync(km.shutdown_kernel)(now=True)
"""
REPO = Path(__file__).resolve().parent.parent
KERNEL = "python3"
# Seconds a run's kernel has to answer its first request; the run's own timeout starts then.
KERNEL_STARTUP_TIMEOUT = 60
# The status of a run whose kernel never answered, and the pauses before it is started again
# (one per infrastructure retry).
KERNEL_FAILED = "kernel_failed"
INFRA_RETRY_PAUSES = (1.0, 3.0)


@dataclass(frozen=True)
class Pipeline:
    """One pipeline definition."""

    name: str
    notebook: Path
    cron: str
    parameters: dict = field(default_factory=dict)
    timeout: int = 1800
    cell_timeout: int = 600
    retries: int = 0
    enabled: bool = True
    description: str = ""
    source: Path | None = None


@dataclass
class RunRecord:
    """A finished (or refused) run."""

    id: int
    pipeline: str
    status: str
    notebook: str | None
    duration_ms: int | None
    failing_cell: int | None = None
    error: str | None = None
    attempts: int = 1
    infra_retries: int = 0  # runs started again because their kernel did not start


# ---------------------------------------------------------------------------- definitions


def load_pipelines(config: Config) -> dict[str, Pipeline]:
    """Every definition in the pipelines folder, validated, by name.

    Example: ``sorted(load_pipelines(config))``.
    """
    folder = config.pipelines.folder
    schema = load_schema("pipeline")
    found: dict[str, Pipeline] = {}
    for path in sorted(folder.glob("*.toml")):
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        errors = list(schema_validator(schema).iter_errors(raw))
        if errors:
            where = "/".join(map(str, errors[0].absolute_path)) or "(top)"
            raise ConfigError(f"{path}: {where}: {errors[0].message}")
        cron_fields(raw["cron"], where=str(path))
        notebook = Path(raw["notebook"])
        notebook = notebook if notebook.is_absolute() else (folder.parent / notebook)
        if not notebook.is_file():
            raise ConfigError(f"{path}: notebook {raw['notebook']} not found")
        if raw["name"] in found:
            raise ConfigError(f"{path}: a second pipeline named {raw['name']!r}")
        found[raw["name"]] = Pipeline(
            name=raw["name"],
            notebook=notebook.resolve(),
            cron=raw["cron"],
            parameters=raw.get("parameters", {}),
            timeout=raw.get("timeout", 1800),
            cell_timeout=raw.get("cell_timeout", 600),
            retries=raw.get("retries", 0),
            enabled=raw.get("enabled", True),
            description=raw.get("description", ""),
            source=path,
        )
    return found


def get_pipeline(config: Config, name: str) -> Pipeline:
    """The pipeline called ``name``, or :class:`ConfigError` listing the known ones."""
    pipelines = load_pipelines(config)
    if name not in pipelines:
        known = ", ".join(sorted(pipelines)) or "none"
        raise ConfigError(f"no pipeline {name!r} in {config.pipelines.folder} (known: {known})")
    return pipelines[name]


CRON_NAMES = ("minute", "hour", "day", "month", "day_of_week")


def cron_fields(expression: str, *, where: str = "cron") -> dict[str, str]:
    """The five fields of a cron expression by huey's names, or :class:`ConfigError`."""
    from huey import crontab

    parts = expression.split()
    if len(parts) != 5:
        raise ConfigError(
            f"{where}: cron {expression!r} needs five fields (minute hour day month weekday)"
        )
    fields = dict(zip(CRON_NAMES, parts, strict=True))
    try:
        crontab(**fields)(datetime.datetime(2026, 1, 1))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: bad cron {expression!r}: {exc}") from exc
    return fields


# ---------------------------------------------------------------------------- running


def params_hash(parameters: dict) -> str:
    return hashlib.sha256(json.dumps(parameters, sort_keys=True, default=str).encode()).hexdigest()[
        :12
    ]


@contextlib.contextmanager
def _exclusive(folder: Path, name: str):
    make_folders(folder)
    fd = open_new_file(folder / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineBusy(
                f"pipeline {name!r} is running already; this run is skipped"
            ) from None
        yield
    finally:
        os.close(fd)


def run_pipeline(
    config: Config,
    name: str,
    *,
    parameters: dict | None = None,
    trigger: str = "manual",
    catalog: Catalog | None = None,
) -> RunRecord:
    """Run a pipeline now (retrying as configured) and return its record.

    Raises :class:`PipelineBusy` when a run of the same pipeline is in progress.

    Example: ``run_pipeline(config, "sanity").notebook``.
    """
    pipeline = get_pipeline(config, name)
    values = {**pipeline.parameters, **(parameters or {}), "home": str(config.home)}
    folder = DataPool.of(config).runs / pipeline.name
    with borrowed_catalog(config, catalog) as catalog, _exclusive(folder, pipeline.name):
        _close_stale_runs(catalog, pipeline.name)
        record = None
        for attempt in range(1, pipeline.retries + 2):
            record = _run_with_a_kernel(config, catalog, pipeline, values, trigger, attempt)
            if record.status in ("succeeded", KERNEL_FAILED):
                break  # a machine that cannot start kernels is not helped by the retries
            log.warning("pipeline %s attempt %d %s: %s", name, attempt, record.status, record.error)
        record.attempts = attempt
        prune_runs(config, catalog, pipeline.name)
        return record


def _run_with_a_kernel(
    config, catalog, pipeline: Pipeline, values: dict, trigger: str, attempt: int
) -> RunRecord:
    """One attempt, started again (a record each) while its kernel fails to start."""
    record = _run_once(config, catalog, pipeline, values, trigger, attempt)
    retries = 0
    for pause in INFRA_RETRY_PAUSES:
        if record.status != KERNEL_FAILED:
            break
        retries += 1
        log.warning(
            "pipeline %s: %s; infrastructure retry %d of %d in %g s",
            pipeline.name,
            record.error,
            retries,
            len(INFRA_RETRY_PAUSES),
            pause,
        )
        time.sleep(pause)
        record = _run_once(config, catalog, pipeline, values, "infra_retry", attempt)
    record.infra_retries = retries
    return record


def _run_once(
    config, catalog, pipeline: Pipeline, values: dict, trigger: str, attempt: int
) -> RunRecord:
    started = now_ms()
    stamp = format_ms(started, f"{STAMP}%fZ")
    relative = f"runs/{pipeline.name}/{stamp}-{params_hash(values)}.ipynb"
    output = DataPool.of(config).path(relative)
    versions = _versions()
    with catalog.writing() as conn:
        run_id = conn.execute(
            pipeline_runs.insert()
            .values(
                pipeline=pipeline.name,
                trigger=trigger,
                parameters=json.dumps(values, sort_keys=True, default=str),
                params_hash=params_hash(values),
                notebook=relative,
                status="running",
                attempt=attempt,
                started_at=started,
                provider_job_id=f"run-{pipeline.name}-{stamp}",
                **versions,
            )
            .returning(pipeline_runs.c.id)
        ).scalar_one()
    tracking = _start_tracking(catalog, pipeline, f"run-{pipeline.name}-{stamp}")
    try:
        status, failing, error = _execute(pipeline, output, values)
    except BaseException:
        _finish_record(catalog, run_id, started, "interrupted", None, "the runner was stopped")
        raise
    finished = _finish_record(catalog, run_id, started, status, failing, error)
    _finish_tracking(catalog, tracking, output, status, error)
    log.info(
        "pipeline %s run %d %s in %.1f s: %s",
        pipeline.name,
        run_id,
        status,
        (finished - started) / 1000,
        relative,
    )
    return RunRecord(
        id=run_id,
        pipeline=pipeline.name,
        status=status,
        notebook=relative if output.exists() else None,
        duration_ms=finished - started,
        failing_cell=failing,
        error=error,
    )


def _finish_record(catalog, run_id, started, status, failing, error) -> int:
    finished = now_ms()
    with catalog.writing() as conn:
        conn.execute(
            update(pipeline_runs)
            .where(pipeline_runs.c.id == run_id)
            .values(
                status=status,
                finished_at=finished,
                duration_ms=finished - started,
                failing_cell=failing,
                error=error,
            )
        )
    return finished


def _close_stale_runs(catalog, pipeline: str) -> None:
    """Runs still marked running while we hold the pipeline's lock died with their runner."""
    r = pipeline_runs.c
    with catalog.writing() as conn:
        conn.execute(
            update(pipeline_runs)
            .where(r.pipeline == pipeline, r.status == "running")
            .values(status="interrupted", error="its runner stopped before the run ended")
        )


def _execute(pipeline: Pipeline, output: Path, values: dict) -> tuple[str, int | None, str | None]:
    """Run papermill in a subprocess of its own process group; once its kernel answers, kill the
    group (and the kernel) at the run's timeout."""
    make_folders(output.parent)
    signals, signals_to_parent = os.pipe()
    command = [
        sys.executable,
        "-c",
        PAPERMILL_RUNNER,
        str(pipeline.notebook),
        str(output),
        json.dumps(values, default=str),
        str(pipeline.cell_timeout),
        str(KERNEL_STARTUP_TIMEOUT),
        str(signals_to_parent),
    ]
    kernel: list[int] = []  # the kernel's pid, once the runner has started it
    with tempfile.TemporaryFile() as printed:
        try:
            process = subprocess.Popen(
                command,
                cwd=pipeline.notebook.parent,
                start_new_session=True,
                umask=modes_in(output.parent).umask,  # papermill writes the notebook with it
                stdout=printed,
                stderr=subprocess.STDOUT,
                pass_fds=(signals_to_parent,),
            )
        except BaseException:
            os.close(signals)
            raise
        finally:
            os.close(signals_to_parent)
        try:
            # the runner's own start, its imports and the kernel's answer
            if not _kernel_ready(signals, kernel, time.monotonic() + 2 * KERNEL_STARTUP_TIMEOUT):
                _stop(process, kernel)
                lines = _printed(printed)
                said = [line for line in lines if line.startswith("the kernel did not start")]
                error = (said or [f"the kernel did not start within {KERNEL_STARTUP_TIMEOUT} s"])[0]
                return KERNEL_FAILED, None, error
            process.wait(timeout=pipeline.timeout)
        except subprocess.TimeoutExpired:
            _stop(process, kernel)
            cell, _ = _failure(output)
            return "timeout", cell, f"killed after the run's timeout of {pipeline.timeout} s"
        except BaseException:  # Ctrl-C or SIGTERM of the runner: the run goes with it
            _stop(process, kernel)
            raise
        finally:
            os.close(signals)
            secure_file(output)
        text = _printed(printed)
    if process.returncode == 0:
        return "succeeded", None, None
    cell, error = _failure(output)
    if cell is not None and _duration(output, cell) >= pipeline.cell_timeout:
        # the kernel was interrupted at the cell timeout: its KeyboardInterrupt says less
        error = f"CellTimeoutError: the cell ran longer than {pipeline.cell_timeout} seconds"
    return "failed", cell, error or (text[-1] if text else f"exit status {process.returncode}")


def _kernel_ready(signals: int, kernel: list[int], deadline: float) -> bool:
    """Wait for the runner's "ready" (True), noting the kernel's pid on the way; False when the
    runner ends first or the deadline passes."""
    pending = b""
    with selectors.DefaultSelector() as selector:
        selector.register(signals, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                break
            chunk = os.read(signals, 512)
            if not chunk:
                break  # the runner has ended
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                word, _, rest = line.decode().partition(" ")
                if word == "kernel" and rest.isdigit():
                    kernel.append(int(rest))
                elif word == "ready":
                    return True
    return False


def _stop(process: subprocess.Popen, kernel: list[int]) -> None:
    """Kill the runner's process group and the kernel (jupyter_client starts kernels in a
    session of their own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for pid in kernel:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _printed(printed) -> list[str]:
    """The lines the runner printed."""
    printed.seek(0)
    return printed.read().decode(errors="replace").strip().splitlines()


def _failure(output: Path) -> tuple[int | None, str | None]:
    """The failing (or still running) cell of an executed notebook, and its error. The cell is
    counted in the pipeline's own notebook (from 0), without the cells papermill adds."""
    import nbformat

    try:
        notebook = nbformat.read(output, as_version=4)
    except (OSError, ValueError):
        return None, None
    added = {"injected-parameters", "papermill-error-cell-tag"}
    cells = [c for c in notebook.cells if not added & set(c.get("metadata", {}).get("tags", []))]
    started = None
    for index, cell in enumerate(cells):
        papermill = cell.get("metadata", {}).get("papermill", {})
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            return index, f"{errors[0].get('ename')}: {errors[0].get('evalue')}"
        if papermill.get("status") in ("running", "failed"):
            return index, None
        if papermill.get("start_time"):
            started = index
    # no error shown (e.g. a cell stopped at its timeout): the last cell that started
    return started, None


def _duration(output: Path, index: int) -> float:
    """Seconds the given cell (counted as in :func:`_failure`) ran."""
    import nbformat

    added = {"injected-parameters", "papermill-error-cell-tag"}
    cells = [
        c
        for c in nbformat.read(output, as_version=4).cells
        if not added & set(c.get("metadata", {}).get("tags", []))
    ]
    return float(cells[index].get("metadata", {}).get("papermill", {}).get("duration") or 0)


def _versions() -> dict:
    import importlib.metadata

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        code = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        code = ""
    return {
        "code_version": code or f"workbench {version('workbench')}",
        "papermill_version": version("papermill"),
        "kernel": f"{KERNEL} (ipykernel {version('ipykernel')})",
    }


# ---------------------------------------------------------------------------- tracking


def notebook_sections(notebook: Path) -> list[tuple[str, int]]:
    """The ``##`` sections of a notebook with their number of code cells (at least 1)."""
    import nbformat

    cells = nbformat.read(notebook, as_version=4).cells
    sections: list[list] = [["setup", 0]]
    for cell in cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("## "):
                    sections.append([line[3:].strip(), 0])
                    break
        elif cell.cell_type == "code":
            sections[-1][1] += 1
    return [(name, max(count, 1)) for name, count in sections if count or name != "setup"]


def _start_tracking(catalog, pipeline: Pipeline, job_id: str):
    try:
        from workbench import jobs
    except ImportError:  # pragma: no cover - job tracking is part of the package
        return None
    try:
        steps = [
            jobs.StepConfig(tag=f"s{i}", name=name, points=points)
            for i, (name, points) in enumerate(notebook_sections(pipeline.notebook))
        ]
        config = jobs.JobConfig(
            tag=f"pipeline.{pipeline.name}",
            name=f"Pipeline {pipeline.name}",
            step_configurations=steps,
        )
        jobs.save_job_configs(catalog, [config])
        jobs.create_job(catalog, provider_job_id=job_id, customer_id=None, tag=config.tag)
        return jobs, config, job_id
    except Exception as exc:  # tracking never fails a run
        log.warning("could not track pipeline %s: %s", pipeline.name, exc)
        return None


def _finish_tracking(catalog, tracking, output: Path, status: str, error: str | None) -> None:
    if tracking is None:
        return
    jobs, config, job_id = tracking
    try:
        failing, _ = _failure(output) if status != "succeeded" else (None, None)
        done = _sections_done(output, failing)
        for step in config.step_configurations[:done]:
            jobs.record_event(
                catalog,
                provider_job_id=job_id,
                kind="step",
                tag=step.tag,
                event_id=f"{job_id}:{step.tag}",
            )
        if status == "succeeded":
            jobs.record_event(
                catalog, provider_job_id=job_id, kind="complete", event_id=f"{job_id}:complete"
            )
        else:
            jobs.record_event(
                catalog,
                provider_job_id=job_id,
                kind="error",
                metadata={"status": status, "error": error},
                event_id=f"{job_id}:error",
            )
    except Exception as exc:  # tracking never fails a run
        log.warning("could not record the progress of %s: %s", job_id, exc)


def _sections_done(output: Path, failing: int | None) -> int:
    """How many sections of an executed notebook ran to their end."""
    import nbformat

    try:
        cells = nbformat.read(output, as_version=4).cells
    except (OSError, ValueError):
        return 0
    limit = len(cells) if failing is None else failing
    done, section_started = 0, False
    for index, cell in enumerate(cells[:limit]):
        heading = cell.cell_type == "markdown" and any(
            line.startswith("## ") for line in cell.source.splitlines()
        )
        if heading and (section_started or index > 0):
            done += 1
        section_started = True
    return done + (1 if failing is None else 0)


# ---------------------------------------------------------------------------- history


def list_runs(catalog: Catalog, pipeline: str | None = None, *, limit: int = 50) -> list[dict]:
    """The latest run records, newest first."""
    r = pipeline_runs.c
    query = select(pipeline_runs).order_by(r.id.desc()).limit(limit)
    if pipeline:
        query = query.where(r.pipeline == pipeline)
    with catalog.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def prune_runs(config: Config, catalog: Catalog, pipeline: str) -> int:
    """Delete the runs beyond ``keep_runs`` or older than ``keep_days`` (notebook and record)."""
    keep = config.pipelines
    r = pipeline_runs.c
    oldest = now_ms() - keep.keep_days * DAY_MS
    with catalog.engine.connect() as conn:
        rows = conn.execute(
            select(r.id, r.notebook, r.started_at)
            .where(r.pipeline == pipeline)
            .order_by(r.id.desc())
        ).all()
    doomed = [row for n, row in enumerate(rows) if n >= keep.keep_runs or row.started_at < oldest]
    for row in doomed:
        if row.notebook:
            DataPool.of(config).path(row.notebook).unlink(missing_ok=True)
    if doomed:
        ids = [row.id for row in doomed]
        with catalog.writing() as conn:
            jobs_of = [
                j
                for (j,) in conn.execute(
                    select(r.provider_job_id).where(r.id.in_(ids), r.provider_job_id.is_not(None))
                )
            ]
            conn.execute(delete(pipeline_runs).where(r.id.in_(ids)))
            if jobs_of:  # their tracked jobs and events go with them
                conn.execute(delete(job_events).where(job_events.c.provider_job_id.in_(jobs_of)))
                conn.execute(delete(jobs).where(jobs.c.provider_job_id.in_(jobs_of)))
    return len(doomed)


def crontab_lines(config: Config) -> list[str]:
    """crontab lines that run every enabled pipeline with this installation's Python."""
    python = shlex.quote(str(Path(sys.executable).absolute()))
    home = shlex.quote(str(config.home))
    logs = shlex.quote(str(DataPool.of(config).logs / "cron.log"))
    lines = [f"# workbench pipelines of {config.home} (times are UTC; set CRON_TZ=UTC if need be)"]
    for pipeline in load_pipelines(config).values():
        if pipeline.enabled:
            lines.append(
                f"{pipeline.cron} {python} -m workbench.cli --home {home} run "
                f"{pipeline.name} >> {logs} 2>&1"
            )
    return lines


# ---------------------------------------------------------------------------- scheduler


@scheduler.task("run_pipeline")
def _run_task(home: str, name: str, parameters: dict | None = None, trigger: str = "queue") -> dict:
    """The scheduler's task: one run of the pipeline ``name`` (skipped if one is going on)."""
    from workbench.config import load_config

    try:
        record = run_pipeline(load_config(home), name, parameters=parameters, trigger=trigger)
    except PipelineBusy as exc:
        log.warning("%s", exc.message)
        return {"pipeline": name, "status": "skipped"}
    return {"pipeline": name, "status": record.status, "notebook": record.notebook}


@scheduler.periodic
def _scheduled_runs(config: Config) -> list[scheduler.Periodic]:
    """One periodic entry per enabled pipeline, at its cron expression."""
    return [
        scheduler.Periodic(
            f"pipeline.{p.name}", cron_fields(p.cron), "run_pipeline", (p.name, None, "schedule")
        )
        for p in load_pipelines(config).values()
        if p.enabled
    ]


def run_scheduler(config: Config, *, workers: int | None = None) -> None:
    """Run the scheduler: every pipeline at its cron expression, queued runs and syncs, in
    the foreground until interrupted."""
    from workbench.features import build  # noqa: F401  (registers compute_feature_share)
    from workbench.sensors import tables  # noqa: F401  (registers the build_table_chunk task)
    from workbench.sync import scheduled  # noqa: F401  (registers the sync_account task)

    private_umask(config.pool_group)  # a second defence: the pool's writers set modes themselves
    scheduler.run_consumer(config, workers=workers)
