"""One workload's Envoy configuration from the compiled mesh: the entry point (pure).

:func:`translate` reads the same :class:`~trustmesh.policy.compose.WorkloadPolicy` the
offline evaluator reads and returns every resource its sidecar needs, as proto3-JSON dicts
with their ``@type`` (ready for :meth:`trustmesh.xds.cache.Snapshot.from_resources`):

* listeners — ``virtualInbound`` (:mod:`trustmesh.xds.inbound`), absent for a workload
  without ports (a pure client such as ``sleep``); with ``outbound_address``, also the
  outbound listeners the app reaches by address — the HTTP proxy ``outbound_http`` and a
  TCP listener per non-HTTP Service port (:mod:`trustmesh.xds.outbound_listeners`);
* clusters — ``inbound|<port>||`` to the application, ``outbound|<port>||<host>`` per
  registry port, ``PassthroughCluster`` / ``BlackHoleCluster``, and one per ``jwksUri``
  host (:mod:`trustmesh.xds.outbound`, :mod:`trustmesh.xds.jwt`);
* routes — the outbound HTTP route configuration per port and, with
  ``outbound_address``, the HTTP proxy's ``http_proxy``: every outbound route reaches
  Envoy over RDS, so a VirtualService change never changes (and drains) a listener;
* extension configs — the HTTP policy filters when delivered over ECDS (the default).

Why ECDS: Envoy applies a listener (LDS) change only to new connections, and keeps old
keep-alive connections on the old filters until they drain (600 s by default), so a
revoked permission would stay usable on an open connection. A filter fetched over ECDS is
replaced on existing connections at once. Each HTTP chain therefore names fixed slots —
``trustmesh.guard.host`` and ``trustmesh.guard.headers`` (the ambiguous-Host and
repeated-header guards, :mod:`trustmesh.xds.guards`),
``trustmesh.authn.jwt``, ``trustmesh.authz.audit``, ``trustmesh.authz.deny``,
``trustmesh.authz.allow`` (after ``trustmesh.authz.custom.<i>``, the CUSTOM filters — per
provider the shadow RBAC filter and its ext_authz filter — which run before JWT as in
Istio) — filled with a pass-through config when nothing of that
kind applies, so adding or removing a policy changes an extension config, not the
listener. Network (TCP) RBAC stays in the listener: it is checked once per connection.

A slot costs Envoy a filter instance per request even when it is a pass-through (about
1.6k instructions each, measured with callgrind), so every slot is ``disabled`` in the
listener and switched on by its inbound route configuration, served over RDS: the virtual
host names each slot that holds a policy in ``typed_per_filter_config`` (an empty
``FilterConfig``). RDS, like ECDS, reaches open connections with their next request, and
an empty slot is a pass-through whichever of the two updates Envoy applies first, so no
ordering of the pair ever enforces less than the old or the new policy.
:attr:`FilterDelivery.INLINE` puts every filter in the listener, exactly as Istio does.

Example::

    resources = translate(mesh, "foo/httpbin", inbound_address="127.0.0.20")
    snapshot = Snapshot.from_resources(resources.all())
"""

from __future__ import annotations

import copy
import enum
import ipaddress
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from trustmesh.envoy_json import HCM_TYPE, socket_address
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.derived import Derived
from trustmesh.xds.envoyfilter import apply_envoy_filters
from trustmesh.xds.guards import (
    HEADER_GUARD_SLOT,
    HEADER_GUARD_TYPES,
    HOST_GUARD_FILTER,
    header_guard_config,
    host_guard_config,
    request_guard_filters,
)
from trustmesh.xds.inbound import (
    capture_inbound_clusters,
    inbound_clusters,
    inbound_listener,
    inbound_ports,
    passthrough_scopes,
    service_ports,
    virtual_inbound_listener,
)
from trustmesh.xds.jwt import JWT_FILTER, jwks_clusters, jwt_authn_config
from trustmesh.xds.mesh_routes import routing_key
from trustmesh.xds.outbound import (
    ROUTE_TYPE,
    Protocol,
    outbound_clusters,
    outbound_routes,
)
from trustmesh.xds.outbound_capture import service_port_listeners, virtual_outbound_listener
from trustmesh.xds.outbound_listeners import (
    outbound_http_route,
    outbound_listeners,
    outbound_proxy_clusters,
    workload_subset_clusters,
)
from trustmesh.xds.rbac import (
    HTTP_RBAC_TYPE,
    http_custom_filters,
    http_rbac_filters,
    network_rbac_filters,
)

__all__ = [
    "ECDS_TYPE",
    "CaptureMode",
    "FilterDelivery",
    "ProxyResources",
    "http_policy_filters",
    "slot_switches",
    "static_bootstrap",
    "translate",
]

ECDS_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
JWT_SLOT = "trustmesh.authn.jwt"
# RBAC action → slot, in filter order.
_RBAC_SLOTS = {
    "LOG": "trustmesh.authz.audit",
    "DENY": "trustmesh.authz.deny",
    "ALLOW": "trustmesh.authz.allow",
}
_CUSTOM_SLOT = "trustmesh.authz.custom.{}"
_FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"


class CaptureMode(enum.Enum):
    """How the app's traffic reaches its sidecar — which listener layout Envoy gets.

    ``PROCESS``: no capture (a local-process mesh): Envoy binds the workload's ports on its
    own address and offers the app outbound listeners by address (an HTTP proxy).
    ``TRANSPARENT``: the pod's network namespace redirects inbound TCP to 15006 and
    outbound TCP to 15001 (istio-init's rules): Istio's ``virtualInbound`` /
    ``virtualOutbound`` layout with original destinations and per-port outbound
    listeners that bind nothing.
    """

    PROCESS = "process"
    TRANSPARENT = "transparent"


class FilterDelivery(enum.Enum):
    """Where the HTTP policy filters (CUSTOM, jwt_authn, RBAC) are delivered."""

    ECDS = "ECDS"  # as extension configs: a change applies to open connections at once
    INLINE = "INLINE"  # inside the listener, as Istio does


@dataclass(frozen=True)
class ProxyResources:
    """Everything one sidecar is served, each tuple sorted by resource name.

    Dicts may share sub-dicts (with each other and with other workloads' results):
    treat them as read-only.
    """

    listeners: tuple[dict[str, Any], ...]
    clusters: tuple[dict[str, Any], ...]
    routes: tuple[dict[str, Any], ...]
    extension_configs: tuple[dict[str, Any], ...] = ()

    def all(self) -> tuple[dict[str, Any], ...]:
        """Every resource, clusters first (what a listener or route refers to exists)."""
        return (*self.clusters, *self.listeners, *self.routes, *self.extension_configs)


def translate(
    mesh: MeshPolicy,
    workload_ref: str,
    *,
    inbound_address: str,
    sds_cluster: str = "sds-grpc",
    app_address: str = "127.0.0.1",
    delivery: FilterDelivery = FilterDelivery.ECDS,
    outbound_address: str | None = None,
    workload_addresses: Mapping[str, str] | None = None,
    capture: CaptureMode = CaptureMode.PROCESS,
    service_addresses: Mapping[str, str] | None = None,
) -> ProxyResources:
    """The Envoy resources of ``workload_ref``'s sidecar (``namespace/name``).

    ``capture`` picks the listener layout (:class:`CaptureMode`). Under ``TRANSPARENT``
    the listeners bind no workload address: ``inbound_address`` is the pod IP (for the
    node id only), ``app_address`` is unused (the app is reached at the address the
    client dialled, from 127.0.0.6), ``outbound_address`` must be None, and
    ``service_addresses`` (Service ``namespace/name`` → ClusterIP) says where each
    Service is dialled.

    ``inbound_address``: where the inbound listener binds the workload's ports;
    ``app_address``: where the application itself listens on the same ports;
    ``sds_cluster``: the bootstrap cluster of the agent's SDS server;
    ``outbound_address``: where the outbound listeners bind (none without it), for an
    app that reaches services through its sidecar by address (no traffic capture);
    ``workload_addresses``: the IP of each workload (``namespace/name``) whose manifest
    has none, for service endpoints.

    What every client in a namespace shares — outbound clusters and routes — is built
    once per compiled mesh and shared between the proxies' resources (treat them as
    read-only); a fleet's rebuild then costs little more per proxy than its own inbound
    side.
    Raises ``LookupError`` for an unknown workload, ``ValueError`` for a workload without
    a sidecar, an address that is not an IP, or an outbound listener that would bind an
    inbound port of the same address.
    """
    wp = mesh.for_workload(workload_ref)
    if wp is None:
        raise LookupError(f"unknown workload {workload_ref!r}")
    if not wp.workload.has_sidecar:
        raise ValueError(f"{workload_ref} has no sidecar: there is no Envoy to configure")
    addresses = [("inbound_address", inbound_address), ("app_address", app_address)]
    if outbound_address is not None:
        addresses.append(("outbound_address", outbound_address))
    for what, address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"{what} must be an IP address, got {address!r}") from None
    if not sds_cluster:
        raise ValueError("sds_cluster must be non-empty")
    if capture is CaptureMode.TRANSPARENT:
        if outbound_address is not None:
            raise ValueError("a captured sidecar has no outbound_address: the app dials services")
        resources = _transparent(
            mesh, wp, sds_cluster, delivery, workload_addresses, _cluster_ips(service_addresses)
        )
        return _with_envoy_filters(mesh, resources, workload_ref)

    ports = inbound_ports(wp)
    listeners: list[dict[str, Any]] = []
    extension_configs: list[dict[str, Any]] = []
    if ports:
        http_filters: list[dict[str, Any]] = []
        if any(p.protocol is Protocol.HTTP for p in ports):
            http_filters, extension_configs = http_policy_filters(wp, mesh, delivery)
        listeners.append(
            inbound_listener(
                wp,
                mesh,
                ports,
                address=inbound_address,
                sds_cluster=sds_cluster,
                http_filters=http_filters,
                network_filters=lambda port: network_rbac_filters(wp, mesh, port),
            )
        )
    proxy_clusters: list[dict[str, Any]] = []
    if outbound_address is not None:
        outbound = outbound_listeners(wp, mesh, outbound_address)
        if ipaddress.ip_address(outbound_address) == ipaddress.ip_address(inbound_address):
            bound = {p.port for p in ports} & {_listener_port(x) for x in outbound}
            if bound:
                raise ValueError(
                    f"outbound_address {outbound_address} would bind inbound port(s) "
                    f"{sorted(bound)} a second time: use another address"
                )
        listeners = sorted([*listeners, *outbound], key=lambda x: str(x["name"]))
    service_clusters = _shared(
        mesh,
        wp,
        ("clusters", sds_cluster, _addresses_key(workload_addresses)),
        lambda: outbound_clusters(wp, mesh, sds_cluster, workload_addresses),
    )
    if outbound_address is not None:
        proxy_clusters = outbound_proxy_clusters(wp) + _shared(
            mesh,
            wp,
            ("workload subsets", sds_cluster, _addresses_key(workload_addresses)),
            lambda: workload_subset_clusters(wp, mesh, service_clusters),
        )
    clusters: dict[str, dict[str, Any]] = {}
    for cluster in (
        *inbound_clusters(ports, app_address),
        *service_clusters,
        *proxy_clusters,
        *jwks_clusters(wp.jwt_providers),
    ):
        clusters.setdefault(cluster["name"], cluster)
    routes = _shared(
        mesh,
        wp,
        ("routes",),
        lambda: sorted(outbound_routes(wp, mesh), key=lambda r: str(r["name"])),
    )
    if outbound_address is not None:
        # The proxy listener's routes, over RDS: a VirtualService change never drains it.
        routes = [
            *routes,
            _shared(mesh, wp, ("proxy routes",), lambda: outbound_http_route(wp, mesh)),
        ]
    inbound_routes = _slots_by_route(listeners, extension_configs)
    resources = ProxyResources(
        listeners=tuple(listeners),
        clusters=tuple(clusters[name] for name in sorted(clusters)),
        routes=tuple(sorted([*routes, *inbound_routes], key=lambda r: str(r["name"]))),
        extension_configs=tuple(sorted(extension_configs, key=lambda e: str(e["name"]))),
    )
    return _with_envoy_filters(mesh, resources, workload_ref)


def _with_envoy_filters(
    mesh: MeshPolicy, resources: ProxyResources, workload_ref: str
) -> ProxyResources:
    """The EnvoyFilters applied, then every virtual host of the inbound routes switching on
    every slot in use again: a virtual host a patch added must meet the policies (as in
    Istio, where the filters do not depend on the route), and a slot a MERGE filled must
    run. A switch a patch wrote itself is kept: that is the patch's explicit choice."""
    patched = apply_envoy_filters(mesh, resources, workload_ref)
    if patched is resources or not patched.extension_configs:
        return patched
    enabled = slot_switches(patched.extension_configs)
    inbound = {
        str(node["rds"]["route_config_name"])
        for node in _objects(list(patched.listeners))
        if node.get("@type") == HCM_TYPE
        and "rds" in node
        and any("config_discovery" in f for f in node.get("http_filters", ()))
    }
    for route in patched.routes:  # copies: apply_envoy_filters returned new resources
        if route["name"] not in inbound:
            continue
        for host in route.get("virtual_hosts", ()):
            switches = host.setdefault("typed_per_filter_config", {})
            for name, switch in enabled.items():
                switches.setdefault(name, dict(switch))
    return patched


def _cluster_ips(addresses: Mapping[str, str] | None) -> dict[str, str]:
    checked = {}
    for service, address in sorted((addresses or {}).items()):
        namespace, _, name = service.partition("/")
        if not namespace or not name or "/" in name:
            raise ValueError(f"service_addresses keys are namespace/name, got {service!r}")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"ClusterIP of {service} must be an IP, got {address!r}") from None
        checked[service] = address
    return checked


def _transparent(
    mesh: MeshPolicy,
    wp: WorkloadPolicy,
    sds_cluster: str,
    delivery: FilterDelivery,
    workload_addresses: Mapping[str, str] | None,
    cluster_ips: Mapping[str, str],
) -> ProxyResources:
    """Istio's layout for a sidecar behind capture rules (see :class:`CaptureMode`)."""
    ports = service_ports(wp)
    scopes = passthrough_scopes(wp, ports)
    # Passthrough chains always carry HTTP: the HTTP policy filters are always needed.
    http_filters, extension_configs = http_policy_filters(wp, mesh, delivery)
    listeners = [
        virtual_inbound_listener(
            wp,
            mesh,
            ports,
            scopes,
            sds_cluster=sds_cluster,
            http_filters=http_filters,
            network_filters=lambda port: network_rbac_filters(wp, mesh, port),
        ),
        virtual_outbound_listener(wp),
        *service_port_listeners(wp, mesh, cluster_ips),
    ]
    addresses_key = _addresses_key(workload_addresses)
    service_clusters = _shared(
        mesh,
        wp,
        ("clusters", sds_cluster, addresses_key),
        lambda: outbound_clusters(wp, mesh, sds_cluster, workload_addresses),
    )
    subset_clusters = _shared(
        mesh,
        wp,
        ("workload subsets", sds_cluster, addresses_key),
        lambda: workload_subset_clusters(wp, mesh, service_clusters),
    )
    clusters: dict[str, dict[str, Any]] = {}
    for cluster in (
        *capture_inbound_clusters(ports),
        *service_clusters,
        *subset_clusters,
        *jwks_clusters(wp.jwt_providers),
    ):
        clusters.setdefault(cluster["name"], cluster)
    inbound_routes = _slots_by_route(listeners, extension_configs)
    routes = _shared(
        mesh,
        wp,
        ("captured routes", _addresses_key(cluster_ips)),
        lambda: sorted(
            outbound_routes(wp, mesh, cluster_ips, workload_routes=True),
            key=lambda r: str(r["name"]),
        ),
    )
    return ProxyResources(
        listeners=tuple(sorted(listeners, key=lambda x: str(x["name"]))),
        clusters=tuple(clusters[name] for name in sorted(clusters)),
        routes=tuple(sorted([*routes, *inbound_routes], key=lambda r: str(r["name"]))),
        extension_configs=tuple(sorted(extension_configs, key=lambda e: str(e["name"]))),
    )


_Shared = TypeVar("_Shared")


def _shared(
    mesh: MeshPolicy, wp: WorkloadPolicy, what: tuple[object, ...], build: Callable[[], _Shared]
) -> _Shared:
    """``build()`` once per compiled mesh for all clients alike: outbound clusters and
    routes depend on the client only through its namespace (DestinationRule scope, short
    names) and its egress mode — and its labels, when a VirtualService routes by
    ``sourceLabels``."""
    shared = _SHARED.table(mesh)
    key = (*what, wp.workload.namespace, wp.egress_mode, routing_key(wp, mesh))
    if key not in shared:
        shared[key] = build()
    found: _Shared = shared[key]
    return found


# (what, client namespace, egress mode, routing key) → outbound clusters or routes shared
# by clients alike.
_SHARED: Derived[MeshPolicy, tuple[object, ...], Any] = Derived("outbound config")


def _addresses_key(addresses: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(addresses.items())) if addresses else ()


def _listener_port(listener: Mapping[str, Any]) -> int:
    return int(listener["address"]["socket_address"]["port_value"])


def http_policy_filters(
    wp: WorkloadPolicy, mesh: MeshPolicy, delivery: FilterDelivery
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The HTTP policy filters in Istio's order — CUSTOM, jwt_authn, AUDIT, DENY, ALLOW —
    behind trustmesh's request guards, and, under ECDS, the extension configs they name."""
    custom = http_custom_filters(wp, mesh)
    rbac = http_rbac_filters(wp, mesh)
    jwt = jwt_authn_config(wp.jwt_providers)
    if delivery is FilterDelivery.INLINE:
        filters = [*request_guard_filters(wp, mesh), *custom]
        if wp.jwt_providers:
            filters.append({"name": JWT_FILTER, "typed_config": jwt})
        return [*filters, *rbac], []

    slots: list[tuple[str, dict[str, Any]]] = [
        (HOST_GUARD_FILTER, host_guard_config(wp)),
        (HEADER_GUARD_SLOT, header_guard_config(wp, mesh)),
    ]
    slots += [(_CUSTOM_SLOT.format(i), f["typed_config"]) for i, f in enumerate(custom)]
    slots.append((JWT_SLOT, jwt))
    by_action: dict[str, dict[str, Any]] = {}
    for f in rbac:
        action = _rbac_action(f["typed_config"])
        if action in by_action or action not in _RBAC_SLOTS:
            # rbac.py builds at most one filter per action; anything else is a bug there.
            raise ValueError(f"rbac.py built an unexpected second or {action!r} RBAC filter")
        by_action[action] = f["typed_config"]
    for action, slot in _RBAC_SLOTS.items():
        # An RBAC filter without rules enforces nothing and logs nothing: a free slot.
        slots.append((slot, by_action.get(action, {"@type": HTTP_RBAC_TYPE})))
    filters = [
        {
            "name": name,
            "disabled": True,  # switched on per inbound route: see _slots_by_route
            "config_discovery": {
                "config_source": {"ads": {}, "resource_api_version": "V3"},
                "type_urls": list(HEADER_GUARD_TYPES)
                if name == HEADER_GUARD_SLOT
                else [config["@type"]],
            },
        }
        for name, config in slots
    ]
    configs = [{"@type": ECDS_TYPE, "name": name, "typed_config": config} for name, config in slots]
    return filters, configs


def slot_switches(extension_configs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A virtual host's ``typed_per_filter_config`` switching on the slots that hold a
    policy (anything but a bare ``{"@type": ...}`` pass-through): an empty
    ``FilterConfig`` each. A new dict on every call."""
    return {
        str(e["name"]): {"@type": _FILTER_CONFIG_TYPE, "config": {}}
        for e in sorted(extension_configs, key=lambda e: str(e["name"]))
        if len(e["typed_config"]) > 1
    }


def _slots_by_route(
    listeners: Sequence[dict[str, Any]], extension_configs: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Move the route configuration of every HTTP manager that carries policy slots to RDS
    (edits ``listeners`` in place), its virtual hosts switching on the slots in use; the
    route configurations, one per name.

    Under ECDS only; chains of one port (mTLS and plaintext) share their route
    configuration, as do the passthrough chains.
    """
    if not extension_configs:
        return []
    enabled = slot_switches(extension_configs)
    routes: dict[str, dict[str, Any]] = {}
    for node in _objects(listeners):
        if node.get("@type") != HCM_TYPE or "route_config" not in node:
            continue
        if not any("config_discovery" in f for f in node["http_filters"]):
            continue
        route = {"@type": ROUTE_TYPE, **node.pop("route_config")}
        route["virtual_hosts"] = [
            {**host, "typed_per_filter_config": dict(enabled)} if enabled else host
            for host in route["virtual_hosts"]
        ]
        name = str(route["name"])
        if routes.setdefault(name, route) != route:
            raise ValueError(f"two inbound route configurations named {name!r} differ")
        node["rds"] = {
            "config_source": {"ads": {}, "resource_api_version": "V3"},
            "route_config_name": name,
        }
    return [routes[name] for name in sorted(routes)]


def _rbac_action(config: Mapping[str, Any]) -> str:
    rules = config.get("rules") or config.get("shadow_rules") or {}
    return str(rules.get("action", "ALLOW"))


# ---------------------------------------------------------------------------- bootstrap


def static_bootstrap(
    resources: ProxyResources,
    *,
    node_id: str,
    sds_socket: str,
    node_cluster: str = "",
    sds_cluster: str = "sds-grpc",
    admin_address: str = "127.0.0.1",
    admin_port: int = 0,
) -> dict[str, Any]:
    """A bootstrap serving ``resources`` without an ADS server: listeners and clusters as
    static resources, extension configs and the route configurations a listener fetches
    by RDS put back inline, the agent's SDS socket as ``sds_cluster``.

    For tests, ``envoy --mode validate`` and running a sidecar before the ADS server
    exists. Returns new dicts; ``resources`` is not modified.
    """
    extensions = {e["name"]: e["typed_config"] for e in resources.extension_configs}
    routes = {str(r["name"]): r for r in resources.routes}
    listeners = [
        _inline_routes(_inline_extensions(_untyped(r), extensions), routes)
        for r in resources.listeners
    ]
    clusters = [_untyped(c) for c in resources.clusters]
    clusters.append(
        {
            "name": sds_cluster,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": _HTTP_OPTIONS,
                    "explicit_http_config": {"http2_protocol_options": {}},  # gRPC
                }
            },
            "load_assignment": {
                "cluster_name": sds_cluster,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": sds_socket}}}}]}
                ],
            },
        }
    )
    return {
        "node": {"id": node_id, "cluster": node_cluster or node_id},
        "admin": {"address": socket_address(admin_address, admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _untyped(resource: Mapping[str, Any]) -> dict[str, Any]:
    # A top-level resource's "@type" names it for xDS; a bootstrap field must not carry it.
    return {k: copy.deepcopy(v) for k, v in resource.items() if k != "@type"}


def _inline_extensions(value: Any, extensions: Mapping[str, Any]) -> Any:
    for node in _objects(value):
        if "config_discovery" in node:
            name = node["name"]
            if name not in extensions:
                raise ValueError(f"filter {name!r} refers to a missing extension config")
            del node["config_discovery"]
            node["typed_config"] = copy.deepcopy(extensions[name])
    return value


def _inline_routes(value: Any, routes: Mapping[str, Any]) -> Any:
    for node in _objects(value):
        if "rds" in node:
            name = node.pop("rds")["route_config_name"]
            if name not in routes:
                raise ValueError(f"a listener refers to a missing route configuration {name!r}")
            node["route_config"] = _untyped(routes[name])
    return value


def _objects(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for item in list(value.values()):
            yield from _objects(item)
    elif isinstance(value, list):
        for item in value:
            yield from _objects(item)
