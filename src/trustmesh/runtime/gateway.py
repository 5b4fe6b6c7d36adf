"""Gateway pods on this host: where clients outside the mesh connect.

Process mode: the gateway Envoy listens on its pod address; its listeners come from the
Gateways selecting the pod and change with them, so ``trustmesh status`` reads them from
the Envoy's admin endpoint (``/listeners``) rather than from a record made at start.

Pod sandbox: the pod address exists only inside the mesh's namespaces, so the runtime
publishes the gateway's Service ports on a loopback address of this host, as a
LoadBalancer would (:class:`Publisher`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from trustmesh.api.snapshot import Workload
from trustmesh.policy.compose import MeshPolicy
from trustmesh.runtime.netns import netns_socket
from trustmesh.runtime.plan import MeshPlan
from trustmesh.xds.gateway import gateway_listen_ports

__all__ = ["PublishedPort", "Publisher", "envoy_listener_addresses", "published_ports"]

_TIMEOUT = 2.0


def envoy_listener_addresses(admin: str) -> list[str]:
    """``ip:port`` of every listener of the Envoy whose admin is at ``admin`` (host:port);
    empty when it does not answer."""
    url = f"http://{admin}/listeners?format=json"
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT) as response:
            body = json.loads(response.read())
    except (OSError, urllib.error.URLError, ValueError):
        return []
    found = []
    for listener in body.get("listener_statuses", []):
        address = listener.get("local_address", {}).get("socket_address", {})
        if address.get("address") and address.get("port_value"):
            found.append(f"{address['address']}:{address['port_value']}")
    return sorted(found)


# ------------------------------------------------------------------ the pod sandbox


@dataclass(frozen=True, slots=True)
class PublishedPort:
    """``host:port`` on this host forwarding to the gateway pod's ``pod_ip:target``."""

    pod: str
    host: str
    port: int
    pod_ip: str
    target: int

    def describe(self) -> str:
        return f"{self.host}:{self.port} → {self.pod_ip}:{self.target}"


def published_ports(plan: MeshPlan, mesh: MeshPolicy, base: str) -> list[PublishedPort]:
    """What the host publishes for each gateway pod of a sandboxed mesh, as a
    LoadBalancer Service would: the ports of the Services selecting the pod, on address
    ``base + (pod number << 8) + 1`` (the address that pod would have in process mode),
    to the pod's target ports; with no such Service, the gateway's listener ports as
    they are."""
    first = ipaddress.IPv4Address(base)
    out = []
    for pod in plan.pods:
        workload = mesh.snapshot.workload(pod.ref)
        if not pod.gateway or workload is None:
            continue
        host = str(first + (pod.index << 8) + 1)
        pairs: dict[int, int] = {}
        for service in sorted(mesh.snapshot.services, key=lambda s: (s.namespace, s.name)):
            if not service.selects(workload):
                continue
            for sp in service.ports:
                target = sp.target_port if isinstance(sp.target_port, int) else None
                if isinstance(sp.target_port, str):
                    target = _container_port(workload, sp.target_port)
                pairs.setdefault(sp.port, target or sp.port)
        if not pairs:
            pairs = {port: port for port in gateway_listen_ports(mesh, pod.ref)}
        out += [PublishedPort(pod.ref, host, p, pod.pod_ip, t) for p, t in sorted(pairs.items())]
    return out


def _container_port(workload: Workload, name: str) -> int | None:
    resource = workload.resource
    spec = resource.spec.spec if workload.kind == "Pod" else resource.spec.template.spec
    for container in spec.containers:
        for port in container.ports:
            if port.name == name:
                return int(port.container_port)
    return None


class Publisher:
    """Listens on the host for each :class:`PublishedPort` and relays every connection
    to the gateway pod, from the mesh's node namespace (whose bridge reaches the pods).

    Nothing is configured in the host's network namespace: the listening sockets are this
    process's, and the pod sees connections from the node address (``10.88.0.1``), as a
    pod behind a LoadBalancer Service sees the node that forwarded them
    (``externalTrafficPolicy: Cluster``): client addresses reach the gateway's policy
    through X-Forwarded-For and ``numTrustedProxies``, as behind any load balancer.
    """

    def __init__(self, node_netns: str, ports: list[PublishedPort]) -> None:
        self._node = node_netns
        self._ports = ports
        self._servers: list[asyncio.Server] = []
        self._relays: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for item in self._ports:

            async def accepted(
                reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter,
                item: PublishedPort = item,
            ) -> None:
                task = asyncio.current_task()
                assert task is not None
                self._relays.add(task)
                try:
                    await self._relay(item, reader, writer)
                finally:
                    self._relays.discard(task)

            server = await asyncio.start_server(accepted, item.host, item.port, reuse_address=True)
            self._servers.append(server)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _relay(
        self, item: PublishedPort, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sock = netns_socket(self._node)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (item.pod_ip, item.target)), 5
            )
            upstream_reader, upstream_writer = await asyncio.open_connection(sock=sock)
        except (OSError, TimeoutError):
            sock.close()
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            upstream_writer.close()
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, ConnectionError):
        writer.close()
