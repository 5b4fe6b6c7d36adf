"""DestinationRule ``connectionPool`` and ``outlierDetection`` on outbound clusters (pure).

Which settings apply to a cluster is decided by :mod:`trustmesh.policy.traffic_policy`
(a :class:`ClusterTrafficPolicy` value); this module maps it to Envoy, as Istio does
(``pilot/pkg/networking/core/cluster_traffic_policy.go``):

* ``connectionPool`` → one ``circuit_breakers`` threshold (Istio's defaults: every limit
  2³²−1, ``track_remaining``), ``connect_timeout``, upstream TCP keepalive and the HTTP
  protocol options (``idle_timeout``, ``max_requests_per_connection``, …);
* ``outlierDetection`` → ``outlier_detection`` with success-rate ejection off, enforcement
  100 % for each consecutive-error kind given, and the panic threshold set to
  ``minHealthPercent`` (0 unless given: Envoy's default of 50 % would send traffic to
  ejected endpoints of a two-pod service).

Without either field a cluster is left exactly as built.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from trustmesh.api import traffic as t
from trustmesh.envoy_json import HTTP_OPTIONS_TYPE
from trustmesh.policy.traffic_policy import ClusterTrafficPolicy, cluster_traffic_policy

__all__ = [
    "ClusterTrafficPolicy",
    "apply_traffic_policy",
    "cluster_traffic_policy",
    "proto_duration",
]

_UNLIMITED = 2**32 - 1
_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def proto_duration(text: str) -> str:
    """A Kubernetes-style duration (``1m30s``) as protobuf JSON (``90s``)."""
    seconds = Decimal(str(t.duration_seconds(text))).quantize(Decimal("1e-9"))
    shown = format(seconds.normalize(), "f")
    return f"{shown}s"


def apply_traffic_policy(cluster: dict[str, Any], policy: ClusterTrafficPolicy) -> None:
    """Set ``policy`` on an Envoy cluster (proto3-JSON dict), in place."""
    if policy.connection_pool is not None:
        _apply_connection_pool(cluster, policy.connection_pool)
    if policy.outlier_detection is not None:
        _apply_outlier_detection(cluster, policy.outlier_detection)


def _apply_connection_pool(cluster: dict[str, Any], pool: t.ConnectionPoolSettings) -> None:
    threshold: dict[str, Any] = {
        "max_connections": _UNLIMITED,
        "max_pending_requests": _UNLIMITED,
        "max_requests": _UNLIMITED,
        "max_retries": _UNLIMITED,
        "track_remaining": True,
    }
    common: dict[str, Any] = {}
    http, tcp = pool.http, pool.tcp
    idle_timeout: str | None = None
    if http is not None:
        if http.http2_max_requests > 0:
            threshold["max_requests"] = http.http2_max_requests
        if http.http1_max_pending_requests > 0:
            threshold["max_pending_requests"] = http.http1_max_pending_requests
        if http.max_retries > 0:
            threshold["max_retries"] = http.max_retries
        idle_timeout = http.idle_timeout
        if http.max_requests_per_connection > 0:
            common["max_requests_per_connection"] = http.max_requests_per_connection
    if tcp is not None:
        if tcp.connect_timeout is not None:
            cluster["connect_timeout"] = proto_duration(tcp.connect_timeout)
        if tcp.max_connections > 0:
            threshold["max_connections"] = tcp.max_connections
        if tcp.max_connection_duration is not None:
            common["max_connection_duration"] = proto_duration(tcp.max_connection_duration)
        if idle_timeout is None:
            idle_timeout = tcp.idle_timeout
        if tcp.tcp_keepalive is not None:
            cluster["upstream_connection_options"] = {
                "tcp_keepalive": _keepalive(tcp.tcp_keepalive)
            }
    if idle_timeout is not None:
        common["idle_timeout"] = proto_duration(idle_timeout)
    cluster["circuit_breakers"] = {"thresholds": [threshold]}
    streams = http.max_concurrent_streams if http is not None else 0
    upgrade = http is not None and http.h2_upgrade_policy is t.H2UpgradePolicy.UPGRADE
    client_protocol = http is not None and http.use_client_protocol
    if not (common or streams or upgrade or client_protocol):
        return
    options = cluster.setdefault("typed_extension_protocol_options", {}).setdefault(
        _HTTP_OPTIONS_KEY,
        {"@type": HTTP_OPTIONS_TYPE, "explicit_http_config": {"http_protocol_options": {}}},
    )
    if client_protocol:  # Istio: the client's protocol wins over any upgrade
        options.pop("explicit_http_config", None)
        options["use_downstream_protocol_config"] = {
            "http_protocol_options": {},
            "http2_protocol_options": {},
        }
    elif upgrade:
        options["explicit_http_config"] = {"http2_protocol_options": {}}
    if common:
        options["common_http_protocol_options"] = common
    http2 = options.get("explicit_http_config", {}).get("http2_protocol_options")
    if http2 is not None and streams:
        http2["max_concurrent_streams"] = streams


def _keepalive(keepalive: t.TcpKeepalive) -> dict[str, Any]:
    # Envoy takes whole seconds; an empty message turns SO_KEEPALIVE on with OS defaults.
    out: dict[str, Any] = {}
    if keepalive.probes > 0:
        out["keepalive_probes"] = keepalive.probes
    if keepalive.time is not None:
        out["keepalive_time"] = int(t.duration_seconds(keepalive.time))
    if keepalive.interval is not None:
        out["keepalive_interval"] = int(t.duration_seconds(keepalive.interval))
    return out


def _apply_outlier_detection(cluster: dict[str, Any], outlier: t.OutlierDetection) -> None:
    out: dict[str, Any] = {"enforcing_success_rate": 0}
    if outlier.consecutive_5xx_errors is not None:
        out["consecutive_5xx"] = outlier.consecutive_5xx_errors
        out["enforcing_consecutive_5xx"] = 100 if outlier.consecutive_5xx_errors > 0 else 0
    if outlier.consecutive_gateway_errors is not None:
        value = outlier.consecutive_gateway_errors
        out["consecutive_gateway_failure"] = value
        out["enforcing_consecutive_gateway_failure"] = 100 if value > 0 else 0
    if outlier.interval is not None:
        out["interval"] = proto_duration(outlier.interval)
    if outlier.base_ejection_time is not None:
        out["base_ejection_time"] = proto_duration(outlier.base_ejection_time)
    if outlier.max_ejection_percent > 0:
        out["max_ejection_percent"] = outlier.max_ejection_percent
    if outlier.split_external_local_origin_errors:
        out["split_external_local_origin_errors"] = True
        failures = outlier.consecutive_local_origin_failures
        if failures:
            out["consecutive_local_origin_failure"] = failures
            out["enforcing_consecutive_local_origin_failure"] = 100
        out["enforcing_local_origin_success_rate"] = 0
    cluster["outlier_detection"] = out
    cluster.setdefault("common_lb_config", {})["healthy_panic_threshold"] = {
        "value": float(outlier.min_health_percent)
    }
