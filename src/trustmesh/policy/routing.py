"""Where a client's sidecar sends an HTTP request to a Service: its VirtualService route (pure).

The offline reading of the routes :mod:`trustmesh.xds.mesh_routes` gives the client's
Envoy: the sidecar-bound VirtualService owning the service's host (for the client's
namespace), its first ``http`` entry with a match that applies to this client and this
request (uri, method, authority, scheme, headers, withoutHeaders, queryParams, port,
sourceLabels, sourceNamespace, gateways), and what that entry does — forward to weighted
destinations (each a service, or a DestinationRule subset of it, and the workloads behind
it), redirect, or answer directly. A request no entry matches gets a 404 from the client's
sidecar. ``authz check --from W --to NS/SERVICE`` then decides only at the workloads the
route can reach.

Example::

    choice = sidecar_route(mesh, productpage, reviews_fqdn, 9080, HttpRequest("GET", "/"))
    choice.describe()  # 'VirtualService default/reviews http[0] → reviews… subset v1 …'
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from trustmesh.api.diagnostics import Location
from trustmesh.api.gateway import BoundVirtualService
from trustmesh.api.gateway_models import HttpMatchRequest, HttpRoute, StringMatch
from trustmesh.api.mesh_routes import MeshRoutes, match_applies, mesh_routes, resolve_host
from trustmesh.api.snapshot import Service, Workload
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.derived import Derived
from trustmesh.policy.destination_rules import destination_subsets
from trustmesh.policy.endpoints import service_workloads
from trustmesh.policy.request import HttpRequest

__all__ = [
    "RouteChoice",
    "RouteKind",
    "RoutedDestination",
    "sidecar_mesh_routes",
    "sidecar_route",
]


class RouteKind(enum.Enum):
    FORWARD = "forward"  # to the route's destinations
    REDIRECT = "redirect"  # answered by the client's sidecar
    DIRECT_RESPONSE = "direct_response"  # answered by the client's sidecar
    NO_ROUTE = "no_route"  # no entry matches: 404 from the client's sidecar


@dataclass(frozen=True, slots=True)
class RoutedDestination:
    """One destination of the chosen route: ``host`` (an FQDN) ``port``, ``subset``, its
    weight (of the route's total) and the workloads behind it."""

    host: str
    port: int | None
    subset: str
    weight: int
    service: Service | None
    workloads: tuple[Workload, ...]

    def describe(self) -> str:
        where = self.host + (f":{self.port}" if self.port else "")
        subset = f" subset {self.subset}" if self.subset else ""
        refs = ", ".join(w.ref for w in self.workloads) or "no workload"
        return f"{where}{subset} ({refs})"


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """What the client's sidecar does with the request, and which VirtualService says so."""

    virtual_service: str  # namespace/name
    location: Location  # the chosen http entry (or the VirtualService, for NO_ROUTE)
    kind: RouteKind
    destinations: tuple[RoutedDestination, ...] = ()
    status: int | None = None  # redirect code, direct response status, 404

    @property
    def workloads(self) -> tuple[Workload, ...]:
        """The workloads the request may reach (weight > 0), each once."""
        seen: dict[str, Workload] = {}
        for d in self.destinations:
            if d.weight > 0 or len(self.destinations) == 1:
                for w in d.workloads:
                    seen.setdefault(w.ref, w)
        return tuple(seen.values())

    def describe(self) -> str:
        head = f"VirtualService {self.virtual_service} ({self.location})"
        if self.kind is RouteKind.NO_ROUTE:
            return f"{head}: no route matches, the client's sidecar answers 404"
        if self.kind is RouteKind.REDIRECT:
            return f"{head}: the client's sidecar redirects ({self.status})"
        if self.kind is RouteKind.DIRECT_RESPONSE:
            return f"{head}: the client's sidecar answers {self.status}"
        total = sum(d.weight for d in self.destinations) or 1
        parts = [
            d.describe()
            + (f" weight {100 * d.weight // total}%" if len(self.destinations) > 1 else "")
            for d in self.destinations
        ]
        return f"{head} routes to " + "; ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {
            "virtual_service": self.virtual_service,
            "location": str(self.location),
            "kind": self.kind.value,
            "status": self.status,
            "destinations": [
                {
                    "host": d.host,
                    "port": d.port,
                    "subset": d.subset,
                    "weight": d.weight,
                    "workloads": [w.ref for w in d.workloads],
                }
                for d in self.destinations
            ],
        }


def sidecar_mesh_routes(mesh: MeshPolicy) -> MeshRoutes:
    """The snapshot's sidecar-bound VirtualServices, read once per compiled mesh."""
    return _MESH_ROUTES.get(mesh, None)


_MESH_ROUTES: Derived[MeshPolicy, None, MeshRoutes] = Derived(
    "mesh routes", lambda mesh, _: mesh_routes(mesh.snapshot)
)


def sidecar_route(
    mesh: MeshPolicy, client: Workload, host: str, port: int, http: HttpRequest
) -> RouteChoice | None:
    """The route ``client``'s sidecar takes for ``http`` to ``host``:``port`` (a Service's
    FQDN, a ServiceEntry host, any host a VirtualService names); None when no
    VirtualService routes that host for the client (its own endpoints, or egress)."""
    vs = sidecar_mesh_routes(mesh).for_host(host, client.namespace)
    if vs is None:
        return None
    applied = False
    for i, route in enumerate(vs.spec.http):
        matches: Sequence[HttpMatchRequest | None] = route.match or (None,)
        for match in matches:
            if not match_applies(match, vs, client.labels, client.namespace, port):
                continue
            applied = True
            if match is None or _matches(match, http, f"{host}:{port}"):
                return _choice(mesh, client, vs, i, route, port)
    if not applied:
        return None  # nothing applies to this client: the service's default route
    return RouteChoice(
        f"{vs.namespace}/{vs.resource.name}",
        vs.resource.location("http"),
        RouteKind.NO_ROUTE,
        status=404,
    )


def _choice(
    mesh: MeshPolicy,
    client: Workload,
    vs: BoundVirtualService,
    i: int,
    route: HttpRoute,
    port: int,
) -> RouteChoice:
    name = f"{vs.namespace}/{vs.resource.name}"
    where = vs.resource.location("http", i)
    if route.redirect is not None:
        return RouteChoice(name, where, RouteKind.REDIRECT, status=route.redirect.redirect_code)
    if route.direct_response is not None:
        return RouteChoice(
            name, where, RouteKind.DIRECT_RESPONSE, status=route.direct_response.status
        )
    destinations = []
    for d in route.route:
        host = resolve_host(d.destination.host, vs.namespace, mesh.snapshot)
        service = next((s for s in mesh.snapshot.services if s.hostname == host), None)
        to_port = d.destination.port.number if d.destination.port is not None else None
        if to_port is None:
            to_port = service.ports[0].port if service and len(service.ports) == 1 else port
        workloads = _workloads(mesh, client, service, d.destination.subset)
        destinations.append(
            RoutedDestination(host, to_port, d.destination.subset, d.weight, service, workloads)
        )
    return RouteChoice(name, where, RouteKind.FORWARD, tuple(destinations))


def _workloads(
    mesh: MeshPolicy, client: Workload, service: Service | None, subset: str
) -> tuple[Workload, ...]:
    if service is None:
        return ()
    selected = service_workloads(mesh, service)
    if not subset:
        return tuple(selected)
    subsets = destination_subsets(mesh, client.namespace, service)
    chosen = next((s for s in subsets if s.name == subset), None)
    if chosen is None:
        return ()  # Envoy's cluster does not exist: 503, no workload is reached
    labels: Mapping[str, str] = chosen.labels
    return tuple(w for w in selected if all(w.labels.get(k) == v for k, v in labels.items()))


def _matches(match: HttpMatchRequest, http: HttpRequest, default_authority: str) -> bool:
    target = urlsplit(http.path)
    path = target.path or "/"
    authority = target.netloc or http.host or default_authority
    headers: dict[str, str] = {}
    for key, line in http.header_lines():
        name = key.lower()
        headers[name] = f"{headers[name]},{line}" if name in headers else line
    headers[":method"] = http.method.upper()
    headers[":authority"] = authority
    headers[":scheme"] = "http"
    if match.uri is not None and not _string(match.uri, path, ignore_case=match.ignore_uri_case):
        return False
    wanted: list[tuple[str, StringMatch | None]] = [
        (":method", match.method),
        (":authority", match.authority),
        (":scheme", match.scheme),
        *match.headers.items(),
    ]
    for name, expected in wanted:
        if expected is not None and not _header(expected, headers.get(name.lower())):
            return False
    for name, unwanted in match.without_headers.items():
        if _header(unwanted, headers.get(name.lower())):
            return False
    query = dict(parse_qsl(target.query, keep_blank_values=True))
    return all(_header(v, query.get(k)) for k, v in match.query_params.items())


def _header(value: StringMatch, found: str | None) -> bool:
    if found is None:
        return False
    if value.exact is None and value.prefix is None and value.regex is None:
        return True  # present
    return _string(value, found)


def _string(value: StringMatch, text: str, *, ignore_case: bool = False) -> bool:
    if value.exact is None and value.prefix is None and value.regex is None:
        return True
    if value.regex is not None:
        return re.fullmatch(value.regex, text) is not None
    if ignore_case:
        text = text.lower()
    if value.exact is not None:
        return text == (value.exact.lower() if ignore_case else value.exact)
    assert value.prefix is not None
    return text.startswith(value.prefix.lower() if ignore_case else value.prefix)
