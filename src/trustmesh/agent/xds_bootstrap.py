"""The bootstrap of a sidecar Envoy that gets everything from the control plane over ADS.

Unlike :func:`trustmesh.envoy_bootstrap.sidecar_bootstrap`, which spells out the listeners
itself, this bootstrap holds only what Envoy needs before it can talk to anybody:

* ``sds-grpc``: the agent's SDS server on a Unix socket — the workload certificate
  (``default``) and the trust bundle (``ROOTCA``);
* ``xds-grpc``: the control plane, reached over mTLS. Envoy presents the workload
  certificate (that is how the control plane knows which configuration this proxy may
  have) and accepts the server only if its certificate chains to ``ROOTCA`` and carries the
  control plane's SPIFFE ID as URI SAN;
* ``dynamic_resources``: listeners and clusters over ADS on ``xds-grpc``; routes, filter
  configs (ECDS) and the rest follow from them over the same stream.

Example::

    bootstrap = ads_bootstrap(
        node_id="sidecar~127.0.0.20~httpbin.foo~foo.svc.cluster.local",
        cluster="httpbin.foo",
        sds_socket="/run/trustmesh/httpbin/sds.sock",
        xds_address="127.0.0.1",
        xds_port=15012,
    )
    envoy = EnvoyProcess(bootstrap, workdir=Path("/var/lib/trustmesh/httpbin"))
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from typing import Any

from trustmesh.envoy_bootstrap import (
    check_spiffe_ids,
    common_tls_context,
    is_ip,
    sds_cluster,
)
from trustmesh.envoy_json import HTTP_OPTIONS_TYPE, UPSTREAM_TLS_TYPE, socket_address
from trustmesh.identity.ca import control_plane_identity

__all__ = [
    "CONTROL_PLANE_ID",
    "XDS_CLUSTER",
    "ads_bootstrap",
    "control_plane_spiffe_id",
]

XDS_CLUSTER = "xds-grpc"  # Istio's name for the control-plane cluster


def control_plane_spiffe_id(trust_domain: str) -> str:
    """The SPIFFE ID the control plane's serving certificate carries in ``trust_domain``.

    It is the identity :meth:`CertificateAuthority.server_certificate
    <trustmesh.identity.ca.CertificateAuthority.server_certificate>` puts in its leaf: the
    CA and the xDS server are one control plane, as in istiod.
    """
    return control_plane_identity(trust_domain).uri


CONTROL_PLANE_ID = control_plane_spiffe_id("cluster.local")

_ADS = {"ads": {}, "resource_api_version": "V3"}
# While the control plane is down Envoy retries after a random delay of up to
# max_interval (measured: back ~0.25 s after a restart). Cheap for a host's worth of
# sidecars; Envoy's default (0.5 s doubling up to 30 s) would leave a proxy without
# updates for up to half a minute after the control plane returns.
_RETRY_BACK_OFF = {"base_interval": "0.05s", "max_interval": "0.5s"}


def ads_bootstrap(
    *,
    node_id: str,
    cluster: str,
    sds_socket: str,
    xds_address: str,
    xds_port: int,
    admin_address: str = "127.0.0.1",
    admin_port: int = 0,
    control_plane_id: str = CONTROL_PLANE_ID,
    source_address: str | None = None,
    more_xds: Sequence[tuple[str, int]] = (),
) -> dict[str, Any]:
    """The proto3-JSON bootstrap of a sidecar fed over ADS; pure, same input → same dict.

    ``node_id`` must be the id the control plane registered this proxy under (it gives a
    proxy only the configuration of the identity its certificate proves).
    ``xds_address`` is an IP or a DNS name. ``control_plane_id`` is the URI SAN the
    control plane's certificate must carry (``control_plane_spiffe_id(trust_domain)``).
    ``admin_port`` may be 0 (Envoy picks one; :class:`~trustmesh.agent.envoy.EnvoyProcess`
    reads it back); the admin endpoint must be on loopback. ``source_address``: the IP
    every upstream connection of this Envoy leaves from — the workload's own, so
    ``source.ip`` rules at the peer see the pod IP as in Istio (the kernel's choice,
    127.0.0.1 on loopback, without it).
    ``more_xds``: further control-plane replicas (address, port), endpoints of the same
    ``xds-grpc`` cluster: Envoy spreads its ADS (re)connections round robin over them and
    ejects one that refuses connections, so when the replica it streams from dies it
    reconnects to another within the retry back-off (≤ 0.5 s). Every replica must carry
    ``control_plane_id`` (they share the mesh CA).
    """
    if not node_id or not cluster:
        raise ValueError("node_id and cluster must be non-empty")
    if not os.path.isabs(sds_socket):
        raise ValueError(f"sds_socket must be an absolute path, got {sds_socket!r}")
    if not isinstance(xds_address, str) or not xds_address:
        raise ValueError(f"xds_address must be a non-empty string, got {xds_address!r}")
    if not isinstance(xds_port, int) or isinstance(xds_port, bool) or not 1 <= xds_port <= 65535:
        raise ValueError(f"xds_port must be 1..65535, got {xds_port!r}")
    if not is_ip(admin_address) or not ipaddress.ip_address(admin_address).is_loopback:
        raise ValueError(f"admin address must be a loopback IP, got {admin_address!r}")
    if not isinstance(admin_port, int) or not 0 <= admin_port <= 65535:
        raise ValueError(f"admin port must be 0..65535, got {admin_port!r}")
    check_spiffe_ids("control_plane_id", frozenset({control_plane_id}), allow_empty=False)
    for address, port in more_xds:
        if not isinstance(address, str) or not address:
            raise ValueError(f"more_xds addresses must be non-empty strings, got {address!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError(f"more_xds ports must be 1..65535, got {port!r}")
    if source_address is not None and not is_ip(source_address):
        raise ValueError(f"source_address must be an IP, got {source_address!r}")

    bootstrap: dict[str, Any] = {
        "node": {"id": node_id, "cluster": cluster},
        "admin": {"address": socket_address(admin_address, admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            "retry_policy": {"retry_back_off": dict(_RETRY_BACK_OFF)},
                        }
                    }
                ],
            },
            "lds_config": dict(_ADS),
            "cds_config": dict(_ADS),
        },
        "static_resources": {
            "clusters": [
                _xds_cluster([(xds_address, xds_port), *more_xds], control_plane_id),
                sds_cluster(sds_socket),
            ]
        },
    }
    if source_address is not None:
        # Cluster manager wide: one setting instead of one per cluster, so the clusters
        # themselves stay the same for every proxy (and are built and hashed once).
        bootstrap["cluster_manager"] = {
            "upstream_bind_config": {
                "source_address": socket_address(source_address, 0)["socket_address"]
            }
        }
    return bootstrap


def _xds_cluster(endpoints: Sequence[tuple[str, int]], server_id: str) -> dict[str, Any]:
    """The control plane (one endpoint per replica) as a gRPC (HTTP/2) upstream over mTLS
    with the workload identity."""
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS_TYPE,
            # gRPC servers negotiate HTTP/2 by ALPN; the server identity is pinned by SAN.
            "common_tls_context": common_tls_context(frozenset({server_id}), ("h2",)),
        },
    }
    cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if all(is_ip(a) for a, _ in endpoints) else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        # As Istio's xds-grpc cluster: notice a control plane that vanished without a
        # reset (a host gone, a NAT entry dropped), so Envoy reconnects.
        "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 300}},
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": socket_address(address, port)}}
                        for address, port in endpoints
                    ]
                }
            ],
        },
        "transport_socket": tls,
    }
    if len(endpoints) > 1:
        # A replica that refuses connections (killed) is ejected after one failure, so
        # the next attempt goes to a live one; it is tried again after base_ejection_time.
        cluster["outlier_detection"] = {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "enforcing_consecutive_local_origin_failure": 100,
            "base_ejection_time": "5s",
            "max_ejection_percent": 100,
            "interval": "1s",
        }
    return cluster
