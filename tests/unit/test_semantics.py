"""One test per Istio semantic rule trustmesh must reproduce (istio-semantics.md)."""

from __future__ import annotations

import pytest

from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import Decision, RequestError, Verdict
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source
from trustmesh.policy.trace import render_trace

from .meshutil import NOW, compile_text, http, policy, tcp

ALLOW, DENY, RESET = Verdict.ALLOW, Verdict.DENY, Verdict.RESET


# --- TCP / HTTP field dropping --------------------------------------------------------


def test_allow_rule_with_http_field_is_dropped_whole_on_tcp() -> None:
    mesh = compile_text(
        policy(
            "tcp",
            "foo",
            """
selector: {matchLabels: {app: tcp-echo}}
rules:
- to: [{operation: {methods: [GET], ports: ["9000"]}}]
""",
        )
    )
    assert tcp(mesh, 9000).verdict is DENY
    assert tcp(mesh, 9001).verdict is DENY
    assert "none has a rule for TCP" in " ".join(render_trace(tcp(mesh, 9000).trace))


def test_allow_ports_without_http_fields_still_work_on_tcp() -> None:
    mesh = compile_text(
        policy(
            "tcp",
            "foo",
            """
selector: {matchLabels: {app: tcp-echo}}
rules:
- to: [{operation: {ports: ["9000", "9001"]}}]
""",
        )
    )
    assert [tcp(mesh, p).verdict for p in (9000, 9001, 9002)] == [ALLOW, ALLOW, DENY]
    assert tcp(mesh, 9000).rule == "ns[foo]-policy[tcp]-rule[0]"


def test_deny_rule_loses_only_http_fields_on_tcp() -> None:
    only_methods = compile_text(
        policy(
            "d",
            "foo",
            """
selector: {matchLabels: {app: tcp-echo}}
action: DENY
rules:
- to: [{operation: {methods: [GET]}}]
""",
        )
    )
    assert tcp(only_methods, 9000).verdict is DENY
    assert tcp(only_methods, 9001).verdict is DENY
    with_port = compile_text(
        policy(
            "d",
            "foo",
            """
selector: {matchLabels: {app: tcp-echo}}
action: DENY
rules:
- to: [{operation: {methods: [GET], ports: ["9000"]}}]
""",
        )
    )
    assert tcp(with_port, 9000).verdict is DENY
    assert tcp(with_port, 9001).verdict is ALLOW


def test_deny_on_http_header_condition_is_dropped_for_tcp() -> None:
    mesh = compile_text(
        policy(
            "d",
            "foo",
            """
selector: {matchLabels: {app: tcp-echo}}
action: DENY
rules:
- from: [{source: {namespaces: [bar]}}]
  when: [{key: "request.headers[x-token]", values: [admin]}]
""",
        )
    )
    assert tcp(mesh, 9000, src="bar/sleep").verdict is DENY  # header dropped: wider deny
    assert tcp(mesh, 9000, src="foo/sleep").verdict is ALLOW


# --- selection and composition --------------------------------------------------------


def test_peer_authentication_oldest_wins_by_timestamp_then_appearance() -> None:
    def pa(name: str, mode: str, stamp: str = "") -> str:
        meta = f"  creationTimestamp: {stamp}\n" if stamp else ""
        return policy(
            name, "foo", f"mtls: {{mode: {mode}}}", kind="PeerAuthentication", extra_meta=meta
        )

    legacy = Source.workload("legacy/sleep")
    by_time = compile_text(
        pa("newer", "PERMISSIVE", "2024-05-01T00:00:00Z")
        + pa("older", "STRICT", "2023-01-01T00:00:00Z")
    )
    assert http(by_time, source=legacy).verdict is RESET
    by_order = compile_text(pa("first", "PERMISSIVE") + pa("second", "STRICT"))
    assert http(by_order, source=legacy).verdict is ALLOW
    stamped_beats_unstamped = compile_text(
        pa("a", "PERMISSIVE") + pa("b", "STRICT", "2020-01-01T00:00:00Z")
    )
    assert http(stamped_beats_unstamped, source=legacy).verdict is RESET
    same_time_name_wins = compile_text(
        pa("zz", "PERMISSIVE", "2020-01-01T00:00:00Z") + pa("aa", "STRICT", "2020-01-01T00:00:00Z")
    )
    assert http(same_time_name_wins, source=legacy).verdict is RESET


def test_peer_authentication_with_selector_in_root_namespace_is_ignored() -> None:
    mesh = compile_text(
        policy(
            "strict",
            "istio-system",
            """
selector: {matchLabels: {app: httpbin}}
mtls: {mode: STRICT}
""",
            kind="PeerAuthentication",
        )
    )
    assert http(mesh, src="legacy/sleep").verdict is ALLOW


def test_authorization_policy_in_root_namespace_applies_mesh_wide_with_selector() -> None:
    mesh = compile_text(
        policy(
            "deny-httpbin",
            "istio-system",
            """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules: [{}]
""",
        )
    )
    assert http(mesh, dst="bar/httpbin").rule == "ns[istio-system]-policy[deny-httpbin]-rule[0]"
    assert http(mesh, dst="foo/httpbin").verdict is DENY


def test_port_level_mtls_is_keyed_by_target_port_and_inherits_when_unset() -> None:
    mesh = compile_text(
        policy(
            "w",
            "bar",
            """
selector: {matchLabels: {app: httpbin}}
mtls: {mode: STRICT}
portLevelMtls:
  8000: {mode: DISABLE}
""",
            kind="PeerAuthentication",
        )
    )
    assert http(mesh, src="legacy/sleep", dst="bar/httpbin").verdict is ALLOW
    assert http(mesh, src="foo/sleep", dst="bar/httpbin").verdict is ALLOW  # auto mTLS → plaintext


def test_target_ref_policies_are_ignored_for_sidecars() -> None:
    mesh = compile_text(
        policy(
            "gw",
            "foo",
            """
targetRefs: [{kind: Service, group: "", name: httpbin}]
action: DENY
rules: [{}]
""",
        )
    )
    assert http(mesh).verdict is ALLOW


# --- trust domains --------------------------------------------------------------------


def test_trust_domain_aliases_expand_principals() -> None:
    config = policy(
        "allow",
        "foo",
        """
selector: {matchLabels: {app: httpbin}}
rules:
- from: [{source: {principals: [old-td/ns/bar/sa/sleep]}}]
""",
    )
    without = compile_text(config, mesh="trustDomain: new-td\n")
    assert http(without, src="bar/sleep").verdict is DENY
    aliased = compile_text(config, mesh="trustDomain: new-td\ntrustDomainAliases: [old-td]\n")
    decision = http(aliased, src="bar/sleep")
    assert decision.verdict is ALLOW
    assert decision.principal == "new-td/ns/bar/sa/sleep"


def test_cluster_local_principal_stands_for_the_current_trust_domain() -> None:
    config = policy(
        "allow",
        "foo",
        """
selector: {matchLabels: {app: httpbin}}
rules:
- from: [{source: {principals: [cluster.local/ns/bar/sa/sleep]}}]
""",
    )
    mesh = compile_text(config, mesh="trustDomain: new-td\n")
    assert http(mesh, src="bar/sleep").verdict is ALLOW


# --- path normalization modes ---------------------------------------------------------

DENY_ADMIN = policy(
    "deny-admin",
    "foo",
    """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules:
- to: [{operation: {paths: [/admin/secret]}}]
""",
)


def test_base_normalization_leaves_double_slash_and_encoded_slash() -> None:
    mesh = compile_text(DENY_ADMIN)
    assert http(mesh, "/admin/secret").verdict is DENY
    assert http(mesh, "/x/../admin/secret").verdict is DENY
    assert http(mesh, "/%61dmin/secret").verdict is DENY
    assert http(mesh, "//admin/secret").verdict is ALLOW  # the documented bypass
    assert http(mesh, "/admin%2Fsecret").verdict is ALLOW


def test_merge_slashes_and_decode_modes_close_the_bypasses() -> None:
    merge = compile_text(DENY_ADMIN, mesh="pathNormalization: {normalization: MERGE_SLASHES}\n")
    assert http(merge, "//admin/secret").verdict is DENY
    assert http(merge, "/admin%2Fsecret").verdict is ALLOW
    decode = compile_text(
        DENY_ADMIN, mesh="pathNormalization: {normalization: DECODE_AND_MERGE_SLASHES}\n"
    )
    assert http(decode, "/admin%2Fsecret").verdict is DENY
    assert http(decode, "/admin%2fsecret").verdict is DENY


def test_none_normalization_does_nothing() -> None:
    mesh = compile_text(DENY_ADMIN, mesh="pathNormalization: {normalization: NONE}\n")
    assert http(mesh, "/x/../admin/secret").verdict is ALLOW


def test_paths_match_without_query_and_nul_is_400() -> None:
    mesh = compile_text(DENY_ADMIN)
    assert http(mesh, "/admin/secret?x=1").verdict is DENY
    bad = http(mesh, "/admin/%00")
    assert (bad.verdict, bad.status) == (Verdict.BAD_REQUEST, 400)


# --- string match forms ---------------------------------------------------------------


def _paths(values: str) -> str:
    return policy(
        "allow",
        "foo",
        f"""
selector: {{matchLabels: {{app: httpbin}}}}
rules:
- to: [{{operation: {{paths: {values}}}}}]
""",
    )


def test_string_match_forms() -> None:
    mesh = compile_text(_paths('["/exact", "/pre*", "*.json", "/mid*dle/x"]'))
    assert http(mesh, "/exact").verdict is ALLOW
    assert http(mesh, "/exact/more").verdict is DENY
    assert http(mesh, "/prefix/anything").verdict is ALLOW
    assert http(mesh, "/data/file.json").verdict is ALLOW
    assert http(mesh, "/middle/x").verdict is DENY  # no middle wildcard
    assert http(mesh, "/mid*dle/x").verdict is ALLOW  # it is a literal '*'


def test_path_templates() -> None:
    mesh = compile_text(_paths('["/api/{*}/items", "/files/{**}"]'))
    assert http(mesh, "/api/v1/items").verdict is ALLOW
    assert http(mesh, "/api/v1/v2/items").verdict is DENY
    assert http(mesh, "/files/a/b/c.txt").verdict is ALLOW


def test_hosts_ignore_case_and_do_not_match_host_with_port() -> None:
    mesh = compile_text(
        policy(
            "allow",
            "foo",
            """
selector: {matchLabels: {app: httpbin}}
rules:
- to: [{operation: {hosts: [httpbin.foo]}}]
""",
        )
    )
    assert http(mesh, host="HTTPBIN.foo").verdict is ALLOW
    assert http(mesh, host="httpbin.foo:8000").verdict is DENY


def test_methods_are_exact_and_unknown_methods_are_400() -> None:
    mesh = compile_text(DENY_ADMIN)
    bad = http(mesh, method="get")
    assert (bad.verdict, bad.status) == (Verdict.BAD_REQUEST, 400)


# --- conditions -----------------------------------------------------------------------

NOT_ADMIN = policy(
    "deny-not-admin",
    "foo",
    """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules:
- to: [{operation: {methods: [GET]}}]
  when: [{key: "request.headers[x-token]", notValues: [admin]}]
""",
)


def test_not_values_on_a_missing_or_empty_header_matches() -> None:
    mesh = compile_text(NOT_ADMIN)
    assert http(mesh, headers=(("x-token", "admin"),)).verdict is ALLOW
    assert http(mesh, headers=(("X-Token", "guest"),)).verdict is DENY
    assert http(mesh).verdict is DENY
    assert http(mesh, headers=(("x-token", ""),)).verdict is DENY


def test_header_values_are_case_sensitive() -> None:
    mesh = compile_text(NOT_ADMIN)
    assert http(mesh, headers=(("x-token", "ADMIN"),)).verdict is DENY


def test_namespaces_and_service_accounts_and_principal_presence() -> None:
    mesh = compile_text(
        policy(
            "allow",
            "foo",
            """
selector: {matchLabels: {app: httpbin}}
rules:
- from: [{source: {namespaces: ["ba*"]}}]
  to: [{operation: {paths: [/ns]}}]
- from: [{source: {serviceAccounts: [foo/sleep]}}]
  to: [{operation: {paths: [/sa]}}]
- from: [{source: {principals: ["*"]}}]
  to: [{operation: {paths: [/any]}}]
""",
        )
    )
    assert http(mesh, "/ns", src="bar/sleep").verdict is ALLOW
    assert http(mesh, "/ns", src="foo/sleep").verdict is DENY
    assert http(mesh, "/sa", src="foo/sleep").verdict is ALLOW
    assert http(mesh, "/sa", src="bar/sleep").verdict is DENY
    assert http(mesh, "/any", src="bar/sleep").verdict is ALLOW
    assert http(mesh, "/any", src="legacy/sleep").verdict is DENY  # no mTLS, no principal


def test_unknown_source_ip_fails_closed_for_both_actions() -> None:
    allow = compile_text(
        policy(
            "allow",
            "foo",
            """
selector: {matchLabels: {app: httpbin}}
rules:
- from: [{source: {ipBlocks: [10.0.0.0/8]}}]
""",
        )
    )
    assert http(allow).verdict is DENY
    assert http(allow, source=Source.workload("foo/sleep", "10.1.2.3")).verdict is ALLOW
    deny = compile_text(
        policy(
            "deny",
            "foo",
            """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules:
- from: [{source: {notIpBlocks: [10.0.0.0/8]}}]
""",
        )
    )
    assert http(deny).verdict is DENY
    assert http(deny, source=Source.workload("foo/sleep", "10.1.2.3")).verdict is ALLOW


# --- actions and naming ---------------------------------------------------------------


def test_deciding_rule_is_the_lexicographically_smallest_name() -> None:
    rules = "\n".join("- to: [{operation: {paths: [/x]}}]" for _ in range(11))
    mesh = compile_text(
        policy("many", "foo", f"selector: {{matchLabels: {{app: httpbin}}}}\nrules:\n{rules}")
    )
    assert http(mesh, "/x").rule == "ns[foo]-policy[many]-rule[0]"
    spec = "selector: {matchLabels: {app: httpbin}}\nrules:\n" + "\n".join(
        "- to: [{operation: {paths: [/y]}}]"
        if i in (2, 10)
        else "- to: [{operation: {paths: [/z]}}]"
        for i in range(11)
    )
    assert (
        http(compile_text(policy("many", "foo", spec)), "/y").rule
        == "ns[foo]-policy[many]-rule[10]"
    )


def test_allow_nothing_and_allow_everything() -> None:
    nothing = compile_text(policy("allow-nothing", "foo", "{}"))
    decision = http(nothing)
    assert (decision.verdict, decision.status, decision.reason) == (
        DENY,
        403,
        "RBAC: access denied",
    )
    everything = compile_text(policy("all", "foo", "rules: [{}]"))
    assert http(everything).rule == "ns[foo]-policy[all]-rule[0]"


def test_only_dry_run_allow_policies_enforce_nothing_but_report() -> None:
    mesh = compile_text(
        policy(
            "dry",
            "foo",
            "rules:\n- to: [{operation: {paths: [/ip]}}]",
            extra_meta='  annotations: {"istio.io/dry-run": "true"}\n',
        )
    )
    decision = http(mesh, "/get")
    assert decision.verdict is ALLOW
    assert [s.log_line() for s in decision.dry_run] == ["shadow denied"]


def test_dry_run_deny_logs_shadow_denied_with_rule() -> None:
    mesh = compile_text(
        policy(
            "dry",
            "foo",
            "action: DENY\nrules:\n- to: [{operation: {paths: [/headers]}}]",
            extra_meta='  annotations: {"istio.io/dry-run": "true"}\n',
        )
    )
    decision = http(mesh, "/headers")
    assert decision.verdict is ALLOW
    assert decision.dry_run[0].log_line() == (
        "shadow denied, matched policy ns[foo]-policy[dry]-rule[0]"
    )


def test_custom_with_unknown_provider_fails_closed_under_the_name_envoy_logs() -> None:
    """Istio's builder turns the rule into a DENY named as Envoy's access log then reports
    it (``rbac_access_denied_matched_policy[…]``), so `expect.rule` agrees live."""
    mesh = compile_text(
        policy("ext", "foo", "action: CUSTOM\nprovider: {name: not-configured}\nrules: [{}]")
    )
    decision = http(mesh)
    assert (decision.verdict, decision.status) == (DENY, 403)
    assert decision.rule == (
        "istio-ext-authz-not-configured-ns[foo]-policy[ext]-rule[0]-deny-due-to-bad-CUSTOM-action"
    )
    assert "extensionProviders" in decision.reason


def test_custom_provider_that_is_not_an_authorizer_fails_closed() -> None:
    """A provider entry that is no ext_authz kind (here: a name only), or whose service is
    not in the registry, cannot be used: Istio denies what the CUSTOM rules match."""
    custom = policy("ext", "foo", "action: CUSTOM\nprovider: {name: opa}\nrules: [{}]")
    for entry in (
        "{name: opa}",
        "{name: opa, envoyExtAuthzHttp: {service: nowhere.foo.svc.cluster.local, port: 80}}",
    ):
        mesh = compile_text(custom, mesh=f"extensionProviders: [{entry}]\n")
        decision = evaluate(mesh, _request("/x"), now=NOW, ext_authz={"opa": True})
        assert (decision.verdict, decision.status) == (DENY, 403), entry
        assert decision.rule is not None and decision.rule.endswith(
            "-deny-due-to-bad-CUSTOM-action"
        )
        assert "cannot be used" in decision.reason


def test_custom_rule_names_follow_istio_for_configured_and_several_providers() -> None:
    # Authorizers Istio can use: an ext_authz kind and a service of the registry.
    grpc = "envoyExtAuthzGrpc: {service: httpbin.foo.svc.cluster.local, port: 8000}"
    configured = f"extensionProviders: [{{name: opa, {grpc}}}, {{name: oauth, {grpc}}}]\n"
    custom = "action: CUSTOM\nprovider: {name: opa}\nrules: [{to: [{operation: {paths: [/x]}}]}]"
    mesh = compile_text(policy("ext", "foo", custom), mesh=configured)
    asked = evaluate(mesh, _request("/x"), now=NOW, ext_authz={"opa": False})
    assert (asked.verdict, asked.rule) == (DENY, "istio-ext-authz-opa-ns[foo]-policy[ext]-rule[0]")
    assert evaluate(mesh, _request("/x"), now=NOW, ext_authz={"opa": True}).verdict is ALLOW
    # Two providers on one workload: Istio (flag off by default) makes every rule a DENY;
    # Envoy's filters run in provider order, so oauth's rule decides.
    other = "action: CUSTOM\nprovider: {name: oauth}\nrules: [{}]"
    both = compile_text(
        policy("ext", "foo", custom) + policy("b-other", "foo", other), mesh=configured
    )
    decision = evaluate(both, _request("/x"), now=NOW, ext_authz={"opa": True, "oauth": True})
    assert decision.verdict is DENY
    assert decision.rule == (
        "istio-ext-authz-oauth-ns[foo]-policy[b-other]-rule[0]-deny-due-to-bad-CUSTOM-action"
    )
    assert "PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS" in decision.reason


def _request(path: str) -> Request:
    return Request(Source.workload("foo/sleep"), "foo/httpbin", 8000, HttpRequest("GET", path))


def test_audit_never_changes_the_decision() -> None:
    mesh = compile_text(policy("audit", "foo", "action: AUDIT\nrules: [{}]"))
    decision = http(mesh)
    assert decision.verdict is ALLOW
    assert decision.audit == "ns[foo]-policy[audit]-rule[0]"


# --- mTLS -----------------------------------------------------------------------------


def test_mesh_strict_resets_plaintext_and_destination_rule_disable_breaks_it() -> None:
    strict = policy("default", "istio-system", "mtls: {mode: STRICT}", kind="PeerAuthentication")
    mesh = compile_text(strict)
    assert http(mesh, src="legacy/sleep").verdict is RESET
    assert http(mesh, src="legacy/sleep").status is None
    assert http(mesh, src="foo/sleep", dst="legacy/httpbin").verdict is ALLOW
    assert http(mesh, src="foo/sleep", dst="bar/httpbin").verdict is ALLOW
    dr = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: plain, namespace: foo}
spec:
  host: httpbin.bar.svc.cluster.local
  trafficPolicy: {tls: {mode: DISABLE}}
---
"""
    broken = compile_text(strict + dr)
    decision = http(broken, src="foo/sleep", dst="bar/httpbin")
    assert (decision.verdict, decision.status) == (RESET, 503)


# --- found by the differential test against Envoy (tests/xds) --------------------------


def test_dry_run_allow_is_not_evaluated_for_a_denied_request() -> None:
    mesh = compile_text(
        policy("deny", "foo", "action: DENY\nrules:\n- to: [{operation: {paths: [/x]}}]")
        + policy(
            "dry",
            "foo",
            "rules:\n- to: [{operation: {paths: [/y]}}]",
            extra_meta='  annotations: {"istio.io/dry-run": "true"}\n',
        )
        + policy("audit", "foo", "action: AUDIT\nrules: [{}]")
    )
    denied = http(mesh, "/x")
    assert denied.verdict is DENY and denied.dry_run == ()
    assert denied.audit == "ns[foo]-policy[audit]-rule[0]"  # AUDIT runs before DENY
    assert [s.result for s in http(mesh, "/z").dry_run] == ["denied"]


def test_remote_ip_comes_from_the_last_x_forwarded_for_entry() -> None:
    mesh = compile_text(
        policy(
            "allow",
            "foo",
            """
selector: {matchLabels: {app: httpbin}}
rules:
- from: [{source: {remoteIpBlocks: [203.0.113.0/24]}}]
""",
        )
    )
    source = Source.workload("foo/sleep", "10.0.0.1")
    via = (("x-forwarded-for", "198.51.100.7, 203.0.113.9"),)
    assert http(mesh, source=source, headers=via).verdict is ALLOW
    spoofed_first = (("x-forwarded-for", "203.0.113.9, 198.51.100.7"),)
    assert http(mesh, source=source, headers=spoofed_first).verdict is DENY
    assert http(mesh, source=source).verdict is DENY


def test_request_principal_wildcards_only_at_the_ends_of_the_whole_value() -> None:
    from trustmesh.policy.matchers import request_principal_match

    inner = request_principal_match(["iss*/sub"])  # '*' inside: literal
    assert not inner("issuer", "sub") and inner("iss*", "sub")
    assert request_principal_match(["iss/*"])("iss", "anyone")
    assert not request_principal_match(["*/*"])("iss", "sub")  # subject is literally '*'
    assert request_principal_match(["*/*"])("iss", "*")
    assert request_principal_match(["*.example.com/alice"])("idp.example.com", "alice")
    assert request_principal_match(["*"])("iss", "sub")


def test_trust_bundle_expansion_follows_istio() -> None:
    from trustmesh.policy.authz import TrustBundle

    bundle = TrustBundle(("td1", "old-td"))
    assert bundle.expand(["cluster.local/ns/a/sa/b"]) == ["td1/ns/a/sa/b", "old-td/ns/a/sa/b"]
    assert bundle.expand(["*/ns/a/sa/b", "sa/b", "other/ns/a/sa/b"]) == [
        "*/ns/a/sa/b",
        "sa/b",
        "other/ns/a/sa/b",
    ]
    assert bundle.expand(["*-td/ns/a/sa/b"]) == ["td1/ns/a/sa/b", "*-td/ns/a/sa/b"]


def test_a_port_the_workload_does_not_declare_reaches_nothing() -> None:
    """httpbin declares 8000 only. Istio's sidecar captures port 9999 too and enforces
    policy first; what it lets through finds nothing listening (503 over HTTP, a closed
    connection over TCP) — never an 'allow'."""
    mesh = compile_text()
    allowed = http(mesh, port=9999)
    assert (allowed.verdict, allowed.status) == (RESET, 503)
    assert "nothing listens on port 9999 of foo/httpbin (it declares 8000)" in allowed.reason
    assert allowed.reason in render_trace(allowed.trace)
    assert (http(mesh, port=8000).verdict, http(mesh, port=8000).status) == (ALLOW, 200)
    plaintext_to_legacy = http(mesh, port=9999, source=Source.plaintext(), dst="legacy/httpbin")
    assert (plaintext_to_legacy.verdict, plaintext_to_legacy.status) == (RESET, None)
    assert tcp(mesh, 9999, dst="foo/httpbin").verdict is RESET
    # the sidecar still enforces first: a denial stays a denial (403), as in Istio
    deny_all = compile_text(policy("deny", "foo", "action: DENY\nrules: [{}]"))
    denied = http(deny_all, port=9999)
    assert (denied.verdict, denied.status, denied.rule) == (
        DENY,
        403,
        "ns[foo]-policy[deny]-rule[0]",
    )


def test_a_sidecar_client_is_routed_by_its_host() -> None:
    """Istio's outbound route for port 8000 picks the cluster by Host: a name of the
    destination's Service reaches it over mTLS; a name of no service is passed through
    in plaintext (ALLOW_ANY) or answered 502 (REGISTRY_ONLY); another service's name
    goes to that service."""
    mesh = compile_text()
    for host in ("httpbin.foo:8000", "HTTPBIN.foo.svc.cluster.local", "httpbin", "httpbin:8000"):
        delivered = http(mesh, host=host)
        assert (delivered.verdict, delivered.principal) == (ALLOW, "cluster.local/ns/foo/sa/sleep")
    passed = http(mesh, host="internal.foo")
    assert (passed.verdict, passed.principal) == (ALLOW, None)
    assert any("PassthroughCluster" in step for step in render_trace(passed.trace))
    assert http(mesh, host="httpbin.foo:9999").principal is None  # not a domain of port 8000
    strict = compile_text(
        policy("strict", "foo", "mtls: {mode: STRICT}", kind="PeerAuthentication")
    )
    reset = http(strict, host="internal.foo")
    assert (reset.verdict, reset.status) == (RESET, 503)
    blocked = http(
        compile_text(mesh="outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n"), host="internal.foo"
    )
    assert (blocked.verdict, blocked.status) == (DENY, 502)
    # a principal source is no sidecar of this config: its Host is delivered as given
    peer = Source.principal("cluster.local/ns/x/sa/y")
    assert http(mesh, host="internal.foo", source=peer).principal == "cluster.local/ns/x/sa/y"
    with pytest.raises(RequestError, match="routes to Service bar/httpbin"):
        http(mesh, host="httpbin.bar:8000")


METRICS_PORT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: metrics, namespace: foo}
spec:
  selector: {matchLabels: {app: metrics}}
  template:
    metadata: {labels: {app: metrics}}
    spec:
      serviceAccountName: metrics
      containers: [{name: m, ports: [{containerPort: 8000}, {containerPort: 9191}]}]
"""


def test_a_sidecar_client_dialling_a_port_no_service_covers_leaves_without_mtls() -> None:
    """foo/metrics declares 9191 and no Service: a sidecar client dials its pod IP, for
    which Istio's sidecar has no listener or cluster. TCP falls to virtualOutbound:
    PassthroughCluster in plaintext (ALLOW_ANY) — so the peer sees no identity and STRICT
    resets it — or BlackHoleCluster (REGISTRY_ONLY). HTTP to a port some HTTP Service uses
    (8000) meets that port's listener, whose route has no virtual host for a pod IP."""
    mesh = compile_text(METRICS_PORT)
    passed = tcp(mesh, 9191, dst="foo/metrics")
    assert passed.verdict is ALLOW
    assert any("PassthroughCluster" in step for step in render_trace(passed.trace)), render_trace(
        passed.trace
    )
    only_sleep = policy(
        "only-sleep", "foo", "selector: {matchLabels: {app: metrics}}\n"
        "rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]}]",
    )  # fmt: skip
    # no identity reaches the peer: an ALLOW on sleep's principal denies it
    assert (
        tcp(compile_text(METRICS_PORT + "---\n" + only_sleep), 9191, dst="foo/metrics").verdict
        is DENY
    )
    strict = policy("strict", "foo", "mtls: {mode: STRICT}", kind="PeerAuthentication")
    assert (
        tcp(compile_text(METRICS_PORT + "---\n" + strict), 9191, dst="foo/metrics").verdict is RESET
    )
    registry_only = compile_text(
        METRICS_PORT, mesh="outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n"
    )
    closed = tcp(registry_only, 9191, dst="foo/metrics")
    assert (closed.verdict, closed.status) == (RESET, None)
    assert "BlackHoleCluster" in closed.reason
    # HTTP on 8000, an HTTP Service port elsewhere, with no Service of foo/metrics on it
    blocked = http(registry_only, dst="foo/metrics", port=8000, host="10.88.0.9:8000")
    assert (blocked.verdict, blocked.status) == (DENY, 502)
    through = http(mesh, dst="foo/metrics", port=8000, host="10.88.0.9:8000")
    assert (through.verdict, through.principal) == (ALLOW, None)
    # the Service's own names still go to the Service
    with pytest.raises(RequestError, match="routes to Service foo/httpbin"):
        http(mesh, dst="foo/metrics", port=8000, host="httpbin.foo:8000")


def test_http_egress_under_registry_only_is_502_only_where_a_listener_routes_by_host() -> None:
    """A sidecar has an outbound HTTP listener on a port only when some Service or
    ServiceEntry serves HTTP there; its route answers an unknown Host with 502. On any
    other port the request meets virtualOutbound, whose BlackHoleCluster closes it."""
    registry_only = "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n"

    def egress(mesh: MeshPolicy, port: int) -> Decision:
        request = Request(
            Source.workload("foo/sleep"), "", port, HttpRequest("GET", "/"), "unknown.example"
        )
        return evaluate(mesh, request, now=NOW)

    plain = compile_text(mesh=registry_only)
    assert (egress(plain, 8000).verdict, egress(plain, 8000).status) == (DENY, 502)  # httpbin's
    closed = egress(plain, 80)
    assert (closed.verdict, closed.status) == (RESET, None)
    assert "BlackHoleCluster" in closed.reason
    gateway = """apiVersion: v1
kind: Service
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  ports: [{name: http2, port: 80, targetPort: 8080}]
"""
    with_gateway = compile_text(gateway, mesh=registry_only)
    assert (egress(with_gateway, 80).verdict, egress(with_gateway, 80).status) == (DENY, 502)
