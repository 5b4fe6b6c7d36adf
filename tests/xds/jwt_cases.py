"""Where Envoy's jwt_authn finds end-user tokens, and what it makes of them: policy sets and
requests for the RBAC differential test (test_rbac_differential, cases ``jwt-extraction/*``).

Each set has RequestAuthentications shaped like a user would write them (one provider with
Envoy's default locations, one with custom header / prefix / parameter / cookie locations
and claim headers, two providers with their own or shared locations, one forwarding the
token) and one ALLOW policy whose rules tell the answers apart: on ``/who`` which identity
(if any) RBAC saw, on ``/headers`` which token and claim headers RBAC still saw. Tokens
are signed at run time with fresh keys and expire an hour from the real now (Envoy checks
them against the real clock).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

A, B = "a.example", "b.example"
Headers = tuple[tuple[str, str], ...]

_WHO = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: who, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {requestPrincipals: ["a.example/alice"]}}]
    to: [{operation: {paths: ["/who"]}}]
  - from: [{source: {requestPrincipals: ["a.example/alice2"]}}]
    to: [{operation: {paths: ["/who"]}}]
  - from: [{source: {requestPrincipals: ["b.example/bob"]}}]
    to: [{operation: {paths: ["/who"]}}]
  - from: [{source: {requestPrincipals: ["b.example/bob-aud"]}}]
    to: [{operation: {paths: ["/who"]}}]
  - from: [{source: {notRequestPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/who"]}}]
  - to: [{operation: {paths: ["/headers"]}}]
    when: [{key: "request.headers[authorization]", values: ["*"]}]
  - to: [{operation: {paths: ["/headers"]}}]
    when: [{key: "request.headers[x-jwt]", values: ["*"]}]
  - to: [{operation: {paths: ["/headers"]}}]
    when: [{key: "request.headers[x-jwt-sub]", values: ["alice"]}]
  - to: [{operation: {paths: ["/headers"]}}]
    when: [{key: "request.headers[x-jwt-sub]", values: ["forged"]}]
  - to: [{operation: {paths: ["/headers"]}}]
---
"""


@dataclass(frozen=True, slots=True)
class Tokens:
    """Signed tokens for the probes, and the JWKS of each issuer."""

    jwks_a: str
    jwks_b: str
    alice: str
    alice2: str
    bob: str  # aud svc
    bob_aud: str  # aud other: B's provider refuses it with 403 where it checks audiences
    forged: str  # issuer A, signed with B's key
    expired: str
    alice_as_b: str  # subject alice, issuer B


@functools.cache
def make_tokens() -> Tokens:
    """One set of keys and tokens per test session (the rig and the assertions share it)."""
    key_a, key_b = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def jwks(key: ec.EllipticCurvePrivateKey, kid: str) -> str:
        public = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        public.update(kid=kid, alg="ES256", use="sig")
        return json.dumps({"keys": [public]}, separators=(",", ":"))

    def sign(
        key: ec.EllipticCurvePrivateKey, kid: str, iss: str, sub: str, **claims: object
    ) -> str:
        payload = {"iss": iss, "sub": sub, "exp": int(time.time()) + 3600, **claims}
        return pyjwt.encode(payload, key, algorithm="ES256", headers={"kid": kid})

    return Tokens(
        jwks_a=jwks(key_a, "ka"),
        jwks_b=jwks(key_b, "kb"),
        alice=sign(key_a, "ka", A, "alice"),
        alice2=sign(key_a, "ka", A, "alice2"),
        bob=sign(key_b, "kb", B, "bob", aud="svc"),
        bob_aud=sign(key_b, "kb", B, "bob-aud", aud="other"),
        forged=sign(key_b, "ka", A, "mallory"),
        expired=pyjwt.encode(
            {"iss": A, "sub": "alice", "exp": int(time.time()) - 3600},
            key_a,
            algorithm="ES256",
            headers={"kid": "ka"},
        ),
        alice_as_b=sign(key_b, "kb", B, "alice"),
    )


def _authn(name: str, rules: str) -> str:
    body = "\n".join("  " + line for line in rules.strip("\n").splitlines())
    return (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        f"metadata: {{name: {name}, namespace: foo}}\nspec:\n"
        f"  selector: {{matchLabels: {{app: httpbin}}}}\n  jwtRules:\n{body}\n---\n"
    )


def policy_sets(t: Tokens) -> dict[str, str]:
    """Name → configuration (RequestAuthentications + the ``who`` ALLOW policy)."""
    a, b = f"'{t.jwks_a}'", f"'{t.jwks_b}'"
    return {
        "default": _authn("a", f"- issuer: {A}\n  jwks: {a}\n"),
        "custom": _authn(
            "a",
            f"""- issuer: {A}
  jwks: {a}
  fromHeaders: [{{name: x-jwt}}, {{name: X-Auth, prefix: "Tok "}}]
  fromParams: [tok]
  fromCookies: [session]
  outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
""",
        ),
        # A reads only x-a; B the defaults and checks audiences: another provider's
        # location is not one's own (an A token in Authorization is an unknown issuer).
        "two": _authn(
            "ab",
            f"- issuer: {A}\n  jwks: {a}\n  fromHeaders: [{{name: x-a}}]\n"
            f"- issuer: {B}\n  jwks: {b}\n  audiences: [svc]\n",
        ),
        # Both at the defaults, in two resources: every token is at both providers'
        # locations; what one accepts it removes before the next looks.
        "two-default": _authn("a", f"- issuer: {A}\n  jwks: {a}\n")
        + _authn(
            "b",
            f"- issuer: {B}\n  jwks: {b}\n"
            "  outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]\n",
        ),
        "forward": _authn("a", f"- issuer: {A}\n  jwks: {a}\n  forwardOriginalToken: true\n"),
    }


def probes(name: str, t: Tokens) -> list[tuple[str, str, Headers]]:
    """(method, path, header lines) to send to set ``name``."""
    auth = "authorization"
    placements: list[Headers] = [
        (),
        ((auth, f"Bearer {t.alice}"),),
        ((auth, f"x Bearer {t.alice}"),),  # the prefix anywhere in the value
        ((auth, f"xBearer {t.alice}"),),
        ((auth, f"Basic abc, Bearer {t.alice}"),),
        ((auth, f"Bearer {t.alice} x"),),  # the token runs to the end: "<jwt> x"
        ((auth, f"Bearer {t.alice}  \tx"),),
        ((auth, f"Bearer {t.alice} xy"),),
        ((auth, f"Bearer {t.alice},junk"),),
        ((auth, f"Bearer {t.alice}."),),
        ((auth, f"Bearer !!{t.alice}"),),
        ((auth, f"bearer {t.alice}"),),  # the prefix is case-sensitive: no token
        ((auth, f"BEARER {t.forged}"),),
        ((auth, f"Bearer\t{t.forged}"),),
        ((auth, "Bearer"),),
        ((auth, "Bearer !!!"),),
        ((auth, f"Bearer Bearer {t.alice}"),),
        ((auth, f"Bearer {t.alice}"), (auth, f"Bearer {t.alice2}")),  # joined: one value
        ((auth, f"Bearer {t.alice2} Bearer {t.alice}"),),
        ((auth, f"Bearer {t.forged}"),),
        ((auth, f"Bearer {t.expired}"),),
        ((auth, f"Bearer {t.bob}"),),
        ((auth, f"Bearer {t.bob_aud}"),),
        ((auth, f"Bearer {t.alice_as_b}"),),
        (("x-jwt", t.alice),),
        (("x-jwt", f" {t.alice2}\t"),),  # the codec trims the value
        (("x-jwt", t.alice), ("x-jwt", t.alice2)),  # two lines: two tokens
        (("x-jwt", t.alice), ("x-jwt", t.forged)),
        (("x-jwt", t.forged), ("x-jwt", t.alice)),
        (("x-jwt", ""),),
        (("X-Auth", f"Tok {t.alice}"),),
        (("x-auth", f"please Tok {t.alice2}"),),
        (("x-auth", f"tok {t.forged}"),),
        (("x-jwt", t.alice), ("x-auth", f"Tok {t.alice2}")),  # the last found is checked first
        (("x-a", t.alice),),
        (("x-a", t.bob),),
        (("x-a", t.alice), (auth, f"Bearer {t.bob_aud}")),
        (("x-a", t.forged), (auth, f"Bearer {t.bob_aud}")),
        (("x-a", t.forged), (auth, f"Bearer {t.bob}")),
        (("x-jwt-sub", "forged"),),  # a claim header is the filter's own
        (("x-jwt-sub", "forged"), (auth, f"Bearer {t.alice}")),
        (("x-jwt-sub", "forged"), (auth, f"Bearer {t.bob}")),
        (("cookie", f"session={t.alice}"),),
        (("cookie", f'a=1; session="{t.alice2}"; b=2'),),
        (("cookie", f"session={t.alice}; session={t.forged}"),),
        (("cookie", f"session={t.forged}"), ("cookie", f"session={t.alice}")),
        (("cookie", f"session ={t.forged}"),),
        (("cookie", f"x=1;\tsession={t.forged}"),),
        (("cookie", f"Session={t.forged}"),),
        (("x-jwt", t.alice), ("cookie", f"session={t.forged}")),
    ]
    queries = [
        f"?access_token={t.alice}",
        f"?access_token={t.alice}&access_token={t.forged}",  # the first value only
        f"?access_token={t.forged}&access_token={t.alice}",
        f"?access_token={t.alice.replace('.', '%2E')}",
        f"?access_token={t.alice}+",
        "?access_token=",
        "?access_token",
        f"?Access_Token={t.forged}",
        f"?x=1;access_token={t.forged}",
        f"?tok={t.alice}",
        f"?tok={t.forged}&x=%26tok%3D{t.alice}",
        f"?access_token={t.bob}",
        f"?access_token={t.forged}",
    ]
    requests = [("GET", "/who", headers) for headers in placements]
    requests += [("GET", f"/who{query}", ()) for query in queries]
    requests += [
        ("GET", f"/who?access_token={t.bob}", ((auth, f"Bearer {t.alice}"),)),
        ("GET", f"/who?access_token={t.forged}", ((auth, f"Bearer {t.alice}"),)),
        ("GET", f"/who?access_token={t.bob_aud}", ((auth, f"Bearer {t.forged}"),)),
        ("GET", f"/who?access_token={t.forged}", ((auth, f"Bearer {t.bob_aud}"),)),
        ("GET", f"/who?tok={t.alice2}", (("x-jwt", t.alice),)),
    ]
    requests += [("GET", "/headers", headers) for headers in placements[:4] + placements[17:]]
    preflight = (("origin", "https://app.example"), ("access-control-request-method", "GET"))
    requests += [
        ("OPTIONS", "/who", (*preflight, (auth, f"Bearer {t.forged}"))),
        ("OPTIONS", "/who", (("origin", "https://app.example"), (auth, f"Bearer {t.forged}"))),
    ]
    del name  # every set gets every request: what one set ignores, another reads
    return requests


def who_policy() -> str:
    return _WHO
