"""May a workload reach a host outside the workload list? Egress follows
``outboundTrafficPolicy`` at sidecars (ALLOW_ANY passes unknown hosts through,
REGISTRY_ONLY answers 502 or closes the connection), with a registry host's TLS
origination described; ambient sources and workloads without a sidecar are not
controlled, and gateways and egress waypoints are not modelled.
"""

from __future__ import annotations

from trustmesh.api import models as m
from trustmesh.api.dataplane import USE_WAYPOINT, MeshMode
from trustmesh.api.gateway import exported_to
from trustmesh.api.snapshot import Workload
from trustmesh.policy.client_routes import http_port_in_registry
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import RequestError, Verdict
from trustmesh.policy.origination import (
    describe_origination,
    origination_tls,
    sidecar_origination_problem,
)
from trustmesh.policy.protocols import app_speaks_tls
from trustmesh.policy.request import Request
from trustmesh.policy.routing import sidecar_mesh_routes
from trustmesh.policy.upstream_tls import UpstreamMode


def egress_decision(
    mesh: MeshPolicy, request: Request, source: Workload | None
) -> tuple[Verdict, int | None, str]:
    """Outbound from ``source`` to a host outside the workload list."""
    host = (
        (request.destination_host or "").lower().rsplit(":", 1)[0]
        if request.destination_host
        else ""
    )
    is_http = request.http is not None
    ok_status = 200 if is_http else None
    if source is None:
        raise RequestError("an egress question needs a source workload (--from NS/NAME)")
    dataplane = source.dataplane.mode
    if dataplane is MeshMode.GATEWAY:
        return (
            Verdict.UNSUPPORTED,
            None,
            f"unsupported: gateway: source {source.ref} is a gateway: where it sends traffic"
            " follows its Gateway / VirtualService routes, which trustmesh does not model",
        )
    if dataplane is MeshMode.AMBIENT:
        waypoint = _egress_waypoint(mesh, host)
        if waypoint is not None:
            return (
                Verdict.UNSUPPORTED,
                None,
                f"unsupported: ambient: {host} is bound to egress waypoint {waypoint};"
                " trustmesh does not model a waypoint's enforcement",
            )
        return (
            Verdict.ALLOW,
            ok_status,
            f"source {source.ref} is ambient: ztunnel does not apply outboundTrafficPolicy"
            " (only sidecars and egress waypoints do), egress is not controlled",
        )
    if dataplane is not MeshMode.SIDECAR:
        return (
            Verdict.ALLOW,
            ok_status,
            f"source {source.ref} has no sidecar: egress is not controlled",
        )
    known = registry_entry(mesh, host, source.namespace)
    if known:
        reason = f"{host} is in the service registry ({known})"
        port = _egress_port(request) or (80 if is_http else None)
        entry_port = _entry_port(mesh, known, port) if port is not None else None
        if entry_port is not None and port is not None:
            entry_namespace = known.removeprefix("ServiceEntry ").split("/", 1)[0]
            upstream = origination_tls(mesh, source.namespace, entry_namespace, host, port)
            if sidecar_origination_problem(upstream) is not None and not app_speaks_tls(
                entry_port.name, entry_port.protocol
            ):
                return (
                    Verdict.DENY,
                    503 if is_http else None,
                    (f"{reason}; {describe_origination(upstream, host)}"),
                )
            if upstream.mode is not UpstreamMode.PLAINTEXT or upstream.rule:
                reason = f"{reason}; {describe_origination(upstream, host)}"
        return Verdict.ALLOW, ok_status, reason
    routed = sidecar_mesh_routes(mesh).for_host(host, source.namespace)
    if routed is not None:
        return (
            Verdict.UNSUPPORTED,
            None,
            f"unsupported: VirtualService {routed.namespace}/{routed.resource.name} routes"
            f" {host} for {source.ref} (to an egress gateway, say); trustmesh does not follow"
            " egress routes offline",
        )
    source_policy = mesh.for_workload(source.ref)
    mode = (
        source_policy.egress_mode
        if source_policy
        else mesh.snapshot.mesh.outbound_traffic_policy.mode
    )
    if mode is m.OutboundTrafficPolicyMode.ALLOW_ANY:
        return Verdict.ALLOW, ok_status, f"{host} is unknown; ALLOW_ANY passes it through"
    port = _egress_port(request)
    if is_http and (port is None or http_port_in_registry(mesh, port)):
        return (
            Verdict.DENY,
            502,
            f"{host} is unknown under REGISTRY_ONLY: the outbound HTTP route of port"
            f" {port or 80} has no virtual host for it (block_all: 502)",
        )
    if is_http:
        return (
            Verdict.RESET,
            None,
            f"{host} is unknown under REGISTRY_ONLY and no Service or ServiceEntry serves HTTP"
            f" on port {port}, so the sidecar has no HTTP listener there: virtualOutbound"
            " sends the connection to BlackHoleCluster, which closes it",
        )
    return Verdict.RESET, None, f"{host} is unknown under REGISTRY_ONLY: connection reset"


def _entry_port(mesh: MeshPolicy, known: str, port: int) -> m.ServicePort | None:
    """The port ``port`` of the ServiceEntry ``known`` names (``ServiceEntry ns/name``)."""
    if not known.startswith("ServiceEntry "):
        return None
    namespace, _, name = known.removeprefix("ServiceEntry ").partition("/")
    for entry in mesh.snapshot.of_kind("ServiceEntry"):
        if entry.namespace == namespace and entry.name == name:
            ports: tuple[m.ServicePort, ...] = entry.spec.ports
            return next((p for p in ports if p.number == port), None)
    return None


def _egress_port(request: Request) -> int | None:
    """The port an egress request goes to: the question's, else one in its host."""
    if request.port is not None:
        return request.port
    _, colon, port = (request.destination_host or "").rpartition(":")
    return int(port) if colon and port.isdigit() else None


def _egress_waypoint(mesh: MeshPolicy, host: str) -> str | None:
    for entry in mesh.snapshot.of_kind("ServiceEntry"):
        waypoint = entry.labels.get(USE_WAYPOINT)
        if not waypoint or waypoint == "none":
            continue
        for pattern in entry.spec.hosts:
            pattern = pattern.lower()
            if pattern == host or (pattern.startswith("*") and host.endswith(pattern[1:])):
                return f"{waypoint} (ServiceEntry {entry.namespace}/{entry.name})"
    return None


def registry_entry(mesh: MeshPolicy, host: str, client_namespace: str | None = None) -> str | None:
    """What makes ``host`` known: a Service or a ServiceEntry (one exported to
    ``client_namespace``, when given), or None."""
    for service in mesh.snapshot.services:
        forms = (
            service.hostname,
            f"{service.name}.{service.namespace}.svc",
            f"{service.name}.{service.namespace}",
        )
        if host in forms:
            return f"Service {service.namespace}/{service.name}"
    for entry in mesh.snapshot.of_kind("ServiceEntry"):
        if client_namespace is not None and not exported_to(entry, client_namespace):
            continue
        for pattern in entry.spec.hosts:
            pattern = pattern.lower()
            if pattern == host or (pattern.startswith("*") and host.endswith(pattern[1:])):
                return f"ServiceEntry {entry.namespace}/{entry.name}"
    return None
