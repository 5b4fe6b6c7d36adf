"""``trustmesh control-plane --store https://… --listen ADDR --name NAME``: one replica;
``trustmesh replica restart NAME``: one of ``up --hosts`` restarted as itself."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trustmesh.runtime.layout import DEFAULT_STATE
from trustmesh.runtime.process import run_until_signalled
from trustmesh.runtime.replica import ReplicaOptions, serve_replica
from trustmesh.store.etcd_client import TLS_ENV, EtcdTls
from trustmesh.store.model import StoreError


def control_plane(
    store: Annotated[
        str,
        typer.Option(
            "--store",
            help="https://HOST:PORT[,HOST:PORT...] (with --etcd-*file) or etcd://… (plaintext)",
            envvar="TRUSTMESH_STORE",
        ),
    ],
    listen: Annotated[
        str,
        typer.Option(
            "--listen", help="HOST:PORT for xDS (port 0: a free one); the CA listens on HOST."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="This replica's name (unique in the store).")],
    ca: Annotated[
        Path, typer.Option("--ca", help="CA directory (keys stay here; created on first start).")
    ] = Path("trustmesh-ca"),
    state: Annotated[
        Path | None,
        typer.Option("--state", help="Working directory (default: trustmesh-replica-NAME)."),
    ] = None,
    trust_domain: Annotated[str, typer.Option("--trust-domain")] = "cluster.local",
    mesh_config: Annotated[
        list[str] | None, typer.Option("--mesh-config", help="MeshConfig or IstioOperator file.")
    ] = None,
    lease_ttl: Annotated[
        int, typer.Option("--lease-ttl", help="Seconds until a dead replica's keys are gone.")
    ] = 5,
    ca_port: Annotated[int, typer.Option("--ca-port")] = 0,
    ca_renewal_port: Annotated[int, typer.Option("--ca-renewal-port")] = 0,
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", help="Prometheus /metrics on HOST (0: a free port).")
    ] = 0,
    etcd_cafile: Annotated[
        Path | None, typer.Option("--etcd-cafile", help="The etcd CA (PEM).", envvar=TLS_ENV[0])
    ] = None,
    etcd_certfile: Annotated[
        Path | None,
        typer.Option("--etcd-certfile", help="This replica's etcd certificate.", envvar=TLS_ENV[1]),
    ] = None,
    etcd_keyfile: Annotated[
        Path | None, typer.Option("--etcd-keyfile", help="Its key (PEM).", envvar=TLS_ENV[2])
    ] = None,
) -> None:
    """Run one control-plane replica: xDS + CA on ADDR, configuration from the store."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise typer.BadParameter(f"--listen must be HOST:PORT, got {listen!r}")
    if not name or "/" in name:
        raise typer.BadParameter(f"--name must be a name without '/', got {name!r}")
    if lease_ttl < 2:
        raise typer.BadParameter("--lease-ttl must be at least 2 seconds")
    try:
        etcd_tls = EtcdTls.from_options(etcd_cafile, etcd_certfile, etcd_keyfile)
    except StoreError as exc:
        raise typer.BadParameter(str(exc)) from None
    options = ReplicaOptions(
        store=store,
        listen=listen,
        name=name,
        ca_dir=ca,
        state_dir=state or Path(f"trustmesh-replica-{name}"),
        trust_domain=trust_domain,
        mesh_config=tuple(mesh_config or ()),
        lease_ttl=lease_ttl,
        ca_port=ca_port,
        ca_renewal_port=ca_renewal_port,
        metrics_port=metrics_port,
        etcd_tls=etcd_tls,
    )
    raise typer.Exit(run_until_signalled(lambda stop: serve_replica(options, stop)))


replica_app = typer.Typer(help="The control-plane replicas of `trustmesh up --hosts`.")


@replica_app.command("restart")
def restart(
    name: Annotated[str, typer.Argument(help="The replica (r1, r2, …) of `up --hosts`.")],
    state: Annotated[
        Path,
        typer.Option("--state", help="The mesh's state directory.", envvar="TRUSTMESH_STATE"),
    ] = Path(DEFAULT_STATE),
) -> None:
    """Restart a replica as itself: SIGKILL, then the same command on the same ports (the
    ones every host and sidecar knows; the relay forwards them); it takes over its own
    registration at once."""
    from trustmesh.runtime import faults

    state = state.resolve()
    try:
        killed = faults.kill_replica(state, name)
        seconds = faults.restart_replica(state, killed)
    except faults.FaultError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{name} restarted (was pid {killed.pid}): ready in {seconds:.1f} s")
