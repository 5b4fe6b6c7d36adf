"""VirtualService routes at a sidecar: the routes of a service's outbound virtual host (pure).

A sidecar's outbound virtual host for a service port (or ServiceEntry host port) routes
every request to the service's cluster — unless a sidecar-bound VirtualService
(:mod:`trustmesh.api.mesh_routes`) exported to the client's namespace names the host:
then its ``http`` entries replace that default route, translated exactly as at gateways
(:mod:`trustmesh.xds.http_routes`), with the matches that apply to this client on this
port (``gateways`` naming ``mesh``, ``port``, ``sourceLabels``, ``sourceNamespace``). A
request no route matches gets Envoy's 404, as from Istio's sidecar. Subset destinations
name the ``outbound|<port>|<subset>|<fqdn>`` clusters :func:`trustmesh.xds.outbound.
outbound_clusters` builds for every DestinationRule subset.

Example: Istio's ``virtual-service-all-v1`` (``reviews`` → subset ``v1``) gives
``productpage``'s virtual host ``reviews.default.svc.cluster.local:9080`` one route, to
``outbound|9080|v1|reviews.default.svc.cluster.local``.
"""

from __future__ import annotations

from typing import Any

from trustmesh.api.mesh_routes import match_applies
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.derived import Derived
from trustmesh.policy.routing import sidecar_mesh_routes
from trustmesh.xds.http_routes import RouteTable, http_routes
from trustmesh.xds.service_entries import visible_entries

__all__ = ["alias_hosts", "alias_virtual_host", "routes_for", "routing_key"]


def routes_for(
    wp: WorkloadPolicy, mesh: MeshPolicy, fqdn: str, port: int
) -> list[dict[str, Any]] | None:
    """The routes of ``wp``'s virtual host for ``fqdn:port``, or None when no
    VirtualService routes it there (the service's default route then applies).

    Built once per compiled mesh for every client alike (same namespace, and same labels
    where ``sourceLabels`` matter): treat the result as read-only."""
    built = _ROUTES.table(mesh)
    key = (wp.workload.namespace, routing_key(wp, mesh), fqdn, port)
    if key not in built:
        built[key] = _routes_for(wp, mesh, fqdn, port)
    return built[key]


# (client namespace, routing key, FQDN, port) → the virtual host's routes (None: default).
_ROUTES: Derived[MeshPolicy, tuple[object, ...], list[dict[str, Any]] | None] = Derived(
    "virtual service routes"
)


def _routes_for(
    wp: WorkloadPolicy, mesh: MeshPolicy, fqdn: str, port: int
) -> list[dict[str, Any]] | None:
    routes = sidecar_mesh_routes(mesh)
    client = wp.workload
    vs = routes.for_host(fqdn, client.namespace)
    if vs is None:
        return None
    found = list(
        http_routes(
            vs,
            mesh.snapshot,
            RouteTable(),
            lambda match: match_applies(match, vs, client.labels, client.namespace, port),
            port,
        )
    )
    return found or None  # nothing applies here: Istio keeps the service's default route


def routing_key(wp: WorkloadPolicy, mesh: MeshPolicy) -> tuple[tuple[str, str], ...]:
    """What, beyond its namespace, a client's outbound routes depend on: its labels, when
    some VirtualService match names ``sourceLabels`` (else nothing)."""
    if not sidecar_mesh_routes(mesh).uses_source_labels:
        return ()
    return tuple(sorted(wp.workload.labels.items()))


def alias_hosts(wp: WorkloadPolicy, mesh: MeshPolicy) -> list[str]:
    """The exact hosts of VirtualServices exported to ``wp``'s namespace that name no
    Service or ServiceEntry host: Istio gives them virtual hosts of their own on every
    outbound HTTP route (a VirtualService may name a host nothing else declares)."""
    known = {s.hostname for s in mesh.snapshot.services}
    for entry in visible_entries(mesh, wp.workload.namespace):  # exportTo: as Istio sees
        known.update(h.lower() for h in entry.spec.hosts)
    routes = sidecar_mesh_routes(mesh)
    return sorted(
        host
        for host in routes.by_host
        if "*" not in host
        and host not in known
        and routes.for_host(host, wp.workload.namespace) is not None
    )


def alias_virtual_host(
    wp: WorkloadPolicy, mesh: MeshPolicy, host: str, port: int, *, bare: bool
) -> dict[str, Any] | None:
    """The virtual host of an :func:`alias_hosts` host on ``port`` (``bare``: also the
    host without a port), None when no route applies there."""
    routes = routes_for(wp, mesh, host, port)
    if routes is None:
        return None
    domains = [f"{host}:{port}", *([host] if bare else [])]
    return {"name": f"{host}:{port}", "domains": domains, "routes": routes}
