"""ServiceEntry clusters: which entries a proxy sees, and their endpoints (pure).

Shared by the sidecar's outbound clusters and the gateways'. Istio's rules
(``pilot/pkg/serviceregistry/serviceentry``, ``cluster_builder.go``):

* an entry is visible to the proxies of the namespaces its ``exportTo`` names (``.`` its
  own, ``*`` all; none given: all);
* ``outbound|<port>||<host>`` per host and port; endpoints as ``resolution`` says:
  STATIC → the entry's ``endpoints`` (IP addresses; the endpoint's port named like the
  entry's port in ``endpoints[].ports``, else ``targetPort``, else the port number);
  DNS → STRICT_DNS over the endpoints' addresses, or the host itself when there are none;
  DNS_ROUND_ROBIN → LOGICAL_DNS over one of them; NONE (or a wildcard host without
  endpoints) → ORIGINAL_DST, the address the client connected to;
* HTTP/2 to a GRPC / HTTP2 port;
* a cluster ``outbound|<port>|<subset>|<host>`` per subset of the DestinationRule for the
  host, with the endpoints carrying the subset's labels.
"""

from __future__ import annotations

import copy
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.gateway import exported_to
from trustmesh.api.resources import Resource
from trustmesh.envoy_json import (
    CLUSTER_TYPE,
    CONNECT_TIMEOUT,
    HTTP_OPTIONS_TYPE,
    dns_cluster,
    socket_address,
)
from trustmesh.policy.compose import MeshPolicy

__all__ = ["entry_cluster", "visible_entries"]

_HTTP2 = frozenset({"http2", "grpc", "h2c"})
_HTTP2_OPTIONS: dict[str, Any] = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": HTTP_OPTIONS_TYPE,
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


def visible_entries(mesh: MeshPolicy, namespace: str) -> list[Resource[Any]]:
    """The ServiceEntries exported to proxies of ``namespace``, oldest first (the oldest
    declaring a host and port wins)."""
    return sorted(
        (e for e in mesh.snapshot.of_kind("ServiceEntry") if exported_to(e, namespace)),
        key=lambda r: r.age_key(),
    )


def entry_cluster(
    entry: Resource[Any],
    host: str,
    port_index: int,
    *,
    placeholder: str = "",
    subset: m.Subset | None = None,
) -> dict[str, Any]:
    """The cluster of ``entry``'s host and ``ports[port_index]``. ``placeholder``: the
    address of a STATIC entry without endpoints (the sidecar's runtime fills it in).

    ``subset``: a DestinationRule subset of the host, ``outbound|<port>|<subset>|<host>``
    with the endpoints whose ``labels`` carry the subset's labels (Istio's subset
    clusters of a ServiceEntry); a subset with labels of an entry without endpoints
    selects nothing (the host's implicit endpoint has no labels): no endpoints, 503."""
    spec: m.ServiceEntrySpec = entry.spec
    port = spec.ports[port_index]
    name = f"outbound|{port.number}|{subset.name if subset else ''}|{host}"
    resolution = spec.resolution.upper()
    addresses: list[tuple[str, int]] = []
    for endpoint in spec.endpoints:
        # What validation refuses (trustmesh.api.service_entry) never gets this far.
        if endpoint.address and not endpoint.address.startswith("unix://"):
            if subset is not None and any(
                endpoint.labels.get(k) != v for k, v in subset.labels.items()
            ):
                continue
            number = endpoint.ports.get(port.name) or port.target_port or port.number
            addresses.append((endpoint.address, number))
    wildcard = host.startswith("*")
    cluster: dict[str, Any]
    # A subset whose labels no endpoint has: a cluster with no endpoints (503), whatever
    # the resolution; never the placeholder or the host's own name.
    empty_subset = subset is not None and bool(subset.labels) and not addresses
    if empty_subset or resolution == "STATIC":
        if not addresses and placeholder and not empty_subset:
            addresses = [(placeholder, port.number)]
        cluster = {
            "@type": CLUSTER_TYPE,
            "name": name,
            "type": "STATIC",
            "connect_timeout": CONNECT_TIMEOUT,
            "load_assignment": {"cluster_name": name, "endpoints": []},
        }
        if addresses:
            cluster["load_assignment"]["endpoints"] = [
                {"lb_endpoints": [_lb_endpoint(a, n, host) for a, n in addresses]}
            ]
    elif resolution in ("DNS", "DNS_ROUND_ROBIN") and (addresses or not wildcard):
        targets = addresses or [(host, port.target_port or port.number)]
        logical = resolution == "DNS_ROUND_ROBIN"
        if logical:
            targets = targets[:1]  # Envoy's LOGICAL_DNS takes exactly one name
        cluster = dns_cluster(name, targets, logical=logical)
    else:
        cluster = {
            "@type": CLUSTER_TYPE,
            "name": name,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": CONNECT_TIMEOUT,
        }
    protocol = port.protocol if port.protocol not in ("", "TCP", "UDP", "SCTP") else port.name
    if protocol.lower().split("-", 1)[0] in _HTTP2:
        # a copy: a DestinationRule's traffic policy or auto SNI adds to it per cluster
        cluster["typed_extension_protocol_options"] = copy.deepcopy(_HTTP2_OPTIONS)
    return cluster


def _lb_endpoint(address: str, port: int, host: str) -> dict[str, Any]:
    return {
        "endpoint": {"address": socket_address(address, port)},
        "metadata": {"filter_metadata": {"trustmesh": {"service_entry": host}}},
    }
