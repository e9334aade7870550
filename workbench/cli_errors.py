"""How the ``workbench`` command reports a failure: one line on stderr and the error's exit code."""

from __future__ import annotations

import click

from workbench.errors import WorkbenchError


class ErrorGroup(click.Group):
    """A click group that turns a :class:`WorkbenchError` into ``error: <message>`` on stderr
    and the error's exit code (also when the group runs on its own, as in tests).

    Example: ``@click.group(cls=ErrorGroup)``.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WorkbenchError as exc:
            click.echo(f"error: {exc.message}", err=True)
            ctx.exit(exc.exit_code)
