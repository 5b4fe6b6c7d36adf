"""TM-AUTHZ-004 proves a bypass with a source the workload's ALLOW rules really admit.

With mesh-wide STRICT mTLS plaintext clients are reset, so a bypass only matters for the
peers, token holders, addresses… that an ALLOW rule lets in. Each case below admits one
kind of source only, and the finding must name a request from that kind of source that the
evaluator allows.
"""

from __future__ import annotations

import pytest

from trustmesh.analyze.checks.authz_probe import ProbeToken, _sign, probe_mesh
from trustmesh.policy.decision import Verdict
from trustmesh.policy.request import Source

from ..unit.meshutil import http
from .test_authz import only, policy
from .util import context_from, findings

STRICT = """\
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
"""
DENY_ADMIN = policy(
    "deny-admin",
    '  - to:\n    - operation:\n        paths: ["/admin"]\n',
    action="DENY",
    selector="app: httpbin",
)
INGRESS = "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
JWT = """\
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  jwtRules:
  - issuer: https://issuer.example
    jwksUri: https://issuer.example/jwks.json
    audiences: [api]
"""


def allow(rules: str) -> str:
    return policy("allow-some", rules, selector="app: httpbin")


def test_issue_case_ingress_principal_gets_through_every_spelling() -> None:
    ingress_only = f'  - from:\n    - source:\n        principals: ["{INGRESS}"]\n'
    text = STRICT + DENY_ADMIN + allow(ingress_only)
    f = only(findings(text, "TM-AUTHZ-004"))
    assert f.issue.workloads == ("foo/httpbin",)
    message = f.issue.message
    assert f"`GET /admin` from peer {INGRESS} is denied" in message
    assert f"`GET //admin` from peer {INGRESS} is allowed on foo/httpbin:8000" in message
    for spelling in ("`//admin` (double-slash)", "`/admin/` (trailing-slash)", "`/admin%2F`"):
        assert spelling in message
    # What the finding claims is what the evaluator (authz check) answers.
    mesh = context_from(text).mesh
    peer = Source.principal(INGRESS)
    assert http(mesh, "/admin", source=peer).verdict is Verdict.DENY
    for path in ("//admin", "/admin/", "/admin%2F"):
        assert http(mesh, path, source=peer).verdict is Verdict.ALLOW, path
    assert http(mesh, "//admin", source=Source.plaintext()).verdict is Verdict.RESET


@pytest.mark.parametrize(
    ("rules", "extra", "named"),
    [
        (
            '  - from:\n    - source:\n        namespaces: ["istio-system"]\n',
            "",
            "from peer cluster.local/ns/istio-system/sa/",
        ),
        (
            '  - from:\n    - source:\n        serviceAccounts: ["istio-system/ingress"]\n',
            "",
            "from peer cluster.local/ns/istio-system/sa/ingress",
        ),
        (
            '  - from:\n    - source:\n        principals: ["cluster.local/ns/istio-system/*"]\n',
            "",
            "from peer cluster.local/ns/istio-system/sa/probe",
        ),
        (
            "  - when:\n    - key: source.principal\n"
            "      values: [cluster.local/ns/ops/sa/admin]\n",
            "",
            "from peer cluster.local/ns/ops/sa/admin",
        ),
        (
            '  - from:\n    - source:\n        ipBlocks: ["10.20.0.0/16"]\n',
            "",
            " at 10.20.0.1 ",
        ),
        (
            '  - from:\n    - source:\n        remoteIpBlocks: ["192.0.2.0/24"]\n',
            "",
            "(headers x-forwarded-for: 192.0.2.1)",
        ),
        (
            "  - to:\n    - operation:\n        methods: [POST]\n"
            "    when:\n    - key: request.headers[x-api-key]\n      values: [s3cr3t]\n",
            "",
            "`POST //admin` (headers x-api-key: s3cr3t)",
        ),
        (
            '  - from:\n    - source:\n        requestPrincipals: ["https://issuer.example/*"]\n',
            JWT,
            "with a valid JWT for https://issuer.example/probe-user (aud=api)",
        ),
        (
            "  - when:\n    - key: request.auth.claims[groups]\n      values: [admins]\n"
            "    - key: request.auth.principal\n      values: [https://issuer.example/alice]\n",
            JWT,
            "with a valid JWT for https://issuer.example/alice (aud=api, groups=admins)",
        ),
    ],
    ids=[
        "namespaces",
        "serviceAccounts",
        "principal-prefix",
        "when-principal",
        "ipBlocks",
        "remoteIpBlocks",
        "header",
        "requestPrincipals",
        "claims",
    ],
)
def test_bypass_is_proven_with_the_source_the_allow_rule_admits(
    rules: str, extra: str, named: str
) -> None:
    f = only(findings(STRICT + DENY_ADMIN + allow(rules) + extra, "TM-AUTHZ-004"))
    assert "is denied while" in f.issue.message
    allowed = f.issue.message.split("is denied while", 1)[1]
    assert named in allowed, f.issue.message
    assert "plaintext" not in f.issue.message  # STRICT: a plaintext client is reset


def test_allow_that_admits_no_spelling_of_the_path_is_quiet() -> None:
    only_public = allow(
        f'  - from:\n    - source:\n        principals: ["{INGRESS}"]\n'
        '    to:\n    - operation:\n        paths: ["/public/*"]\n'
    )
    assert findings(STRICT + DENY_ADMIN + only_public, "TM-AUTHZ-004") == []


def test_allow_for_a_jwt_no_request_authentication_accepts_is_quiet() -> None:
    # No RequestAuthentication: no request has a request principal, the ALLOW admits no
    # one, so `//admin` is denied like everything else.
    rules = '  - from:\n    - source:\n        requestPrincipals: ["https://issuer.example/*"]\n'
    assert findings(STRICT + DENY_ADMIN + allow(rules), "TM-AUTHZ-004") == []


def test_probe_tokens_are_only_trusted_by_the_analyzers_copy_of_the_mesh() -> None:
    rules = '  - from:\n    - source:\n        requestPrincipals: ["https://issuer.example/*"]\n'
    ctx = context_from(STRICT + DENY_ADMIN + allow(rules) + JWT)
    token = _sign(ProbeToken("https://issuer.example", "u", '{"aud": ["api"]}'))
    peer = Source.principal(INGRESS)
    real = http(ctx.mesh, "/get", source=peer, jwt=token)
    assert real.verdict is Verdict.UNAUTHENTICATED  # the real mesh never trusts the probe key
    probed = http(probe_mesh(ctx), "/get", source=peer, jwt=token)
    assert probed.verdict is Verdict.ALLOW


def test_allow_admitting_other_methods_only_is_not_a_bypass() -> None:
    deny_post = policy(
        "deny-post-admin",
        '  - to:\n    - operation:\n        methods: [POST]\n        paths: ["/admin"]\n',
        action="DENY",
        selector="app: httpbin",
    )
    get_only = allow("  - to:\n    - operation:\n        methods: [GET]\n")
    assert findings(STRICT + deny_post + get_only, "TM-AUTHZ-004") == []
    mesh = context_from(STRICT + deny_post + get_only).mesh
    assert http(mesh, "//admin", method="POST").verdict is Verdict.DENY  # no ALLOW for POST


def test_rule_reading_what_no_probe_sets_is_judged_on_the_path_alone() -> None:
    sni = policy(
        "deny-admin-sni",
        '  - to:\n    - operation:\n        paths: ["/admin"]\n'
        "    when:\n    - key: connection.sni\n      values: [internal.example.com]\n",
        action="DENY",
        selector="app: httpbin",
    )
    f = only(findings(sni, "TM-AUTHZ-004"))
    assert "not confirmed against a request the rule denies" in f.issue.message
    assert "`//admin` (double-slash)" in f.issue.message
