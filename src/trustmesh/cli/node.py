"""``trustmesh node join``: run one host's pods against the control-plane replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from trustmesh.cli import render
from trustmesh.cli.mesh import State, _err, run_in_foreground
from trustmesh.identity.tokens import is_node_name
from trustmesh.runtime.layout import DEFAULT_STATE, Layout
from trustmesh.runtime.plan import Isolation
from trustmesh.runtime.registration import HostJoin
from trustmesh.runtime.supervisor import MeshRuntime

app = typer.Typer(help="A host of the mesh: its pods, registered with the control plane.")


@app.command()
def join(
    config: Annotated[list[Path], typer.Argument(help="The mesh's manifests (every host's).")],
    control_plane: Annotated[
        str,
        typer.Option(
            "--control-plane", help="ADDR[,ADDR...]: the replicas' CA enrollment addresses."
        ),
    ],
    token: Annotated[Path, typer.Option("--token", help="File with the node token.")],
    roots: Annotated[Path, typer.Option("--roots", help="The mesh's trust bundle (PEM).")],
    name: Annotated[str, typer.Option("--name", help="This host's name (the token's node).")],
    pod: Annotated[
        list[str] | None,
        typer.Option("--pod", help="NS/NAME to run here (repeatable); default: spec.nodeName."),
    ] = None,
    base: Annotated[str, typer.Option("--base", help="First pod address block.")] = "127.64.0.0",
    state: State = Path(DEFAULT_STATE),
) -> None:
    """Join with a node token and run this host's pods (process mode) until stopped."""
    if not is_node_name(name):
        render.usage_error(f"--name {name!r} is not a DNS-1123 label")
        raise typer.Exit(2)
    try:
        secret = token.read_text().strip()
        bundle = roots.read_bytes()
    except OSError as exc:
        render.usage_error(f"cannot read {exc.filename}: {exc.strerror}")
        raise typer.Exit(1) from None
    addresses = tuple(a.strip() for a in control_plane.split(",") if a.strip())
    runtime = MeshRuntime(
        [str(p) for p in config],
        Layout(state.resolve()),
        base=base,
        progress=lambda message: _err.print(message, markup=False),
        isolation=Isolation.PROCESS,
        join=HostJoin(name, addresses, secret, bundle, frozenset(pod or ())),
    )
    raise typer.Exit(asyncio.run(_run(runtime)))


async def _run(runtime: MeshRuntime) -> int:
    serving = "host serving; Ctrl-C or `trustmesh down --state` stops it"
    return await run_in_foreground(runtime, serving, alongside=runtime.keep_joined)
