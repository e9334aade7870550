"""The ``workbench`` command: a thin click layer over the library.

Each command opens the home's configuration and calls one library function.
"""

from __future__ import annotations

import json
import os
import sys

import click

from workbench.cli_errors import ErrorGroup
from workbench.config import find_home, init_home, load_config
from workbench.times import utc_datetime


@click.group(cls=ErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option(
    "--timezone",
    default=None,
    help="IANA time zone of the participants, for local days (default UTC), e.g. Europe/Berlin.",
)
@click.pass_context
def study_create(
    ctx, study_id, duration, sensors, auth, checksum_required, from_file, timezone
) -> None:
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
    if timezone is not None:
        definition["timezone"] = timezone
    if checksum_required:
        definition["checksum_required"] = True
    created = studies.create_study(catalog, definition)
    click.echo(
        f"created study {created.id}: {created.definition['duration_days']} days, "
        f"sensors {', '.join(created.sensors)}, auth {created.definition['auth']}, "
        f"time zone {created.definition['timezone']}"
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
    from workbench.pool import DataPool

    made = enroll_subjects(open_catalog(config), study_id, count)
    if as_json:
        click.echo(json.dumps([{"subject": e.subject, "token": e.token} for e in made], indent=2))
        return
    folder = Path(out) if out else DataPool.of(config).enrollment / study_id
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

    Each request is read whole (header within [server] header_timeout seconds, body within
    body_timeout) before one of the worker's threads runs it, so slow or stalled clients
    hold no thread. Interrupted writes from a previous crash are finished or discarded first.

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
        "workbench_server.wsgi:app",
        "--bind",
        f"{host or s.host}:{port or s.port}",
        "--workers",
        str(workers or s.workers),
        "--threads",
        str(threads or s.threads),
        # reads requests on an event loop under [server] header_timeout and body_timeout;
        # header names keep their underscores (trackerapi clients send `x-api_key`)
        "--worker-class",
        "workbench_server.worker.BufferingWorker",
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


@cli.group()
def subject() -> None:
    """What only the coordinator decides about a subject: removal (JTrack status 3), its
    lifting, and how many devices the subject may still attach.

    \b
    Example:
        workbench subject remove demo demo_00003 --by alice
        workbench subject restore demo demo_00003
        workbench subject reset-devices demo demo_00003
    """


def _standing_line(standing) -> str:
    state = "removed" if standing.removed_at is not None else "in the study"
    return (
        f"{standing.subject} of {standing.study}: {state}; {standing.devices} devices attached "
        f"({standing.devices_changed} changed)"
    )


@subject.command("remove")
@click.argument("study_id", metavar="STUDY")
@click.argument("subject_id", metavar="SUBJECT")
@click.option("--by", help="Who decided it (default: the logged-in user).")
@click.pass_context
def subject_remove(ctx, study_id, subject_id, by) -> None:
    """Remove SUBJECT from STUDY (status 3): their devices are marked removed, no device can
    be attached and no upload of theirs is stored (it goes to junk) until `restore`. Nothing
    already stored is deleted.

    \b
    Example:
        workbench subject remove demo demo_00003 --by alice
    """
    from workbench.subjects import remove_subject

    catalog = _catalog(ctx)
    try:
        click.echo(_standing_line(remove_subject(catalog, study_id, subject_id, by=by)))
    finally:
        catalog.dispose()


@subject.command("restore")
@click.argument("study_id", metavar="STUDY")
@click.argument("subject_id", metavar="SUBJECT")
@click.pass_context
def subject_restore(ctx, study_id, subject_id) -> None:
    """Lift the removal of SUBJECT: their removed devices are active again.

    \b
    Example:
        workbench subject restore demo demo_00003
    """
    from workbench.subjects import restore_subject

    catalog = _catalog(ctx)
    try:
        click.echo(_standing_line(restore_subject(catalog, study_id, subject_id)))
    finally:
        catalog.dispose()


@subject.command("reset-devices")
@click.argument("study_id", metavar="STUDY")
@click.argument("subject_id", metavar="SUBJECT")
@click.pass_context
def subject_reset_devices(ctx, study_id, subject_id) -> None:
    """Let SUBJECT attach devices again up to the study's max_devices (e.g. after a lost
    phone): devices attached before now count only while still active.

    \b
    Example:
        workbench subject reset-devices demo demo_00003
    """
    from workbench.subjects import reset_devices

    catalog = _catalog(ctx)
    try:
        click.echo(_standing_line(reset_devices(catalog, study_id, subject_id)))
    finally:
        catalog.dispose()


@subject.command("timezone")
@click.argument("study_id", metavar="STUDY")
@click.argument("subject_id", metavar="SUBJECT")
@click.argument("zone", metavar="ZONE", required=False)
@click.option("--clear", is_flag=True, help="Use the study's time zone again.")
@click.pass_context
def subject_timezone(ctx, study_id, subject_id, zone, clear) -> None:
    """Give SUBJECT a time zone of its own (an IANA name such as America/New_York), for a
    participant who lives elsewhere than the study's zone; local days of sensor tables, yield
    and features follow it (the next `tables build` rebuilds the tables it moves).

    \b
    Example:
        workbench subject timezone demo demo_00003 America/New_York
        workbench subject timezone demo demo_00003 --clear
    """
    from workbench.subjects import set_timezone

    if bool(zone) == bool(clear):
        raise click.UsageError("give a ZONE or --clear, not both")
    catalog = _catalog(ctx)
    try:
        now = set_timezone(catalog, study_id, subject_id, None if clear else zone)
        click.echo(f"{subject_id} of {study_id}: time zone {now}")
    finally:
        catalog.dispose()


@cli.group()
def junk() -> None:
    """Bodies the upload server refused but kept (unknown study, archived study, left
    subject, ...): list them, and prune what is no longer needed. Pruned rows stay in the
    catalog, marked pruned, so `workbench verify` stays consistent.

    \b
    Example:
        workbench junk list --older-than 30
        workbench junk prune --older-than 30 --dry-run
    """


def _junk_filters(function):
    function = click.option("--study", help="Only junk claiming this study.")(function)
    function = click.option("--reason", help="Only this refusal, e.g. unknown_study.")(function)
    return click.option(
        "--older-than",
        "older_than",
        type=click.FloatRange(min=0),
        help="Only junk received more than DAYS days ago.",
        metavar="DAYS",
    )(function)


@junk.command("list")
@_junk_filters
@click.option("--pruned", is_flag=True, help="Include what was pruned already.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@click.pass_context
def junk_list(ctx, older_than, reason, study, pruned, fmt) -> None:
    """List kept junk, oldest first, with its total size.

    \b
    Example:
        workbench junk list --reason unknown_study
    """
    from workbench.junk import list_junk

    frame = list_junk(
        _config(ctx),
        older_than_days=older_than,
        reason=reason,
        study=study,
        include_pruned=pruned,
    )
    if fmt == "json":
        click.echo(frame.write_json())
        return
    if fmt == "csv":
        from workbench.writers import csv_bytes

        click.echo(csv_bytes(frame).decode(), nl=False)
        return
    for row in frame.iter_rows(named=True):
        click.echo(
            f"{row['id']:>6} {row['received_at']:%Y-%m-%d %H:%M:%S} {row['reason']:<18} "
            f"{row['remote_addr'] or '-':<16} {row['bytes'] or 0:>10}  {row['path']}"
            + ("  (pruned)" if row["pruned_at"] is not None else "")
        )
    click.echo(f"{frame.height} junk files, {int(frame['bytes'].sum() or 0):,} bytes")


@junk.command("prune")
@_junk_filters
@click.option("--all", "everything", is_flag=True, help="Prune all junk, whatever its age.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.pass_context
def junk_prune(ctx, older_than, reason, study, everything, dry_run) -> None:
    """Delete kept junk files and mark their rows pruned. Needs --older-than DAYS or --all.

    \b
    Example:
        workbench junk prune --older-than 30
        workbench junk prune --reason unknown_study --all --dry-run
    """
    from workbench.junk import prune_junk

    if older_than is None and not everything:
        raise click.UsageError("say which junk to prune: --older-than DAYS, or --all")
    result = prune_junk(
        _config(ctx), older_than_days=older_than, reason=reason, study=study, dry_run=dry_run
    )
    click.echo(result.summary())


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
@click.argument("study_id", metavar="STUDY", required=False)
@click.option("--all", "all_studies", is_flag=True, help="Every study, archived ones too.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "parquet"]),
    default="table",
    show_default=True,
    help="table: readable text; csv: JTrack's columns first; json: a list of rows.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to FILE instead of standard output (parquet needs it).",
)
@click.option(
    "--history",
    is_flag=True,
    help="Show the changes of activity code instead: when each subject went silent, left, ...",
)
@click.option("--subject", help="With --history: only this subject.")
@click.pass_context
def status(ctx, study_id, all_studies, fmt, out, history, subject) -> None:
    """Show who is sending data, who went silent and since when, and how complete it is.

    Refreshes first: new uploads are folded in, changes recorded, alerts updated and each
    study's CSV rewritten in the pool's reports folder. Activity codes: 0 no data, 1 left
    early, 2 duration over but not left, 3 completed, 4 several devices active, 5 ok.

    \b
    Example:
        workbench status demo
        workbench status demo --format csv --out demo-status.csv
        workbench status --all --format parquet --out status.parquet
        workbench status demo --history --subject demo_00003
    """
    import polars as pl

    from workbench.pool import DataPool
    from workbench.refresh import refresh_status
    from workbench.status import status_history_table, study_status
    from workbench.studies import get_study, list_studies
    from workbench.writers import render

    if bool(study_id) == all_studies:
        raise click.UsageError("name one STUDY, or give --all")
    if fmt == "parquet" and not out:
        raise click.UsageError("--format parquet needs --out FILE")
    config = _config(ctx)
    catalog = _catalog(ctx)
    try:
        if study_id:
            get_study(catalog, study_id)  # a name that is no study changes nothing
        refresh_status(config, catalog=catalog)
        ids = [s.id for s in list_studies(catalog)] if all_studies else [study_id]
        tables = []
        for one in ids:
            if history:
                table = status_history_table(catalog, one, subject=subject)
            else:
                table = study_status(catalog, one, pool=DataPool.of(config))
            if all_studies:
                table = table.select(pl.lit(one).alias("study"), pl.all())
            tables.append(table)
    finally:
        catalog.dispose()
    if fmt == "table" and all_studies:
        data = b"".join(
            f"{one}\n".encode() + render(t, "table") + b"\n"
            for one, t in zip(ids, tables, strict=True)
        )
    else:
        table = pl.concat(tables, how="diagonal_relaxed") if tables else pl.DataFrame()
        if fmt == "parquet":
            _emit_parquet(table, out)
            click.echo(f"wrote {table.height} rows to {out}", err=True)
            return
        data = render(table, fmt)
    _emit(data, out)


def _emit(data: bytes, out: str | None) -> None:
    if out:
        from pathlib import Path

        from workbench.pool import write_file_atomically

        write_file_atomically(Path(out).resolve(), data)
        click.echo(f"wrote {out}", err=True)
    else:
        click.echo(data.decode(), nl=False)


def _emit_parquet(frame, out: str) -> None:
    from pathlib import Path

    from workbench.writers import write_parquet_atomically

    write_parquet_atomically(frame, Path(out).resolve())


@cli.command()
@click.option("--no-mail", is_flag=True, help="Do not mail new alerts this time.")
@click.pass_context
def refresh(ctx, no_mail) -> None:
    """Bring every active study's status, history, alerts and CSV up to date.

    Costs in proportion to the uploads since the last refresh; meant to run every few minutes
    from the scheduler (or cron). New alerts are mailed once when [smtp] is configured.

    \b
    Example:
        workbench refresh
    """
    from workbench.refresh import refresh_status

    report = refresh_status(_config(ctx), mail=not no_mail)
    click.echo(report.summary())


class _DefaultToList(ErrorGroup):
    """``workbench alerts [STUDY]`` lists; ``workbench alerts ack ID`` acknowledges."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_DefaultToList)
def alerts() -> None:
    """What coordinators should act on: questionnaire safety items (listed first), silent
    subjects, overdue leavers, extra devices, subjects who never sent data, low completeness.
    Without a subcommand: list.

    \b
    Example:
        workbench alerts
        workbench alerts demo --format json
        workbench alerts ack 12 --note "phone replaced"
    """


@alerts.command("list")
@click.argument("study_id", metavar="[STUDY]", required=False)
@click.option("--all", "include_closed", is_flag=True, help="Closed alerts too.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
)
@click.option("--no-refresh", is_flag=True, help="List what the last refresh found.")
@click.pass_context
def alerts_list(ctx, study_id, include_closed, fmt, no_refresh) -> None:
    """List open alerts (of one study or questionnaire source, or all), each with since-when
    and what to do; safety alerts come first.

    \b
    Example:
        workbench alerts list demo
        workbench alerts list mindtrails
        workbench alerts list --all --format csv
    """
    from workbench.alerts import alerts_table, list_alerts
    from workbench.refresh import refresh_status
    from workbench.studies import get_study
    from workbench.writers import render

    config = _config(ctx)
    catalog = _catalog(ctx)
    try:
        sources = {source.name for source in config.sources}
        if study_id and study_id not in sources:  # a questionnaire source has safety alerts
            get_study(catalog, study_id)
        if not no_refresh:
            refresh_status(config, catalog=catalog)
        items = list_alerts(catalog, study_id, include_closed=include_closed)
    finally:
        catalog.dispose()
    if fmt == "table" and not items:
        click.echo("no open alerts" if not include_closed else "no alerts")
        return
    if fmt == "json":
        import orjson

        click.echo(orjson.dumps([a.as_dict() for a in items], option=orjson.OPT_INDENT_2).decode())
        return
    table = alerts_table(items)
    if fmt == "table":  # what a coordinator reads first; --format csv/json has every column
        table = table.select(
            "id", "study", "subject", "device", "kind", "since", "detail", "action", "acked_by"
        )
    _emit(render(table, fmt), None)


@alerts.command("ack")
@click.argument("alert_id", metavar="ID", type=int)
@click.option("--note", help="What was done (required for a safety alert).")
@click.option("--by", help="Who handled it (default: the logged-in user).")
@click.pass_context
def alerts_ack(ctx, alert_id, note, by) -> None:
    """Record that an alert was handled, by whom, with a note.

    A safety alert (a questionnaire's safety item, e.g. PHQ-9 item 9) needs --note, is
    closed by the acknowledgement and is acknowledged only once.

    \b
    Example:
        workbench alerts ack 12 --note "called; phone was in airplane mode"
    """
    from workbench.alerts import ack_alert

    catalog = _catalog(ctx)
    try:
        alert = ack_alert(catalog, alert_id, by=by, note=note)
    finally:
        catalog.dispose()
    closed = " and closed" if alert.is_safety else ""
    click.echo(
        f"alert {alert.id} ({alert.kind}, {alert.subject}) acknowledged{closed} by {alert.acked_by}"
    )


@cli.command()
@click.argument("study_id", metavar="[STUDY]", required=False)
@click.option(
    "--full", is_flag=True, help="Check every file again and look for files no ledger row names."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Processes checking files (default: one per core).",
)
@click.pass_context
def sanity(ctx, study_id, full, workers) -> None:
    """Check stored batch files against the ledger and the batch JSON Schema.

    Each file must exist with its recorded size and SHA-256, parse, hold valid records that
    all name the ledger row's study, subject, device and sensor, and match its record count
    and sample span. By default only files not checked before are read. Failing files are
    listed in a CSV and JSON report under the pool's reports/sanity/; exit status 1 if any.

    \b
    Example:
        workbench sanity
        workbench sanity demo --full
    """
    from workbench.sanity import sanity_check

    report = sanity_check(
        _config(ctx), study=study_id, full=full, workers=workers, progress=sys.stderr.isatty()
    )
    for failure in report.failures:
        click.echo(f"{failure.path}: {failure.reason}")
    click.echo(report.summary())
    if not report.ok:
        ctx.exit(1)


@cli.command()
@click.option(
    "--all-hosts",
    is_flag=True,
    help="Also finish the writes of servers that ran on other hosts (e.g. a container that was replaced).",
)
@click.option(
    "--uploads/--no-uploads",
    default=True,
    show_default=True,
    help="Finish upload writes interrupted by a crash (refused while a server on this host runs).",
)
@click.option(
    "--exports/--no-exports",
    default=True,
    show_default=True,
    help="Rebuild every decoded questionnaire table from the raw snapshots alone.",
)
@click.pass_context
def recover(ctx, all_hosts, uploads, exports) -> None:
    """Recover from a crash or a lost folder: finish or discard interrupted upload writes, and
    rebuild every decoded questionnaire table from the raw snapshots.

    \b
    Example:
        workbench recover
        workbench recover --all-hosts --no-exports
        workbench recover --no-uploads        # only rebuild the decoded tables
    """
    config = _config(ctx)
    if uploads:
        from workbench.ingest import recover_incoming

        click.echo(_recovered(recover_incoming(config, all_hosts=all_hosts)))
    if exports and config.sources:
        from workbench.export import rebuild_decoded

        done = rebuild_decoded(config, progress=sys.stderr.isatty())
        click.echo(
            f"decoded tables rebuilt from raw: {sum(done.values())} rows in {len(done)} tables"
        )


@cli.command()
@click.argument("source", metavar="[SOURCE|.]", required=False)
@click.argument("table", metavar="[TABLE|.]", required=False)
@click.pass_context
def export(ctx, source, table) -> None:
    """Export questionnaire tables from study servers into the pool, decrypted and decoded.

    Fetches the rows above each table's high-water mark, stores them as a raw snapshot
    (hashed, in the catalog), decrypts the ...RSA fields, merges them into per-day Parquet and
    CSV files, advances the mark and, for sources in delete_mode, deletes on the server the rows
    found in both. "." means every source or every table. Credentials come from the
    environment variables the source names. Exit status 8 if a table failed (what was stored
    stays stored; the next run resumes).

    \b
    Example:
        MT_USER=demo MT_PASSWORD=demo workbench export
        workbench export mindtrails PHQ9
    """
    from workbench.errors import ExportFailed
    from workbench.export import export_sources
    from workbench.logs import setup_logging

    config = _config(ctx)
    setup_logging(config)
    reports = export_sources(
        config,
        None if source in (None, ".") else source,
        None if table in (None, ".") else table,
        progress=sys.stderr.isatty(),
    )
    for report in reports:
        click.echo(report.summary())
    if not all(r.ok for r in reports):
        raise ExportFailed("some tables failed; see above and the error log in the pool's logs/")


@cli.command()
@click.argument("source", metavar="[SOURCE|.]", required=False)
@click.argument("table", metavar="[TABLE|.]", required=False)
@click.pass_context
def decode(ctx, source, table) -> None:
    """Decode tables again from their raw snapshots (e.g. after a fix to decoding or a new key).

    \b
    Example:
        workbench decode                 # every source and table
        workbench decode mindtrails PHQ9
    """
    from workbench.export import rebuild_decoded
    from workbench.logs import setup_logging

    config = _config(ctx)
    setup_logging(config)
    done = rebuild_decoded(
        config,
        None if source in (None, ".") else source,
        None if table in (None, ".") else table,
        progress=sys.stderr.isatty(),
    )
    for key, rows in sorted(done.items()):
        click.echo(f"{key}: {rows} rows decoded")
    if not done:
        click.echo("no raw snapshots to decode")


@cli.command()
@click.argument("table")
@click.option("--source", help="Source of the table (default: the only one configured).")
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "parquet"]), default="csv", show_default=True
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write to FILE (parquet needs it).")
@click.pass_context
def combine(ctx, table, source, fmt, out) -> None:
    """Join every day of one decoded table into one file, by id (exact name, never a prefix).

    \b
    Example:
        workbench combine PHQ9 --out phq9.csv
        workbench combine GAD7 --source mindtrails --format parquet --out gad7.parquet
    """
    from workbench.decoded import combine_table

    config = _config(ctx)
    source = _only_source(config, source)
    if fmt == "parquet" and not out:
        raise click.UsageError("--format parquet needs --out FILE")
    frame = combine_table(config, source, table)
    if fmt == "parquet":
        _emit_parquet(frame, out)
        click.echo(f"wrote {frame.height} rows to {out}", err=True)
        return
    from workbench.writers import csv_bytes

    _emit(csv_bytes(frame), out)


@cli.command()
@click.argument("table")
@click.option(
    "--instrument",
    "name",
    required=True,
    help="Instrument id, e.g. phq9 (shipped in workbench/shipped/data_templates/instruments/, or the home's "
    "own in <home>/instruments/).",
)
@click.option("--source", help="Source of the table (default: the only one configured).")
@click.option(
    "--last-per-session", is_flag=True, help="Keep only each participant's last answer per session."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "parquet"]),
    default="table",
    show_default=True,
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write to FILE (parquet needs it).")
@click.pass_context
def score(ctx, table, name, source, last_per_session, fmt, out) -> None:
    """Score a decoded questionnaire table with an instrument: adds <id>_total, one column per
    subscale, <id>_band, <id>_missing and <id>_valid. The table must hold every item column of
    the instrument (a PHQ-8 table is scored as phq8, not phq9).

    \b
    Example:
        workbench score PHQ9 --instrument phq9
        workbench score GAD7 --instrument gad7 --last-per-session --format csv --out gad7.csv
    """
    import polars as pl

    from workbench.decoded import combine_table
    from workbench.instruments import instrument
    from workbench.instruments import last_per_session as last
    from workbench.instruments import score as score_table
    from workbench.writers import render

    config = _config(ctx)
    source = _only_source(config, source)
    frame = combine_table(config, source, table)
    if last_per_session:
        frame = last(frame)
    inst = instrument(name, config=config)
    scored = score_table(frame, inst, config=config)
    if fmt == "parquet":
        if not out:
            raise click.UsageError("--format parquet needs --out FILE")
        _emit_parquet(scored, out)
        click.echo(f"wrote {scored.height} rows to {out}", err=True)
        return
    if fmt == "table":
        keep = [c for c in ("participant", "session", "date") if c in scored.columns]
        keep += [c for c in scored.columns if c.startswith(f"{inst.id}_")]
        _emit(render(scored.select(keep), "table"), out)
        return
    _emit(render(scored.select(pl.all()), "csv"), out)


def _only_source(config, source):
    if source is None:
        if len(config.sources) != 1:
            raise click.UsageError("name the --source (workbench.toml has several or none)")
        return config.sources[0].name
    return source


@cli.group()
def report() -> None:
    """Data-quality and attrition reports, as CSV, Parquet and an HTML page in the pool's
    reports/ folder.

    \b
    Example:
        workbench report questionnaire
        workbench report participant mindtrails
        workbench report attrition demo
    """


@report.command("questionnaire")
@click.argument("source", metavar="[SOURCE]", required=False)
@click.pass_context
def report_questionnaire(ctx, source) -> None:
    """Per questionnaire and column: % blank, special codes, out-of-range answers and invalid
    choices (checked against the instrument whose items the table holds); per instrument and
    session: Cronbach's alpha and corrected item-total correlations; per participant: change
    from first to last score, response, remission and reliable change. The page ends with a
    methods paragraph naming the rules and their sources.

    \b
    Example:
        workbench report questionnaire mindtrails
    """
    from workbench.reports import write_questionnaire_report

    written = write_questionnaire_report(_config(ctx), source)
    for line in written.lines:
        click.echo(line)
    click.echo(f"report: {written.page}")


@report.command("participant")
@click.argument("source", metavar="[SOURCE]", required=False)
@click.pass_context
def report_participant(ctx, source) -> None:
    """Per participant: the questionnaires and sessions missing against the study schedule.

    \b
    Example:
        workbench report participant mindtrails
    """
    from workbench.reports import write_participant_report

    written = write_participant_report(_config(ctx), source)
    for line in written.lines:
        click.echo(line)
    click.echo(f"report: {written.page}")


@report.command("attrition")
@click.argument("name", metavar="STUDY")
@click.pass_context
def report_attrition(ctx, name) -> None:
    """Dispositions, CONSORT counts, Kaplan-Meier retention with 95 % bands, dropout by study
    week, usage half-life and EMA compliance, for a sensing study or a questionnaire source.

    \b
    Example:
        workbench report attrition demo
        workbench report attrition mindtrails
    """
    from workbench.reports import write_attrition_report
    from workbench.writers import render

    result, written = write_attrition_report(_config(ctx), name)
    click.echo(render(result.consort, "table").decode(), nl=False)
    for line in written.lines:
        click.echo(line)
    click.echo(f"report: {written.page}")


@cli.command("run")
@click.argument("name")
@click.option(
    "-p",
    "--parameter",
    "parameters",
    nargs=2,
    multiple=True,
    metavar="KEY VALUE",
    help="Set a notebook parameter (values are read as JSON when they parse, else as text).",
)
@click.pass_context
def run_command(ctx, name, parameters) -> None:
    """Run a pipeline now and print where its executed notebook is.

    \b
    Example:
        workbench run status
        workbench run attrition -p study demo
    """
    from workbench.pipelines import run_pipeline
    from workbench.pool import DataPool

    values = {}
    for key, value in parameters:
        try:
            values[key] = json.loads(value)
        except ValueError:
            values[key] = value
    config = _config(ctx)
    record = run_pipeline(config, name, parameters=values)
    where = (
        DataPool.of(config).path(record.notebook) if record.notebook else "no notebook was written"
    )
    click.echo(f"run {record.id} of {name}: {record.status} in {record.duration_ms / 1000:.1f} s")
    click.echo(f"notebook: {where}")
    if record.status != "succeeded":
        cell = "" if record.failing_cell is None else f" in cell {record.failing_cell}"
        raise click.ClickException(f"the run {record.status}{cell}: {record.error}")


@cli.command()
@click.option(
    "--workers", type=click.IntRange(1, 32), help="Consumer workers (default from workbench.toml)."
)
@click.pass_context
def scheduler(ctx, workers) -> None:
    """Run the scheduler in the foreground: every enabled pipeline on its cron schedule (UTC),
    queued in SQLite in the pool (or Redis when configured), until Ctrl-C.

    \b
    Example:
        workbench scheduler
        WORKBENCH_REDIS_URL=redis://127.0.0.1:6379/0 workbench scheduler --workers 4
    """
    import logging

    from workbench.logs import setup_logging
    from workbench.pipelines import load_pipelines, run_scheduler

    config = _config(ctx)
    setup_logging(config)
    logging.getLogger("huey").addHandler(logging.StreamHandler())
    for pipeline in load_pipelines(config).values():
        state = "" if pipeline.enabled else " (disabled)"
        click.echo(
            f"{pipeline.name:<12} {pipeline.cron:<16} {pipeline.notebook.name}{state}", err=True
        )
    run_scheduler(config, workers=workers)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8866, show_default=True)
@click.option(
    "--cold",
    is_flag=True,
    help="Start a kernel when a page is opened instead of keeping one ready per dashboard.",
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Serve without a token or password (refused unless HOST is a loopback address).",
)
@click.pass_context
def dashboards(ctx, host, port, cold, no_auth) -> None:
    """Serve the coordinators' dashboards with Voila until Ctrl-C: study status (who needs
    attention today) and attrition (how retention is going). The landing page lists them;
    each is at /voila/render/<name>.ipynb. Notebook sources are hidden.

    Pages need a sign-in: the printed URLs carry a token, random per start unless set in
    WORKBENCH_DASHBOARDS_TOKEN. With WORKBENCH_DASHBOARDS_PASSWORD set, the login page asks
    for that password instead (and the URLs carry no token, unless both are set).

    One kernel per dashboard is kept ready with the page already computed, so a page opens
    in about the time of an empty one; the page refreshes itself (every 5 minutes by default)
    and has a Refresh button.

    \b
    Example:
        workbench dashboards --port 8866
        # then open the printed http://127.0.0.1:8866/voila/render/study_status.ipynb?token=...
        WORKBENCH_DASHBOARDS_PASSWORD=... workbench dashboards --host 0.0.0.0
    """
    import signal

    from workbench.dashboards import (
        PASSWORD_ENV,
        dashboard_access,
        dashboard_urls,
        serve_dashboards,
        stop_process,
        wait_for_dashboards,
    )

    config = _config(ctx)
    access = dashboard_access(open_access=no_auth)
    # SIGTERM (e.g. from a process manager) stops it like Ctrl-C: Voila and its kernels too
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    process = serve_dashboards(config, port=port, host=host, preheat=not cold, access=access)
    try:
        wait_for_dashboards(f"http://{host}:{port}", process=process, token=access.token)
        for name, url in dashboard_urls(f"http://{host}:{port}", access).items():
            click.echo(f"{name:<13} {url}")
        if access.hashed_password:
            click.echo(f"sign in with the password in {PASSWORD_ENV}")
        elif not access.required:
            click.echo("no sign-in: anyone who can reach this address sees the dashboards")
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_process(process)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8888, show_default=True)
@click.option(
    "--browser/--no-browser",
    default=False,
    show_default=True,
    help="Open JupyterLab in this machine's web browser.",
)
@click.pass_context
def lab(ctx, host, port, browser) -> None:
    """Start JupyterLab on the home until Ctrl-C, where researchers open the study's data.

    Its root folder is the home's notebooks/ (the copies `workbench init` made), and its
    default kernel imports this workbench with the home set: workbench.load_config() in a
    cell is this home's configuration. Pages need the token carried in the printed URL,
    random per start unless set in WORKBENCH_LAB_TOKEN. JupyterLab keeps its settings,
    workspaces and runtime files in the home's private .lab/ folder, not in ~/.jupyter.
    A port in use is refused.

    \b
    Example:
        workbench lab --port 8888
        # then open the printed http://127.0.0.1:8888/lab?token=...
        WORKBENCH_LAB_TOKEN=... workbench --home ~/sleep-lab lab
    """
    import signal

    from workbench.dashboards import stop_process
    from workbench.lab import lab_access, lab_url, serve_lab, wait_for_lab

    config = _config(ctx)
    access = lab_access()
    url = f"http://{host}:{port}"
    process = serve_lab(config, port=port, host=host, access=access, browser=browser)
    # SIGTERM (e.g. from a process manager) stops it like Ctrl-C: JupyterLab and its kernels
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        wait_for_lab(url, process=process, access=access)
        click.echo(f"JupyterLab: {lab_url(url, access)}")
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_process(process)


@cli.command()
@click.argument("name", required=False)
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.pass_context
def runs(ctx, name, limit) -> None:
    """Show the run history of every pipeline (or one), newest first.

    \b
    Example:
        workbench runs
        workbench runs status --limit 5
    """

    from workbench.pipelines import list_runs

    catalog = _catalog(ctx)
    try:
        rows = list_runs(catalog, name, limit=limit)
    finally:
        catalog.dispose()
    if not rows:
        click.echo("no runs yet")
        return
    for row in rows:
        when = utc_datetime(row["started_at"])
        took = "" if row["duration_ms"] is None else f"{row['duration_ms'] / 1000:6.1f} s"
        line = f"{row['id']:>5} {when:%Y-%m-%d %H:%M:%S} {row['pipeline']:<12} {row['status']:<9} {took:>8}  {row['notebook']}"
        if row["error"]:
            cell = "" if row["failing_cell"] is None else f"cell {row['failing_cell']}: "
            line += f"\n      {cell}{row['error']}"
        click.echo(line)


@cli.command()
@click.pass_context
def crontab(ctx) -> None:
    """Print crontab lines that run every enabled pipeline (for teams who prefer cron).

    \b
    Example:
        workbench crontab | crontab -
    """
    from workbench.pipelines import crontab_lines

    for line in crontab_lines(_config(ctx)):
        click.echo(line)


@cli.command("simulate-questionnaires")
@click.option("--port", type=int, default=9000, show_default=True)
@click.option("--participants", type=click.IntRange(1, 100000), default=20, show_default=True)
@click.option("--days", type=click.IntRange(1, 3650), default=14, show_default=True)
@click.option(
    "--padding", type=click.Choice(["pkcs1v15", "oaep"]), default="pkcs1v15", show_default=True
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def simulate_questionnaires(ctx, port, participants, days, padding, seed) -> None:
    """Run a local study server speaking the MindTrails export protocol, with realistic
    questionnaire tables (PHQ-9, GAD-7, demographics) whose participantRSA fields are
    encrypted with the public key in the home's keys/ folder (a key pair is made if missing).
    Logins are the values of MT_USER and MT_PASSWORD (default demo/demo).

    \b
    Example:
        workbench simulate-questionnaires --port 9000 --participants 50
    """
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from workbench.simulators.study_server import StudyServer, demo_tables, generate_keypair, serve

    home = _config(ctx).home
    _private, public = generate_keypair(home / "keys")
    key = load_pem_public_key(public.read_bytes())
    tables, deleteable = demo_tables(
        key, participants=participants, days=days, seed=seed, padding=padding
    )
    server = StudyServer(
        tables,
        deleteable=deleteable,
        user=os.environ.get("MT_USER", "demo"),
        password=os.environ.get("MT_PASSWORD", "demo"),
    )
    click.echo(f"study server on http://127.0.0.1:{port}/export/ (Ctrl-C to stop)", err=True)
    serve(server, host="127.0.0.1", port=port)


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
    default=7,
    show_default=True,
    help="Local days of data per participant, ending yesterday in the study's time zone.",
)
@click.option(
    "--start",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    help="First local day (YYYY-MM-DD) instead of DAYS before today.",
)
@click.option(
    "--seed",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Random seed, for repeatable runs.",
)
@click.option(
    "--url",
    help="Upload to the server at this URL (default: store through the ingest path in process).",
)
@click.option(
    "--truth",
    "truth_path",
    type=click.Path(dir_okay=False),
    help="Write the truth per subject and local day to this Parquet file.",
)
@click.option(
    "--true-coordinates",
    is_flag=True,
    help="Send true coordinates instead of rotating them as the JTrack app does.",
)
@click.pass_context
def simulate(ctx, study_id, subjects, days, start, seed, url, truth_path, true_coordinates) -> None:
    """Simulate participants' realistic days and store them, keeping the truth.

    Enrolls SUBJECTS new subjects. Each gets a home, a workplace and other places in one city,
    sleeps at home, commutes, walks, uses apps, answers EMA prompts, labels activities and
    sometimes switches the phone off; the phone's batches (in the JTrack app's shapes and
    batch sizes) are stored through the ingest path, or uploaded to a running server with
    --url. --truth writes what really happened, per subject and local day.

    \b
    Example:
        workbench simulate demo --subjects 20 --days 14 --seed 1 --truth truth.parquet
        workbench simulate demo --subjects 5 --url http://127.0.0.1:8080
    """
    from workbench.simulators.days import simulate_days

    truth = simulate_days(
        _config(ctx),
        study_id,
        subjects=subjects,
        days=days,
        seed=seed,
        start=start.date() if start else None,
        obfuscate=not true_coordinates,
        url=url,
        progress=True,
    )
    if truth_path:
        truth.write(truth_path)
    click.echo(truth.summary() + (f"; truth {truth_path}" if truth_path else ""))
    if truth.failed:
        for error in truth.errors[:5]:
            click.echo(error, err=True)
        raise click.ClickException(f"{truth.failed} uploads failed")


@cli.command()
@click.option(
    "--port", type=int, default=8080, show_default=True, help="Port for the upload server."
)
@click.option(
    "--subjects",
    type=click.IntRange(1, 10000),
    default=12,
    show_default=True,
    help="Simulated phones (for the status and alerts; 3 more subjects get whole days).",
)
@click.option(
    "--days",
    type=click.IntRange(1, 365),
    default=3,
    show_default=True,
    help="Days of data of the simulated phones.",
)
@click.option(
    "--exit",
    "exit_after",
    is_flag=True,
    help="Stop the server once the simulation is done instead of serving until Ctrl-C.",
)
@click.option(
    "--dashboards-port",
    type=click.IntRange(0, 65535),
    default=8866,
    show_default=True,
    help="Port for the Voila dashboards while serving (0: no dashboards).",
)
@click.option(
    "--lab-port",
    type=click.IntRange(0, 65535),
    default=8888,
    show_default=True,
    help="Port for JupyterLab while serving (0: no JupyterLab).",
)
@click.pass_context
def demo(ctx, port, subjects, days, exit_after, dashboards_port, lab_port) -> None:
    """Set up a demo home, start the upload server and feed it simulated phones.

    Creates workbench.toml and the pool if missing, a "demo" study (Europe/Berlin), starts
    the server, runs the simulated phones against it and sends a few subjects' simulated days
    of real-shaped sensor data, checks the pool with verify, builds the sensor tables (their
    summary and data yield are printed), then keeps serving until
    Ctrl-C with the scheduler, the Voila dashboards and JupyterLab (their addresses are
    printed, with their tokens).

    \b
    Example:
        workbench demo --port 8080 --exit
        workbench --home demo-home demo
    """
    from workbench.simulators.demo import run_demo

    run_demo(
        ctx.obj["home"],
        port=port,
        subjects=subjects,
        days=days,
        keep_serving=not exit_after,
        dashboards_port=dashboards_port,
        lab_port=lab_port,
    )


from workbench.cli_jobs import jobs  # noqa: E402  (the job-tracking commands)

cli.add_command(jobs)

from workbench.cli_sync import sync  # noqa: E402  (the sync commands)

cli.add_command(sync)

from workbench.cli_features import features  # noqa: E402  (the features command)
from workbench.cli_tables import tables  # noqa: E402  (the sensor-table commands)

cli.add_command(tables)
cli.add_command(features)


def main() -> None:
    """Entry point of the ``workbench`` command."""
    from workbench.pool import private_umask

    private_umask()  # a second defence: every writer sets its modes itself
    cli(prog_name="workbench")


if __name__ == "__main__":
    main()
