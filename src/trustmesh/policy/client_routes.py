"""How a sidecar client's outbound listeners route a request to a destination: by its Host
over HTTP (the outbound route's virtual hosts per Service and ServiceEntry, matched as
Istio does), by port otherwise, and what happens to a Host or a pod port the registry does
not know: PassthroughCluster (ALLOW_ANY), a local 502 or BlackHoleCluster (REGISTRY_ONLY).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from trustmesh.api import models as m
from trustmesh.api.snapshot import Workload
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.decision import RequestError
from trustmesh.policy.derived import Derived
from trustmesh.policy.endpoints import service_for
from trustmesh.policy.protocols import proxied_as_tcp


class RouteKind(enum.Enum):
    """Where a sidecar client's outbound listeners send a request: by its Host over HTTP,
    by its port (and the address it dials) otherwise."""

    SERVICE = "service"  # the destination's Service: its cluster, mesh mTLS as usual
    PASSTHROUGH = "passthrough"  # no virtual host / listener: PassthroughCluster, plaintext
    BLOCKED = "blocked"  # no virtual host under REGISTRY_ONLY: a local 502
    CLOSED = "closed"  # no listener under REGISTRY_ONLY: BlackHoleCluster closes it


@dataclass(frozen=True, slots=True)
class ClientRoute:
    kind: RouteKind
    explanation: str


def sidecar_client_route(
    mesh: MeshPolicy,
    client: Workload,
    target: WorkloadPolicy,
    port: int,
    host: str | None,
    *,
    is_http: bool = True,
) -> ClientRoute:
    """How a sidecar client's request with ``Host: host`` to the destination's Service
    port is routed: Istio's outbound route for that port has a virtual host per Service
    (and ServiceEntry) on it — ``name.ns.svc.cluster.local``, ``name.ns.svc``,
    ``name.ns``, ``name`` in the client's own namespace, each with and without
    ``:port``, matched case-insensitively — and a catch-all that passes anything else
    through in plaintext (ALLOW_ANY) or answers 502 (REGISTRY_ONLY). A port no Service
    of the destination covers is dialled at the pod IP: see :func:`_pod_port_route`.

    ``RequestError`` when the Host names another service: the request goes there.
    """
    service, service_port = service_for(target, port)
    if service is None or service_port is None:
        return _pod_port_route(mesh, client, target, port, host, is_http)
    if host is None:
        return ClientRoute(RouteKind.SERVICE, f"{service.hostname}:{service_port}: by port")
    service_ports = [sp for sp in service.ports if sp.port == service_port]
    if any(proxied_as_tcp(sp.name, sp.protocol) for sp in service_ports):
        return ClientRoute(
            RouteKind.SERVICE, f"{service.hostname}:{service_port} is TCP: routed by port"
        )
    owner = _virtual_host_owner(mesh, client.namespace, service_port, host.lower())
    ours = f"Service {service.namespace}/{service.name}"
    if owner == ours:
        return ClientRoute(
            RouteKind.SERVICE, f"Host {host} is a name of {service.hostname}:{service_port}"
        )
    if owner is not None:
        raise RequestError(
            f"from a sidecar client, Host {host} routes to {owner} (port {service_port}), not"
            f" to {target.workload.ref}: the client sidecar picks the destination by Host"
        )
    policy = mesh.for_workload(client.ref)
    mode = policy.egress_mode if policy else mesh.snapshot.mesh.outbound_traffic_policy.mode
    if mode is m.OutboundTrafficPolicyMode.REGISTRY_ONLY:
        return ClientRoute(
            RouteKind.BLOCKED,
            f"Host {host} names no service on port {service_port}: the client sidecar"
            " answers 502 (REGISTRY_ONLY, block_all)",
        )
    return ClientRoute(
        RouteKind.PASSTHROUGH,
        f"Host {host} names no service on port {service_port}: the client sidecar passes"
        f" it through (PassthroughCluster) to {target.workload.ref} in plaintext, without"
        " its identity",
    )


def _pod_port_route(
    mesh: MeshPolicy,
    client: Workload,
    target: WorkloadPolicy,
    port: int,
    host: str | None,
    is_http: bool,
) -> ClientRoute:
    """A port no Service of the destination covers: the client dials the pod IP, and its
    sidecar has no cluster for that address. HTTP to a port some HTTP Service or
    ServiceEntry of the registry uses meets that port's outbound listener, which routes
    by Host (a pod IP names no service): on through ``PassthroughCluster`` (ALLOW_ANY) or
    502 (REGISTRY_ONLY). Anything else falls to ``virtualOutbound``: passed through
    (ALLOW_ANY) or closed by ``BlackHoleCluster`` (REGISTRY_ONLY). Passed through means
    plaintext, without the client's identity, as Istio's passthrough is — unless a
    ServiceEntry's TCP port without addresses claims every connection to that port."""
    where = f"no Service covers port {port} of {target.workload.ref}: the client dials its pod IP"
    policy = mesh.for_workload(client.ref)
    mode = policy.egress_mode if policy else mesh.snapshot.mesh.outbound_traffic_policy.mode
    registry_only = mode is m.OutboundTrafficPolicyMode.REGISTRY_ONLY
    if is_http and http_port_in_registry(mesh, port):
        owner = _virtual_host_owner(mesh, client.namespace, port, host.lower()) if host else None
        if owner is not None:
            raise RequestError(
                f"from a sidecar client, Host {host} routes to {owner} (port {port}), not"
                f" to {target.workload.ref}: the client sidecar picks the destination by Host"
            )
        if registry_only:
            return ClientRoute(
                RouteKind.BLOCKED,
                f"{where}; its Host names no service on port {port}: the client sidecar"
                " answers 502 (REGISTRY_ONLY, block_all)",
            )
        return ClientRoute(
            RouteKind.PASSTHROUGH,
            f"{where}; its Host names no service on port {port}: the client sidecar passes"
            " it through (PassthroughCluster) in plaintext, without its identity",
        )
    entry = _tcp_entry_on(mesh, port)
    if entry is not None:
        raise RequestError(
            f"from a sidecar client, every connection to port {port} goes to {entry} (a TCP"
            f" port without addresses), not to {target.workload.ref}"
        )
    if registry_only:
        return ClientRoute(
            RouteKind.CLOSED,
            f"{where}, which is not in the service registry: the client sidecar closes the"
            " connection (REGISTRY_ONLY, BlackHoleCluster)",
        )
    return ClientRoute(
        RouteKind.PASSTHROUGH,
        f"{where}, which is not in the service registry: the client sidecar passes it"
        " through (PassthroughCluster) in plaintext, without its identity",
    )


def http_port_in_registry(mesh: MeshPolicy, port: int) -> bool:
    """Does some Service or ServiceEntry serve HTTP on ``port`` (so a sidecar has an
    outbound HTTP listener on ``0.0.0.0:port``)?"""
    return port in _HTTP_PORTS.get(mesh, None)


def _http_ports(mesh: MeshPolicy, _: None) -> frozenset[int]:
    found = {
        sp.port
        for service in mesh.snapshot.services
        for sp in service.ports
        if not proxied_as_tcp(sp.name, sp.protocol)
    }
    for entry in mesh.snapshot.of_kind("ServiceEntry"):
        found |= {
            p.number
            for p in entry.spec.ports
            if not proxied_as_tcp(p.name, p.protocol) and p.protocol.upper() != "TLS"
        }
    return frozenset(found)


_HTTP_PORTS: Derived[MeshPolicy, None, frozenset[int]] = Derived("http ports", _http_ports)


def _tcp_entry_on(mesh: MeshPolicy, port: int) -> str | None:
    """The ServiceEntry whose TCP port ``port`` has no addresses: its sidecar listener on
    ``0.0.0.0:port`` takes every connection to that port (Istio's behaviour)."""
    entries = sorted(mesh.snapshot.of_kind("ServiceEntry"), key=lambda r: (r.namespace, r.name))
    for entry in entries:
        spec: m.ServiceEntrySpec = entry.spec
        if spec.addresses:
            continue
        for p in spec.ports:
            protocol = p.protocol.upper()
            if (
                p.number == port
                and protocol not in ("TLS", "HTTPS")
                and proxied_as_tcp(p.name, p.protocol)
            ):
                return f"ServiceEntry {entry.namespace}/{entry.name}"
    return None


def _virtual_host_owner(
    mesh: MeshPolicy, client_namespace: str, port: int, host: str
) -> str | None:
    exact, wildcards = _VIRTUAL_HOSTS.get(mesh, (client_namespace, port))
    found = exact.get(host)
    if found is not None:
        return found
    bare = host.rsplit(":", 1)[0] if host.endswith(f":{port}") else host
    for suffix, owner in wildcards:  # "*.example.com" → ".example.com"
        if bare.endswith(suffix) and len(bare) > len(suffix):
            return owner
    return None


_HostIndex = tuple[dict[str, str], list[tuple[str, str]]]


def _virtual_hosts(mesh: MeshPolicy, key: tuple[str, int]) -> _HostIndex:
    """The client namespace's outbound HTTP virtual hosts on a port: exact names, and
    wildcard suffixes, each with the Service or ServiceEntry that owns it."""
    client_namespace, port = key
    exact: dict[str, str] = {}
    wildcards: list[tuple[str, str]] = []
    for service in sorted(mesh.snapshot.services, key=lambda s: s.hostname):
        ports = [sp for sp in service.ports if sp.port == port]
        if not ports or any(proxied_as_tcp(sp.name, sp.protocol) for sp in ports):
            continue
        short = f"{service.name}.{service.namespace}"
        names = [service.hostname, f"{short}.svc", short]
        if service.namespace == client_namespace:
            names.append(service.name)
        for name in names:
            for domain in (name, f"{name}:{port}"):
                exact.setdefault(domain.lower(), f"Service {service.namespace}/{service.name}")
    entries = sorted(mesh.snapshot.of_kind("ServiceEntry"), key=lambda r: (r.namespace, r.name))
    for entry in entries:
        spec: m.ServiceEntrySpec = entry.spec
        if not any(p.number == port and not proxied_as_tcp(p.name, p.protocol) for p in spec.ports):
            continue
        owner = f"ServiceEntry {entry.namespace}/{entry.name}"
        for pattern in spec.hosts:
            pattern = pattern.lower()
            if pattern.startswith("*"):
                wildcards.append((pattern[1:], owner))
            else:
                for domain in (pattern, f"{pattern}:{port}"):
                    exact.setdefault(domain, owner)
    return exact, wildcards


_VIRTUAL_HOSTS: Derived[MeshPolicy, tuple[str, int], _HostIndex] = Derived(
    "virtual hosts", _virtual_hosts
)
