"""``trustmesh agent``: one workload's identity agent, SDS server and (optionally) Envoy."""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.agent.sds import SdsServer, SecretStore
from trustmesh.agent.workload import AgentConfig, WorkloadAgent
from trustmesh.cli import render
from trustmesh.envoy_bootstrap import (
    Backend,
    DirectResponse,
    InboundListener,
    OutboundListener,
    sidecar_bootstrap,
)
from trustmesh.identity.spiffe import SpiffeId


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise typer.BadParameter(f"{what} must be HOST:PORT, got {text!r}")
    return host, int(port)


def agent(
    namespace: Annotated[str, typer.Option("--namespace", "-n")],
    service_account: Annotated[str, typer.Option("--service-account", "-s")],
    ca: Annotated[str, typer.Option("--ca", help="CA enrollment address HOST:PORT.")],
    ca_renewal: Annotated[str, typer.Option("--ca-renewal", help="CA renewal address.")],
    ca_root: Annotated[Path, typer.Option("--ca-root", help="Root certificate(s) of the CA.")],
    token_file: Annotated[Path, typer.Option("--token-file", help="Bootstrap token file.")],
    sds_socket: Annotated[Path, typer.Option("--sds-socket", help="Unix socket for Envoy.")],
    trust_domain: Annotated[str, typer.Option("--trust-domain")] = "cluster.local",
    envoy: Annotated[bool, typer.Option("--envoy", help="Start and supervise Envoy.")] = False,
    inbound: Annotated[
        str | None, typer.Option("--inbound", help="LISTEN_IP:PORT=BACKEND_HOST:PORT (STRICT).")
    ] = None,
    outbound: Annotated[
        list[str] | None,
        typer.Option("--outbound", help="LISTEN_IP:PORT=UPSTREAM_HOST:PORT@SPIFFE_ID"),
    ] = None,
    admin_port: Annotated[int, typer.Option("--admin-port")] = 0,
    workdir: Annotated[Path | None, typer.Option("--workdir")] = None,
) -> None:
    """Obtain and rotate this workload's certificate; serve it to Envoy over SDS."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        identity = SpiffeId(trust_domain, namespace, service_account)
        token = token_file.read_text().strip()
        roots = ca_root.read_bytes()
        inbound_spec = _inbound(inbound) if inbound else None
        outbound_specs = tuple(_outbound(o) for o in outbound or ())
    except (OSError, ValueError) as exc:
        render.usage_error(str(exc))
        raise typer.Exit(2) from None
    config = AgentConfig(identity, ca, ca_renewal, roots, token)

    async def main() -> None:
        store = SecretStore()
        sds = SdsServer(store, str(sds_socket))
        await sds.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        workload = WorkloadAgent(config, store)
        tasks = [asyncio.create_task(workload.run(stop))]
        process = None
        try:
            if envoy:
                await asyncio.wait_for(workload.ready.wait(), 60)
                bootstrap = sidecar_bootstrap(
                    node_id=f"sidecar~{identity.namespace}~{identity.service_account}",
                    cluster=identity.service_account,
                    sds_socket=str(sds_socket.resolve()),
                    admin_address="127.0.0.1",
                    admin_port=admin_port,
                    inbound=inbound_spec,
                    outbound=outbound_specs,
                )
                folder = workdir or Path(tempfile.mkdtemp(prefix="trustmesh-envoy-"))
                process = EnvoyProcess(bootstrap, workdir=folder)
                await process.start()
                typer.echo(f"envoy running (pid {process.pid}, admin {process.admin_url})")
                tasks.append(asyncio.create_task(process.supervise(stop)))
            await stop.wait()
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            if process is not None:
                await process.stop()
            await sds.stop()

    asyncio.run(main())


def _inbound(text: str) -> InboundListener:
    listen, _, backend = text.partition("=")
    address, port = _host_port(listen, "--inbound listener")
    if backend.startswith("direct:"):
        return InboundListener(address, port, DirectResponse(backend.removeprefix("direct:")))
    host, backend_port = _host_port(backend, "--inbound backend")
    return InboundListener(address, port, Backend(host, backend_port))


def _outbound(text: str) -> OutboundListener:
    listen, _, rest = text.partition("=")
    upstream, _, spiffe_id = rest.partition("@")
    address, port = _host_port(listen, "--outbound listener")
    host, upstream_port = _host_port(upstream, "--outbound upstream")
    return OutboundListener(address, port, Backend(host, upstream_port), frozenset({spiffe_id}))
