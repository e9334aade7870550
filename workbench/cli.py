"""The ``workbench`` command: a thin click layer over the library.

Each command opens the home's configuration and calls one library function.
"""

from __future__ import annotations

import json
import os
import sys

import click

from workbench.config import find_home, init_home, load_config
from workbench.errors import WorkbenchError


class _Group(click.Group):
    """Turns workbench errors into a one-line message and the error's exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except WorkbenchError as exc:
            click.echo(f"error: {exc.message}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    help="Workbench home holding workbench.toml (default: $WORKBENCH_HOME, then the current directory).",
)
@click.version_option(package_name="workbench")
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """Research workbench for digital-health studies: upload server, data pool and catalog.

    \b
    Example:
        workbench --home ~/lab init
        workbench --home ~/lab study create demo --sensors accelerometer,location
        workbench --home ~/lab serve
    """
    ctx.obj = {"home": find_home(home)}


def _config(ctx: click.Context):
    return load_config(ctx.obj["home"])


def _catalog(ctx: click.Context):
    from workbench.catalog import open_catalog

    return open_catalog(_config(ctx))


@cli.command()
@click.option("--force", is_flag=True, help="Overwrite an existing workbench.toml.")
@click.pass_context
def init(ctx: click.Context, force: bool) -> None:
    """Write a commented workbench.toml into the home and create the data pool.

    \b
    Example:
        workbench init                 # in the current directory
        workbench --home ~/lab init
    """
    config = init_home(ctx.obj["home"], force=force)
    from workbench.catalog import open_catalog

    open_catalog(config).dispose()
    click.echo(
        f"initialised {config.home}: configuration {config.home / 'workbench.toml'}, pool {config.pool}"
    )


@cli.group()
def study() -> None:
    """Create, list, show and archive studies.

    \b
    Example:
        workbench study create demo --duration 28 --sensors accelerometer,location
    """


@study.command("create")
@click.argument("study_id", metavar="STUDY")
@click.option(
    "--duration",
    type=click.IntRange(1, 3650),
    default=28,
    show_default=True,
    help="Days each subject takes part.",
)
@click.option(
    "--sensors", help="Comma-separated sensor names (default: accelerometer,activity,location)."
)
@click.option(
    "--auth",
    type=click.Choice(["token", "legacy"]),
    default="token",
    show_default=True,
    help="token: each subject sends a Bearer token; legacy: JTrack's unauthenticated mode (unsafe).",
)
@click.option(
    "--checksum-required",
    is_flag=True,
    help="Refuse uploads without an md5 or Content-Digest header.",
)
@click.option(
    "--from",
    "from_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Read the definition from a JSON file: a workbench study definition or a JTrack study JSON.",
)
@click.pass_context
def study_create(ctx, study_id, duration, sensors, auth, checksum_required, from_file) -> None:
    """Create STUDY from options or from a definition file.

    \b
    Example:
        workbench study create demo --duration 14 --sensors accelerometer,location
        workbench study create legacy_study --from /srv/jtrack/studies/legacy_study/legacy_study.json
    """
    from workbench import studies

    catalog = _catalog(ctx)
    if from_file:
        definition = studies.load_definition_file(from_file, study_id)
    else:
        names = [s.strip() for s in sensors.split(",") if s.strip()] if sensors else None
        definition = studies.definition_from_options(
            study_id, duration_days=duration, sensors=names, auth=auth
        )
    if checksum_required:
        definition["checksum_required"] = True
    created = studies.create_study(catalog, definition)
    click.echo(
        f"created study {created.id}: {created.definition['duration_days']} days, "
        f"sensors {', '.join(created.sensors)}, auth {created.definition['auth']}"
    )
    if created.definition["auth"] == "legacy":
        click.echo(
            "warning: legacy auth lets anyone who knows a subject id upload as that subject",
            err=True,
        )


@study.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def study_list(ctx, as_json) -> None:
    """List studies with their status and sensors.

    \b
    Example:
        workbench study list --json
    """
    from workbench.studies import list_studies

    found = list_studies(_catalog(ctx))
    if as_json:
        click.echo(
            json.dumps(
                [{"id": s.id, "status": s.status, "definition": s.definition} for s in found],
                indent=2,
            )
        )
        return
    if not found:
        click.echo("no studies yet; create one with `workbench study create STUDY`")
        return
    click.echo(f"{'study':<24} {'status':<9} {'days':>5}  sensors")
    for s in found:
        click.echo(
            f"{s.id:<24} {s.status:<9} {s.definition['duration_days']:>5}  {', '.join(s.sensors)}"
        )


@study.command("show")
@click.argument("study_id", metavar="STUDY")
@click.pass_context
def study_show(ctx, study_id) -> None:
    """Print a study's full definition as JSON.

    \b
    Example:
        workbench study show demo
    """
    from workbench.studies import get_study

    found = get_study(_catalog(ctx), study_id)
    click.echo(json.dumps({"status": found.status, **found.definition}, indent=2))


@study.command("archive")
@click.argument("study_id", metavar="STUDY")
@click.pass_context
def study_archive(ctx, study_id) -> None:
    """Archive STUDY: it takes no more data (uploads go to junk, 409); nothing is deleted.

    \b
    Example:
        workbench study archive demo
    """
    from workbench.studies import archive_study

    archive_study(_catalog(ctx), study_id)
    click.echo(f"archived study {study_id}; its data stays in the pool")


@cli.command()
@click.argument("study_id", metavar="STUDY")
@click.option(
    "--count", type=click.IntRange(1, 100000), required=True, help="How many subjects to enroll."
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print [{"subject": ..., "token": ...}] instead of writing QR codes.',
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Folder for QR codes and the sheet (default: <pool>/enrollment/<study>).",
)
@click.pass_context
def enroll(ctx, study_id, count, as_json, out) -> None:
    """Enroll COUNT new subjects in STUDY, each with a secret token.

    Only a hash of each token is stored: the QR codes (or the JSON) are the only copy.

    \b
    Example:
        workbench enroll demo --count 20
        workbench enroll demo --count 3 --json > tokens.json
    """
    from pathlib import Path

    from workbench.enrollment import enroll as enroll_subjects
    from workbench.enrollment import write_enrollment_sheets

    config = _config(ctx)
    from workbench.catalog import open_catalog

    made = enroll_subjects(open_catalog(config), study_id, count)
    if as_json:
        click.echo(json.dumps([{"subject": e.subject, "token": e.token} for e in made], indent=2))
        return
    folder = Path(out) if out else config.pool / "enrollment" / study_id
    sheet = write_enrollment_sheets(made, folder, server_url=config.server.public_url)
    click.echo(f"enrolled {len(made)} subjects ({made[0].subject} to {made[-1].subject})")
    click.echo(f"QR codes in {folder}; printable sheet {sheet}")


@cli.command()
@click.option("--host", help="Address to listen on (default from workbench.toml).")
@click.option("--port", type=int, help="Port to listen on (default from workbench.toml).")
@click.option("--workers", type=click.IntRange(1, 64), help="gunicorn worker processes.")
@click.option("--threads", type=click.IntRange(1, 64), help="Threads per worker.")
@click.option("--access-log", is_flag=True, help="Log every request to standard output.")
@click.pass_context
def serve(ctx, host, port, workers, threads, access_log) -> None:
    """Run the upload server under gunicorn in the foreground.

    Interrupted writes from a previous crash are finished or discarded first.

    \b
    Example:
        workbench serve --host 0.0.0.0 --port 8080 --workers 2
    """
    from workbench.ingest import recover_incoming

    config = _config(ctx)
    done = recover_incoming(config)
    if any(done.values()):
        click.echo(f"recovered interrupted writes: {_recovered(done)}", err=True)
    s = config.server
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "server.wsgi:app",
        "--bind",
        f"{host or s.host}:{port or s.port}",
        "--workers",
        str(workers or s.workers),
        "--threads",
        str(threads or s.threads),
        "--worker-class",
        "gthread",
        "--timeout",
        "60",
        "--graceful-timeout",
        "20",
        "--no-control-socket",
    ]
    if access_log:
        args += ["--access-logfile", "-"]
    env = {**os.environ, "WORKBENCH_HOME": str(config.home)}
    sys.stdout.flush()
    os.execvpe(sys.executable, args, env)


@cli.command()
@click.option("--quick", is_flag=True, help="Check sizes only, not SHA-256 hashes.")
@click.pass_context
def verify(ctx, quick) -> None:
    """Check that the ledger and the files in the pool agree.

    Exit status 0 when they do; otherwise every discrepancy is listed and the status is 5.

    \b
    Example:
        workbench verify
    """
    from workbench.errors import VerifyFailed
    from workbench.ledger import verify as verify_pool

    found = verify_pool(_config(ctx), check_hashes=not quick, progress=sys.stderr.isatty())
    for item in found:
        click.echo(str(item))
    if found:
        raise VerifyFailed(f"{len(found)} discrepancies between the ledger and the files")
    click.echo("ledger and files agree")


@cli.command()
@click.option(
    "--all-hosts",
    is_flag=True,
    help="Also finish the writes of servers that ran on other hosts (e.g. a container that was replaced).",
)
@click.pass_context
def recover(ctx, all_hosts) -> None:
    """Finish or discard writes interrupted by a crash (refused while a server on this host runs).

    \b
    Example:
        workbench recover
        workbench recover --all-hosts
    """
    from workbench.ingest import recover_incoming

    done = recover_incoming(_config(ctx), all_hosts=all_hosts)
    click.echo(_recovered(done))


def _recovered(done: dict[str, int]) -> str:
    return (
        f"{done['completed']} interrupted writes completed ({done['reledgered']} of them "
        f"recorded anew), {done['junk']} moved to junk/recovered, {done['discarded']} "
        "unanswered discarded"
    )


@cli.command()
@click.argument("study_id", metavar="STUDY")
@click.option(
    "--subjects",
    type=click.IntRange(1, 10000),
    default=10,
    show_default=True,
    help="Simulated participants (enrolled anew).",
)
@click.option(
    "--days",
    type=click.IntRange(1, 365),
    default=3,
    show_default=True,
    help="Days of data per participant, ending now.",
)
@click.option("--url", help="Upload server URL (default: public_url from workbench.toml).")
@click.option(
    "--batches-per-day",
    type=click.IntRange(1, 1440),
    help="Cap on batches per sensor and day (default: the study's, at most 24).",
)
@click.option(
    "--records",
    type=click.IntRange(1, 10000),
    default=150,
    show_default=True,
    help="Records per batch.",
)
@click.option(
    "--clients",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Phones uploading at once.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Random seed, for repeatable runs."
)
@click.pass_context
def simulate(ctx, study_id, subjects, days, url, batches_per_day, records, clients, seed) -> None:
    """Simulate participants' phones uploading JTrack batches to a running server.

    Enrolls SUBJECTS new subjects, registers a device for each and uploads realistic batches
    with checksums and tokens: some subjects go silent, some leave, some uploads are retried.

    \b
    Example:
        workbench simulate demo --subjects 20 --days 7 --url http://127.0.0.1:8080
    """
    from workbench.simulator import simulate as run_simulation

    config = _config(ctx)
    report = run_simulation(
        config,
        study_id,
        subjects=subjects,
        days=days,
        url=url or config.server.public_url,
        batches_per_day=batches_per_day,
        records_per_batch=records,
        clients=clients,
        seed=seed,
        progress=True,
    )
    click.echo(report.summary())
    if report.failed:
        raise click.ClickException(f"{report.failed} uploads failed; see the messages above")


@cli.command()
@click.option(
    "--port", type=int, default=8080, show_default=True, help="Port for the upload server."
)
@click.option(
    "--subjects",
    type=click.IntRange(1, 10000),
    default=12,
    show_default=True,
    help="Simulated participants.",
)
@click.option(
    "--days",
    type=click.IntRange(1, 365),
    default=3,
    show_default=True,
    help="Days of simulated data.",
)
@click.option(
    "--exit",
    "exit_after",
    is_flag=True,
    help="Stop the server once the simulation is done instead of serving until Ctrl-C.",
)
@click.pass_context
def demo(ctx, port, subjects, days, exit_after) -> None:
    """Set up a demo home, start the upload server and feed it simulated phones.

    Creates workbench.toml and the pool if missing, a "demo" study, starts the server,
    runs the simulator against it, checks the pool with verify and keeps serving until Ctrl-C.

    \b
    Example:
        workbench demo --port 8080 --exit
        workbench --home demo-home demo
    """
    from workbench.demo import run_demo

    run_demo(ctx.obj["home"], port=port, subjects=subjects, days=days, keep_serving=not exit_after)


def main() -> None:
    """Entry point of the ``workbench`` command."""
    cli(prog_name="workbench")


if __name__ == "__main__":
    main()
