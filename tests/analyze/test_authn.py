"""End-user authentication checks: each trigger next to its near-identical non-trigger."""

from __future__ import annotations

import json

from trustmesh.analyze.findings import Finding, Severity
from trustmesh.api.diagnostics import Location

from .util import findings

JWKS = json.dumps(
    {"keys": [{"kty": "EC", "crv": "P-256", "x": "gS-hfNlLJtH4Nr1fnNxkKz7QrU9aCmAM_l5ScqQKbJM",
               "y": "9zuUKr3qJG2ZCWZzxqSPL4QXqCq3JMK1Beb1d7TdQKI", "kid": "k1"}]}
)  # fmt: skip

REQUEST_AUTHN = f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  selector:
    matchLabels: {{app: httpbin}}
  jwtRules:
  - issuer: issuer.example.com
    jwks: '{JWKS}'
"""


def where(found: Finding) -> Location:
    assert found.issue.location is not None
    return found.issue.location


def allow(rules: str, name: str = "allow", action: str = "ALLOW") -> str:
    return f"""\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: foo}}
spec:
  selector:
    matchLabels: {{app: httpbin}}
  action: {action}
  rules:
{rules}"""


REQUIRE_PRINCIPAL = """\
  - from:
    - source:
        requestPrincipals: ["issuer.example.com/*"]
"""
FROM_SLEEP = """\
  - from:
    - source:
        principals: ["cluster.local/ns/foo/sa/sleep"]
"""


# --- TM-AUTHN-001 --------------------------------------------------------------------------


def test_request_authentication_alone_lets_tokenless_requests_through() -> None:
    [found] = findings(REQUEST_AUTHN, "TM-AUTHN-001")
    assert found.issue.workloads == ("foo/httpbin",)
    assert found.severity is Severity.WARNING
    assert (where(found).line, where(found).field) == (8, "spec.jwtRules")
    assert "port 8000" in found.issue.message
    # the evaluator proved it: a real request without a token was allowed
    assert "GET / from workload foo/sleep to port 8000 with no token: allowed" in (
        found.issue.message
    )


def test_the_proposed_fix_closes_the_finding() -> None:
    [found] = findings(REQUEST_AUTHN, "TM-AUTHN-001")
    assert "notRequestPrincipals" in found.issue.fix
    assert findings(REQUEST_AUTHN + "---\n" + found.issue.fix, "TM-AUTHN-001") == []


def test_allow_requiring_a_request_principal_is_not_flagged() -> None:
    assert findings(REQUEST_AUTHN + allow(REQUIRE_PRINCIPAL), "TM-AUTHN-001") == []


def test_allow_requiring_a_claim_is_not_flagged() -> None:
    claim = """\
  - when:
    - key: request.auth.claims[groups]
      values: ["admins"]
"""
    assert findings(REQUEST_AUTHN + allow(claim), "TM-AUTHN-001") == []


def test_allow_that_does_not_need_a_token_is_flagged_with_its_rule() -> None:
    [found] = findings(REQUEST_AUTHN + allow(FROM_SLEEP), "TM-AUTHN-001")
    assert "ns[foo]-policy[allow]-rule[0]" in found.issue.message
    assert found.severity is Severity.WARNING
    assert "allowed (rule ns[foo]-policy[allow]-rule[0])" in found.issue.message


def test_some_open_allow_rules_next_to_token_rules_are_info() -> None:
    health = """\
  - to:
    - operation:
        paths: ["/healthz"]
"""
    [found] = findings(REQUEST_AUTHN + allow(REQUIRE_PRINCIPAL + health), "TM-AUTHN-001")
    assert found.severity is Severity.INFO
    assert "rule[1]" in found.issue.message and "rule[0]" not in found.issue.message
    assert "GET /healthz" in found.issue.message


def test_deny_of_missing_tokens_protects_the_workload() -> None:
    deny = """\
  - from:
    - source:
        notRequestPrincipals: ["*"]
"""
    text = REQUEST_AUTHN + allow(deny, "deny", "DENY")
    assert findings(text, "TM-AUTHN-001") == []


def test_deny_of_missing_tokens_on_another_port_does_not_protect() -> None:
    deny = """\
  - from:
    - source:
        notRequestPrincipals: ["*"]
    to:
    - operation:
        ports: ["9999"]
"""
    [found] = findings(REQUEST_AUTHN + allow(deny, "deny", "DENY"), "TM-AUTHN-001")
    assert found.issue.workloads == ("foo/httpbin",)


def test_dry_run_deny_does_not_protect() -> None:
    deny = """\
  - from:
    - source:
        notRequestPrincipals: ["*"]
"""
    policy = allow(deny, "deny", "DENY").replace(
        "namespace: foo}", 'namespace: foo, annotations: {istio.io/dry-run: "true"}}'
    )
    assert len(findings(REQUEST_AUTHN + policy, "TM-AUTHN-001")) == 1


def test_tcp_only_workloads_and_workloads_without_sidecar_are_not_flagged() -> None:
    tcp = REQUEST_AUTHN.replace("app: httpbin", "app: tcp-echo")
    assert findings(tcp, "TM-AUTHN-001") == []
    legacy = REQUEST_AUTHN.replace("namespace: foo", "namespace: legacy")
    assert findings(legacy, "TM-AUTHN-001") == []


def test_custom_authorizer_makes_it_info() -> None:
    custom = allow('  - to:\n    - operation:\n        paths: ["/*"]\n', "ext", "CUSTOM").replace(
        "  action: CUSTOM", "  action: CUSTOM\n  provider: {name: oauth2}"
    )
    [found] = findings(
        REQUEST_AUTHN + custom,
        "TM-AUTHN-001",
        mesh="extensionProviders:\n- name: oauth2\n",
    )
    assert found.severity is Severity.INFO
    assert "CUSTOM" in found.issue.message


def test_mesh_wide_request_authentication_names_every_http_workload() -> None:
    mesh_wide = REQUEST_AUTHN.replace("namespace: foo", "namespace: istio-system").replace(
        "  selector:\n    matchLabels: {app: httpbin}\n", ""
    )
    [found] = findings(mesh_wide, "TM-AUTHN-001")
    assert set(found.issue.workloads) == {"foo/httpbin", "bar/httpbin"}
    # sleep serves no port, tcp-echo declares only tcp- ports: no JWT is ever read there
    assert "foo/tcp-echo" not in found.issue.workloads
    assert "legacy/httpbin" not in found.issue.workloads  # no sidecar, nothing enforced


# --- TM-AUTHN-002 --------------------------------------------------------------------------


DENY_BAD_ISSUER = allow(
    """\
  - from:
    - source:
        requestPrincipals: ["evil.example.com/*"]
""",
    "deny-evil",
    "DENY",
)


def test_deny_on_request_principals_without_request_authentication_never_denies() -> None:
    [found] = findings(DENY_BAD_ISSUER, "TM-AUTHN-002")
    assert found.severity is Severity.ERROR
    assert found.issue.workloads == ("foo/httpbin",)
    assert found.issue.resource == "AuthorizationPolicy/foo/deny-evil"
    assert where(found).field == "spec.rules[0].from[0].source.requestPrincipals"
    assert where(found).line == 12
    assert "never denies" in found.issue.message
    assert 'issuer: "evil.example.com"' in found.issue.fix


def test_same_deny_with_a_request_authentication_is_fine() -> None:
    assert findings(REQUEST_AUTHN + DENY_BAD_ISSUER, "TM-AUTHN-002") == []


def test_request_authentication_for_another_workload_does_not_count() -> None:
    other = REQUEST_AUTHN.replace("app: httpbin", "app: sleep")
    assert len(findings(other + DENY_BAD_ISSUER, "TM-AUTHN-002")) == 1


def test_allow_on_claims_without_request_authentication_never_allows() -> None:
    claim = """\
  - when:
    - key: request.auth.claims[groups]
      values: ["admins"]
"""
    [found] = findings(allow(claim).removeprefix("---\n"), "TM-AUTHN-002")
    assert found.severity is Severity.INFO
    assert where(found).field == "spec.rules[0].when[0].key"
    assert "never allows" in found.issue.message


def test_negative_token_match_in_allow_matches_everything() -> None:
    rule = """\
  - from:
    - source:
        notRequestPrincipals: ["evil.example.com/*"]
"""
    [found] = findings(allow(rule), "TM-AUTHN-002")
    assert found.severity is Severity.WARNING
    assert "allows regardless of tokens" in found.issue.message


def test_deny_with_one_dead_source_entry_is_a_partial_bypass() -> None:
    rule = """\
  - from:
    - source:
        requestPrincipals: ["evil.example.com/*"]
    - source:
        namespaces: ["legacy"]
"""
    [found] = findings(allow(rule, "deny", "DENY"), "TM-AUTHN-002")
    assert found.severity is Severity.WARNING
    assert "that part of the DENY never denies" in found.issue.message


def test_policies_without_jwt_fields_are_not_flagged() -> None:
    assert findings(allow(FROM_SLEEP), "TM-AUTHN-002") == []


# --- TM-AUTHN-003 --------------------------------------------------------------------------


def with_jwks_uri(uri: str) -> str:
    return REQUEST_AUTHN.replace(f"jwks: '{JWKS}'", f"jwksUri: {uri}")


def test_plain_http_jwks_uri() -> None:
    [found] = findings(with_jwks_uri("http://issuer.example.com/jwks.json"), "TM-AUTHN-003")
    assert found.severity is Severity.WARNING
    assert where(found).field == "spec.jwtRules[0].jwksUri"
    assert where(found).line == 9
    assert found.issue.workloads == ("foo/httpbin",)
    assert "plain http" in found.issue.message


def test_https_public_jwks_uri_is_fine() -> None:
    assert findings(with_jwks_uri("https://issuer.example.com/jwks.json"), "TM-AUTHN-003") == []


def test_metadata_and_loopback_addresses_are_errors() -> None:
    for uri in ("https://169.254.169.254/latest/meta-data", "https://127.0.0.1:8080/debug"):
        [found] = findings(with_jwks_uri(uri), "TM-AUTHN-003")
        assert found.severity is Severity.ERROR, uri


def test_private_address_and_cluster_names() -> None:
    [private] = findings(with_jwks_uri("https://10.0.0.5/keys"), "TM-AUTHN-003")
    assert private.severity is Severity.WARNING
    [internal] = findings(
        with_jwks_uri("https://keycloak.auth.svc.cluster.local/certs"), "TM-AUTHN-003"
    )
    assert internal.severity is Severity.INFO


def test_private_key_in_jwks() -> None:
    leaked = json.loads(JWKS)
    leaked["keys"][0]["d"] = "c2VjcmV0"
    text = REQUEST_AUTHN.replace(JWKS, json.dumps(leaked))
    [found] = findings(text, "TM-AUTHN-003")
    assert found.severity is Severity.ERROR
    assert where(found).field == "spec.jwtRules[0].jwks"
    assert "k1 (EC private key: d)" in found.issue.message
    assert '"d"' not in found.issue.fix and '"x"' in found.issue.fix


def test_public_jwks_is_fine() -> None:
    assert findings(REQUEST_AUTHN, "TM-AUTHN-003") == []
