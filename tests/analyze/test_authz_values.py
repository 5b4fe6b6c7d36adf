"""Values that can never match (TM-AUTHZ-013) and `*` in the middle of a value (TM-AUTHZ-009).

Each finding's severity follows what the dead value costs: a DENY that misses what it was
written for is a hole, an ALLOW that admits nothing fails closed, and for the negative
forms (notPaths…) it is the other way round. The evaluator confirms the claims.
"""

from __future__ import annotations

import pytest

from trustmesh.analyze.findings import Finding, Severity
from trustmesh.policy.decision import Verdict

from ..unit.meshutil import http
from .test_authz import line_of, only, policy, where
from .util import context_from, findings


def operation(body: str) -> str:
    return f"  - to:\n    - operation:\n        {body}\n"


def deny(body: str, **kwargs: str) -> str:
    return policy("deny-it", operation(body), action="DENY", selector="app: httpbin", **kwargs)


def allow(body: str, **kwargs: str) -> str:
    return policy("allow-it", operation(body), selector="app: httpbin", **kwargs)


def never(text: str, **kwargs: object) -> list[Finding]:
    return findings(text, "TM-AUTHZ-013", **kwargs)


# --- methods --------------------------------------------------------------------------


def test_lower_case_method_in_deny_is_a_hole_proven_by_the_evaluator() -> None:
    text = deny('methods: ["delete"]')
    f = only(never(text))
    assert f.severity is Severity.ERROR
    assert (where(f).line, where(f).field) == (
        line_of(text, "delete"),
        "spec.rules[0].to[0].operation.methods[0]",
    )
    assert "this DENY rule never denies anything" in f.issue.message
    assert "a hole" in f.issue.message
    assert f.issue.fix == 'Probably meant "DELETE".'
    mesh = context_from(text).mesh
    assert http(mesh, method="DELETE").verdict is Verdict.ALLOW
    assert http(mesh, method="delete").verdict is Verdict.BAD_REQUEST


def test_lower_case_method_next_to_a_good_one_is_a_partial_hole() -> None:
    f = only(never(deny('methods: ["POST", "delete"]')))
    assert f.severity is Severity.WARNING
    assert "does not catch the requests this value was meant to" in f.issue.message


def test_lower_case_method_in_allow_fails_closed() -> None:
    f = only(never(allow('methods: ["get"]')))
    assert f.severity is Severity.INFO
    assert "this ALLOW rule never allows anything" in f.issue.message
    assert "fails closed" in f.issue.message


def test_excluded_lower_case_method_in_allow_is_a_hole_and_in_deny_fails_closed() -> None:
    hole = only(never(allow('notMethods: ["delete"]')))
    assert hole.severity is Severity.WARNING
    assert "the ALLOW admits what it was meant to keep out" in hole.issue.message
    closed = only(never(deny('notMethods: ["delete"]')))
    assert closed.severity is Severity.INFO
    assert "the DENY denies more than meant" in closed.issue.message


def test_grpc_method_name_belongs_in_paths() -> None:
    f = only(never(deny('methods: ["/pkg.Orders/Delete"]')))
    assert "gRPC calls are always POST" in f.issue.message
    assert 'paths: ["/pkg.Orders/Delete"]' in f.issue.fix


def test_upper_case_extension_and_wildcard_methods_are_quiet() -> None:
    assert never(deny('methods: ["DELETE", "PATCH", "PURGE", "FOO", "*"]')) == []


def test_dry_run_policy_is_reported_as_info() -> None:
    text = deny('methods: ["delete"]', annotations='"istio.io/dry-run": "true"')
    f = only(never(text))
    assert f.severity is Severity.INFO and "dry-run" in f.issue.message


# --- paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason", "meant"),
    [
        ("admin", "request paths always start with `/`", '"/admin"'),
        ("admin/*", "request paths always start with `/`", '"/admin/*"'),
        ("/ops/../secret", "normalizes it to /secret", '"/secret"'),
        ("/a/./b", "normalizes it to /a/b", '"/a/b"'),
        ("/search?q=x", "without the query string", '"/search"'),
        ("/%61dmin", "normalizes it to /admin", '"/admin"'),
        ("{*}/x", "request paths always start with `/`", '"/{*}/x"'),
    ],
)
def test_paths_no_normalized_request_carries(value: str, reason: str, meant: str) -> None:
    f = only(never(deny(f'paths: ["{value}"]')))
    assert reason in f.issue.message, f.issue.message
    assert f.issue.fix == f"Probably meant {meant}."
    assert f.severity is Severity.ERROR


def test_path_forms_depend_on_the_mesh_normalization() -> None:
    merge = "pathNormalization:\n  normalization: MERGE_SLASHES\n"
    none = "pathNormalization:\n  normalization: NONE\n"
    assert (
        "normalizes it to /a/b" in only(never(deny('paths: ["/a//b"]'), mesh=merge)).issue.message
    )
    assert never(deny('paths: ["/a//b"]')) == []  # BASE keeps `//`
    assert never(deny('paths: ["/a/../b"]'), mesh=none) == []  # NONE keeps dot segments


def test_good_paths_are_quiet() -> None:
    values = '"/admin", "/admin/*", "*.php", "*", "/api/{*}/items", "/a%2Fb", "/"'
    assert never(deny(f"paths: [{values}]")) == []


# --- ports ----------------------------------------------------------------------------

WEB = """\
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: bar}
spec:
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        ports:
        - {containerPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: bar}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
"""


def test_service_port_instead_of_target_port() -> None:
    text = WEB + policy(
        "deny-80", operation('ports: ["80"]'), action="DENY", namespace="bar", selector="app: web"
    )
    f = only(never(text))
    assert "no workload it applies to listens on 80" in f.issue.message
    assert "Service port 80 leads to 8080" in f.issue.message
    assert f.issue.fix == 'Probably meant "8080".'
    # Judged from declared ports, which may not be all the app listens on: never ERROR.
    assert f.severity is Severity.WARNING
    mesh = context_from(text).mesh
    assert http(mesh, src="bar/sleep", dst="bar/web", port=8080).verdict is Verdict.ALLOW


def test_port_not_exposed_and_declared_ports_are_judged_per_target() -> None:
    f = only(never(deny('ports: ["9999", "8000"]')))
    assert "9999" in f.issue.message and "expose 8000" in f.issue.message
    # A namespace-wide policy: some workload there exposes each port.
    wide = policy("ports", operation('ports: ["8000", "9000"]'), action="DENY")
    assert never(wide) == []
    assert never(allow('notPorts: ["9999"]')) == []  # excludes nothing that can arrive


def test_destination_port_condition_is_checked_too() -> None:
    rules = "  - when:\n    - key: destination.port\n      values: ['9999']\n"
    text = policy("cond", rules, action="DENY", selector="app: httpbin")
    f = only(never(text))
    assert where(f).field == "spec.rules[0].when[0].values[0]"


# --- hosts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("http://httpbin.foo:8000/", "never a URL"),
        ("httpbin.foo/get", "the Host header has no path"),
        ("httpbin.foo:http", "is not a port"),
        ("httpbin.bar", "names Service bar/httpbin"),
        ("httpbin.bar.svc.cluster.local:8000", "names Service bar/httpbin"),
        ("httpbin.foo:9999", "Service foo/httpbin has no port 9999"),
    ],
)
def test_hosts_that_never_reach_the_workload(value: str, reason: str) -> None:
    f = only(never(deny(f'hosts: ["{value}"]')))
    assert reason in f.issue.message, f.issue.message


def test_hosts_of_the_workloads_own_service_are_quiet() -> None:
    values = '"httpbin.foo", "httpbin.foo:8000", "HTTPBIN.foo.svc.cluster.local:*", "*.example.com"'
    assert never(deny(f"hosts: [{values}]")) == []


# --- identities -----------------------------------------------------------------------

JWT = """\
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  jwtRules:
  - issuer: https://issuer.example/
    jwksUri: https://issuer.example/jwks.json
"""


def test_request_principal_of_an_issuer_no_request_authentication_accepts() -> None:
    rules = (
        '  - from:\n    - source:\n        requestPrincipals: ["https://issuer.example/alice"]\n'
    )
    f = only(never(policy("rp", rules, selector="app: httpbin") + JWT))
    assert "no RequestAuthentication" in f.issue.message
    assert "'https://issuer.example'" in f.issue.message
    assert f.issue.fix == 'Probably meant "https://issuer.example//alice".'


def test_request_principal_without_a_subject_and_principal_forms() -> None:
    rules = (
        '  - from:\n    - source:\n        requestPrincipals: ["alice"]\n'
        "  - from:\n    - source:\n"
        '        principals: ["spiffe://cluster.local/ns/foo/sa/sleep", "foo/sleep"]\n'
    )
    found = sorted(
        never(policy("ids", rules, selector="app: httpbin")), key=lambda f: where(f).field
    )
    assert [where(f).field for f in found] == [
        "spec.rules[0].from[0].source.requestPrincipals[0]",
        "spec.rules[1].from[0].source.principals[0]",
        "spec.rules[1].from[0].source.principals[1]",
    ]
    assert "without `spiffe://`" in found[1].issue.message
    assert found[1].issue.fix == 'Probably meant "cluster.local/ns/foo/sa/sleep".'
    assert "serviceAccounts" in found[2].issue.fix


def test_well_formed_identities_are_quiet() -> None:
    rules = (
        "  - from:\n    - source:\n"
        '        principals: ["cluster.local/ns/foo/sa/sleep", "*"]\n'
        '        requestPrincipals: ["https://issuer.example//*"]\n'
    )
    assert never(policy("ok", rules, selector="app: httpbin") + JWT) == []


# --- TM-AUTHZ-009: `*` in the middle -------------------------------------------------


def middle(text: str) -> list[Finding]:
    return [
        f for f in findings(text, "TM-AUTHZ-009") if "no wildcard in the middle" in f.issue.message
    ]


def test_middle_wildcard_principal_matches_only_the_literal_text() -> None:
    rules = '  - from:\n    - source:\n        principals: ["cluster.local/ns/*/sa/sleep"]\n'
    text = policy("deny-sleeps", rules, action="DENY", selector="app: httpbin")
    f = only(middle(text))
    assert f.severity is Severity.WARNING and "a hole" in f.issue.message
    assert 'the prefix "cluster.local/ns/*"' in f.issue.fix
    assert 'the suffix "*/sa/sleep"' in f.issue.fix
    mesh = context_from(text).mesh
    assert http(mesh).verdict is Verdict.ALLOW  # foo/sleep is not denied


def test_middle_wildcard_path_suggests_a_uri_template() -> None:
    one, two = sorted(
        middle(allow('paths: ["/api/*/items", "/v1/**"]')), key=lambda f: where(f).field
    )
    assert one.severity is Severity.INFO and "fails closed" in one.issue.message
    assert 'the URI template "/api/{*}/items"' in one.issue.fix
    assert 'the URI template "/v1/{**}"' in two.issue.fix


def test_middle_wildcard_hosts_and_condition_values() -> None:
    rules = (
        '  - to:\n    - operation:\n        hosts: ["api.*.example.com"]\n'
        "    when:\n    - key: request.headers[x-env]\n      notValues: [prod-*-eu]\n"
    )
    found = middle(policy("mixed", rules, action="DENY", selector="app: httpbin"))
    assert sorted(where(f).field for f in found) == [
        "spec.rules[0].to[0].operation.hosts[0]",
        "spec.rules[0].when[0].notValues[0]",
    ]


def test_wildcards_istio_supports_are_quiet() -> None:
    rules = (
        '  - from:\n    - source:\n        namespaces: ["team-*-prod"]\n'
        '        principals: ["*/ns/foo/sa/sleep", "cluster.local/*", "*"]\n'
        '    to:\n    - operation:\n        paths: ["/api/{*}/items", "/static/*", "*.css"]\n'
        '        hosts: ["*.example.com"]\n'
    )
    assert middle(policy("ok", rules, selector="app: httpbin")) == []
