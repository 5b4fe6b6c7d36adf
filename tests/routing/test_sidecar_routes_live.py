"""VirtualService routes at the client's sidecar, through real Envoys (issue 12).

Istio's bookinfo routing tasks on a bookinfo-like mesh (``workloads.yaml``: reviews v1,
v2, v3 each answer with their version): ``virtual-service-all-v1`` sends everything to v1,
the ``end-user: jason`` match sends exactly those requests to v2, a 50/50 weighted split,
a route timeout, a redirect — and the subset endpoint is still reached over mTLS with the
client's identity, so reviews' AuthorizationPolicy by principal still decides. One mesh for
the module.
"""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import Iterator

import pytest

from tests.e2e.mesh import trustmesh
from tests.routing.rig import RoutingMesh, routing_mesh

pytestmark = pytest.mark.envoy

REVIEWS = "http://reviews:9080/hello"
_VERSION = re.compile(r"Hello version: (v[0-9]+)")

DESTINATION_RULE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
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
    - destination: {host: reviews, subset: v1}
"""

FIFTY_FIFTY = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v3}
      weight: 50
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoutingMesh]:
    with routing_mesh(tmp_path_factory.mktemp("routing"), base="127.140.0.0") as running:
        yield running


def versions(mesh: RoutingMesh, n: int, **kwargs: object) -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        reply = mesh.get(REVIEWS, **kwargs)  # type: ignore[arg-type]
        assert reply.status == 200, reply
        match = _VERSION.search(reply.body)
        assert match is not None, reply.body
        found[match.group(1)] += 1
    return found


def test_without_a_virtual_service_every_version_answers(mesh: RoutingMesh) -> None:
    mesh.apply(DESTINATION_RULE)
    assert set(versions(mesh, 60)) == {"v1", "v2", "v3"}


def test_virtual_service_all_v1_sends_everything_to_v1(mesh: RoutingMesh) -> None:
    mesh.apply(DESTINATION_RULE + "---\n" + ALL_V1)
    assert versions(mesh, 60) == {"v1": 60}
    # Another client's sidecar follows the same VirtualService.
    assert versions(mesh, 10, client="default/sleep") == {"v1": 10}


def test_a_header_match_sends_exactly_those_requests_to_v2(mesh: RoutingMesh) -> None:
    mesh.apply(DESTINATION_RULE + "---\n" + JASON_V2)
    assert versions(mesh, 30, headers={"end-user": "jason"}) == {"v2": 30}
    assert versions(mesh, 30, headers={"end-user": "someone"}) == {"v1": 30}
    assert versions(mesh, 30) == {"v1": 30}


def test_a_weighted_split_sends_about_half_to_each(mesh: RoutingMesh) -> None:
    mesh.apply(DESTINATION_RULE + "---\n" + FIFTY_FIFTY)
    found = versions(mesh, 200)
    assert set(found) == {"v1", "v3"}
    # Binomial(200, 0.5): 100 ± 3.9 standard deviations is 61..139 (p ≈ 1e-4 outside).
    assert 61 <= found["v1"] <= 139, found


def test_a_route_timeout_ends_a_request_the_service_never_answers(mesh: RoutingMesh) -> None:
    mesh.apply(
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: slow, namespace: default}
spec:
  hosts: [slow.default.svc.cluster.local]
  http:
  - timeout: 0.5s
    route:
    - destination: {host: slow}
"""
    )
    started = time.monotonic()
    reply = mesh.get("http://slow:8000/", timeout=20)
    elapsed = time.monotonic() - started
    assert reply.status == 504, reply
    assert reply.body == "upstream request timeout"
    assert 0.4 <= elapsed < 5, elapsed


def test_a_redirect_is_answered_by_the_client_sidecar(mesh: RoutingMesh) -> None:
    mesh.apply(
        DESTINATION_RULE
        + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match:
    - uri: {prefix: /old}
    redirect: {uri: /hello, redirectCode: 302}
  - route:
    - destination: {host: reviews, subset: v2}
"""
    )
    moved = mesh.get("http://reviews:9080/old/page")
    assert moved.status == 302
    assert moved.headers["location"] == "http://reviews:9080/hello"
    assert versions(mesh, 5) == {"v2": 5}
    assert mesh.get("http://reviews:9080/old").headers.get("server") == "envoy"


def test_a_host_only_the_virtual_service_declares_is_routed(mesh: RoutingMesh) -> None:
    mesh.apply(
        DESTINATION_RULE
        + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookreviews, namespace: default}
spec:
  hosts: [bookreviews.example.com]
  http:
  - route:
    - destination: {host: reviews.default.svc.cluster.local, subset: v3}
"""
    )
    for _ in range(5):
        reply = mesh.get("http://bookreviews.example.com/hello")
        assert (reply.status, _VERSION.findall(reply.body)) == (200, ["v3"])


def reviews_policy(principal: str) -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews-viewer, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{principals: ["{principal}"]}}
"""


def test_the_subset_endpoint_still_sees_the_clients_identity(mesh: RoutingMesh) -> None:
    productpage = "cluster.local/ns/default/sa/bookinfo-productpage"
    mesh.apply(DESTINATION_RULE + "---\n" + ALL_V1 + "---\n" + reviews_policy(productpage))
    assert versions(mesh, 10) == {"v1": 10}
    denied = mesh.get(REVIEWS, client="default/sleep")
    assert denied.status == 403  # reviews-v1's sidecar: sleep's principal is not allowed
    assert denied.body == "RBAC: access denied"


SUBSET_SNI_ONLY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-by-sni, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - when:
    - key: connection.sni
      values: ["outbound_.9080_.v1_.reviews.default.svc.cluster.local"]
"""


def test_a_subset_cluster_sends_the_subsets_sni_live_and_offline(mesh: RoutingMesh) -> None:
    """istiod's subset SNI ``outbound_.9080_.v1_.reviews…`` reaches reviews-v1's sidecar
    (its RBAC reads it as connection.sni), and ``authz check`` predicts the same verdicts."""
    mesh.apply(DESTINATION_RULE + "---\n" + JASON_V2 + "---\n" + SUBSET_SNI_ONLY)
    assert versions(mesh, 5) == {"v1": 5}  # subset v1's cluster: the allowed SNI
    denied = mesh.get(REVIEWS, headers={"end-user": "jason"})  # subset v2: its own SNI
    assert (denied.status, denied.body) == (403, "RBAC: access denied")
    config = ("-f", str(mesh.config_dir), "--mesh-config", str(mesh.root / "mesh.yaml"))
    for header, verdict in (("end-user=someone", "allow"), ("end-user=jason", "deny")):
        offline = trustmesh(
            *("authz", "check", *config),
            *("--from", "default/productpage-v1", "--to", "default/reviews", "--port", "9080"),
            *("--path", "/hello", "--header", header, "-o", "json"),
            state=mesh.state,
        )
        assert json.loads(offline.stdout)["verdict"] == verdict, offline.stdout


def test_status_names_what_the_sidecars_do_not_honour(mesh: RoutingMesh) -> None:
    faulty = ALL_V1.replace(
        "  - route:\n",
        "  - fault: {abort: {httpStatus: 500, percentage: {value: 100}}}\n    route:\n",
    )
    mesh.apply(DESTINATION_RULE + "---\n" + faulty)
    assert versions(mesh, 5) == {"v1": 5}  # the route applies; the fault is not injected
    shown = trustmesh("status", state=mesh.state)
    assert shown.returncode == 0, shown.stderr
    routes = mesh.config_dir / "routes.yaml"
    line = (
        routes.read_text()
        .splitlines()
        .index("  - fault: {abort: {httpStatus: 500, percentage: {value: 100}}}")
    )
    assert (
        f"{routes}:{line + 1} spec.http[0].fault: warning[virtual-service-not-honoured]"
        in shown.stdout
    ), shown.stdout
