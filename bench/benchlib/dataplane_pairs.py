"""The proxy pairs of the data-plane benchmark: trustmesh's two sidecars fed by the real
control plane (CA server, agents over SDS, ADS), and the hand-written static pair; every
process stopped by its PID when the caller's exit stack closes."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.dataplane_topology import (
    ALLOW_SLEEP,
    APP_ADDRESS,
    HTTPBIN,
    HTTPBIN_POD_ADDRESS,
    SLEEP,
    SLEEP_OUTBOUND_ADDRESS,
    SLEEP_POD_ADDRESS,
)
from benchlib.envoy_pair import handwritten_client_bootstrap, handwritten_server_bootstrap, issue
from benchlib.mesh_rig import RunningAgent, sidecar_bootstrap, start_envoy
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.identity.server import CaServer
from trustmesh.xds.controlplane import ControlPlane, ProxyRegistration

ROOT = Path(__file__).resolve().parents[2]


async def stacked_envoy(
    stack: contextlib.AsyncExitStack, bootstrap: dict[str, Any], workdir: Path
) -> EnvoyProcess:
    """An Envoy with one worker thread, stopped by PID when ``stack`` closes."""
    # Pushed before start: a failed start is killed too.
    return await start_envoy(
        bootstrap, workdir, lambda envoy: stack.push_async_callback(envoy.stop), timeout=20
    )


def write_mesh_config(directory: Path) -> Path:
    """The istio.io example mesh, mesh-wide STRICT, and the ALLOW that turns RBAC on."""
    directory.mkdir(parents=True)
    shutil.copy(ROOT / "examples/mesh/workloads.yaml", directory / "workloads.yaml")
    strict = ROOT / "examples/scenarios/12-mesh-strict/config.yaml"
    shutil.copy(strict, directory / "mtls.yaml")
    (directory / "authz.yaml").write_text(ALLOW_SLEEP)
    return directory


@dataclass(frozen=True, slots=True)
class Pair:
    """A client proxy (where the load generator sends) and the server proxy behind it."""

    client: EnvoyProcess
    server: EnvoyProcess
    client_address: str


async def trustmesh_pair(
    stack: contextlib.AsyncExitStack, ca: CertificateAuthority, workdir: Path
) -> Pair:
    """Two sidecars configured by the real control plane over ADS + mTLS."""
    ca_server = CaServer(ca)
    stack.push_async_callback(ca_server.stop)
    await ca_server.start()
    httpbin = ProxyRegistration.sidecar("foo/httpbin", HTTPBIN_POD_ADDRESS, app_address=APP_ADDRESS)
    sleep = ProxyRegistration.sidecar(
        "foo/sleep", SLEEP_POD_ADDRESS, outbound_address=SLEEP_OUTBOUND_ADDRESS
    )
    # workloads.yaml declares Deployments (no pod IP): the runtime tells the control plane
    # where httpbin runs, for sleep's endpoint of httpbin.foo.
    plane = ControlPlane(
        [str(write_mesh_config(workdir / "config"))],
        ca=ca,
        workload_addresses={"foo/httpbin": HTTPBIN_POD_ADDRESS},
    )
    plane.register(httpbin)
    plane.register(sleep)
    stack.push_async_callback(plane.stop)
    await plane.start()
    envoys = []
    for identity, registration in ((HTTPBIN, httpbin), (SLEEP, sleep)):
        home = workdir / identity.service_account
        home.mkdir(parents=True)
        ports = (ca_server.port, ca_server.renewal_port)
        agent = await RunningAgent.start(identity, ca, ports, home, ready_timeout=10)
        stack.push_async_callback(agent.close)
        bootstrap = sidecar_bootstrap(
            registration.node_id, identity, agent.sds, plane.port, plane.spiffe_id
        )
        envoys.append(await stacked_envoy(stack, bootstrap, home / "envoy"))
    server, client = envoys
    return Pair(client, server, SLEEP_OUTBOUND_ADDRESS)


async def handwritten_pair(
    stack: contextlib.AsyncExitStack,
    ca: CertificateAuthority,
    workdir: Path,
    addresses: tuple[str, str],
    access_logs: tuple[Sequence[dict[str, Any]], Sequence[dict[str, Any]]] = ((), ()),
) -> Pair:
    """The minimal static pair, certificates from the same CA (same key type, same root)."""
    now = dt.datetime.now(dt.UTC)
    client_at, server_at = addresses
    server = await stacked_envoy(
        stack,
        handwritten_server_bootstrap(
            server_at, APP_ADDRESS, issue(ca, HTTPBIN, now), access_logs[1]
        ),
        workdir / "server",
    )
    client = await stacked_envoy(
        stack,
        handwritten_client_bootstrap(client_at, server_at, issue(ca, SLEEP, now), access_logs[0]),
        workdir / "client",
    )
    return Pair(client, server, client_at)


def check_free(addresses: Sequence[tuple[str, int]]) -> None:
    """Fail early, with a clear message, if another process holds one of our ports."""
    for host, port in addresses:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"{host}: the benchmark listens on loopback addresses only")
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise SystemExit(f"{host}:{port} is in use ({exc}): another run?") from None
