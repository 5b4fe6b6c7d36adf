"""``trustmesh node join``: run one host's pods against the control-plane replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from trustmesh.cli import render
from trustmesh.cli.mesh import State, _err, run_in_foreground
from trustmesh.identity.tokens import is_node_name
from trustmesh.runtime.cluster import Cluster
from trustmesh.runtime.layout import DEFAULT_STATE, Layout, cluster_file
from trustmesh.runtime.node_groups import vm_workloads
from trustmesh.runtime.plan import Isolation
from trustmesh.runtime.registration import MAX_TTL, MIN_TTL, HostJoin
from trustmesh.runtime.supervisor import MeshRuntime, StartError
from trustmesh.store.model import is_object_name

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
    isolation: Annotated[
        str,
        typer.Option(
            "--isolation",
            help="process (default): pods as processes on loopback addresses; netns: every "
            "pod in its own network namespace under this host's (needs root and nft).",
        ),
    ] = "process",
    replica_host: Annotated[
        str,
        typer.Option(
            "--replica-host",
            help="Reach the replicas' advertised ports at this address (a relay or NAT in "
            "front of them); default: the address each replica advertises.",
        ),
    ] = "",
    lease_ttl: Annotated[
        int,
        typer.Option(
            "--lease-ttl",
            help=f"Seconds this host's registrations outlive its last keep-alive "
            f"({MIN_TTL}-{MAX_TTL}); refreshed every third of it.",
        ),
    ] = 30,
    group: Annotated[
        list[str] | None,
        typer.Option(
            "--group",
            help="NS/NAME of a WorkloadGroup (repeatable): run one workload from its "
            "template here and auto-register it with the group (Istio's VM onboarding).",
        ),
    ] = None,
    state: State = Path(DEFAULT_STATE),
) -> None:
    """Join with a node token and run this host's pods until stopped."""
    if not is_node_name(name):
        render.usage_error(f"--name {name!r} is not a DNS-1123 label")
        raise typer.Exit(2)
    try:
        mode = Isolation(isolation)
    except ValueError:
        render.usage_error(f"--isolation must be netns or process, not {isolation!r}")
        raise typer.Exit(2) from None
    if not MIN_TTL <= lease_ttl <= MAX_TTL:
        render.usage_error(f"--lease-ttl must be {MIN_TTL}..{MAX_TTL} seconds, not {lease_ttl}")
        raise typer.Exit(2)
    try:
        secret = token.read_text().strip()
        bundle = roots.read_bytes()
    except OSError as exc:
        render.usage_error(f"cannot read {exc.filename}: {exc.strerror}")
        raise typer.Exit(1) from None
    addresses = tuple(a.strip() for a in control_plane.split(",") if a.strip())
    paths = [str(p) for p in config]
    groups: tuple[tuple[str, str], ...] = ()
    probes: tuple[tuple[str, str], ...] = ()
    if group:
        for ref in group:
            group_ns, _, group_name = ref.partition("/")
            if not is_object_name(group_ns, label_only=True) or not is_object_name(group_name):
                render.usage_error(f"--group {ref!r} is not NAMESPACE/NAME")
                raise typer.Exit(2)
        if mode is not Isolation.PROCESS:
            # the hosts' LAN routes only the pod addresses planned at `up --hosts`
            render.usage_error("--group runs its workloads in --isolation process only")
            raise typer.Exit(2)
        try:
            planned = vm_workloads(paths, list(group), name, base, state.resolve())
        except StartError as exc:
            render.usage_error(str(exc))
            for problem in exc.diagnostics:
                _err.print(f"  {problem}", markup=False)
            raise typer.Exit(1) from None
        paths.append(str(planned.path))
        groups, probes = planned.groups, planned.probes
        if pod:
            pod = [*pod, *(ref for ref, _ in groups)]
    runtime = MeshRuntime(
        paths,
        Layout(state.resolve()),
        base=base,
        progress=lambda message: _err.print(message, markup=False),
        isolation=mode,
        join=HostJoin(
            name,
            addresses,
            secret,
            bundle,
            frozenset(pod or ()),
            ttl=lease_ttl,
            replica_host=replica_host,
            groups=groups,
            probes=probes,
        ),
    )
    raise typer.Exit(asyncio.run(_run(runtime)))


@app.command()
def rejoin(
    host: Annotated[str, typer.Argument(help="The host of `up --hosts` to start again.")],
    token: Annotated[
        Path | None,
        typer.Option("--token", help="File with a new node token; default: minted from the CA."),
    ] = None,
    state: State = Path(DEFAULT_STATE),
) -> None:
    """Start a host of `trustmesh up --hosts` again (after its process died): it joins with
    a new node token, registers its pods and serves them (in the background)."""
    secret = None
    if token is not None:
        try:
            secret = token.read_text().strip()
        except OSError as exc:
            render.usage_error(f"cannot read {exc.filename}: {exc.strerror}")
            raise typer.Exit(1) from None
    state = state.resolve()
    if not cluster_file(state).exists():
        render.usage_error(f"no mesh of hosts (up --hosts) in {state}")
        raise typer.Exit(1)
    cluster = Cluster(state, lambda message: _err.print(message, markup=False))
    try:
        started = cluster.rejoin(host, secret)
    except (StartError, OSError) as exc:
        render.usage_error(str(exc))
        raise typer.Exit(1) from None
    _err.print(f"{host} joined again (pid {started['pid']})", markup=False)


async def _run(runtime: MeshRuntime) -> int:
    serving = "host serving; Ctrl-C or `trustmesh down --state` stops it"
    return await run_in_foreground(runtime, serving)  # the runtime keeps the lease itself
