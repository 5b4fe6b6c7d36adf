"""`trustmesh test --live` sends each case as the workload would, and agrees with the
offline verdict: the case's Host, HEAD, a Service port that differs from the container
port (Istio's httpbin: 8000 → 8080), one workload of a Service with several (bookinfo's
reviews v1/v2/v3), a port nothing listens on, a CUSTOM provider that is not configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.mesh import trustmesh, up_in_a_free_block

pytestmark = pytest.mark.envoy


def _deployment(name: str, labels: str, port: int | None, sample: str = "httpbin") -> str:
    ports = f"\n        ports: [{{containerPort: {port}}}]" if port else ""
    namespace = "outside" if name == "outside-sleep" else "shop"
    return f"""---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  template:
    metadata: {{labels: {{{labels}}}}}
    spec:
      containers:
      - name: app
        command: [trustmesh, sample, {sample}]{ports}
"""


MESH = (
    """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: outside}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: shop}
spec:
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
"""
    + _deployment("httpbin", "app: httpbin", 8080)
    + "".join(_deployment(f"reviews-v{n}", f"app: reviews, version: v{n}", 9080) for n in (1, 2, 3))
    + _deployment("sleep", "app: sleep", None, "sleep")
    + _deployment("outside-sleep", "app: sleep", None, "sleep")
)

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: host-fqdn, namespace: shop}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules: [{to: [{operation: {hosts: ["httpbin.shop.svc.cluster.local:8000", internal.shop]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: CUSTOM
  provider: {name: not-configured}
  rules: [{to: [{operation: {paths: [/ext]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: v2-denies-get, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews, version: v2}}
  action: DENY
  rules: [{to: [{operation: {paths: [/get]}}]}]
"""

HOST_RULE = "ns[shop]-policy[host-fqdn]-rule[0]"
BAD_CUSTOM = (
    "istio-ext-authz-not-configured-ns[shop]-policy[ext]-rule[0]-deny-due-to-bad-CUSTOM-action"
)


def _case(
    name: str, source: str, to: str, port: int, expect: str | dict[str, object], **req: object
) -> dict[str, object]:
    request = {"method": "GET", "path": "/get", **req}
    return {
        "name": name,
        "from": {"workload": source},
        "to": {"workload": to, "port": port},
        "request": request,
        "expect": expect,
    }


CASES = [
    # the container port (8080) reached through the Service port (8000) with mTLS
    _case("httpbin by its target port", "shop/sleep", "shop/httpbin", 8080, "allow"),
    _case(
        "HEAD",
        "shop/sleep",
        "shop/httpbin",
        8080,
        {"verdict": "allow", "status": 200},
        method="HEAD",
    ),
    _case(
        "the Host is sent",
        "shop/sleep",
        "shop/httpbin",
        8080,
        {"verdict": "deny", "rule": HOST_RULE},
        host="httpbin.shop.svc.cluster.local:8000",
    ),
    _case(
        "a Host no service has: passed through in plaintext",
        "shop/sleep",
        "shop/httpbin",
        8080,
        {"verdict": "deny", "rule": HOST_RULE},
        host="internal.shop",
    ),
    _case(
        "the Host from a pod without a sidecar",
        "outside/outside-sleep",
        "shop/httpbin",
        8080,
        {"verdict": "deny", "rule": HOST_RULE},
        host="internal.shop",
    ),
    _case(
        "CUSTOM provider not configured",
        "shop/sleep",
        "shop/httpbin",
        8080,
        {"verdict": "deny", "status": 403, "rule": BAD_CUSTOM},
        path="/ext",
    ),
    _case("nothing listens on 9999", "shop/sleep", "shop/httpbin", 9999, "reset"),
    *(
        _case(f"reviews-v{n}", "shop/sleep", f"shop/reviews-v{n}", 9080, verdict)
        for n, verdict in (
            (1, "allow"),
            (2, {"verdict": "deny", "rule": "ns[shop]-policy[v2-denies-get]-rule[0]"}),
            (3, "allow"),
        )
    ),
    _case(
        "reviews-v2 from a pod without a sidecar",
        "outside/outside-sleep",
        "shop/reviews-v2",
        9080,
        {"verdict": "deny", "rule": "ns[shop]-policy[v2-denies-get]-rule[0]"},
    ),
]


def test_live_cases_reach_what_they_name_and_agree_with_offline(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(MESH)
    (config / "policies.yaml").write_text(POLICIES)
    # the same case several times: reviews has three endpoints, each must be the named one
    cases = CASES + [
        dict(c, name=f"{c['name']} again") for c in CASES if "reviews" in str(c["name"])
    ]
    suite = {
        "apiVersion": "trustmesh.dev/v1alpha1",
        "kind": "PolicyTest",
        "metadata": {"name": "fidelity"},
        "spec": {"cases": cases},
    }
    tests = tmp_path / "test.yaml"
    tests.write_text(json.dumps(suite))
    state = tmp_path / "state"
    started = up_in_a_free_block(config, state=state, base="127.57.0.0", timeout=180)
    try:
        assert started.returncode == 0, started.stderr
        offline = trustmesh("test", "-f", str(config), str(tests), "-o", "json", state=state)
        assert offline.returncode == 0, offline.stdout + offline.stderr
        result = trustmesh(
            "test", "--live", "-f", str(config), str(tests), "-o", "json", state=state, timeout=180
        )
        body = json.loads(result.stdout)
        report = "\n".join(
            f"{c['case']}: {c['failures']} {c['mismatches']} {c['notRun']} {c['detail']}"
            for c in body["cases"]
            if not c["passed"]
        )
        assert result.returncode == 0 and body["failed"] == 0 and body["notRun"] == 0, report
        live = {c["case"]: c["live"] for c in body["cases"]}
        assert live["the Host is sent"]["rule"] == HOST_RULE
        assert live["CUSTOM provider not configured"]["rule"] == BAD_CUSTOM
        assert live["HEAD"]["status"] == 200
        assert live["reviews-v2"]["rule"] == "ns[shop]-policy[v2-denies-get]-rule[0]"
        assert live["nothing listens on 9999"]["verdict"] == "reset"
    finally:
        assert trustmesh("down", state=state).returncode == 0
