"""DestinationRule connectionPool / outlierDetection → Envoy cluster settings, with
Istio's precedence (port level replaces wholesale, subsets override field by field), and
the translated config parses into Envoy's protos."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, json_format
from typer.testing import CliRunner

from tests.unit.meshutil import compile_text
from trustmesh.api.loader import load_sources
from trustmesh.api.traffic import duration_seconds
from trustmesh.cli.main import app
from trustmesh.xds.cache import _ensure_types
from trustmesh.xds.traffic_policy import cluster_traffic_policy, proto_duration
from trustmesh.xds.translate import translate

CIRCUIT_BREAKER = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: foo}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1, connectTimeout: 250ms, tcpKeepalive: {time: 2m, probes: 3}}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1, idleTimeout: 1m30s}
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"""


def _cluster(text: str, name: str = "outbound|8000||httpbin.foo.svc.cluster.local") -> Any:
    resources = translate(compile_text(text), "foo/sleep", inbound_address="127.0.0.2")
    (cluster,) = [c for c in resources.clusters if c["name"] == name]
    return cluster


def test_istio_circuit_breaking_task_maps_to_envoy_thresholds() -> None:
    cluster = _cluster(CIRCUIT_BREAKER)
    assert cluster["circuit_breakers"] == {
        "thresholds": [
            {
                "max_connections": 1,
                "max_pending_requests": 1,
                "max_requests": 2**32 - 1,
                "max_retries": 2**32 - 1,
                "track_remaining": True,
            }
        ]
    }
    assert cluster["connect_timeout"] == "0.25s"
    assert cluster["upstream_connection_options"] == {
        "tcp_keepalive": {"keepalive_probes": 3, "keepalive_time": 120}
    }
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["common_http_protocol_options"] == {
        "max_requests_per_connection": 1,
        "idle_timeout": "90s",
    }
    assert options["explicit_http_config"] == {"http_protocol_options": {}}
    assert cluster["outlier_detection"] == {
        "enforcing_success_rate": 0,
        "consecutive_5xx": 1,
        "enforcing_consecutive_5xx": 100,
        "interval": "1s",
        "base_ejection_time": "180s",
        "max_ejection_percent": 100,
    }
    assert cluster["common_lb_config"] == {"healthy_panic_threshold": {"value": 0.0}}
    _ensure_types(cluster)
    json_format.ParseDict(cluster, any_pb2.Any())  # Envoy's own schema accepts it


def test_no_traffic_policy_leaves_the_cluster_as_it_was() -> None:
    cluster = _cluster("")
    for key in ("circuit_breakers", "outlier_detection", "common_lb_config"):
        assert key not in cluster


def test_port_level_settings_replace_the_top_level_wholesale() -> None:
    text = CIRCUIT_BREAKER + (
        "    portLevelSettings:\n"
        "    - port: {number: 8000}\n"
        "      connectionPool: {http: {http2MaxRequests: 7}}\n"
    )
    cluster = _cluster(text)
    (threshold,) = cluster["circuit_breakers"]["thresholds"]
    assert threshold["max_requests"] == 7
    assert threshold["max_connections"] == 2**32 - 1  # not inherited from the top level
    assert "outlier_detection" not in cluster  # the port entry sets none: none applies
    assert cluster["connect_timeout"] != "0.25s"


def _rule(text: str) -> Any:
    loaded = load_sources([("dr.yaml", text.encode())])
    assert not loaded.diagnostics, loaded.diagnostics
    (rule,) = loaded.resources
    return rule.spec


SUBSETS = (
    CIRCUIT_BREAKER
    + """    portLevelSettings:
    - port: {number: 9000}
      outlierDetection: {consecutiveGatewayErrors: 2}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool: {tcp: {maxConnections: 5}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 8000}
        connectionPool: {tcp: {maxConnections: 9}}
"""
)


def test_subset_overrides_field_by_field_and_wholesale_with_its_own_port_level() -> None:
    rule = _rule(SUBSETS)
    v1 = cluster_traffic_policy(rule, 8000, "v1")
    assert v1.connection_pool is not None and v1.connection_pool.tcp is not None
    assert v1.connection_pool.tcp.max_connections == 5
    assert v1.outlier_detection == rule.traffic_policy.outlier_detection  # inherited
    v2 = cluster_traffic_policy(rule, 8000, "v2")
    assert v2.connection_pool is not None and v2.connection_pool.tcp is not None
    assert v2.connection_pool.tcp.max_connections == 9
    assert v2.outlier_detection is None  # the subset's port level replaces everything
    v2_other = cluster_traffic_policy(rule, 9000, "v2")
    assert v2_other.outlier_detection is not None
    assert v2_other.outlier_detection.consecutive_gateway_errors == 2
    assert v2_other.connection_pool is None  # the destination's port 9000 entry has none
    assert cluster_traffic_policy(rule, 8000, "nope") == cluster_traffic_policy(rule, 8000)


def test_durations_as_kubernetes_users_write_them() -> None:
    assert duration_seconds("1h2m3.5s") == 3723.5
    assert proto_duration("10ms") == "0.01s"
    assert proto_duration("2m") == "120s"


def test_bad_traffic_policy_fields_name_file_line_and_field(tmp_path: Path) -> None:
    text = CIRCUIT_BREAKER.replace("maxRequestsPerConnection", "maxRequestsPerConection")
    text = text.replace("interval: 1s", "interval: 0s")
    loaded = load_sources([("dr.yaml", text.encode())])
    shown = sorted(str(d) for d in loaded.diagnostics)
    assert len(shown) == 2, shown
    assert shown[0].startswith("dr.yaml:10 spec.trafficPolicy.connectionPool.http.maxRequestsPer")
    assert "did you mean maxRequestsPerConnection" in shown[0]
    assert shown[1].startswith("dr.yaml:13 spec.trafficPolicy.outlierDetection.interval")
    assert "at least 1ms" in shown[1]


def test_consecutive_errors_is_warned_as_ignored(tmp_path: Path) -> None:
    config = tmp_path / "dr.yaml"
    config.write_text(CIRCUIT_BREAKER.replace("consecutive5xxErrors: 1", "consecutiveErrors: 1"))
    result = CliRunner().invoke(app, ["validate", "-f", str(config)])
    assert result.exit_code == 0, result.output
    assert (
        f"{config}:12 spec.trafficPolicy.outlierDetection.consecutiveErrors: "
        "warning[deprecated-field]: deprecated and ignored by Istio"
    ) in result.output
    cluster = _cluster(config.read_text())
    assert "consecutive_5xx" not in cluster["outlier_detection"]  # Istio ignores it too
