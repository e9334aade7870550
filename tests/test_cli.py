"""Every command explains itself with an example and is documented in the user guide."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from workbench.cli import cli

GUIDE = (Path(__file__).resolve().parent.parent / "docs" / "guide.md").read_text()


def commands(group: click.Group, prefix=()):
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))


ALL = list(commands(cli))


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=[" ".join(p) for p, _ in ALL])
def test_help_has_an_example(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert f"workbench {' '.join(path)}" in result.output or isinstance(
        dict(ALL)[path], click.Group
    )


@pytest.mark.parametrize(
    "path", [p for p, c in ALL if not isinstance(c, click.Group)], ids=lambda p: " ".join(p)
)
def test_command_is_documented_in_the_guide(path):
    assert f"workbench {' '.join(path)}" in GUIDE


def test_top_level_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    for name in cli.commands:
        assert name in result.output
