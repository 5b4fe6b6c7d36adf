"""`harden` keeps the calls the inputs imply working (issue 9, item 13).

Istio's bookinfo manifest, as shipped: the proposed allow-nothing would deny productpage →
details/reviews and reviews → ratings. harden lists that under the allow-nothing and adds
one ALLOW per called Service for exactly the callers' service accounts; the output, applied
with the inputs, is then decided again here, independently of harden's own proof.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from trustmesh.analyze.implied import implied_calls
from trustmesh.cli.main import app
from trustmesh.config import load_config
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import Verdict
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source

from .util import context_from

BOOKINFO = str(Path(__file__).parent / "fixtures" / "bookinfo.yaml")
TD = "cluster.local/ns/default/sa"


def harden(tmp_path: Path, *extra: str) -> tuple[str, str, list[dict[str, Any]]]:
    out = tmp_path / "hardened.yaml"
    args = ["harden", "-f", BOOKINFO, "--assume-injected", "-o", str(out), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    return text, result.stderr, [d for d in yaml.safe_load_all(text) if d]


def mesh_with(tmp_path: Path, hardened: str) -> MeshPolicy:
    path = tmp_path / "applied.yaml"
    path.write_text(hardened)
    loaded = load_config([BOOKINFO, str(path)], assume_injected=True)
    assert loaded.mesh is not None, [str(d) for d in loaded.errors]
    return loaded.mesh


def call(mesh: MeshPolicy, source: Source | str, to: str, host: str) -> Verdict:
    src = Source.workload(f"default/{source}") if isinstance(source, str) else source
    request = Request(src, f"default/{to}", 9080, HttpRequest("GET", "/", f"{host}:9080"))
    return evaluate(mesh, request, now=0.0).verdict


def test_bookinfo_calls_stay_allowed_and_others_are_denied(tmp_path: Path) -> None:
    text, stderr, documents = harden(tmp_path)
    by_name = {d["metadata"]["name"]: d for d in documents}
    assert by_name["allow-nothing"]["spec"] == {}
    for service, callers in (
        ("details", ["bookinfo-productpage"]),
        ("reviews", ["bookinfo-productpage"]),
        ("ratings", ["bookinfo-reviews"]),
    ):
        spec = by_name[f"allow-{service}-callers"]["spec"]
        assert spec["selector"] == {"matchLabels": {"app": service}}
        assert spec["rules"] == [
            {
                "from": [{"source": {"principals": [f"{TD}/{c}" for c in callers]}}],
                "to": [{"operation": {"ports": ["9080"]}}],
            }
        ]
    # Applied together with the inputs, decided independently of harden's own proof.
    mesh = mesh_with(tmp_path, text)
    for source, dest, host in (
        ("productpage-v1", "details-v1", "details"),
        ("productpage-v1", "reviews-v1", "reviews"),
        ("productpage-v1", "reviews-v3", "reviews"),
        ("reviews-v2", "ratings-v1", "ratings"),
        ("reviews-v3", "ratings-v1", "ratings"),
    ):
        assert call(mesh, source, dest, host) is Verdict.ALLOW, (source, dest)
    for source, dest, host in (
        ("productpage-v1", "ratings-v1", "ratings"),  # productpage never calls ratings
        ("details-v1", "reviews-v2", "reviews"),
        ("ratings-v1", "details-v1", "details"),
        ("reviews-v2", "details-v1", "details"),
    ):
        assert call(mesh, source, dest, host) is Verdict.DENY, (source, dest)
    assert call(mesh, Source.plaintext(), "details-v1", "details") is Verdict.RESET
    assert call(mesh, Source.principal(f"{TD}/intruder"), "ratings-v1", "ratings") is Verdict.DENY
    assert "the fixes would stop 6 of them" in stderr
    assert "3 ALLOW policy(ies) added" in stderr


def test_each_proposed_policy_says_what_it_denies_and_each_allow_its_proof(
    tmp_path: Path,
) -> None:
    text, _, _ = harden(tmp_path)
    chunk = next(c for c in text.split("---\n") if "name: allow-nothing" in c)
    assert "# denies 6 call(s) the inputs imply:" in chunk
    assert (
        "#   default/productpage-v1 → details:9080 → default/details-v1:9080 [Istio's bookinfo"
        " sample: productpage v1 calls details:9080" in chunk
    )
    assert "(kept by an ALLOW below)" in chunk
    assert "nothing reaches them under this policy" in chunk and "default/productpage-v1" in chunk
    ratings = next(c for c in text.split("---\n") if "name: allow-ratings-callers" in c)
    assert "#   allowed: default/reviews-v2 → ratings:9080" in ratings
    assert "#   denied: plaintext client → default/ratings-v1:9080 (reset" in ratings
    assert (
        "#   denied: cluster.local/ns/default/sa/bookinfo-details → default/ratings-v1" in ratings
    )


def test_list_mode_adds_no_allow_and_names_the_denied_calls(tmp_path: Path) -> None:
    text, stderr, documents = harden(tmp_path, "--list-implied-calls")
    assert not [d for d in documents if d["metadata"]["name"].endswith("-callers")]
    assert "not kept: only listed" in text
    assert "#   would stop default/reviews-v3 → ratings:9080" in stderr
    mesh = mesh_with(tmp_path, text)
    assert call(mesh, "productpage-v1", "details-v1", "details") is Verdict.DENY


def test_the_gateway_route_is_a_note_without_the_gateway_and_a_call_with_it(
    tmp_path: Path,
) -> None:
    routes = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo}
spec:
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  http:
  - route:
    - destination: {host: productpage, port: {number: 9080}}
"""
    gateway = """\
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  template:
    metadata:
      labels: {istio: ingressgateway}
    spec:
      serviceAccountName: istio-ingressgateway-service-account
      containers: [{name: istio-proxy, image: istio/proxyv2, ports: [{containerPort: 8080}]}]
"""
    (tmp_path / "routes.yaml").write_text(routes)
    _, stderr, _ = harden(tmp_path, "-f", str(tmp_path / "routes.yaml"))
    assert "no gateway workload in the inputs runs it" in stderr
    (tmp_path / "routes.yaml").write_text(routes + gateway)
    text, _, documents = harden(tmp_path, "-f", str(tmp_path / "routes.yaml"))
    product = next(d for d in documents if d["metadata"]["name"] == "allow-productpage-callers")
    principals = product["spec"]["rules"][0]["from"][0]["source"]["principals"]
    assert principals == ["cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]
    assert "VirtualService default/bookinfo routes Gateway default/bookinfo-gateway" in text


# --- inference, one source of evidence at a time ---------------------------------------

APPS = """\
---
apiVersion: v1
kind: Service
metadata: {name: %(name)s, namespace: foo}
spec:
  selector: {app: %(name)s}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 9090}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: %(name)s, namespace: foo}
spec:
  template:
    metadata:
      labels: {app: %(name)s}
    spec:
      containers:
      - name: app
        ports: [{containerPort: 8080}, {containerPort: 9090}]
"""


def client(env: str = "", args: str = "", image: str = "app") -> str:
    return f"""\
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: client, namespace: foo}}
spec:
  template:
    metadata:
      labels: {{app: client}}
    spec:
      containers:
      - name: main
        image: {image}
        env: [{env}]
        args: [{args}]
"""


def calls_of(text: str) -> set[tuple[str, str, int, int]]:
    ctx = context_from(APPS % {"name": "orders"} + APPS % {"name": "cart"} + text)
    found, _ = implied_calls(ctx)
    return {(c.source, c.service, c.service_port, c.port) for c in found}


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ('{name: ORDERS_URL, value: "http://orders:80/api"}', "", {("foo/orders", 80, 8080)}),
        (
            '{name: ORDERS, value: "orders"}',
            "",
            {("foo/orders", 80, 8080), ("foo/orders", 9090, 9090)},
        ),
        ('{name: ADDR, value: "cart.foo.svc.cluster.local:9090"}', "", {("foo/cart", 9090, 9090)}),
        ("", '"--upstream=grpc://cart.foo:9090"', {("foo/cart", 9090, 9090)}),
        ("", '"serve", "orders:80"', {("foo/orders", 80, 8080)}),
        ('{name: NOTE, value: "talks to orders sometimes"}', "", set()),  # a word, not a name
        ('{name: ORDERS, value: "orders:1234"}', "", set()),  # not a port of the Service
        ('{name: OTHER, value: "http://payments:80"}', "", set()),  # no such Service
    ],
)
def test_service_names_in_env_and_args(env: str, args: str, expected: set[Any]) -> None:
    found = calls_of(client(env, args))
    assert {(svc, port, target) for src, svc, port, target in found} == expected
    assert all(src == "foo/client" for src, *_ in found)


def test_a_workload_naming_its_own_service_calls_nothing() -> None:
    own = (APPS % {"name": "orders"}).replace(
        "      - name: app\n",
        '      - name: app\n        env: [{name: SELF, value: "orders:80"}]\n',
    )
    ctx = context_from(own)
    assert implied_calls(ctx) == ([], [])


@pytest.mark.parametrize(
    ("image", "env", "calls_ratings"),
    [
        ("examples-bookinfo-reviews-v1:1.20.3", "", False),
        ("examples-bookinfo-reviews-v2:1.20.3", "", True),
        ("examples-bookinfo-reviews-v1:1.20.3", '{name: ENABLE_RATINGS, value: "true"}', True),
        ("examples-bookinfo-reviews-v3:1.20.3", '{name: ENABLE_RATINGS, value: "false"}', False),
    ],
)
def test_bookinfo_reviews_calls_ratings_only_when_enabled(
    image: str, env: str, calls_ratings: bool
) -> None:
    ratings = (APPS % {"name": "ratings"}).replace("port: 80, targetPort: 8080", "port: 9080")
    ctx = context_from(ratings + client(env, "", image))
    found, _ = implied_calls(ctx)
    assert bool(found) is calls_ratings
    if found:
        assert "Istio's bookinfo sample: reviews" in found[0].evidence


def test_bookinfo_hostnames_follow_env_overrides() -> None:
    details = (APPS % {"name": "details-api"}).replace("port: 80, targetPort: 8080", "port: 9080")
    env = "{name: DETAILS_HOSTNAME, value: details-api}, {name: REVIEWS_HOSTNAME, value: none}"
    ctx = context_from(details + client(env, "", "examples-bookinfo-productpage-v1:1.20.3"))
    found, _ = implied_calls(ctx)
    assert {(c.service, c.service_port) for c in found} == {("foo/details-api", 9080)}


def test_strict_mtls_resets_a_caller_without_sidecar_and_says_so(tmp_path: Path) -> None:
    legacy = tmp_path / "reporter.yaml"
    legacy.write_text(
        client('{name: HTTPBIN_URL, value: "http://httpbin.foo:8000/get"}').replace(
            "namespace: foo", "namespace: legacy"
        )
    )
    mesh_dir = str(Path(__file__).resolve().parents[2] / "examples" / "mesh")
    result = CliRunner().invoke(app, ["harden", "-f", mesh_dir, "-f", str(legacy)])
    assert result.exit_code == 0, result.output
    chunk = next(c for c in result.stdout.split("---\n") if "kind: PeerAuthentication" in c)
    assert "# resets (the caller has no sidecar" in chunk
    assert "legacy/client → httpbin:8000 → foo/httpbin:8000" in chunk
    assert "NOT kept: reset" in chunk
    assert "not kept: legacy/client → httpbin:8000" in result.stderr
