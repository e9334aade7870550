"""Scheduled notebook pipelines: definitions, runs with papermill, run records, the scheduler.

A pipeline is a TOML file in ``pipelines/`` (schema: ``data_templates/schemas/pipeline.schema.json``):
a notebook, its parameters, a cron expression (UTC), a timeout for the run and one per cell, a
number of retries. :func:`run_pipeline` executes the notebook with papermill in a subprocess
(the wall-clock timeout kills its whole process group), never two runs of one pipeline at once
(a lock file per pipeline), and keeps the executed notebook as
``pool/runs/<pipeline>/<UTC time>-<params hash>.ipynb`` with a run record in the catalog
(parameters, status, duration, failing cell and error, code version, papermill and kernel
versions). Every run is also a tracked job with a step per notebook section (``##`` headings).

:func:`make_huey` turns the definitions into periodic huey tasks (SqliteHuey in the pool, or
RedisHuey when a Redis URL is configured); ``workbench scheduler`` runs its consumer.

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
import shlex
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, select, update

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
# the cell timeout in seconds, a file to write the kernel's process id into.
PAPERMILL_RUNNER = """
import json, sys
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
notebook, output, values, cell_timeout, pid_file = sys.argv[1:6]
# Start the kernel first: it boots while papermill is imported, which saves a third of a second.
# (An async manager, started on the loop nbclient will use, as nbclient expects.)
km = AsyncKernelManager(kernel_name="python3")
run_sync(km.start_kernel)()
with open(pid_file, "w") as handle:  # the kernel runs in a session of its own: the parent
    handle.write(str(km.provisioner.process.pid))  # kills it by this pid at the run timeout
import papermill
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
            notebook = REPO / raw["notebook"]
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
            record = _run_once(config, catalog, pipeline, values, trigger, attempt)
            if record.status == "succeeded":
                break
            log.warning("pipeline %s attempt %d %s: %s", name, attempt, record.status, record.error)
        record.attempts = attempt
        prune_runs(config, catalog, pipeline.name)
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
    """Run papermill in a subprocess of its own process group; kill the group at the timeout."""
    make_folders(output.parent)
    command = [
        sys.executable,
        "-c",
        PAPERMILL_RUNNER,
        str(pipeline.notebook),
        str(output),
        json.dumps(values, default=str),
        str(pipeline.cell_timeout),
        str(output.with_suffix(".kernel-pid")),
    ]
    process = subprocess.Popen(
        command,
        cwd=pipeline.notebook.parent,
        start_new_session=True,
        umask=modes_in(output.parent).umask,  # papermill writes the notebook with the umask
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = process.communicate(timeout=pipeline.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        _kill_kernel(output.with_suffix(".kernel-pid"))
        cell, _ = _failure(output)
        return "timeout", cell, f"killed after the run's timeout of {pipeline.timeout} s"
    except BaseException:  # Ctrl-C or SIGTERM of the runner: the run goes with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        _kill_kernel(output.with_suffix(".kernel-pid"))
        raise
    finally:
        output.with_suffix(".kernel-pid").unlink(missing_ok=True)
        secure_file(output)
    if process.returncode == 0:
        return "succeeded", None, None
    cell, error = _failure(output)
    text = out.decode(errors="replace").strip().splitlines()
    if cell is not None and _duration(output, cell) >= pipeline.cell_timeout:
        # the kernel was interrupted at the cell timeout: its KeyboardInterrupt says less
        error = f"CellTimeoutError: the cell ran longer than {pipeline.cell_timeout} seconds"
    return "failed", cell, error or (text[-1] if text else f"exit status {process.returncode}")


def _kill_kernel(pid_file: Path) -> None:
    """Kill the run's kernel (jupyter_client starts kernels in a session of their own)."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


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


def make_huey(config: Config, *, immediate: bool = False):
    """A huey instance with one periodic task per enabled pipeline, a ``run_task`` to queue
    runs and a ``sync_task`` to queue account syncs: RedisHuey when a Redis URL is configured, else SqliteHuey in the pool."""
    from huey import RedisHuey, SqliteHuey, crontab

    url = config.redis_url
    if url:
        huey = RedisHuey("workbench", url=url, immediate=immediate, utc=True)
    else:
        queue = DataPool.of(config).scheduler_queue
        make_folders(config.pool)
        os.close(open_new_file(queue, os.O_RDONLY | os.O_CREAT))  # SQLite keeps this mode
        huey = SqliteHuey("workbench", filename=str(queue), immediate=immediate, utc=True)
    home = str(config.home)

    def run(name: str, parameters: dict | None = None, trigger: str = "queue") -> dict:
        from workbench.config import load_config

        try:
            record = run_pipeline(load_config(home), name, parameters=parameters, trigger=trigger)
        except PipelineBusy as exc:
            log.warning("%s", exc.message)
            return {"pipeline": name, "status": "skipped"}
        return {"pipeline": name, "status": record.status, "notebook": record.notebook}

    huey.run_task = huey.task(name="run_pipeline")(run)
    from workbench.sync.scheduled import register_sync_tasks

    register_sync_tasks(huey, home)  # huey.sync_task: one account's sync, requeued at limits
    for pipeline in load_pipelines(config).values():
        if not pipeline.enabled:
            continue

        def tick(name=pipeline.name):
            return run(name, trigger="schedule")

        tick.__name__ = f"pipeline_{pipeline.name}"
        huey.periodic_task(crontab(**cron_fields(pipeline.cron)), name=f"pipeline.{pipeline.name}")(
            tick
        )
    return huey


def run_scheduler(config: Config, *, workers: int | None = None) -> None:
    """Run the huey consumer with the periodic tasks in the foreground until interrupted."""
    from huey.consumer import Consumer

    private_umask(config.pool_group)  # a second defence: the pool's writers set modes themselves
    huey = make_huey(config)
    consumer = Consumer(
        huey,
        workers=workers or config.pipelines.workers,
        worker_type="thread",
        periodic=True,
        check_worker_health=True,
        # idle workers look at the queue at least every 0.25 s (huey's default backs off to
        # 10 s): a sync requeued for a rate limit's reset must start on time
        initial_delay=0.05,
        max_delay=0.25,
    )
    consumer.run()
