"""``workbench sync``: providers, account links, syncs, maintenance, polling, the simulator.

A thin click layer over :mod:`workbench.sync`, added to the ``workbench`` command with
``cli.add_command(sync)``.
"""

from __future__ import annotations

import json

import click

from workbench.cli_errors import ErrorGroup
from workbench.times import READABLE, format_ms


def _config(ctx: click.Context):
    from workbench.config import load_config

    return load_config((ctx.obj or {}).get("home"))


def _time(ms: int | None) -> str:
    return format_ms(ms, READABLE) if ms else "-"


@click.group(cls=ErrorGroup)
def sync() -> None:
    """Sync with third-party APIs (wearables, data-donation platforms) within rate limits.

    \b
    Example:
        workbench sync link demo demo_00001 google_health
        workbench sync run --due
    """


@sync.command("providers")
@click.pass_context
def sync_providers(ctx) -> None:
    """List the providers of [[sync.providers]] with their windows and rate limits.

    \b
    Example:
        workbench sync providers
    """
    from workbench.sync.settings import sync_settings

    settings = sync_settings(_config(ctx))
    if not settings.providers:
        click.echo("no [[sync.providers]] in workbench.toml")
    for p in settings.providers:
        requests, seconds = p.rate_limit
        click.echo(
            f"{p.name:<16} {p.type:<14} {p.base_url}  window={p.window} "
            f"limit={requests}/{seconds:g}s per {p.limit_scope}  streams={','.join(p.streams)}"
        )


@sync.command("link")
@click.argument("study")
@click.argument("subject")
@click.argument("provider")
@click.pass_context
def sync_link(ctx, study, subject, provider) -> None:
    """Start linking SUBJECT of STUDY to PROVIDER: prints the authorization URL to give the
    participant; the server's /sync/callback completes the link.

    \b
    Example:
        workbench sync link demo demo_00001 google_health
    """
    from workbench.catalog import open_catalog
    from workbench.sync.accounts import start_link

    config = _config(ctx)
    catalog = open_catalog(config)
    try:
        account, url = start_link(config, catalog, study, subject, provider)
    finally:
        catalog.dispose()
    click.echo(f"account {account.id} ({account.status}); authorization URL:\n{url}")


@sync.command("accounts")
@click.option("--study", help="Only this study's accounts.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def sync_accounts(ctx, study, as_json) -> None:
    """List linked accounts with their status and last sync.

    \b
    Example:
        workbench sync accounts --study demo
    """
    from workbench.catalog import open_catalog
    from workbench.sync.accounts import list_accounts

    catalog = open_catalog(_config(ctx))
    try:
        found = list_accounts(catalog, study=study)
    finally:
        catalog.dispose()
    if as_json:
        click.echo(json.dumps([a.as_dict() for a in found], indent=2))
        return
    if not found:
        click.echo("no accounts; link one with `workbench sync link STUDY SUBJECT PROVIDER`")
    for a in found:
        click.echo(
            f"{a.id:>5} {a.study}/{a.subject:<16} {a.provider:<16} {a.status:<8} "
            f"last synced {_time(a.last_synced_at)}" + (f"  ({a.error})" if a.error else "")
        )


@sync.command("run")
@click.argument("account", type=int, required=False)
@click.option("--due", is_flag=True, help="Queue every account not synced for [sync] stale_days.")
@click.option("--queue", is_flag=True, help="Queue ACCOUNT on the scheduler instead of now.")
@click.pass_context
def sync_run(ctx, account, due, queue) -> None:
    """Sync ACCOUNT now (a rate limit requeues the rest on the scheduler), or queue the due
    accounts with --due.

    \b
    Example:
        workbench sync run 3
        workbench sync run --due
    """
    from workbench.sync import queue_due, queue_sync, sync_account

    config = _config(ctx)
    if due == (account is not None):
        raise click.UsageError("give an ACCOUNT id or --due (not both)")
    if due:
        found = queue_due(config)
        click.echo(f"queued {len(found)} due accounts" + (f": {found}" if found else ""))
        return
    if queue:
        queue_sync(config, account, trigger="manual")
        click.echo(f"queued a sync of account {account}")
        return
    result = sync_account(config, account)
    click.echo(result.summary())
    if result.status in ("failed", "revoked"):
        ctx.exit(1)


@sync.command("maintenance")
@click.pass_context
def sync_maintenance(ctx) -> None:
    """Remove incomplete profiles, refresh tokens close to expiry, delete orphaned records.

    \b
    Example:
        workbench sync maintenance
    """
    from workbench.logs import setup_logging
    from workbench.sync import run_maintenance

    config = _config(ctx)
    setup_logging(config)
    click.echo(run_maintenance(config).summary())


@sync.command("poll")
@click.pass_context
def sync_poll(ctx) -> None:
    """Write the progress of activities starting or ending soon to their destinations.

    \b
    Example:
        workbench sync poll
    """
    from workbench.logs import setup_logging
    from workbench.sync import poll_activities

    config = _config(ctx)
    setup_logging(config)
    click.echo(poll_activities(config).summary())


@sync.command("simulate")
@click.option("--port", type=click.IntRange(1, 65535), default=9100, show_default=True)
@click.option(
    "--limit", default="300/60", show_default=True, help="Rate limit as REQUESTS/SECONDS."
)
@click.pass_context
def sync_simulate(ctx, port, limit) -> None:
    """Serve a local provider simulator (Google Health, Open Humans, REST) until Ctrl-C.
    Its OAuth2 client is demo-client / demo-secret.

    \b
    Example:
        workbench sync simulate --port 9100 --limit 60/6
    """
    from workbench.simulators.providers import ProviderSimulator, serve_simulator

    try:
        requests, seconds = limit.split("/")
        rate = (int(requests), float(seconds))
        if rate[0] < 1 or rate[1] <= 0:
            raise ValueError
    except ValueError:
        raise click.BadParameter("write the limit as REQUESTS/SECONDS, e.g. 60/60") from None
    click.echo(f"provider simulator on http://127.0.0.1:{port} (limit {limit}); Ctrl-C stops it")
    serve_simulator(ProviderSimulator(rate_limit=rate), port=port)
