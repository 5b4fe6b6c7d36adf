"""The analyzer on ambient workloads: ztunnel enforces their selector policies (no
"enforces nothing"), and what it silently drops or widens is reported (TM-AMBIENT-001)."""

from __future__ import annotations

from trustmesh.analyze.findings import Severity

from .util import findings

WORKLOADS = """apiVersion: v1
kind: Namespace
metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin, namespace: amb}
spec:
  template:
    metadata: {labels: {app: httpbin}}
    spec:
      serviceAccountName: httpbin
      containers: [{name: httpbin, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: amb}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: 8080}]}
---
"""


def policy(name: str, body: str) -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: amb}}\nspec:\n"
        "  selector: {matchLabels: {app: httpbin}}\n" + body + "---\n"
    )


ALLOW_L4 = policy(
    "allow-curl",
    "  rules:\n  - from: [{source: {principals: [cluster.local/ns/amb/sa/curl]}}]\n",
)
DENY_POST = policy(
    "deny-post", "  action: DENY\n  rules:\n  - to: [{operation: {methods: [POST]}}]\n"
)
ALLOW_GET = policy(
    "allow-get",
    "  rules:\n  - from: [{source: {namespaces: [amb]}}]\n"
    "    to: [{operation: {methods: [GET], paths: [/get]}}]\n",
)
DENY_PORT = policy(
    "deny-admin-port",
    "  action: DENY\n  rules:\n  - to: [{operation: {ports: ['8080'], paths: [/admin]}}]\n",
)


def test_policies_ztunnel_enforces_are_not_reported_as_enforcing_nothing() -> None:
    text = WORKLOADS + ALLOW_L4 + DENY_POST
    assert findings(text, "TM-AUTHZ-008", base=False) == []
    custom = policy("ext", "  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]\n")
    (f,) = findings(
        WORKLOADS + custom, "TM-AUTHZ-008", base=False, mesh="extensionProviders: [{name: opa}]\n"
    )
    assert "ztunnel" in f.issue.message and "CUSTOM" in f.issue.message


def test_a_deny_left_with_only_http_attributes_protects_nothing() -> None:
    (f,) = findings(WORKLOADS + DENY_POST, "TM-AMBIENT-001", base=False)
    assert f.severity is Severity.ERROR
    assert "can never match at ztunnel" in f.issue.message
    assert f.issue.workloads == ("amb/httpbin",)
    assert f.issue.location is not None
    assert f.issue.location.field == "spec.rules[0].to[0].operation.methods"


def test_allow_rules_dropped_and_denies_widened_are_reported() -> None:
    (allow,) = findings(WORKLOADS + ALLOW_GET, "TM-AMBIENT-001", base=False)
    assert allow.severity is Severity.WARNING and "rules[0] (methods, paths)" in allow.issue.message
    (deny,) = findings(WORKLOADS + DENY_PORT, "TM-AMBIENT-001", base=False)
    assert "denies more than written" in deny.issue.message
    assert findings(WORKLOADS + ALLOW_L4, "TM-AMBIENT-001", base=False) == []


def test_request_authentication_is_not_enforced_by_ztunnel() -> None:
    jwt = """apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: amb}
spec:
  selector: {matchLabels: {app: httpbin}}
  jwtRules: [{issuer: https://issuer.example, jwksUri: https://issuer.example/jwks}]
"""
    (f,) = findings(WORKLOADS + jwt, "TM-AMBIENT-001", base=False)
    assert "does not validate JWTs" in f.issue.message


def test_a_waypoint_takes_the_policy_out_of_ztunnels_hands() -> None:
    with_waypoint = WORKLOADS.replace(
        "labels: {istio.io/dataplane-mode: ambient}",
        "labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}",
    )
    assert findings(with_waypoint + DENY_POST, "TM-AMBIENT-001", base=False) == []


def test_ambient_workloads_count_for_default_deny_and_mtls() -> None:
    (deny,) = findings(WORKLOADS, "TM-AUTHZ-001", base=False)
    assert deny.issue.workloads == ("amb/httpbin",)
    (mtls,) = findings(WORKLOADS, "TM-MTLS-001", base=False)
    assert "amb/httpbin:8080" in mtls.issue.message
    strict = """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: no-mtls, namespace: amb}
spec: {mtls: {mode: DISABLE}}
"""
    (downgrade,) = findings(WORKLOADS + strict, "TM-MTLS-002", base=False)
    # ztunnel has no DISABLE: plaintext is accepted, mTLS is not refused.
    assert "plaintext is accepted" in downgrade.issue.message
    assert "mTLS refused" not in downgrade.issue.message


def test_a_gateway_opting_out_of_the_sidecar_is_not_an_injection_opt_out() -> None:
    gateway = """apiVersion: v1
kind: Namespace
metadata: {name: ingress, labels: {istio-injection: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: istio-ingressgateway, namespace: ingress}
spec:
  template:
    metadata:
      labels: {istio: ingressgateway}
      annotations: {sidecar.istio.io/inject: "false"}
    spec:
      containers: [{name: istio-proxy, args: [proxy, router], ports: [{containerPort: 8080}]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app, namespace: ingress}
spec:
  template:
    metadata: {labels: {app: app}, annotations: {sidecar.istio.io/inject: "false"}}
    spec: {containers: [{name: app, ports: [{containerPort: 8080}]}]}
"""
    (f,) = findings(gateway, "TM-INST-010", base=False)
    assert f.issue.workloads == ("ingress/app",)
