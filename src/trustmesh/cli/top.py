"""``trustmesh top``: the running mesh's authorization traffic, xDS and certificates, live."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from trustmesh.cli import render
from trustmesh.metrics.top import (
    MetricsUnavailable,
    TopSnapshot,
    rates,
    read_snapshot,
    table,
    to_json,
)
from trustmesh.runtime.layout import DEFAULT_STATE
from trustmesh.runtime.running import NotRunning, RunningMesh

__all__ = ["top"]

_out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _snapshot(running: RunningMesh) -> TopSnapshot:
    try:
        return read_snapshot(running)
    except MetricsUnavailable as exc:
        render.usage_error(str(exc))
        raise typer.Exit(1) from None


def top(
    state: Annotated[
        Path,
        typer.Option("--state", envvar="TRUSTMESH_STATE", help="The mesh's state directory."),
    ] = Path(DEFAULT_STATE),
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
    output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table",
    interval: Annotated[
        float, typer.Option("--interval", help="Seconds between refreshes.", min=0.2)
    ] = 2.0,
) -> None:
    """Per pod: requests allowed and denied (per second and in all), dry-run and ext_authz
    results, xDS sync state, certificate time left; the control plane's totals."""
    if output not in ("table", "json"):
        render.usage_error(f"-o/--output must be table or json, not {output!r}")
        raise typer.Exit(2)
    try:
        running = RunningMesh.open(state.resolve())
    except NotRunning as exc:
        render.usage_error(str(exc))
        raise typer.Exit(1) from None
    current = _snapshot(running)
    if once:
        if output == "json":
            sys.stdout.write(json.dumps(to_json(current, {}), indent=2) + "\n")
        else:
            _out.print(table(current, {}))
        return
    try:
        if output == "json":  # one JSON document per line and refresh
            while True:
                time.sleep(interval)  # the refresh period the user asked for
                latest = _snapshot(running)
                sys.stdout.write(json.dumps(to_json(latest, rates(current, latest))) + "\n")
                sys.stdout.flush()
                current = latest
        with Live(table(current, {}), console=_out, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                try:
                    latest = read_snapshot(running)
                except MetricsUnavailable as exc:  # a control plane restarting: keep watching
                    view = Group(table(current, {}), Text(f"not refreshed: {exc}", style="red"))
                    live.update(view, refresh=True)
                    continue
                live.update(table(latest, rates(current, latest)), refresh=True)
                current = latest
    except KeyboardInterrupt:
        return
