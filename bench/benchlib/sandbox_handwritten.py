"""The hand-written Envoy pair for captured pods: what a user would write by hand behind
istio-init's rules, with nothing but the essentials.

* client (the calling pod's sidecar): one listener on 0.0.0.0:15001 whose
  ``original_dst`` listener filter recovers the address the app dialled (the REDIRECT
  rule moved it), an HTTP connection manager routing everything to an ``ORIGINAL_DST``
  cluster — the upstream is that very address — over mTLS with a static certificate,
  the server pinned by its SPIFFE ID;
* server (the called pod's sidecar): one listener on 0.0.0.0:15006 with ``original_dst``,
  mTLS requiring a client certificate, the RBAC filter ALLOWing sleep's principal, and an
  ``ORIGINAL_DST`` cluster bound to 127.0.0.6 (the source istio-init lets through to the
  app, as Istio's inbound clusters do) — the app at the pod IP and port the client dialled.

Certificates come from trustmesh's CA, inline (no SDS): the best case a user could write.
"""

from __future__ import annotations

from typing import Any

from benchlib.envoy_pair import (
    Credentials,
    _address,
    _bootstrap,
    _hcm,
    allow_sleep_rbac,
    downstream_tls,
    upstream_tls,
)
from trustmesh.runtime.capture import INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT

_ORIGINAL_DST = {
    "name": "envoy.filters.listener.original_dst",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
    },
}
INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"


def _original_dst_cluster(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
        **extra,
    }


def captured_client_bootstrap(creds: Credentials) -> dict[str, Any]:
    """Outbound 15001 (original destination) → the dialled address over mTLS."""
    route = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    listener = {
        "name": "outbound",
        "address": _address("0.0.0.0", OUTBOUND_CAPTURE_PORT),
        "listener_filters": [_ORIGINAL_DST],
        "filter_chains": [{"filters": [_hcm("outbound", route)]}],
    }
    cluster = _original_dst_cluster("upstream", transport_socket=upstream_tls(creds))
    return _bootstrap("handwritten-captured-client", listener, [cluster])


def captured_server_bootstrap(creds: Credentials) -> dict[str, Any]:
    """Inbound 15006 (original destination), mTLS + RBAC → the app from 127.0.0.6."""
    route = {"match": {"prefix": "/"}, "route": {"cluster": "app"}}
    listener = {
        "name": "inbound",
        "address": _address("0.0.0.0", INBOUND_CAPTURE_PORT),
        "listener_filters": [_ORIGINAL_DST],
        "filter_chains": [
            {
                "transport_socket": downstream_tls(creds),
                "filters": [_hcm("inbound", route, [allow_sleep_rbac()])],
            }
        ],
    }
    bind = {"source_address": {"address": INBOUND_PASSTHROUGH_SOURCE, "port_value": 0}}
    cluster = _original_dst_cluster("app", upstream_bind_config=bind)
    return _bootstrap("handwritten-captured-server", listener, [cluster])
