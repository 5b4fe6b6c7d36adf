"""VirtualService routes and DestinationRule subsets in a sidecar's translation (pure).

The route configuration JSON both sidecar layouts get over RDS (the local-process proxy's
``http_proxy`` and the captured layout's ``"9080"``), the subset clusters with the
subset's traffic policy merged over the rule's, and which VirtualServices and matches
apply to which client — with what cannot be honoured reported by ``validate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trustmesh.config import LoadedConfig, load_config
from trustmesh.xds.translate import CaptureMode, ProxyResources, translate

HERE = Path(__file__).parent
REVIEWS = "reviews.default.svc.cluster.local"
PRODUCTPAGE = "default/productpage-v1"

SUBSETS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, interval: 10s}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool: {tcp: {maxConnections: 7}}
      tls: {mode: DISABLE}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 9080}
        tls: {mode: ISTIO_MUTUAL, sni: v3.reviews.example}
"""

ALL_V1 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
"""


def load(tmp_path: Path, *texts: str, workloads: str = "") -> LoadedConfig:
    (tmp_path / "workloads.yaml").write_text(workloads or (HERE / "workloads.yaml").read_text())
    (tmp_path / "routes.yaml").write_text("\n---\n".join(texts))
    loaded = load_config([str(tmp_path)])
    assert not loaded.errors, loaded.errors
    assert loaded.mesh is not None
    return loaded


def process(loaded: LoadedConfig, ref: str = PRODUCTPAGE) -> ProxyResources:
    assert loaded.mesh is not None
    return translate(loaded.mesh, ref, inbound_address="127.0.0.50", outbound_address="127.0.0.51")


def proxy_route_config(resources: ProxyResources) -> dict[str, Any]:
    """The proxy listener's route configuration: the RDS resource its manager names."""
    (listener,) = [x for x in resources.listeners if x["name"] == "outbound_http"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert "route_config" not in manager  # inline routes would drain the listener on change
    (config,) = [r for r in resources.routes if r["name"] == manager["rds"]["route_config_name"]]
    assert config["name"] == "http_proxy"  # Istio's name for the HTTP proxy's routes
    return config


def proxy_routes(resources: ProxyResources, name: str) -> list[dict[str, Any]]:
    """The routes of the proxy listener's virtual host ``name``."""
    config = proxy_route_config(resources)
    (vhost,) = [v for v in config["virtual_hosts"] if v["name"] == name]
    return [r for r in vhost["routes"] if not r["name"].startswith("workload ")]


def cluster(resources: ProxyResources, name: str) -> dict[str, Any]:
    (found,) = [c for c in resources.clusters if c["name"] == name]
    return found


def endpoints(found: dict[str, Any]) -> set[str]:
    return {
        e["metadata"]["filter_metadata"]["trustmesh"]["workload"]
        for group in found["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    }


DEFAULT_RETRIES = {
    "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
    "num_retries": 2,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3"
                ".PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": "5",
    "retriable_status_codes": [503],
}


def test_virtual_service_all_v1_is_the_reviews_virtual_host(tmp_path: Path) -> None:
    loaded = load(tmp_path, SUBSETS, ALL_V1)
    expected = [
        {
            "name": "default.reviews.0",
            "match": {"prefix": "/"},
            "route": {
                "cluster_not_found_response_code": "SERVICE_UNAVAILABLE",
                "cluster": f"outbound|9080|v1|{REVIEWS}",
                "timeout": "0s",
                "retry_policy": DEFAULT_RETRIES,
            },
        }
    ]
    assert proxy_routes(process(loaded), f"{REVIEWS}:9080") == expected
    assert loaded.mesh is not None
    captured = translate(
        loaded.mesh, PRODUCTPAGE, inbound_address="127.0.0.50", capture=CaptureMode.TRANSPARENT
    )
    (config,) = [r for r in captured.routes if r["name"] == "9080"]
    (vhost,) = [v for v in config["virtual_hosts"] if v["name"] == f"{REVIEWS}:9080"]
    assert [r for r in vhost["routes"] if not r["name"].startswith("workload ")] == expected
    # Other services keep their default route.
    assert proxy_routes(process(loaded), "slow.default.svc.cluster.local:8000") == [
        {
            "name": "default",
            "match": {"prefix": "/"},
            "route": {"cluster": "outbound|8000||slow.default.svc.cluster.local", "timeout": "0s"},
        }
    ]


def test_subset_clusters_merge_the_subsets_traffic_policy(tmp_path: Path) -> None:
    resources = process(load(tmp_path, SUBSETS))
    v1, v2, v3 = (cluster(resources, f"outbound|9080|{v}|{REVIEWS}") for v in ("v1", "v2", "v3"))
    assert endpoints(v1) == {"default/reviews-v1"}
    assert endpoints(v2) == {"default/reviews-v2"}
    assert endpoints(v3) == {"default/reviews-v3"}
    # v1 has no policy of its own: the rule's outlier detection, auto mTLS.
    assert v1["outlier_detection"]["consecutive_5xx"] == 3
    assert v1["outlier_detection"]["interval"] == "10s"
    assert "circuit_breakers" not in v1
    assert [m["name"] for m in v1["transport_socket_matches"]] == [
        "tlsMode-istio",
        "tlsMode-disabled",
    ]
    # v2: its connection pool, the rule's outlier detection, its tls DISABLE: plaintext.
    assert v2["circuit_breakers"]["thresholds"][0]["max_connections"] == 7
    assert v2["outlier_detection"]["consecutive_5xx"] == 3
    assert "transport_socket" not in v2 and "transport_socket_matches" not in v2
    # v3: a port-level entry replaces the rule's policy wholesale (no outlier detection)
    # and its ISTIO_MUTUAL names its own SNI; the reviews workloads' identity is pinned.
    assert "outlier_detection" not in v3
    tls = v3["transport_socket"]["typed_config"]
    assert tls["sni"] == "v3.reviews.example"
    sans = tls["common_tls_context"]["combined_validation_context"]["default_validation_context"]
    assert {"san_type": "URI", "matcher": {"exact": REVIEWS_ID}} in sans[
        "match_typed_subject_alt_names"
    ]
    # The service's own cluster is unchanged: every version.
    assert endpoints(cluster(resources, f"outbound|9080||{REVIEWS}")) == {
        "default/reviews-v1",
        "default/reviews-v2",
        "default/reviews-v3",
    }


REVIEWS_ID = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"


def test_subset_clusters_send_istiods_subset_sni_and_the_service_cluster_none(
    tmp_path: Path,
) -> None:
    """istiod names a subset cluster's mesh SNI ``outbound_.PORT_.SUBSET_.HOST`` (what an
    AUTO_PASSTHROUGH gateway routes by, what ``connection.sni`` sees); the service's own
    cluster ``outbound_.PORT_._.HOST``. Both from policy.upstream_tls.upstream_tls, which
    says why."""
    from trustmesh.policy.upstream_tls import UpstreamMode, upstream_tls

    loaded = load(tmp_path, SUBSETS)
    resources = process(loaded)

    def sni(name: str) -> str:
        found = cluster(resources, name)
        if "transport_socket" in found:
            return str(found["transport_socket"]["typed_config"]["sni"])
        (mesh,) = [m for m in found["transport_socket_matches"] if m["name"] == "tlsMode-istio"]
        return str(mesh["transport_socket"]["typed_config"]["sni"])

    assert sni(f"outbound|9080||{REVIEWS}") == f"outbound_.9080_._.{REVIEWS}"
    assert sni(f"outbound|9080|v1|{REVIEWS}") == f"outbound_.9080_.v1_.{REVIEWS}"
    assert sni(f"outbound|9080|v3|{REVIEWS}") == "v3.reviews.example"  # the rule's own
    # The per-workload clusters copy their service cluster: its SNI, not a subset's.
    assert sni(f"outbound|9080|workload-reviews-v1|{REVIEWS}") == f"outbound_.9080_._.{REVIEWS}"
    assert loaded.mesh is not None
    (service,) = [s for s in loaded.mesh.snapshot.services if s.hostname == REVIEWS]
    v2 = upstream_tls(loaded.mesh, "default", service, 9080, "v2")
    assert v2.mode is UpstreamMode.PLAINTEXT and v2.rule == "default/reviews"
    assert str(v2.location).endswith("spec.subsets[1].trafficPolicy.tls"), v2.location
    v3 = upstream_tls(loaded.mesh, "default", service, 9080, "v3")
    assert (v3.mode, v3.sni) == (UpstreamMode.ISTIO_MUTUAL, "v3.reviews.example")
    assert "subsets[2].trafficPolicy.portLevelSettings[0].tls" in v3.why
    v1 = upstream_tls(loaded.mesh, "default", service, 9080, "v1")
    assert (v1.mode, v1.rule, v1.why) == (UpstreamMode.AUTO, "", "auto mTLS")


def test_match_fields_reach_the_route(tmp_path: Path) -> None:
    vs = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
      uri: {prefix: /api}
      method: {exact: GET}
      queryParams: {debug: {}}
      withoutHeaders: {x-canary: {exact: "no"}}
    route:
    - destination: {host: reviews, subset: v2}
      weight: 75
      headers: {request: {set: {x-version: v2}}}
    - destination: {host: reviews, subset: v3}
      weight: 25
    timeout: 1.5s
    retries: {attempts: 4, perTryTimeout: 250ms, retryOn: "5xx,503"}
    rewrite: {uri: /v2/api, authority: reviews-v2}
    headers: {response: {remove: [server]}}
  - directResponse: {status: 418, body: {string: teapot}}
"""
    routes = proxy_routes(process(load(tmp_path, SUBSETS, vs)), f"{REVIEWS}:9080")
    assert routes[0] == {
        "name": "jason",
        "match": {
            "prefix": "/api",
            "headers": [
                {"name": ":method", "string_match": {"exact": "GET"}},
                {"name": "end-user", "string_match": {"exact": "jason"}},
                {"name": "x-canary", "string_match": {"exact": "no"}, "invert_match": True},
            ],
            "query_parameters": [{"name": "debug", "present_match": True}],
        },
        "route": {
            "cluster_not_found_response_code": "SERVICE_UNAVAILABLE",
            "weighted_clusters": {
                "clusters": [
                    {
                        "name": f"outbound|9080|v2|{REVIEWS}",
                        "weight": 75,
                        "request_headers_to_add": [
                            {
                                "header": {"key": "x-version", "value": "v2"},
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                            }
                        ],
                    },
                    {"name": f"outbound|9080|v3|{REVIEWS}", "weight": 25},
                ]
            },
            "timeout": "1.5s",
            "retry_policy": {
                **DEFAULT_RETRIES,
                "retry_on": "5xx,retriable-status-codes",
                "num_retries": 4,
                "retriable_status_codes": [503],
                "per_try_timeout": "0.25s",
            },
            "prefix_rewrite": "/v2/api",
            "host_rewrite_literal": "reviews-v2",
        },
        "response_headers_to_remove": ["server"],
    }
    assert routes[1] == {
        "name": "default.reviews.1",
        "match": {"prefix": "/"},
        "direct_response": {"status": 418, "body": {"inline_string": "teapot"}},
    }


SOURCE_LABELS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match:
    - sourceLabels: {app: productpage}
    route:
    - destination: {host: reviews, subset: v2}
  - match:
    - gateways: [istio-system/some-gateway]
    route:
    - destination: {host: reviews, subset: v3}
  - route:
    - destination: {host: reviews, subset: v1}
"""


def test_source_labels_and_match_gateways_pick_the_clients(tmp_path: Path) -> None:
    loaded = load(tmp_path, SUBSETS, SOURCE_LABELS)

    def clusters(ref: str) -> list[str]:
        return [
            r["route"]["cluster"] for r in proxy_routes(process(loaded, ref), f"{REVIEWS}:9080")
        ]

    v1, v2 = (f"outbound|9080|{v}|{REVIEWS}" for v in ("v1", "v2"))
    assert clusters(PRODUCTPAGE) == [v2, v1]  # a gateway's match never reaches sidecars
    assert clusters("default/sleep") == [v1]
    # Translated in one compiled mesh: clients with other labels do not share routes.
    assert loaded.mesh is not None
    for ref, expected in ((PRODUCTPAGE, v2), ("default/sleep", v1)):
        captured = translate(
            loaded.mesh, ref, inbound_address="127.0.0.50", capture=CaptureMode.TRANSPARENT
        )
        (config,) = [r for r in captured.routes if r["name"] == "9080"]
        (vhost,) = [v for v in config["virtual_hosts"] if v["name"] == f"{REVIEWS}:9080"]
        routed = [r for r in vhost["routes"] if not r["name"].startswith("workload ")]
        assert routed[0]["route"]["cluster"] == expected


def test_a_virtual_service_for_gateways_only_or_exported_elsewhere_leaves_sidecars_alone(
    tmp_path: Path,
) -> None:
    gateway_only = ALL_V1.replace("hosts: [reviews]", "hosts: [reviews]\n  gateways: [gw]")
    elsewhere = ALL_V1.replace("hosts: [reviews]", "hosts: [reviews]\n  exportTo: [other]")
    for text in (gateway_only, elsewhere):
        routes = proxy_routes(process(load(tmp_path, SUBSETS, text)), f"{REVIEWS}:9080")
        assert [r["name"] for r in routes] == ["default"]
    both = ALL_V1.replace("hosts: [reviews]", "hosts: [reviews]\n  gateways: [gw, mesh]")
    routes = proxy_routes(process(load(tmp_path, SUBSETS, both)), f"{REVIEWS}:9080")
    assert routes[0]["route"]["cluster"] == f"outbound|9080|v1|{REVIEWS}"


def test_the_oldest_virtual_service_keeps_a_host_and_the_other_is_reported(
    tmp_path: Path,
) -> None:
    older = ALL_V1.replace(
        "namespace: default}", "namespace: default, creationTimestamp: '2024-01-01T00:00:00Z'}"
    )
    newer = (
        ALL_V1.replace("name: reviews,", "name: reviews-v3,")
        .replace(
            "namespace: default}", "namespace: default, creationTimestamp: '2025-01-01T00:00:00Z'}"
        )
        .replace("subset: v1", "subset: v3")
    )
    loaded = load(tmp_path, SUBSETS, newer, older)
    routes = proxy_routes(process(loaded), f"{REVIEWS}:9080")
    assert [r["route"]["cluster"] for r in routes] == [f"outbound|9080|v1|{REVIEWS}"]
    (conflict,) = [d for d in loaded.diagnostics if d.code == "virtual-service-host-conflict"]
    assert conflict.location.field == "spec.hosts[0]"
    assert "default/reviews (older)" in conflict.message
    lines = (tmp_path / "routes.yaml").read_text().splitlines()
    first_hosts = lines.index("  hosts: [reviews]") + 1  # the newer one's, written first
    assert conflict.location.line == first_hosts


@pytest.mark.parametrize(
    ("extra", "code", "field", "applied"),
    [
        ("  tcp:\n  - route:\n    - destination: {host: reviews}\n", "virtual-service-not-honoured",
         "spec.tcp", True),
        ("  tls:\n  - match: [{sniHosts: [reviews]}]\n"
         "    route:\n    - destination: {host: reviews}\n",
         "virtual-service-not-honoured", "spec.tls", True),
    ],
)  # fmt: skip
def test_routes_sidecars_cannot_honour_are_reported(
    tmp_path: Path, extra: str, code: str, field: str, applied: bool
) -> None:
    loaded = load(tmp_path, SUBSETS, ALL_V1 + extra)
    (found,) = [d for d in loaded.diagnostics if d.code.startswith("virtual-service-")]
    assert (found.code, found.location.field) == (code, field)
    assert found.location.file.endswith("routes.yaml") and found.location.line > 0
    routes = proxy_routes(process(loaded), f"{REVIEWS}:9080")
    assert (routes[0]["name"] != "default") is applied


@pytest.mark.parametrize(
    ("route", "code", "field", "applied"),
    [
        ("fault: {abort: {httpStatus: 500, percentage: {value: 100}}}",
         "virtual-service-not-honoured", "spec.http[0].fault", True),
        ("mirror: {host: reviews, subset: v3}", "virtual-service-not-honoured",
         "spec.http[0].mirror", True),
        ("corsPolicy: {allowOrigins: [{exact: a.example}]}", "virtual-service-not-honoured",
         "spec.http[0].corsPolicy", True),
        ("delegate: {name: other}", "virtual-service-refused", "spec.http[0].delegate", False),
        ("timeout: soon", "virtual-service-refused", "spec.http[0].timeout", False),
        ("bogus: 1", "virtual-service-refused", "spec.http[0].bogus", False),
    ],
)  # fmt: skip
def test_route_fields_sidecars_cannot_honour_are_reported(
    tmp_path: Path, route: str, code: str, field: str, applied: bool
) -> None:
    text = ALL_V1.replace("  - route:\n", f"  - {route}\n    route:\n")
    if route.startswith("delegate"):
        text = ALL_V1.replace("  - route:\n    - destination: {host: reviews, subset: v1}\n",
                              f"  - {route}\n")  # fmt: skip
    loaded = load(tmp_path, SUBSETS, text)
    found = [d for d in loaded.diagnostics if d.code.startswith("virtual-service-")]
    assert [(d.code, d.location.field) for d in found] == [(code, field)], found
    assert found[0].location.line > 0
    routes = proxy_routes(process(loaded), f"{REVIEWS}:9080")
    assert (routes[0]["name"] != "default") is applied


def test_a_service_entry_host_routes_to_the_egress_gateway(tmp_path: Path) -> None:
    """Istio's egress gateway task: the sidecar sends edition.cnn.com:80 to the egress
    gateway's Service (subset cnn); the gateway's own match is left to the gateway."""
    egress = """
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Service
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  ports:
  - {name: http2, port: 80, targetPort: 8080}
  - {name: https, port: 443, targetPort: 8443}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cnn, namespace: default}
spec:
  hosts: [edition.cnn.com]
  ports:
  - {number: 80, name: http-port, protocol: HTTP}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: egressgateway-for-cnn, namespace: default}
spec:
  host: istio-egressgateway.istio-system.svc.cluster.local
  subsets:
  - name: cnn
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: direct-cnn-through-egress-gateway, namespace: default}
spec:
  hosts: [edition.cnn.com]
  gateways: [istio-egressgateway, mesh]
  http:
  - match:
    - gateways: [mesh]
      port: 80
    route:
    - destination:
        host: istio-egressgateway.istio-system.svc.cluster.local
        subset: cnn
        port: {number: 80}
      weight: 100
  - match:
    - gateways: [istio-egressgateway]
      port: 80
    route:
    - destination: {host: edition.cnn.com, port: {number: 80}}
      weight: 100
"""
    resources = process(load(tmp_path, egress))
    routes = proxy_routes(resources, "edition.cnn.com:80")
    gateway = "istio-egressgateway.istio-system.svc.cluster.local"
    assert [r["route"]["cluster"] for r in routes] == [f"outbound|80|cnn|{gateway}"]
    assert cluster(resources, f"outbound|80|cnn|{gateway}")["name"]  # it exists


def test_a_destination_without_port_takes_the_listener_port(tmp_path: Path) -> None:
    one_port = "  - {name: http, port: 9080, targetPort: 5000}\n"
    workloads = (HERE / "workloads.yaml").read_text()
    assert one_port in workloads
    workloads = workloads.replace(
        one_port, one_port + "  - {name: http-alt, port: 9081, targetPort: 5000}\n"
    )
    vs = ALL_V1.replace("  - route:\n", "  - match: [{port: 9081}]\n    route:\n")
    resources = process(load(tmp_path, SUBSETS, vs, workloads=workloads))
    assert [r["name"] for r in proxy_routes(resources, f"{REVIEWS}:9080")] == ["default"]
    (route,) = proxy_routes(resources, f"{REVIEWS}:9081")
    assert route["route"]["cluster"] == f"outbound|9081|v1|{REVIEWS}"


def test_a_host_nothing_else_declares_gets_its_own_virtual_host(tmp_path: Path) -> None:
    """Istio builds virtual hosts for VirtualService hosts that are no service."""
    alias = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookreviews, namespace: default}
spec:
  hosts: [bookreviews.example.com]
  http:
  - route:
    - destination: {host: reviews, subset: v2}
"""
    loaded = load(tmp_path, SUBSETS, alias)
    resources = process(loaded)
    (route,) = proxy_routes(resources, "bookreviews.example.com:80")
    assert route["route"]["cluster"] == f"outbound|9080|v2|{REVIEWS}"
    config = proxy_route_config(resources)
    (vhost,) = [v for v in config["virtual_hosts"] if v["name"] == "bookreviews.example.com:80"]
    assert vhost["domains"] == ["bookreviews.example.com:80", "bookreviews.example.com"]
    assert loaded.mesh is not None
    captured = translate(
        loaded.mesh, PRODUCTPAGE, inbound_address="127.0.0.50", capture=CaptureMode.TRANSPARENT
    )
    (config,) = [r for r in captured.routes if r["name"] == "9080"]
    (vhost,) = [v for v in config["virtual_hosts"] if v["name"] == "bookreviews.example.com:9080"]
    assert vhost["domains"] == ["bookreviews.example.com:9080"]
    assert vhost["routes"][0]["route"]["cluster"] == f"outbound|9080|v2|{REVIEWS}"


def test_the_wildcard_host_is_refused_at_sidecars(tmp_path: Path) -> None:
    loaded = load(tmp_path, SUBSETS, ALL_V1.replace("hosts: [reviews]", 'hosts: ["*"]'))
    (found,) = [d for d in loaded.diagnostics if d.code.startswith("virtual-service-")]
    assert (found.code, found.location.field) == ("virtual-service-refused", "spec.hosts[0]")
    routes = proxy_routes(process(loaded), f"{REVIEWS}:9080")
    assert [r["name"] for r in routes] == ["default"]


def test_a_subset_no_destination_rule_defines_is_reported(tmp_path: Path) -> None:
    loaded = load(tmp_path, SUBSETS, ALL_V1.replace("subset: v1", "subset: v9"))
    (found,) = [d for d in loaded.diagnostics if d.code.startswith("virtual-service-")]
    assert found.code == "virtual-service-unknown-subset"
    assert found.location.field == "spec.http[0].route[0].destination.subset"
    assert f"no DestinationRule for {REVIEWS} defines subset v9" in found.message
    # Still routed as written: Envoy answers 503 for the missing cluster, as in Istio.
    (route,) = proxy_routes(process(loaded), f"{REVIEWS}:9080")
    assert route["route"]["cluster"] == f"outbound|9080|v9|{REVIEWS}"
    assert route["route"]["cluster_not_found_response_code"] == "SERVICE_UNAVAILABLE"
    assert not [
        d
        for d in load(tmp_path, SUBSETS, ALL_V1).diagnostics
        if d.code == "virtual-service-unknown-subset"
    ]


JASON_V2 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {end-user: {exact: jason}}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v3}
      weight: 50
    - destination: {host: reviews, subset: v1}
      weight: 50
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookreviews, namespace: default}
spec:
  hosts: [bookreviews.example.com]
  http:
  - route:
    - destination: {host: reviews.default.svc.cluster.local, subset: v2}
"""


def _hcms(value: Any) -> list[dict[str, Any]]:
    """Every HTTP connection manager config in ``value``."""
    if isinstance(value, list):
        return [m for item in value for m in _hcms(item)]
    if not isinstance(value, dict):
        return []
    found = [value] if str(value.get("@type", "")).endswith("HttpConnectionManager") else []
    return found + [m for item in value.values() for m in _hcms(item)]


@pytest.mark.parametrize("layout", ["process", "captured"])
def test_a_virtual_service_change_changes_routes_never_a_listener(
    tmp_path: Path, layout: str
) -> None:
    """Envoy drains a changed listener and cuts its requests after the drain time: a
    route change must reach Envoy as RDS only (tests/routing/test_route_change_live.py
    shows the cut request)."""
    results = []
    for i, texts in enumerate([(SUBSETS,), (SUBSETS, ALL_V1), (SUBSETS, JASON_V2)]):
        (tmp_path / str(i)).mkdir()
        loaded = load(tmp_path / str(i), *texts)
        assert loaded.mesh is not None
        if layout == "process":
            resources = process(loaded)
        else:
            resources = translate(
                loaded.mesh,
                PRODUCTPAGE,
                inbound_address="127.0.0.50",
                capture=CaptureMode.TRANSPARENT,
                service_addresses={"default/reviews": "10.96.0.9"},
            )
        managers = _hcms(list(resources.listeners))
        assert managers and all("rds" in m and "route_config" not in m for m in managers)
        results.append(resources)
    first, *changed = results
    for resources in changed:
        assert resources.listeners == first.listeners
        assert resources.routes != first.routes


def test_an_envoy_filter_patches_the_proxys_rds_routes(tmp_path: Path) -> None:
    patch = """
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: decorate, namespace: default}
spec:
  workloadSelector:
    labels: {app: productpage}
  configPatches:
  - applyTo: HTTP_ROUTE
    match:
      context: SIDECAR_OUTBOUND
      routeConfiguration:
        name: http_proxy
        vhost:
          name: reviews.default.svc.cluster.local:9080
          route: {action: ANY}
    patch:
      operation: MERGE
      value: {decorator: {operation: patched}}
"""
    plain = process(load(tmp_path, SUBSETS, ALL_V1))
    patched = process(load(tmp_path, SUBSETS, ALL_V1, patch))
    (route,) = proxy_routes(patched, f"{REVIEWS}:9080")
    assert route["decorator"] == {"operation": "patched"}
    (untouched,) = proxy_routes(plain, f"{REVIEWS}:9080")
    assert "decorator" not in untouched
    assert patched.listeners == plain.listeners  # a route patch stays in the routes
