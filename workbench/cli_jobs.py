"""``workbench jobs``: tracked jobs, their configurations, the schema and API keys.

A thin click layer over :mod:`workbench.jobs`, added to the ``workbench`` command with
``cli.add_command(jobs)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from workbench.cli_errors import ErrorGroup
from workbench.times import READABLE, format_ms

BAR_WIDTH = 20


def _catalog(ctx: click.Context):
    from workbench.catalog import open_catalog
    from workbench.config import load_config

    return open_catalog(load_config((ctx.obj or {}).get("home")))


def progress_bar(progress: float, width: int = BAR_WIDTH) -> str:
    """``[#########...........] 45%`` for a progress of 0.45."""
    filled = int(progress * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {int(progress * 100):>3}%"


def _time(ms: int) -> str:
    return format_ms(ms, READABLE)


@click.group(cls=ErrorGroup, invoke_without_command=True)
@click.option(
    "--limit", type=click.IntRange(1, 10000), default=20, show_default=True, help="How many jobs."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of progress bars.")
@click.pass_context
def jobs(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Tracked jobs: without a subcommand, the most recent ones with their progress.

    \b
    Example:
        workbench jobs
        workbench jobs --limit 5 --json
        workbench jobs show 3f2b9c1e-6a0d-4c1e-9d7a-0c5e2f1b8a77
    """
    if ctx.invoked_subcommand is not None:
        return
    from workbench.jobs import list_jobs

    catalog = _catalog(ctx)
    try:
        found = list_jobs(catalog, limit=limit)
    finally:
        catalog.dispose()
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("no jobs yet; a tracked job creates one (see `workbench jobs load`)")
        return
    for job in found:
        click.echo(
            f"{progress_bar(job['progress'])}  {job['tag']}  {job['provider_job_id']}  "
            f"{job['status']}"
        )


@jobs.command("schema")
@click.option(
    "-l",
    "--location",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Folder of the generated schema.",
)
@click.option(
    "-n",
    "--name",
    default="job-configurations-schema",
    show_default=True,
    help="Name to use for the generated <name>.generated.json schema file.",
)
def jobs_schema(location: str, name: str) -> None:
    """Write the JSON Schema of job configurations files to <location>/<name>.generated.json.

    A configurations file names it in "$schema" so editors check and complete it.

    \b
    Example:
        workbench jobs schema
        workbench jobs schema -l configs -n job-configurations-schema
    """
    from workbench.jobs import generate_schema

    path = generate_schema(Path(location), name)
    click.echo(f"Generated JSON Schema for JobConfigs at {path}")


@jobs.command("load")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.pass_context
def jobs_load(ctx: click.Context, file: str) -> None:
    """Check a job configurations FILE and save its configurations in the catalog.

    A configuration without a version replaces the one of its tag; one with a version is
    saved once (the same tag and version with other steps is refused: give it a new
    version). Jobs already created keep their steps and totals.

    \b
    Example:
        workbench jobs load job_configurations.json
    """
    from workbench.jobs import JobConfigManager, save_job_configs

    manager = JobConfigManager(configurations_file=file)
    catalog = _catalog(ctx)
    try:
        save_job_configs(catalog, manager)
    finally:
        catalog.dispose()
    for config in manager:
        version = "" if config.version is None else f" version {config.version}"
        click.echo(
            f"saved {config.tag}{version} ({config.name}): "
            f"{len(config.step_configurations)} steps, {config.total_points} points"
        )


@jobs.command("show")
@click.argument("provider_job_id", metavar="PROVIDER_JOB_ID")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@click.pass_context
def jobs_show(ctx: click.Context, provider_job_id: str, as_json: bool) -> None:
    """Show a job: its progress, steps and events.

    \b
    Example:
        workbench jobs show 3f2b9c1e-6a0d-4c1e-9d7a-0c5e2f1b8a77
        workbench jobs show 3f2b9c1e-6a0d-4c1e-9d7a-0c5e2f1b8a77 --json
    """
    from workbench.jobs import get_job

    catalog = _catalog(ctx)
    try:
        job = get_job(catalog, provider_job_id)
    finally:
        catalog.dispose()
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    click.echo(f"{job['provider_job_id']}: {job['tag']} ({job['name'] or 'configuration gone'})")
    click.echo(
        f"customer {job['customer_id'] or '-'}, {job['status']}, created {_time(job['created_at'])}"
    )
    click.echo(
        f"{progress_bar(job['progress'])}  {job['points_done']} of {job['points_total']} points"
    )
    click.echo("steps:")
    for step in job["steps"]:
        mark = "x" if step["done"] else " "
        click.echo(f"  [{mark}] {step['tag']:<24} {step['points']:>6}  {step['name']}")
    click.echo("events:" if job["events"] else "events: none yet")
    for event in job["events"]:
        metadata = "" if event["metadata"] is None else json.dumps(event["metadata"])
        click.echo(
            f"  {_time(event['created_at'])}  {event['kind']:<8} {event['tag'] or '-':<24} "
            f"+{event['points']:<6} {metadata}".rstrip()
        )


@jobs.group("apikey")
def jobs_apikey() -> None:
    """API keys of the tracking API (sent in the x-api_key header).

    \b
    Example:
        workbench jobs apikey create --customer 142
    """


@jobs_apikey.command("create")
@click.option("--customer", help="Bind the key to this customer: it sees only its jobs.")
@click.pass_context
def jobs_apikey_create(ctx: click.Context, customer: str | None) -> None:
    """Make a new API key and print it; only its hash is stored, so this is the only copy.

    \b
    Example:
        workbench jobs apikey create
        workbench jobs apikey create --customer 142
    """
    from workbench.jobs import create_api_key

    catalog = _catalog(ctx)
    try:
        key = create_api_key(catalog, customer_id=customer)
    finally:
        catalog.dispose()
    click.echo(key)
    click.echo(
        "keep it now: only its hash is stored"
        + (f"; it is bound to customer {customer}" if customer else ""),
        err=True,
    )
