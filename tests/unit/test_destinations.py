"""``authz check --to NS/NAME`` takes a Service: every workload it selects is decided."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.unit.meshutil import compile_text
from trustmesh.cli.main import app
from trustmesh.policy.decision import RequestError
from trustmesh.policy.targets import resolve_destination

BOOKINFO = """apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http-web}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: bookinfo}
spec:
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: orphan, namespace: bookinfo}
spec:
  selector: {app: nothing}
  ports: [{port: 80}]
"""
DEPLOYMENT = """---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: bookinfo}}
spec:
  template:
    metadata: {{labels: {{app: {app}, version: {version}}}}}
    spec:
      serviceAccountName: {app}
      containers: [{{name: c, ports: [{{containerPort: {port}, name: http-web}}]}}]
"""
WORKLOADS = (
    DEPLOYMENT.format(name="reviews-v1", app="reviews", version="v1", port=9080)
    + DEPLOYMENT.format(name="reviews-v2", app="reviews", version="v2", port=9080)
    + DEPLOYMENT.format(name="reviews-v3", app="reviews", version="v3", port=9080)
    + DEPLOYMENT.format(name="productpage-v1", app="productpage", version="v1", port=9080)
    + DEPLOYMENT.format(name="httpbin", app="httpbin", version="v1", port=8080)
)
DENY_V1 = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-v1, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews, version: v1}}
  action: DENY
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""


def check(tmp_path: Path, config: str, *args: str) -> tuple[int, str]:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    result = CliRunner().invoke(app, ["authz", "check", "-f", str(path), *args])
    return result.exit_code, result.output


def test_a_service_is_decided_at_every_workload_it_selects(tmp_path: Path) -> None:
    args = ("--to", "bookinfo/reviews", "--from", "bookinfo/productpage-v1")
    code, out = check(tmp_path, BOOKINFO + WORKLOADS + DENY_V1, *args)
    assert code == 3, out  # not allowed everywhere: a request may land on v1
    assert "Service bookinfo/reviews port 9080 selects 3 workload(s)" in out
    assert "bookinfo/reviews-v1, bookinfo/reviews-v2, bookinfo/reviews-v3" in out
    assert "answer differently" in out
    code, out = check(tmp_path, BOOKINFO + WORKLOADS + DENY_V1, *args, "-o", "json")
    body = json.loads(out)
    assert body["service"] == "bookinfo/reviews"
    assert body["verdict"] == "mixed"
    verdicts = {w["workload"]: (w["verdict"], w["port"], w["rule"]) for w in body["workloads"]}
    assert verdicts == {
        "bookinfo/reviews-v1": ("deny", 9080, "ns[bookinfo]-policy[deny-v1]-rule[0]"),
        "bookinfo/reviews-v2": ("allow", 9080, None),
        "bookinfo/reviews-v3": ("allow", 9080, None),
    }
    code, out = check(tmp_path, BOOKINFO + WORKLOADS, *args)
    assert code == 0, out


def test_the_service_port_is_translated_to_the_target_port(tmp_path: Path) -> None:
    """Istio's httpbin sample: Service port 8000 → container 8080; `ports` match 8080."""
    only_8080 = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-8080, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{to: [{operation: {ports: ["8080"], hosts: ["httpbin.bookinfo:8000"]}}]}]
"""
    config = BOOKINFO + WORKLOADS + only_8080
    base = ("--to", "bookinfo/httpbin", "--from", "bookinfo/productpage-v1")
    for port in ("8000", "8080"):  # the Service port, or the workload's own
        code, out = check(tmp_path, config, *base, "--port", port, "-o", "json")
        assert code == 0, out
        body = json.loads(out)
        assert body["verdict"] == "allow"
        assert "service" not in body  # a workload of that name: the single-answer shape
        assert any("destination bookinfo/httpbin port 8080" in t for t in body["trace"])
    via_service = config.replace("name: httpbin, namespace", "name: web, namespace", 1)
    args = ("--to", "bookinfo/web", "--from", "bookinfo/productpage-v1", "--port", "8000")
    code, out = check(tmp_path, via_service, *args, "-o", "json")
    assert code == 3, out  # the Host is web.bookinfo:8000, which the policy does not allow
    [answer] = json.loads(out)["workloads"]
    assert (answer["workload"], answer["port"]) == ("bookinfo/httpbin", 8080)
    assert "no match: to[0].hosts" in " ".join(answer["trace"])


def test_a_named_service_resolves_workloads_and_ports() -> None:
    mesh = compile_text(BOOKINFO + WORKLOADS, base=False)
    found = resolve_destination(mesh.snapshot, "bookinfo/httpbin", None)
    assert found.is_service is False  # a workload of that name wins, as before
    found = resolve_destination(mesh.snapshot, "bookinfo/reviews", None)
    assert [(t.workload.name, t.port, t.host) for t in found.targets] == [
        ("reviews-v1", 9080, "reviews.bookinfo:9080"),
        ("reviews-v2", 9080, "reviews.bookinfo:9080"),
        ("reviews-v3", 9080, "reviews.bookinfo:9080"),
    ]


@pytest.mark.parametrize(
    ("ref", "port", "message"),
    [
        (
            "bookinfo/reveiws",
            None,
            "no workload or Service bookinfo/reveiws; in bookinfo, closest first: "
            "bookinfo/reviews (Service), bookinfo/reviews-v1 (workload)",
        ),
        ("bookinfo/orphan", None, "Service bookinfo/orphan selects no workload"),
        ("bookinfo/reviews", 80, "has no port 80; it serves ports 9080 (→ http-web)"),
        ("bokinfo/reviews", None, "namespace bokinfo has none; namespaces with some: bookinfo"),
        ("reviews", None, "--to takes NAMESPACE/NAME"),
    ],
)
def test_misses_list_candidates_closest_first(ref: str, port: int | None, message: str) -> None:
    mesh = compile_text(BOOKINFO + WORKLOADS, base=False)
    with pytest.raises(RequestError) as caught:
        resolve_destination(mesh.snapshot, ref, port)
    assert message in str(caught.value)


def test_a_miss_is_a_usage_error_exit_2(tmp_path: Path) -> None:
    code, out = check(tmp_path, BOOKINFO + WORKLOADS, "--to", "bookinfo/review", "--plaintext")
    assert code == 2
    assert "closest first: bookinfo/reviews (Service)" in out


def test_running_pods_stand_for_their_deployment(tmp_path: Path) -> None:
    pod = """---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-6f9c-abcde
  namespace: bookinfo
  labels: {app: reviews, version: v1, pod-template-hash: 6f9c}
spec:
  serviceAccountName: reviews
  containers: [{name: c, ports: [{containerPort: 9080, name: http-web}]}]
"""
    mesh = compile_text(BOOKINFO + WORKLOADS + pod, base=False)
    found = resolve_destination(mesh.snapshot, "bookinfo/reviews", 9080)
    assert [t.workload.name for t in found.targets] == [
        "reviews-v2",
        "reviews-v3",
        "reviews-v1-6f9c-abcde",
    ]
