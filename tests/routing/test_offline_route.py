"""``authz check --from W --to NS/SERVICE`` follows the client's VirtualService route: it
names the route and decides only at the workloads the route reaches (pure, no Envoy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.routing.test_sidecar_routes import load
from trustmesh.cli.main import app
from trustmesh.policy.request import HttpRequest
from trustmesh.policy.routing import RouteKind, sidecar_route

ROUTES = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
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
  - match:
    - uri: {prefix: /old}
    redirect: {uri: /new}
  - match:
    - uri: {regex: "/ratings/[0-9]+"}
      method: {exact: GET}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 80
    - destination: {host: reviews, subset: v3}
      weight: 20
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-v2-only-jason, namespace: default}
spec:
  selector: {matchLabels: {version: v2}}
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
"""


def check(tmp_path: Path, *args: str) -> tuple[int, Any]:
    load(tmp_path, ROUTES)  # writes the files
    result = CliRunner().invoke(
        app,
        [
            *("authz", "check", "-f", str(tmp_path), "--to", "default/reviews"),
            *("--port", "9080", "-o", "json", *args),
        ],
    )
    return result.exit_code, json.loads(result.stdout)


def reached(answer: Any) -> list[str]:
    return [w["workload"] for w in answer["workloads"]]


def test_a_header_match_decides_at_v2_only(tmp_path: Path) -> None:
    code, answer = check(tmp_path, "--from", "default/sleep", "--header", "end-user=jason")
    assert reached(answer) == ["default/reviews-v2"]
    line = (tmp_path / "routes.yaml").read_text().splitlines().index("  - match:") + 1
    assert answer["route"]["location"] == f"{tmp_path / 'routes.yaml'}:{line} spec.http[0]"
    assert (code, answer["verdict"]) == (3, "deny")  # v2's DENY for sleep decides alone
    code, answer = check(tmp_path, "--from", "default/productpage-v1", "--header", "end-user=jason")
    assert (code, answer["verdict"], reached(answer)) == (0, "allow", ["default/reviews-v2"])


def test_a_weighted_route_decides_at_each_subset_it_reaches(tmp_path: Path) -> None:
    code, answer = check(tmp_path, "--from", "default/sleep", "--path", "/ratings/7")
    assert code == 0
    assert reached(answer) == ["default/reviews-v1", "default/reviews-v3"]  # never v2
    assert [(d["subset"], d["weight"]) for d in answer["route"]["destinations"]] == [
        ("v1", 80),
        ("v3", 20),
    ]


@pytest.mark.parametrize(
    ("args", "kind", "status"),
    [
        (("--path", "/old/x"), "redirect", 301),
        (("--path", "/ratings/x"), "no_route", 404),  # the regex matches the whole path
        (("--path", "/ratings/7", "--method", "POST"), "no_route", 404),
    ],
)
def test_the_client_sidecar_answers_and_no_workload_is_reached(
    tmp_path: Path, args: tuple[str, ...], kind: str, status: int
) -> None:
    code, answer = check(tmp_path, "--from", "default/sleep", *args)
    assert (code, answer["verdict"], answer["workloads"]) == (3, "not_reached", [])
    assert (answer["route"]["kind"], answer["route"]["status"]) == (kind, status)


def test_without_a_client_workload_every_endpoint_is_asked(tmp_path: Path) -> None:
    _, answer = check(tmp_path, "--principal", "cluster.local/ns/default/sa/sleep")
    assert "route" not in answer
    assert reached(answer) == ["default/reviews-v1", "default/reviews-v2", "default/reviews-v3"]


def test_source_labels_pick_the_route_for_the_client(tmp_path: Path) -> None:
    text = ROUTES.replace(
        "    - headers: {end-user: {exact: jason}}\n",
        "    - sourceLabels: {app: productpage}\n",
    )
    loaded = load(tmp_path, text)
    assert loaded.mesh is not None
    snapshot = loaded.mesh.snapshot
    reviews = next(s for s in snapshot.services if s.name == "reviews")
    productpage, sleep = (snapshot.workload(r) for r in ("default/productpage-v1", "default/sleep"))
    assert productpage is not None and sleep is not None
    chosen = sidecar_route(loaded.mesh, productpage, reviews.hostname, 9080, HttpRequest("GET"))
    assert chosen is not None and chosen.kind is RouteKind.FORWARD
    assert [w.ref for w in chosen.workloads] == ["default/reviews-v2"]
    other = sidecar_route(loaded.mesh, sleep, reviews.hostname, 9080, HttpRequest("GET"))
    assert other is not None and other.kind is RouteKind.NO_ROUTE


SUBSET_SNI_POLICY = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-by-subset-sni, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - when:
    - key: connection.sni
      values: ["outbound_.9080_.v2_.reviews.default.svc.cluster.local"]
"""


def test_connection_sni_is_the_subset_clusters_sni(tmp_path: Path) -> None:
    """Routed to subset v2, the client sends v2's SNI (``outbound_.9080_.v2_.…``), as the
    live sidecar's subset cluster does; without a route, the service's (``_``)."""
    load(tmp_path, ROUTES + SUBSET_SNI_POLICY)
    args = ("--to", "default/reviews", "--port", "9080", "-o", "json")
    runner = CliRunner()

    def ask(*more: str) -> Any:
        result = runner.invoke(app, ["authz", "check", "-f", str(tmp_path), *args, *more])
        return result.exit_code, json.loads(result.stdout)

    code, answer = ask("--from", "default/productpage-v1", "--header", "end-user=jason")
    assert (code, answer["verdict"], reached(answer)) == (0, "allow", ["default/reviews-v2"])
    code, answer = ask("--from", "default/productpage-v1", "--path", "/ratings/7")
    assert (code, answer["verdict"]) == (3, "deny")  # v1 / v3: their own subset's SNI
    code, answer = ask("--principal", "cluster.local/ns/default/sa/productpage")
    assert (code, answer["verdict"]) == (3, "deny")  # no route: outbound_.9080_._.…


EGRESS = """
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: istio-egressgateway-service-account, namespace: istio-system}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  template:
    metadata:
      annotations: {inject.istio.io/templates: gateway}
      labels: {istio: egressgateway, sidecar.istio.io/inject: "true"}
    spec:
      serviceAccountName: istio-egressgateway-service-account
      containers:
      - {name: istio-proxy, image: auto, ports: [{containerPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  ports:
  - {name: http2, port: 80, targetPort: 8080}
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
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-politics, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  action: DENY
  rules:
  - to:
    - operation: {hosts: [edition.cnn.com], paths: [/politics]}
"""


@pytest.mark.parametrize(("path", "code", "verdict"), [("/", 0, "allow"), ("/politics", 3, "deny")])
def test_an_egress_host_routed_to_the_egress_gateway_is_decided_there(
    tmp_path: Path, path: str, code: int, verdict: str
) -> None:
    load(tmp_path, EGRESS)
    result = CliRunner().invoke(
        app,
        [
            *("authz", "check", "-f", str(tmp_path), "--from", "default/sleep"),
            *("--to-host", "edition.cnn.com", "--port", "80", "--path", path, "-o", "json"),
        ],
    )
    answer = json.loads(result.stdout)
    assert (result.exit_code, answer["verdict"]) == (code, verdict), answer
    assert reached(answer) == ["istio-system/istio-egressgateway"]
    (routed,) = answer["route"]["destinations"]
    assert (routed["host"], routed["subset"]) == (
        "istio-egressgateway.istio-system.svc.cluster.local",
        "cnn",
    )
