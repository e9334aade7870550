"""``workbench tables``: build, inspect and share the sensor tables.

A thin click layer over :mod:`workbench.sensors`, added to the ``workbench`` command with
``cli.add_command(tables)``.
"""

from __future__ import annotations

import json

import click

from workbench.cli_errors import ErrorGroup


def _config(ctx: click.Context):
    from workbench.config import load_config

    return load_config((ctx.obj or {}).get("home"))


@click.group(cls=ErrorGroup)
def tables() -> None:
    """Sensor tables: the stored batches as typed Parquet, by study, sensor, local day and
    subject, for analysis (`workbench.sensor_data`, `workbench.data_yield`).

    \b
    Example:
        workbench tables build demo
        workbench tables export demo --out /srv/share/demo --format csv
    """


@tables.command("build")
@click.argument("study_id", metavar="[STUDY]", required=False)
@click.option("--sensor", help="Build this sensor's table only.")
@click.option(
    "--rebuild",
    is_flag=True,
    help="Build from the raw batches anew (after a schema change, or to check the tables).",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 256),
    default=None,
    help="Processes building subjects in parallel (default: one per core).",
)
@click.option(
    "--queue",
    "use_queue",
    is_flag=True,
    help="Hand the work to the scheduler's consumers (`workbench scheduler`, on any host that "
    "shares the pool and Redis) and wait for them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def tables_build(ctx, study_id, sensor, rebuild, processes, use_queue, as_json) -> None:
    """Compact the batches stored since the last build into the sensor tables of STUDY (every
    active study when none is named). Incremental, safe to interrupt and run again; records
    repeated across batches are kept once, records that fail their sensor's schema are
    quarantined and counted.

    \b
    Example:
        workbench tables build demo
        workbench tables build demo --sensor location --rebuild
    """
    from workbench.catalog import open_catalog
    from workbench.sensors.tables import build_tables
    from workbench.studies import list_studies

    config = _config(ctx)
    if study_id:
        names = [study_id]
    else:
        catalog = open_catalog(config)
        try:
            names = [s.id for s in list_studies(catalog) if s.active]
        finally:
            catalog.dispose()
        if not names:
            click.echo("no active study: nothing to build")
            return
    summaries = []
    for name in names:
        summary = build_tables(
            config,
            name,
            sensor=sensor,
            rebuild=rebuild,
            processes=processes,
            queue=use_queue,
            progress=not as_json,
        )
        summaries.append(summary)
        if not as_json:
            click.echo(summary.summary())
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in summaries], indent=2))


@tables.command("quarantine")
@click.argument("study_id", metavar="STUDY")
@click.option("--sensor", help="One sensor's refused records only.")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@click.pass_context
def tables_quarantine(ctx, study_id, sensor, limit) -> None:
    """List the records the last builds refused (with the reason and their batch), and the
    batches skipped whole.

    \b
    Example:
        workbench tables quarantine demo --sensor location
    """
    import polars as pl

    from workbench.sensors.tables import quarantine_table

    frame = quarantine_table(_config(ctx), study_id, sensor)
    if frame.is_empty():
        click.echo(f"{study_id}: no refused records")
        return
    counts = frame.group_by("sensor", "reason").len().sort("len", descending=True)
    click.echo(f"{study_id}: {frame.height} refused records or skipped batches")
    for row in counts.head(limit).iter_rows(named=True):
        click.echo(f"  {row['len']:>8}  {row['sensor']}: {row['reason']}")
    sample = frame.select("sensor", "subject", "batch", "record", "reason").head(limit)
    with pl.Config(tbl_rows=limit, tbl_width_chars=160, fmt_str_lengths=80):
        click.echo(str(sample))


def _names(values: tuple[str, ...]) -> list[str] | None:
    """Names given as repeated options and/or separated by commas."""
    names = [n.strip() for value in values for n in value.split(",") if n.strip()]
    return names or None


@tables.command("export")
@click.argument("study_id", metavar="STUDY")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=str),
    help="Folder to write to: new, empty, or a previous export (which is brought up to date).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "csv"]),
    default="parquet",
    show_default=True,
    help="parquet keeps the types; csv has ISO 8601 times (time in UTC, local_time local).",
)
@click.option(
    "--subjects",
    multiple=True,
    help="Only these subjects (comma-separated, or the option repeated).",
)
@click.option("--sensor", "sensors", multiple=True, help="Only this sensor (repeatable).")
@click.option(
    "--start",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    help="First local day (YYYY-MM-DD, in the study's or the subject's zone).",
)
@click.option("--end", type=click.DateTime(formats=["%Y-%m-%d"]), help="Last local day, included.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Write into a folder that holds other files (they are left alone).",
)
@click.pass_context
def tables_export(ctx, study_id, out, fmt, subjects, sensors, start, end, overwrite) -> None:
    """Write STUDY's sensor tables to a folder for sharing: one file per sensor, subject and
    local day (DIR/<sensor>/<subject>/<sensor>_<subject>_<day>.parquet), data_dictionary.csv
    (every column's type, unit and description) and manifest.json (each file's rows, bytes
    and SHA-256, the workbench version, the filters), written last. Build the tables first.

    \b
    Example:
        workbench tables export demo --out /srv/share/demo
        workbench tables export demo --out share --format csv --subjects demo_00001,demo_00002 \\
            --start 2026-03-02 --end 2026-03-08
    """
    from workbench.sensors.sharing import export_tables

    try:
        done = export_tables(
            _config(ctx),
            study_id,
            out,
            fmt=fmt,
            subjects=_names(subjects),
            sensors=_names(sensors),
            start=start.date() if start else None,
            end=end.date() if end else None,
            overwrite=overwrite,
            progress=True,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(done.summary())
