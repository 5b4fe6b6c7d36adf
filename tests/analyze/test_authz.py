"""Authorization checks: each trigger next to a near-identical config that must stay quiet.

The base layout (tests/analyze/util.py) has foo and bar with sidecars, legacy without,
httpbin:8000 (HTTP) everywhere, sleep clients, and foo/tcp-echo on TCP ports 9000-9002.
"""

from __future__ import annotations

from trustmesh.analyze.findings import Finding, Severity
from trustmesh.analyze.harden import plan
from trustmesh.api.diagnostics import Location

from .util import findings, run

ROOT_ALLOW_NOTHING = """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: istio-system}
spec: {}
"""


def policy(
    name: str,
    rules: str = "",
    *,
    namespace: str = "foo",
    action: str = "ALLOW",
    selector: str = "",
    extra: str = "",
    annotations: str = "",
) -> str:
    """One AuthorizationPolicy document; ``rules`` is the YAML under ``rules:``."""
    meta = f"{{name: {name}, namespace: {namespace}"
    meta += f", annotations: {{{annotations}}}}}" if annotations else "}"
    body = f"  selector: {{matchLabels: {{{selector}}}}}\n" if selector else ""
    body += extra
    body += f"  action: {action}\n"
    body += f"  rules:\n{rules}" if rules else ""
    return (
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {meta}\nspec:\n{body}"
    )


def line_of(text: str, needle: str, after: str = "") -> int:
    """1-based line of the first ``needle`` in config.yaml (after the line holding ``after``)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) if after else 0
    return next(i for i in range(start, len(lines)) if needle in lines[i]) + 1


def where(found: Finding) -> Location:
    assert found.issue.location is not None
    return found.issue.location


def only(found: list[Finding]) -> Finding:
    assert len(found) == 1, [f.issue.message for f in found]
    return found[0]


# bar/db: a TCP port (mysql, through a named targetPort) and an undeclared one behind :80
DB = """\
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: db, namespace: bar}
spec:
  template:
    metadata:
      labels: {app: db}
    spec:
      containers:
      - name: db
        ports:
        - {name: mysql, containerPort: 3306}
        - {containerPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: bar}
spec:
  selector: {app: db}
  ports:
  - {name: db, port: 3306, targetPort: mysql, appProtocol: mysql}
  - {name: web, port: 80, targetPort: 8080}
"""


# --- TM-AUTHZ-001 no default-deny ------------------------------------------------------


def test_no_default_deny_names_namespaces_and_open_workloads() -> None:
    text = policy(
        "deny-post",
        '  - to:\n    - operation: {methods: ["POST"], ports: ["8000"]}\n',
        action="DENY",
    )
    found = findings(text, "TM-AUTHZ-001")
    assert [f.issue.workloads for f in found] == [
        ("foo/httpbin", "foo/tcp-echo"),
        ("bar/httpbin",),
    ]
    first = found[0]
    assert first.issue.resource == "Namespace//foo"
    assert (where(first).file, where(first).field) == ("workloads.yaml", "metadata.name")
    assert "spec: {}" in first.issue.fix and "namespace: foo" in first.issue.fix
    assert first.rule.fixable
    # legacy has no sidecar and sleep serves nothing: neither is named
    assert not any("legacy" in f.issue.message or "sleep" in f.issue.message for f in found)


def test_root_allow_nothing_is_a_mesh_wide_default_deny() -> None:
    assert findings(ROOT_ALLOW_NOTHING, "TM-AUTHZ-001") == []


def test_namespace_allow_nothing_covers_only_its_namespace() -> None:
    found = findings(policy("allow-nothing"), "TM-AUTHZ-001")
    assert [f.issue.workloads for f in found] == [("bar/httpbin",)]


def test_dry_run_allow_nothing_is_not_a_default_deny() -> None:
    text = ROOT_ALLOW_NOTHING.replace(
        "namespace: istio-system}",
        'namespace: istio-system, annotations: {istio.io/dry-run: "true"}}',
    )
    found = findings(text, "TM-AUTHZ-001")
    assert len(found) == 2
    assert "dry-run ALLOW istio-system/allow-nothing is not enforced" in found[0].issue.message


# --- TM-AUTHZ-002 workload covered by no policy ----------------------------------------


def test_uncovered_workload_is_reported_per_workload() -> None:
    text = policy(
        "deny-bar",
        '  - to:\n    - operation: {methods: ["DELETE"], ports: ["8000"]}\n',
        namespace="bar",
        action="DENY",
    )
    found = findings(text, "TM-AUTHZ-002")
    assert [f.issue.workloads for f in found] == [("foo/httpbin",), ("foo/tcp-echo",)]
    assert found[0].issue.resource == "Deployment/foo/httpbin"
    assert where(found[0]).field == "metadata.name"
    assert found[0].severity is Severity.INFO


def test_dry_run_and_audit_policies_do_not_cover() -> None:
    rules = '  - to:\n    - operation: {methods: ["DELETE"]}\n'
    text = policy("audit", rules, action="AUDIT") + policy(
        "shadow", rules, action="DENY", annotations='istio.io/dry-run: "true"'
    )
    found = findings(text, "TM-AUTHZ-002")
    httpbin = next(f for f in found if f.issue.workloads == ("foo/httpbin",))
    assert "only foo/audit, foo/shadow, which enforce nothing" in httpbin.issue.message


def test_covered_workloads_are_quiet() -> None:
    assert findings(ROOT_ALLOW_NOTHING, "TM-AUTHZ-002") == []


# --- TM-AUTHZ-003 ALLOW with negative matches ------------------------------------------


def test_allow_with_not_paths_is_a_bypass_on_mismatch() -> None:
    text = policy(
        "allow-but-admin",
        '  - to:\n    - operation:\n        notPaths: ["/admin"]\n',
        selector="app: httpbin",
    )
    f = only(findings(text, "TM-AUTHZ-003"))
    assert f.issue.workloads == ("foo/httpbin",)
    assert (where(f).line, where(f).field) == (
        line_of(text, "notPaths"),
        "spec.rules[0].to[0].operation.notPaths",
    )


def test_allow_with_not_values_and_not_principals() -> None:
    rules = (
        "  - from:\n    - source:\n        notNamespaces: [legacy]\n"
        "    when:\n    - key: request.headers[x-role]\n      notValues: [guest]\n"
    )
    found = findings(policy("exclusions", rules, selector="app: httpbin"), "TM-AUTHZ-003")
    fields = sorted(where(f).field for f in found)
    assert fields == [
        "spec.rules[0].from[0].source.notNamespaces",
        "spec.rules[0].when[0].notValues",
    ]
    peers = next(f for f in found if "notNamespaces" in where(f).field)
    assert "plaintext clients" in peers.issue.message


def test_exclusion_narrowing_a_positive_match_is_quiet() -> None:
    rules = (
        '  - to:\n    - operation:\n        paths: ["/api/*"]\n        notPaths: ["/api/admin"]\n'
    )
    text = policy("allow-api", rules, selector="app: httpbin")
    assert findings(text, "TM-AUTHZ-003") == []


def test_negative_match_in_dry_run_or_deny_is_quiet() -> None:
    rules = '  - to:\n    - operation:\n        notPaths: ["/admin"]\n'
    dry = policy("a", rules, selector="app: httpbin", annotations='istio.io/dry-run: "true"')
    deny = policy("d", rules, selector="app: httpbin", action="DENY")
    assert findings(dry + deny, "TM-AUTHZ-003") == []


def test_http_negative_on_tcp_only_workload_is_quiet() -> None:
    text = policy(
        "tcp",
        '  - to:\n    - operation:\n        notMethods: ["DELETE"]\n',
        selector="app: tcp-echo",
    )
    assert findings(text, "TM-AUTHZ-003") == []


# --- TM-AUTHZ-004 DENY path match vs. path normalization ------------------------------

DENY_ADMIN = policy(
    "deny-admin",
    '  - to:\n    - operation:\n        paths: ["/admin/secret"]\n',
    action="DENY",
    selector="app: httpbin",
)


def normalization(mode: str) -> str:
    return f"pathNormalization:\n  normalization: {mode}\n"


def test_deny_path_bypassed_under_base_is_proven_by_evaluation() -> None:
    f = only(findings(DENY_ADMIN, "TM-AUTHZ-004"))
    assert f.issue.workloads == ("foo/httpbin",)
    assert (where(f).line, where(f).field) == (
        line_of(DENY_ADMIN, "/admin/secret"),
        "spec.rules[0].to[0].operation.paths[0]",
    )
    assert "`GET //admin/secret` from a plaintext client is allowed" in f.issue.message
    for spelling in (
        "`//admin/secret` (double-slash)",
        "`/admin%2Fsecret` (encoded-slash)",
        "`/admin/secret/` (trailing-slash)",
        "`/admin/secret%2F` (encoded trailing-slash)",
    ):
        assert spelling in f.issue.message
    assert "dot-segment" not in f.issue.message  # BASE resolves `/./`
    assert "DECODE_AND_MERGE_SLASHES" in f.issue.fix and f.rule.fixable
    # No normalization removes a trailing slash: the policy needs the `/*` form too.
    assert '#   paths: ["/admin/secret", "/admin/secret/*"]' in f.issue.fix


def test_merge_slashes_closes_double_slash_but_not_encoded_slash() -> None:
    f = only(findings(DENY_ADMIN, "TM-AUTHZ-004", mesh=normalization("MERGE_SLASHES")))
    assert "`/admin%2Fsecret` (encoded-slash)" in f.issue.message
    assert "double-slash" not in f.issue.message
    assert "`GET /admin%2Fsecret`" in f.issue.message


def test_none_also_misses_dot_segments() -> None:
    f = only(findings(DENY_ADMIN, "TM-AUTHZ-004", mesh=normalization("NONE")))
    assert "`/./admin/secret` (dot-segment), `//admin/secret` (double-slash)" in f.issue.message


def test_decode_and_merge_slashes_leaves_only_the_trailing_slash() -> None:
    mesh = normalization("DECODE_AND_MERGE_SLASHES")
    f = only(findings(DENY_ADMIN, "TM-AUTHZ-004", mesh=mesh))
    assert "`/admin/secret/` (trailing-slash)" in f.issue.message
    assert "double-slash" not in f.issue.message
    assert "`/admin%2Fsecret`" not in f.issue.message
    # The mesh setting is in place: the fix is the policy's, and harden has nothing to add.
    assert "meshConfig" not in f.issue.fix
    assert '"/admin/secret/*"' in f.issue.fix
    assert plan([f]).render() == ""


def test_prefix_deny_is_quiet_under_decode_and_merge_slashes() -> None:
    prefix = DENY_ADMIN.replace('"/admin/secret"', '"/admin/*"')
    assert findings(prefix, "TM-AUTHZ-004", mesh=normalization("DECODE_AND_MERGE_SLASHES")) == []


def test_variants_denied_by_an_allow_policy_are_not_a_bypass() -> None:
    allow_public = policy(
        "allow-public",
        '  - to:\n    - operation:\n        paths: ["/public*"]\n',
        selector="app: httpbin",
    )
    assert findings(DENY_ADMIN + allow_public, "TM-AUTHZ-004") == []


def test_jwt_scoped_deny_without_request_authentication_is_left_to_authn_002() -> None:
    # No RequestAuthentication selects bar/httpbin: no request carries claims, the DENY
    # never matches, and TM-AUTHN-002 says so; there is nothing to bypass.
    rules = (
        '  - to:\n    - operation:\n        paths: ["/ops/*"]\n'
        "    when:\n    - key: request.auth.claims[role]\n      values: [guest]\n"
    )
    text = policy("jwt-deny", rules, action="DENY", namespace="bar")
    assert findings(text, "TM-AUTHZ-004") == []
    assert [f.rule.id for f in findings(text, "TM-AUTHN-002")] == ["TM-AUTHN-002"]


def test_root_namespace_deny_applies_mesh_wide() -> None:
    text = DENY_ADMIN.replace("namespace: foo}", "namespace: istio-system}")
    f = only(findings(text, "TM-AUTHZ-004"))
    # legacy/httpbin has no sidecar: nothing is enforced there, so nothing to bypass
    assert f.issue.workloads == ("bar/httpbin", "foo/httpbin")


def test_suffix_match_and_dry_run_deny_are_quiet() -> None:
    suffix = policy("php", '  - to:\n    - operation:\n        paths: ["*.php"]\n', action="DENY")
    dry = DENY_ADMIN.replace(
        "name: deny-admin, namespace: foo}",
        'name: deny-admin, namespace: foo, annotations: {istio.io/dry-run: "true"}}',
    )
    assert findings(suffix + dry, "TM-AUTHZ-004") == []


# --- TM-AUTHZ-005 allow-all ------------------------------------------------------------


def test_empty_rule_allows_everything() -> None:
    text = ROOT_ALLOW_NOTHING + policy("allow-all", "  - {}\n", namespace="bar")
    f = only(findings(text, "TM-AUTHZ-005"))
    assert f.issue.workloads == ("bar/httpbin",)
    assert (where(f).line, where(f).field) == (line_of(text, "- {}"), "spec.rules[0]")
    assert "plaintext ones included" in f.issue.message


def test_wildcard_only_rule_is_allow_all_too() -> None:
    rules = '  - to:\n    - operation:\n        methods: ["*"]\n        paths: ["*"]\n'
    f = only(findings(policy("wild", rules, selector="app: httpbin"), "TM-AUTHZ-005"))
    assert f.issue.workloads == ("foo/httpbin",)


def test_any_principal_is_not_allow_all() -> None:
    # `principals: ["*"]` needs an mTLS peer: plaintext clients are denied by it.
    rules = '  - from:\n    - source:\n        principals: ["*"]\n'
    assert findings(policy("any-peer", rules, namespace="bar"), "TM-AUTHZ-005") == []


def test_scoped_allow_is_quiet() -> None:
    rules = '  - to:\n    - operation:\n        methods: ["GET"]\n'
    assert findings(policy("get", rules, namespace="bar"), "TM-AUTHZ-005") == []


# --- TM-AUTHZ-006 hosts without the port form ------------------------------------------


def test_allow_exact_host_denies_requests_with_a_port() -> None:
    text = policy(
        "by-host", '  - to:\n    - operation:\n        hosts: ["httpbin.bar"]\n', namespace="bar"
    )
    f = only(findings(text, "TM-AUTHZ-006"))
    assert f.issue.workloads == ("bar/httpbin",)
    assert (where(f).line, where(f).field) == (
        line_of(text, "hosts:"),
        "spec.rules[0].to[0].operation.hosts[0]",
    )
    assert "(Host: httpbin.bar:8000) from a plaintext client is denied" in f.issue.message


def test_deny_exact_host_is_bypassed_with_the_port() -> None:
    text = policy(
        "no-host",
        '  - to:\n    - operation:\n        hosts: ["httpbin.bar"]\n',
        namespace="bar",
        action="DENY",
    )
    f = only(findings(text, "TM-AUTHZ-006"))
    assert "(Host: httpbin.bar:8000) from a plaintext client is allowed" in f.issue.message


def test_host_with_its_port_form_is_quiet() -> None:
    rules = '  - to:\n    - operation:\n        hosts: ["httpbin.bar", "httpbin.bar:*"]\n'
    text = policy("a", rules, namespace="bar") + policy("d", rules, namespace="bar", action="DENY")
    assert findings(text, "TM-AUTHZ-006") == []


def test_allow_exact_host_on_port_80_is_quiet() -> None:
    # Clients leave :80 out of Host, so the exact host is what they send.
    web = DB.replace("name: db", "name: web").replace("app: db", "app: web")
    text = web + policy(
        "by-host",
        '  - to:\n    - operation:\n        hosts: ["web.bar"]\n',
        namespace="bar",
        selector="app: web",
    )
    assert findings(text, "TM-AUTHZ-006") == []


# --- TM-AUTHZ-007 HTTP-only rules on TCP ports -----------------------------------------


def test_deny_with_only_http_fields_blocks_all_tcp() -> None:
    text = policy(
        "deny-get", '  - to:\n    - operation:\n        methods: ["GET"]\n', action="DENY"
    )
    f = only(findings(text, "TM-AUTHZ-007"))
    assert f.issue.workloads == ("foo/tcp-echo",)
    assert (where(f).line, where(f).field) == (line_of(text, "- to:"), "spec.rules[0]")
    assert "foo/tcp-echo ports 9000, 9001, 9002" in f.issue.message


def test_deny_scoped_by_port_is_quiet() -> None:
    rules = '  - to:\n    - operation:\n        methods: ["GET"]\n        ports: ["9000"]\n'
    assert findings(policy("deny-get", rules, action="DENY"), "TM-AUTHZ-007") == []


def test_allow_with_only_http_rules_denies_all_tcp() -> None:
    text = policy("allow-get", '  - to:\n    - operation:\n        methods: ["GET"]\n')
    f = only(findings(text, "TM-AUTHZ-007"))
    assert f.issue.workloads == ("foo/tcp-echo",)
    assert (where(f).line, where(f).field) == (line_of(text, "- to:"), "spec.rules")


def test_allow_with_a_tcp_rule_or_on_http_workloads_is_quiet() -> None:
    get = '  - to:\n    - operation:\n        methods: ["GET"]\n'
    with_tcp = get + '  - to:\n    - operation:\n        ports: ["9000"]\n'
    assert findings(policy("allow", with_tcp), "TM-AUTHZ-007") == []
    assert findings(policy("allow", get, namespace="bar"), "TM-AUTHZ-007") == []


def test_http_only_allow_under_allow_nothing_is_quiet() -> None:
    # TCP is denied on purpose by the default-deny until a rule names it.
    text = ROOT_ALLOW_NOTHING + policy(
        "allow-get", '  - to:\n    - operation:\n        methods: ["GET"]\n'
    )
    assert findings(text, "TM-AUTHZ-007") == []


def test_tcp_ports_come_from_app_protocol_and_named_target_ports() -> None:
    # 3306 is declared mysql (TCP) through a named targetPort; 8080 ("web") is undeclared,
    # sniffed per connection, and never reported.
    text = DB + policy(
        "deny-get",
        '  - to:\n    - operation:\n        methods: ["GET"]\n',
        namespace="bar",
        action="DENY",
        selector="app: db",
    )
    f = only(findings(text, "TM-AUTHZ-007"))
    assert f.issue.workloads == ("bar/db",)
    assert "bar/db ports 3306" in f.issue.message
    assert "8080" not in f.issue.message


# --- TM-AUTHZ-008 selector matching nothing / targetRef on sidecars --------------------


def test_selector_typo_matches_no_workload() -> None:
    text = policy(
        "typo",
        '  - to:\n    - operation: {methods: ["DELETE"]}\n',
        action="DENY",
        selector="app: httbin",
    )
    f = only(findings(text, "TM-AUTHZ-008"))
    assert (where(f).line, where(f).field) == (
        line_of(text, "selector"),
        "spec.selector.matchLabels",
    )
    assert "matches no workload in namespace foo" in f.issue.message


def test_selector_matching_only_workloads_without_sidecar() -> None:
    text = policy("legacy", "  - {}\n", namespace="legacy", selector="app: httpbin")
    f = only(findings(text, "TM-AUTHZ-008"))
    assert f.issue.workloads == ("legacy/httpbin",)
    assert "without a sidecar" in f.issue.message


def test_matching_selector_and_root_namespace_are_quiet() -> None:
    good = policy("ok", "  - {}\n", selector="app: httpbin")
    root = policy("r", "  - {}\n", namespace="istio-system", selector="app: httpbin")
    assert findings(good + root, "TM-AUTHZ-008") == []


def test_policy_in_a_namespace_without_workloads_applies_nowhere() -> None:
    deny = policy("deny", "  - {}\n", namespace="fooo", action="DENY")
    allow = policy("allow", "  - {}\n", namespace="elsewhere", selector="app: nothing")
    found = {f.issue.resource: f for f in findings(deny + allow, "TM-AUTHZ-008")}
    assert set(found) == {"AuthorizationPolicy/fooo/deny", "AuthorizationPolicy/elsewhere/allow"}
    hole = found["AuthorizationPolicy/fooo/deny"]
    assert hole.severity is Severity.WARNING and "a hole" in hole.issue.message
    assert "did you mean namespace 'foo'?" in hole.issue.message
    assert (where(hole).line, where(hole).field) == (
        line_of(deny, "namespace: fooo"),
        "metadata.namespace",
    )
    denial = found["AuthorizationPolicy/elsewhere/allow"]
    assert denial.severity is Severity.INFO and "fails closed" in denial.issue.message


def test_namespace_judged_only_when_the_inputs_hold_workloads() -> None:
    deny = policy("deny", "  - {}\n", namespace="fooo", action="DENY")
    assert findings(deny, "TM-AUTHZ-008", base=False) == []


def test_target_ref_to_a_sidecar_service_is_ignored() -> None:
    refs = '  targetRefs:\n  - {kind: Service, group: "", name: httpbin}\n'
    text = policy(
        "waypoint", '  - to:\n    - operation: {methods: ["DELETE"]}\n', action="DENY", extra=refs
    )
    f = only(findings(text, "TM-AUTHZ-008"))
    assert f.issue.workloads == ("foo/httpbin",)
    assert (where(f).line, where(f).field) == (line_of(text, "kind: Service"), "spec.targetRefs[0]")
    assert "matchLabels: {app: httpbin}" in f.issue.fix


def test_target_ref_to_a_gateway_is_quiet() -> None:
    refs = "  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: gw}\n"
    text = policy(
        "gw", '  - to:\n    - operation: {methods: ["DELETE"]}\n', action="DENY", extra=refs
    )
    assert findings(text, "TM-AUTHZ-008") == []


# --- TM-AUTHZ-009 references that do not exist -----------------------------------------

OLD_TD = policy(
    "old-td",
    '  - from:\n    - source:\n        principals: ["old-td/ns/foo/sa/sleep"]\n',
    selector="app: httpbin",
)


def test_principal_in_a_foreign_trust_domain_never_matches() -> None:
    f = only(findings(OLD_TD, "TM-AUTHZ-009"))
    assert f.severity is Severity.WARNING
    assert f.issue.workloads == ("foo/httpbin",)
    assert (where(f).line, where(f).field) == (
        line_of(OLD_TD, "old-td/ns"),
        "spec.rules[0].from[0].source.principals[0]",
    )
    assert "trustDomainAliases: [old-td]" in f.issue.fix


def test_trust_domain_alias_makes_it_valid() -> None:
    mesh = "trustDomain: new-td\ntrustDomainAliases: [old-td]\n"
    assert findings(OLD_TD, "TM-AUTHZ-009", mesh=mesh) == []


def test_missing_namespace_and_service_account() -> None:
    rules = (
        "  - from:\n    - source:\n"
        '        principals: ["cluster.local/ns/nope/sa/x", "cluster.local/ns/foo/sa/ghost"]\n'
        "  - from:\n    - source:\n        serviceAccounts: [bar/sleep, robot]\n"
        "    when:\n    - key: source.namespace\n      notValues: [gone]\n"
    )
    found = findings(policy("refs", rules, selector="app: httpbin"), "TM-AUTHZ-009")
    assert sorted(where(f).field for f in found) == [
        "spec.rules[0].from[0].source.principals[0]",
        "spec.rules[0].from[0].source.principals[1]",
        "spec.rules[1].from[0].source.serviceAccounts[1]",
        "spec.rules[1].when[0].notValues[0]",
    ]
    assert all(f.severity is Severity.INFO for f in found)


def test_existing_and_wildcard_references_are_quiet() -> None:
    rules = (
        "  - from:\n    - source:\n"
        '        principals: ["cluster.local/ns/foo/sa/sleep", "*/ns/bar/sa/sleep",'
        ' "cluster.local/ns/bar/sa/default", "cluster.local/ns/bar/*"]\n'
        '    - source:\n        namespaces: [legacy, "leg*", "*acy"]\n'
    )
    assert findings(policy("refs", rules, selector="app: httpbin"), "TM-AUTHZ-009") == []


def test_namespace_pattern_matching_no_namespace_is_reported() -> None:
    rules = '  - from:\n    - source:\n        namespaces: [legacy, "team-*", "*-prod"]\n'
    found = findings(policy("refs", rules, selector="app: httpbin"), "TM-AUTHZ-009")
    assert sorted(where(f).field for f in found) == [
        "spec.rules[0].from[0].source.namespaces[1]",
        "spec.rules[0].from[0].source.namespaces[2]",
    ]
    assert "matches no namespace" in found[0].issue.message


# --- TM-AUTHZ-010 CUSTOM provider missing ----------------------------------------------

CUSTOM = policy(
    "ext",
    '  - to:\n    - operation:\n        paths: ["/ext/*"]\n',
    action="CUSTOM",
    selector="app: httpbin",
    extra="  provider: {name: my-authz}\n",
)


def test_custom_provider_not_in_mesh_config_fails_closed() -> None:
    f = only(findings(CUSTOM, "TM-AUTHZ-010"))
    assert f.severity is Severity.ERROR
    assert f.issue.workloads == ("foo/httpbin",)
    assert (where(f).line, where(f).field) == (line_of(CUSTOM, "provider"), "spec.provider.name")
    assert "- name: my-authz" in f.issue.fix


def test_defined_custom_provider_is_quiet() -> None:
    mesh = "extensionProviders:\n- name: my-authz\n  envoyExtAuthzHttp: {service: a.b, port: 80}\n"
    assert findings(CUSTOM, "TM-AUTHZ-010", mesh=mesh) == []


# --- TM-AUTHZ-011 dry-run policies -----------------------------------------------------

DRY = 'istio.io/dry-run: "true"'


def test_dry_run_deny_reports_what_it_would_deny() -> None:
    text = policy(
        "shadow",
        '  - to:\n    - operation:\n        methods: ["POST"]\n',
        action="DENY",
        annotations=DRY,
    )
    f = only(findings(text, "TM-AUTHZ-011"))
    assert f.issue.workloads == ("foo/httpbin", "foo/tcp-echo")
    assert (where(f).line, where(f).field) == (
        line_of(text, "dry-run"),
        "metadata.annotations.istio.io/dry-run",
    )
    assert "TCP connections to ports 9000, 9001, 9002" in f.issue.message


def test_dry_run_allow_would_start_default_deny() -> None:
    text = policy(
        "shadow",
        '  - to:\n    - operation:\n        methods: ["GET"]\n',
        namespace="bar",
        annotations=DRY,
    )
    f = only(findings(text, "TM-AUTHZ-011"))
    assert f.issue.workloads == ("bar/httpbin",)
    assert "start default-deny" in f.issue.message


def test_enforced_policy_is_quiet() -> None:
    text = policy(
        "real",
        '  - to:\n    - operation:\n        methods: ["POST"]\n',
        action="DENY",
        annotations='istio.io/dry-run: "false"',
    )
    assert findings(text, "TM-AUTHZ-011") == []


# --- fixes ---------------------------------------------------------------------------


def test_fixable_rules_give_yaml_harden_can_apply() -> None:
    result = run(DENY_ADMIN, rules=["TM-AUTHZ-001", "TM-AUTHZ-004"])
    assert {f.rule.id for f in result.findings} == {"TM-AUTHZ-001", "TM-AUTHZ-004"}
    fixes = plan(result.findings)
    assert fixes.skipped == []
    assert [(r["kind"], r["metadata"]["namespace"], r["spec"]) for r in fixes.resources] == [
        ("AuthorizationPolicy", "foo", {}),
        ("AuthorizationPolicy", "bar", {}),
    ]
    assert fixes.mesh_config == {"pathNormalization": {"normalization": "DECODE_AND_MERGE_SLASHES"}}
