"""``trustmesh`` command line.

Exit codes: 0 success (``authz check``: allowed), 1 invalid configuration or failed
tests, 2 bad arguments, 3 ``authz check`` decided not to allow, 4 ``authz check`` cannot
decide it exactly (``unsupported``: e.g. traffic through an ambient waypoint).

Each command's module is imported only when that command runs: the modules behind all
commands take ~1.5 s of CPU to import, and a mesh runs the command line many times
(``down``, ``status``, ``request``, every replica and host). Only ``trustmesh --help``
imports them all (to list each command's help).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import typer
import typer.core
from typer import _click as click  # typer 0.29 ships its own click


@dataclass(frozen=True)
class _Entry:
    """Where a command is defined: a module and its attribute (a function, or a Typer
    group of subcommands)."""

    module: str
    attribute: str


_COMMANDS: dict[str, _Entry] = {
    "validate": _Entry("trustmesh.cli.offline", "validate"),
    "authz": _Entry("trustmesh.cli.offline", "authz_app"),
    "test": _Entry("trustmesh.cli.offline", "test_command"),
    "ca": _Entry("trustmesh.cli.ca", "app"),
    "sample": _Entry("trustmesh.cli.sample", "app"),
    "node": _Entry("trustmesh.cli.node", "app"),
    "agent": _Entry("trustmesh.cli.agent", "agent"),
    "up": _Entry("trustmesh.cli.mesh", "up"),
    "status": _Entry("trustmesh.cli.mesh", "status"),
    "logs": _Entry("trustmesh.cli.mesh", "logs"),
    "down": _Entry("trustmesh.cli.mesh", "down"),
    "proxy-config": _Entry("trustmesh.cli.mesh", "proxy_config"),
    "request": _Entry("trustmesh.cli.mesh", "request"),
    "top": _Entry("trustmesh.cli.top", "top"),
    "analyze": _Entry("trustmesh.cli.analyze", "analyze_command"),
    "harden": _Entry("trustmesh.cli.analyze", "harden_command"),
    "graph": _Entry("trustmesh.cli.graph", "graph_command"),
    "apply": _Entry("trustmesh.cli.store", "apply"),
    "get": _Entry("trustmesh.cli.store", "get"),
    "delete": _Entry("trustmesh.cli.store", "delete"),
    "control-plane": _Entry("trustmesh.cli.replica", "control_plane"),
    "replica": _Entry("trustmesh.cli.replica", "replica_app"),
    "traffic": _Entry("trustmesh.cli.insight", "traffic_app"),
    "impact": _Entry("trustmesh.cli.insight", "impact_command"),
    "generate": _Entry("trustmesh.cli.insight", "generate_command"),
}


def _load(name: str, entry: _Entry) -> click.Command:
    """The click command ``name`` as Typer builds it, from its module, imported now."""
    target: Any = getattr(importlib.import_module(entry.module), entry.attribute)
    if isinstance(target, typer.Typer):
        group = typer.main.get_group(target)
        group.name = name
        return group
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name)(target)
    return typer.main.get_command(single)


class _LazyGroup(typer.core.TyperGroup):
    """Typer's group, whose subcommands are imported when one is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _COMMANDS:
            self.commands[cmd_name] = _load(cmd_name, _COMMANDS[cmd_name])
        return self.commands.get(cmd_name)


app = typer.Typer(
    name="trustmesh",
    cls=_LazyGroup,
    help="Zero-trust service-mesh security that speaks Istio's security API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main() -> None:
    pass  # a group of the commands above; nothing runs before them


@app.command("version")
def version() -> None:
    """Print the trustmesh version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("trustmesh"))


def run() -> None:
    app()
