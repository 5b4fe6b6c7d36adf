"""VirtualServices bound to sidecars (``gateways`` unset or naming ``mesh``), read for
enforcement.

Pure: reads a :class:`ConfigSnapshot` and returns values and diagnostics; the sidecar's
outbound routes (:mod:`trustmesh.xds.mesh_routes`) are the consumer. Istio's semantics
(``pilot/pkg/networking/core/route``, ``pilot/pkg/model/push_context.go``):

* a VirtualService applies to sidecars when its ``gateways`` is empty or holds ``mesh``,
  and to a client whose namespace it is exported to (``exportTo``: unset or ``*`` every
  namespace, ``.`` its own);
* its ``hosts`` name services: a short name is resolved in the VirtualService's
  namespace (``reviews`` → ``reviews.<ns>.svc.cluster.local``), ``name.ns`` is that
  namespace's service, anything else is taken as written (ServiceEntry hosts, FQDNs);
* several VirtualServices for one host at sidecars are not merged (Istio merges only at
  gateways; istioctl reports IST0109): the oldest keeps the host, the others are reported
  and ignored for it;
* a match applies to a sidecar only if its ``gateways`` (when set) name ``mesh``, its
  ``sourceLabels`` are among the client's labels and its ``sourceNamespace`` (when set)
  is the client's namespace.

What sidecars cannot honour is reported, never silently dropped: ``tcp`` / ``tls`` routes,
``fault``, ``mirror``, ``corsPolicy`` are warnings (the rest of the VirtualService applies,
as Istio applies its HTTP routes independently of them); a route trustmesh cannot build at
all (``delegate``, ``derivePort``, a route Istio's admission would refuse) refuses the
whole VirtualService at sidecars, with a warning naming the field.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from trustmesh.api.diagnostics import Diagnostic, Location, warning
from trustmesh.api.gateway import (
    BoundVirtualService,
    _exported,
    invalid_route_values,
)
from trustmesh.api.gateway_models import HttpMatchRequest, HttpRoute, VirtualServiceSpec
from trustmesh.api.loader import validate_model
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import ConfigSnapshot

__all__ = [
    "MESH_GATEWAY",
    "MeshRoutes",
    "match_applies",
    "mesh_route_diagnostics",
    "mesh_routes",
    "resolve_host",
]

MESH_GATEWAY = "mesh"

# Fields of an HTTP route sidecars do not honour; the rest of the route still applies.
_IGNORED_ROUTE_FIELDS = {
    "fault": "fault",
    "mirror": "mirror",
    "mirrors": "mirrors",
    "mirror_percent": "mirrorPercent",
    "mirror_percentage": "mirrorPercentage",
    "cors_policy": "corsPolicy",
}


@dataclass(frozen=True, slots=True)
class MeshRoutes:
    """The sidecar-bound VirtualServices of one snapshot, each host owned by the oldest.

    ``by_host``: host resolved to an FQDN (see :func:`resolve_host`), lower case → the
    VirtualServices naming it, oldest first (the first exported to a client owns it).
    """

    services: tuple[BoundVirtualService, ...]
    by_host: Mapping[str, tuple[BoundVirtualService, ...]]
    diagnostics: tuple[Diagnostic, ...]
    uses_source_labels: bool = False  # some match names sourceLabels / sourceNamespace

    def for_host(self, fqdn: str, client_namespace: str) -> BoundVirtualService | None:
        """The VirtualService routing ``fqdn`` for a client in ``client_namespace``: an
        exact host first, then the longest wildcard covering it."""
        fqdn = fqdn.lower()
        for vs in self.by_host.get(fqdn, ()):
            if _exported(vs.resource, client_namespace):
                return vs
        best: tuple[int, BoundVirtualService] | None = None
        for host, candidates in self.by_host.items():
            if not host.startswith("*") or not fqdn.endswith(host[1:]):
                continue
            for vs in candidates:
                if _exported(vs.resource, client_namespace):
                    if best is None or len(host) > best[0]:
                        best = (len(host), vs)
                    break
        return best[1] if best is not None else None


def resolve_host(host: str, namespace: str, snapshot: ConfigSnapshot) -> str:
    """Istio's short-name resolution: ``name`` in ``namespace``, ``name.ns`` a Service of
    ``ns``; anything else as written (ServiceEntry hosts, FQDNs, wildcards)."""
    parts = host.lower().split(".")
    if "*" in host:
        return host.lower()
    if len(parts) == 1:
        return f"{parts[0]}.{namespace}.svc.cluster.local"
    services = {(s.name, s.namespace) for s in snapshot.services}
    if len(parts) == 2 and (parts[0], parts[1]) in services:
        return f"{parts[0]}.{parts[1]}.svc.cluster.local"
    return host.lower()


def match_applies(
    match: HttpMatchRequest | None,
    vs: BoundVirtualService,
    labels: Mapping[str, str],
    namespace: str,
    port: int,
) -> bool:
    """Whether a match (None: a route without ``match``) applies at a sidecar with
    ``labels`` in ``namespace``, on the service port ``port``."""
    if match is None:
        return True
    if match.gateways and MESH_GATEWAY not in match.gateways:
        return False
    if match.port is not None and match.port != port:
        return False
    if any(labels.get(k) != v for k, v in match.source_labels.items()):
        return False
    return not match.source_namespace or match.source_namespace == namespace


def mesh_routes(snapshot: ConfigSnapshot) -> MeshRoutes:
    """Every sidecar-bound VirtualService trustmesh can honour (oldest first), the host
    each owns, and what is reported about them."""
    services: list[BoundVirtualService] = []
    by_host: dict[str, list[BoundVirtualService]] = {}
    problems: list[Diagnostic] = []
    for resource in sorted(snapshot.of_kind("VirtualService"), key=Resource.age_key):
        if resource.group != "networking.istio.io":
            continue
        raw = resource.raw_spec()
        gateways = raw.get("gateways") if isinstance(raw, dict) else None
        if isinstance(gateways, list) and gateways and MESH_GATEWAY not in gateways:
            continue
        path = (*resource.base_path, *resource.spec_path)
        spec, spec_problems = validate_model(VirtualServiceSpec, raw, resource.document, path)
        if spec is None:
            problems.extend(_refused(d) for d in spec_problems)
            continue
        found = list(_problems(resource, spec))
        problems.extend(found)
        if any(d.code == "virtual-service-refused" for d in found):
            continue
        vs = BoundVirtualService(resource, spec)
        services.append(vs)
        problems.extend(_missing_subsets(resource, spec, snapshot))
        for i, host in enumerate(spec.hosts):
            fqdn = resolve_host(host, resource.namespace, snapshot)
            owners = by_host.setdefault(fqdn, [])
            owner = next((o for o in owners if _overlap(o, vs)), None)
            if owner is not None:
                problems.append(
                    warning(
                        "virtual-service-host-conflict",
                        resource.location("hosts", i),
                        f"{fqdn} is already routed at sidecars by VirtualService "
                        f"{owner.namespace}/{owner.resource.name} (older): Istio merges "
                        "VirtualServices only at gateways, so sidecars ignore this one "
                        "for this host (IST0109)",
                    )
                )
                continue
            owners.append(vs)
    by_source = any(
        match.source_labels or match.source_namespace
        for vs in services
        for route in vs.spec.http
        for match in route.match
    )
    hosts = {h: tuple(v) for h, v in by_host.items()}
    return MeshRoutes(tuple(services), hosts, tuple(problems), by_source)


def _overlap(a: BoundVirtualService, b: BoundVirtualService) -> bool:
    """Whether some namespace sees both (the later one then loses the host there)."""
    ea, eb = _export_set(a), _export_set(b)
    return ea is None or eb is None or bool(ea & eb)


def _export_set(vs: BoundVirtualService) -> set[str] | None:
    raw = vs.resource.raw_spec()
    export_to = raw.get("exportTo") if isinstance(raw, dict) else None
    if not export_to or not isinstance(export_to, list):
        return None
    names = {vs.namespace if str(n) == "." else str(n) for n in export_to}
    return None if "*" in names else names


def mesh_route_diagnostics(snapshot: ConfigSnapshot) -> list[Diagnostic]:
    """What ``validate`` reports about sidecar-bound VirtualServices (warnings)."""
    return list(mesh_routes(snapshot).diagnostics)


def _refused(d: Diagnostic) -> Diagnostic:
    return warning(
        "virtual-service-refused",
        d.location,
        f"{d.message}; sidecars do not apply this VirtualService",
    )


def _refuse(where: Location, what: str) -> Diagnostic:
    return warning(
        "virtual-service-refused",
        where,
        f"{what}: sidecars do not apply this VirtualService until it is changed",
    )


def _ignored(where: Location, what: str) -> Diagnostic:
    return warning(
        "virtual-service-not-honoured",
        where,
        f"{what} is not honoured by trustmesh's sidecars (the rest of the VirtualService applies)",
    )


def _missing_subsets(
    resource: Resource[Any], spec: VirtualServiceSpec, snapshot: ConfigSnapshot
) -> Iterator[Diagnostic]:
    """Destinations naming a subset no DestinationRule for their host defines: Envoy has
    no such cluster and answers 503 (istioctl's IST0101)."""
    defined: set[tuple[str, str]] = set()
    wildcards: list[tuple[str, str]] = []
    for rule in snapshot.of_kind("DestinationRule"):
        host = resolve_host(rule.spec.host, rule.namespace, snapshot)
        for subset in rule.spec.subsets:
            if host.startswith("*"):
                wildcards.append((host, subset.name))
            else:
                defined.add((host, subset.name))
    for i, route in enumerate(spec.http):
        for j, destination in enumerate(route.route):
            subset = destination.destination.subset
            if not subset:
                continue
            host = resolve_host(destination.destination.host, resource.namespace, snapshot)
            if (host, subset) in defined or any(
                name == subset and host.endswith(pattern[1:]) for pattern, name in wildcards
            ):
                continue
            yield warning(
                "virtual-service-unknown-subset",
                resource.location("http", i, "route", j, "destination", "subset"),
                f"no DestinationRule for {host} defines subset {subset}: requests routed "
                "there get 503 (IST0101)",
            )


def _problems(resource: Resource[Any], spec: VirtualServiceSpec) -> Iterator[Diagnostic]:
    if not spec.hosts:
        yield _refuse(resource.location("hosts"), "hosts is required")
    for i, host in enumerate(spec.hosts):
        if host == "*":  # Istio's validation refuses it for VirtualServices bound to mesh
            yield _refuse(
                resource.location("hosts", i),
                "the wildcard host * is not allowed for VirtualServices bound to the mesh",
            )
    for field, values in (("tcp", spec.tcp), ("tls", spec.tls)):
        if values:
            yield _ignored(resource.location(field), f"{field} routes")
    for i, route in enumerate(spec.http):
        yield from _route_problems(resource, i, route)


def _route_problems(resource: Resource[Any], i: int, route: HttpRoute) -> Iterator[Diagnostic]:
    def at(*path: str | int) -> Location:
        return resource.location("http", i, *path)

    if route.delegate:
        yield _refuse(at("delegate"), "delegate is not supported")
        return
    for attribute, name in _IGNORED_ROUTE_FIELDS.items():
        if attribute in route.model_fields_set and getattr(route, attribute):
            yield _ignored(at(name), name)
    for path, message in invalid_route_values(route):
        yield _refuse(at(*path), message)
    if route.redirect is not None and route.redirect.derive_port:
        yield _refuse(at("redirect", "derivePort"), "derivePort is not supported")
    body = route.direct_response.body if route.direct_response is not None else None
    if body is not None and body.bytes is not None:
        yield _refuse(at("directResponse", "body", "bytes"), "body.bytes is not supported")
    if route.retries is not None and route.retries.retry_remote_localities:
        yield _ignored(at("retries", "retryRemoteLocalities"), "retryRemoteLocalities")
