"""``workbench features``: behavioural features per subject and local day, written to the pool.

A thin click layer over :mod:`workbench.features.build`, added to the ``workbench`` command
with ``cli.add_command(features)``.
"""

from __future__ import annotations

import json

import click


@click.command("features")
@click.argument("study_id", metavar="STUDY")
@click.option(
    "--rebuild",
    is_flag=True,
    help="Recompute every subject (after `tables build --rebuild`, or to check the table).",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 256),
    default=None,
    help="Processes computing subjects in parallel (default: one per core).",
)
@click.option(
    "--queue",
    "use_queue",
    is_flag=True,
    help="Hand the subjects to the scheduler's consumers (`workbench scheduler`, on any host "
    "that shares the pool and Redis) and wait for them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def features(ctx, study_id, rebuild, processes, use_queue, as_json) -> None:
    """Compute the behavioural features of STUDY (one row per subject and local day, with the
    day's data yield and `valid_day`) into pool/features/STUDY/ as Parquet and CSV, with the
    per-app minutes beside them. Incremental: only subjects with new rows in the sensor tables
    are recomputed. Run `workbench tables build` first (the `features` pipeline does both).

    \b
    Example:
        workbench tables build demo && workbench features demo
        workbench features demo --rebuild --processes 4
    """
    from workbench.config import load_config
    from workbench.features.build import write_features

    config = load_config((ctx.obj or {}).get("home"))
    run = write_features(
        config,
        study_id,
        rebuild=rebuild,
        processes=processes,
        queue=use_queue,
        progress=not as_json,
    )
    click.echo(json.dumps(run.to_dict(), indent=2) if as_json else run.summary())
