"""End-user JWT: real signatures, Envoy's 401 vs 403, skew, locations, claims."""

from __future__ import annotations

import json
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from trustmesh.policy.decision import Verdict

from .meshutil import NOW, compile_text, http, policy

ISSUER = "testing@secure.istio.io"


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    good, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    public = json.loads(ECAlgorithm.to_jwk(good.public_key()))
    public.update(kid="k1", alg="ES256", use="sig")
    return {"good": good, "other": other, "jwks": json.dumps({"keys": [public]})}


def token(keys: dict[str, Any], key: str = "good", **claims: Any) -> str:
    payload = {"iss": ISSUER, "sub": ISSUER, "exp": NOW + 3600, **claims}
    return pyjwt.encode(payload, keys[key], algorithm="ES256", headers={"kid": "k1"})


def request_authn(keys: dict[str, Any], extra: str = "") -> str:
    jwks = keys["jwks"].replace('"', '\\"')
    return policy(
        "jwt",
        "foo",
        f"""
selector: {{matchLabels: {{app: httpbin}}}}
jwtRules:
- issuer: {ISSUER}
  jwks: "{jwks}"
{extra}""",
        kind="RequestAuthentication",
    )


def test_invalid_tokens_are_401_and_no_token_passes(keys: dict[str, Any]) -> None:
    mesh = compile_text(request_authn(keys))
    assert http(mesh, jwt=token(keys)).verdict is Verdict.ALLOW
    assert http(mesh).verdict is Verdict.ALLOW
    for bad, message in (
        (token(keys, key="other"), "Jwt verification fails"),
        (token(keys, exp=NOW - 61), "Jwt is expired"),
        (token(keys, iss="someone-else"), "Jwt issuer is not configured"),
        ("not-a-jwt", "Jwt is not in the form"),
        (token(keys, nbf=NOW + 120), "Jwt not yet valid"),
    ):
        decision = http(mesh, jwt=bad)
        assert (decision.verdict, decision.status) == (Verdict.UNAUTHENTICATED, 401), message
        assert decision.reason.startswith(message)


def test_clock_skew_of_sixty_seconds(keys: dict[str, Any]) -> None:
    mesh = compile_text(request_authn(keys))
    assert http(mesh, jwt=token(keys, exp=NOW - 59)).verdict is Verdict.ALLOW
    assert http(mesh, jwt=token(keys, exp=NOW - 59), now=NOW + 2).verdict is Verdict.UNAUTHENTICATED


def test_audience_mismatch_is_403_and_checked_before_signature(keys: dict[str, Any]) -> None:
    mesh = compile_text(request_authn(keys, "  audiences: [https://api.example.com/]\n"))
    assert http(mesh, jwt=token(keys, aud="api.example.com")).verdict is Verdict.ALLOW
    wrong = http(mesh, jwt=token(keys, aud="other"))
    assert (wrong.verdict, wrong.status) == (Verdict.DENY, 403)
    forged = http(mesh, jwt=token(keys, key="other", aud="other"))
    assert forged.status == 403  # Envoy checks audience before the signature


def test_request_principals_split_at_last_slash(keys: dict[str, Any]) -> None:
    issuer_url = "https://issuer.example.com/realm"
    allow = policy(
        "allow",
        "foo",
        f"""
selector: {{matchLabels: {{app: httpbin}}}}
rules:
- from: [{{source: {{requestPrincipals: ["{issuer_url}/alice"]}}}}]
""",
    )
    jwks = keys["jwks"].replace('"', '\\"')
    authn = policy(
        "jwt",
        "foo",
        f"""
selector: {{matchLabels: {{app: httpbin}}}}
jwtRules:
- issuer: {issuer_url}
  jwks: "{jwks}"
""",
        kind="RequestAuthentication",
    )
    mesh = compile_text(authn + allow)
    alice = http(mesh, jwt=token(keys, iss=issuer_url, sub="alice"))
    assert alice.verdict is Verdict.ALLOW
    assert alice.request_principal == f"{issuer_url}/alice"
    assert http(mesh, jwt=token(keys, iss=issuer_url, sub="bob")).verdict is Verdict.DENY
    assert http(mesh).verdict is Verdict.DENY  # no token → no request principal → 403


def test_claims_lists_nested_and_space_delimited_scope(keys: dict[str, Any]) -> None:
    allow = policy(
        "allow",
        "foo",
        """
selector: {matchLabels: {app: httpbin}}
rules:
- to: [{operation: {paths: [/groups]}}]
  when: [{key: "request.auth.claims[groups]", values: [group1]}]
- to: [{operation: {paths: [/nested]}}]
  when: [{key: "request.auth.claims[realm][role]", values: [admin]}]
- to: [{operation: {paths: [/scope]}}]
  when: [{key: "request.auth.claims[scope]", values: [write]}]
""",
    )
    mesh = compile_text(request_authn(keys) + allow)
    assert http(mesh, "/groups", jwt=token(keys, groups=["group1", "g2"])).verdict is Verdict.ALLOW
    assert http(mesh, "/groups", jwt=token(keys, groups=["g2"])).verdict is Verdict.DENY
    assert http(mesh, "/nested", jwt=token(keys, realm={"role": "admin"})).verdict is Verdict.ALLOW
    assert http(mesh, "/scope", jwt=token(keys, scope="read write")).verdict is Verdict.ALLOW
    assert http(mesh, "/scope", jwt=token(keys, scope="read writer")).verdict is Verdict.DENY


def test_custom_location_and_claim_to_header(keys: dict[str, Any]) -> None:
    extra = """  fromHeaders: [{name: x-jwt, prefix: "Token "}]
  outputClaimToHeaders: [{header: x-jwt-claim-foo, claim: foo}]
"""
    mesh = compile_text(request_authn(keys, extra))
    good = token(keys, foo="bar")
    # the default Authorization location is not read once fromHeaders is set
    assert http(mesh, jwt=token(keys, key="other")).verdict is Verdict.ALLOW
    decision = http(mesh, headers=(("x-jwt", f"Token {good}"),))
    assert decision.verdict is Verdict.ALLOW
    assert dict(decision.upstream_headers) == {"x-jwt-claim-foo": "bar"}
    bad = http(mesh, headers=(("x-jwt", f"Token {token(keys, key='other')}"),))
    assert bad.verdict is Verdict.UNAUTHENTICATED


def test_unfetchable_jwks_uri_rejects_tokens_but_not_their_absence(keys: dict[str, Any]) -> None:
    mesh = compile_text(
        policy(
            "jwt",
            "foo",
            f"""
selector: {{matchLabels: {{app: httpbin}}}}
jwtRules:
- issuer: {ISSUER}
  jwksUri: https://example.com/jwks.json
""",
            kind="RequestAuthentication",
        )
    )
    assert http(mesh, jwt=token(keys)).verdict is Verdict.UNAUTHENTICATED
    assert http(mesh).verdict is Verdict.ALLOW


# --- where Envoy's jwt_authn finds tokens (measured: tests/xds/jwt_cases.py) -------------

WHO = policy(
    "who",
    "foo",
    f"""
selector: {{matchLabels: {{app: httpbin}}}}
rules:
- from: [{{source: {{requestPrincipals: ["{ISSUER}/alice"]}}}}]
- from: [{{source: {{requestPrincipals: ["other.example/bob"]}}}}]
- to: [{{operation: {{paths: [/anyone]}}}}]
- to: [{{operation: {{paths: [/auth-header]}}}}]
  when: [{{key: "request.headers[authorization]", values: ["*"]}}]
""",
)


def _principal(decision: Any) -> str | None:
    return str(decision.request_principal) if decision.request_principal else None


def test_the_prefix_is_found_anywhere_and_the_token_runs_to_the_end(keys: dict[str, Any]) -> None:
    mesh = compile_text(request_authn(keys) + WHO)
    alice = token(keys, sub="alice")
    for value in (f"x Bearer {alice}", f"xBearer {alice}", f"Basic a, Bearer {alice}"):
        decision = http(mesh, headers=(("authorization", value),))
        assert decision.verdict is Verdict.ALLOW, value
        assert _principal(decision) == f"{ISSUER}/alice"
    # "<jwt> x" is the token: the space and what follows sit in the signature part, where
    # Envoy's base64 decoder skips whitespace, and a 65-byte ECDSA signature is read as r, s.
    assert http(mesh, headers=(("authorization", f"Bearer {alice} x"),)).verdict is Verdict.ALLOW
    assert http(mesh, headers=(("authorization", f"Bearer {alice} xy"),)).status == 401
    assert http(mesh, headers=(("authorization", f"Bearer {alice},x"),)).status == 401
    # Case-sensitive: "bearer <jwt>" carries no token, so no identity (403 from the ALLOW).
    lower = http(mesh, headers=(("authorization", f"bearer {alice}"),))
    assert (lower.status, lower.request_principal) == (403, None)


def test_a_query_parameter_counts_once_with_its_first_value(keys: dict[str, Any]) -> None:
    mesh = compile_text(request_authn(keys) + WHO)
    good, bad = token(keys, sub="alice"), token(keys, key="other")
    assert http(mesh, f"/get?access_token={good}&access_token={bad}").verdict is Verdict.ALLOW
    assert http(mesh, f"/get?access_token={bad}&access_token={good}").status == 401
    encoded = good.replace(".", "%2E")
    assert http(mesh, f"/get?access_token={encoded}").verdict is Verdict.ALLOW
    assert http(mesh, f"/get?access_token={good}+").status == 401  # "+" is not a space


def test_a_verified_token_header_is_gone_before_rbac(keys: dict[str, Any]) -> None:
    mesh = compile_text(request_authn(keys) + WHO)
    # forwardOriginalToken is false: Envoy removes the Authorization header it verified.
    verified = http(mesh, "/auth-header", headers=(("authorization", f"Bearer {token(keys)}"),))
    assert verified.rule != "ns[foo]-policy[who]-rule[3]"
    unverified = http(mesh, "/auth-header", headers=(("authorization", "Basic abc"),))
    assert unverified.rule == "ns[foo]-policy[who]-rule[3]"


def test_another_providers_location_is_not_ones_own(keys: dict[str, Any]) -> None:
    other_jwks = keys["jwks"].replace('"', '\\"')
    extra = f"""  fromHeaders: [{{name: x-a}}]
- issuer: other.example
  jwks: "{other_jwks}"
"""
    mesh = compile_text(request_authn(keys, extra) + WHO)
    alice = token(keys, sub="alice")
    assert http(mesh, headers=(("x-a", alice),)).verdict is Verdict.ALLOW
    # ISSUER's token where only other.example looks: "Jwt issuer is not configured".
    misplaced = http(mesh, headers=(("authorization", f"Bearer {alice}"),))
    assert (misplaced.status, misplaced.reason) == (401, "Jwt issuer is not configured")


def test_an_accepted_token_is_removed_before_the_next_provider_looks(keys: dict[str, Any]) -> None:
    other_jwks = keys["jwks"].replace('"', '\\"')
    both = f"""- issuer: other.example
  jwks: "{other_jwks}"
"""
    mesh = compile_text(request_authn(keys, both) + WHO)
    alice, bob = token(keys, sub="alice"), token(keys, iss="other.example", sub="bob")
    # Each token sits where both providers look. other.example accepts bob (from the query)
    # and removes it, then fails on alice; ISSUER's provider, looking again, accepts alice.
    decision = http(
        mesh, f"/get?access_token={bob}", headers=(("authorization", f"Bearer {alice}"),)
    )
    assert decision.verdict is Verdict.ALLOW
    assert _principal(decision) == f"{ISSUER}/alice"


def test_a_cors_preflight_is_not_authenticated(keys: dict[str, Any]) -> None:
    mesh = compile_text(request_authn(keys) + WHO)
    forged = ("authorization", f"Bearer {token(keys, key='other')}")
    preflight = (("origin", "https://app.example"), ("access-control-request-method", "GET"))
    decision = http(mesh, "/anyone", method="OPTIONS", headers=(*preflight, forged))
    assert decision.verdict is Verdict.ALLOW
    assert http(mesh, "/anyone", method="OPTIONS", headers=(forged,)).status == 401


def test_payload_types_and_cookie_quotes_as_envoy_reads_them(keys: dict[str, Any]) -> None:
    mesh = compile_text(request_authn(keys, "  fromCookies: [session]\n") + WHO)
    alice = token(keys, sub="alice")
    assert http(mesh, headers=(("cookie", f'a=1; session="{alice}"'),)).verdict is Verdict.ALLOW
    assert http(mesh, headers=(("cookie", f"session={alice}"),)).verdict is Verdict.ALLOW
    not_a_number = token(keys, sub="alice", exp=str(int(NOW) + 3600))
    decision = http(mesh, headers=(("cookie", f"session={not_a_number}"),))
    assert (decision.status, decision.reason) == (401, "Jwt payload [exp] field is not an integer")
