"""End-user JWT authentication exactly as Envoy's jwt_authn filter does it for Istio.

Istio merges every RequestAuthentication that selects a workload into providers sorted
by issuer, each required as ``requires_any[provider, allow_missing]``: a request with no
token passes (RBAC decides), any token present must be valid. Envoy checks, in order:
form, issuer, time (60 s skew), audience (→ 403), then the signature (→ 401).

Signatures are verified for real with the provider's JWKS. ``now`` is always passed in.
"""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import jwt as pyjwt
from jwt.algorithms import get_default_algorithms

CLOCK_SKEW_SECONDS = 60
SPACE_DELIMITED_CLAIMS = ("permission", "scope")
_ALGORITHMS = get_default_algorithms()


class JwtStatus(enum.Enum):
    MISSING = "missing"  # no token in any configured location: passes
    OK = "ok"
    UNAUTHENTICATED = "unauthenticated"  # 401
    AUDIENCE = "audience"  # 403


@dataclass(frozen=True, slots=True)
class JwtProvider:
    """One ``jwtRules`` entry, with its keys parsed once."""

    issuer: str
    audiences: tuple[str, ...]
    keys: tuple[pyjwt.PyJWK, ...] | None  # None: the JWKS could not be had
    from_headers: tuple[tuple[str, str], ...]  # (lower-case name, prefix)
    from_params: tuple[str, ...]
    from_cookies: tuple[str, ...]
    forward_original_token: bool = False
    output_payload_to_header: str = ""
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()
    jwks_problem: str = ""
    source: str = ""  # ns/name of the RequestAuthentication, for traces
    jwks_uri: str = ""

    def locations(self) -> tuple[tuple[str, str], ...]:
        if self.from_headers or self.from_params or self.from_cookies:
            return self.from_headers
        return (("authorization", "Bearer "),)

    def params(self) -> tuple[str, ...]:
        if self.from_headers or self.from_params or self.from_cookies:
            return self.from_params
        return ("access_token",)


def parse_jwks(text: str) -> tuple[tuple[pyjwt.PyJWK, ...] | None, str]:
    """Public keys of a JWKS document; (None, why) when it is unusable."""
    try:
        data = json.loads(text)
        keys = []
        for entry in data.get("keys", []):
            try:
                keys.append(pyjwt.PyJWK(entry))
            except pyjwt.PyJWTError:
                continue  # Envoy skips keys it cannot use
    except (ValueError, AttributeError, TypeError) as exc:
        return None, f"jwks is not usable: {exc}"
    if not keys:
        return None, "jwks has no usable key"
    return tuple(keys), ""


@dataclass(frozen=True, slots=True)
class JwtResult:
    status: JwtStatus
    message: str = ""
    issuer: str | None = None
    subject: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    provider: JwtProvider | None = None
    token_location: str = ""

    @property
    def http_status(self) -> int | None:
        return {JwtStatus.UNAUTHENTICATED: 401, JwtStatus.AUDIENCE: 403}.get(self.status)


def find_tokens(
    providers: Sequence[JwtProvider],
    headers: Mapping[str, tuple[str, ...]],
    query: str,
) -> list[tuple[str, str]]:
    """Every (token, where) a provider's locations yield, without duplicates."""
    found: list[tuple[str, str]] = []
    params = parse_qsl(query.removeprefix("?"), keep_blank_values=True)
    cookies = _cookies(headers.get("cookie", ()))
    for provider in providers:
        for name, prefix in provider.locations():
            for value in headers.get(name, ()):
                if prefix:
                    if not value.startswith(prefix):
                        continue
                    value = value[len(prefix) :]
                found.append((value.strip(), f"header {name}"))
        for param in provider.params():
            found.extend((v, f"query {param}") for k, v in params if k == param)
        for cookie in provider.from_cookies:
            if cookie in cookies:
                found.append((cookies[cookie], f"cookie {cookie}"))
    unique: dict[str, str] = {}
    for token, where in found:
        unique.setdefault(token, where)
    return list(unique.items())


def authenticate(
    providers: Sequence[JwtProvider],
    headers: Mapping[str, tuple[str, ...]],
    query: str,
    now: float,
) -> JwtResult:
    """The outcome of Istio's jwt_authn filter for one request."""
    if not providers:
        return JwtResult(JwtStatus.MISSING, "no RequestAuthentication applies")
    tokens = find_tokens(providers, headers, query)
    if not tokens:
        return JwtResult(JwtStatus.MISSING, "no token in any configured location")
    result = JwtResult(JwtStatus.MISSING)
    for token, where in tokens:  # every extracted token must verify
        result = verify_token(providers, token, now, where)
        if result.status is not JwtStatus.OK:
            return result
    return result


def verify_token(
    providers: Sequence[JwtProvider], token: str, now: float, where: str = ""
) -> JwtResult:
    parts = token.split(".")
    if len(parts) != 3:
        return _fail(
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
        )
    try:
        header = json.loads(_b64(parts[0]))
        payload = json.loads(_b64(parts[1]))
    except (ValueError, UnicodeDecodeError):
        return _fail("Jwt header or payload is not valid base64url JSON")
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return _fail("Jwt header or payload is not a JSON object")
    issuer = payload.get("iss")
    candidates = [p for p in providers if p.issuer == issuer]
    if not candidates:
        return _fail("Jwt issuer is not configured")
    failure = _fail("Jwt issuer is not configured")
    for provider in candidates:
        outcome = _verify_for(provider, token, header, payload, now)
        if outcome is None:
            sub = payload.get("sub")
            return JwtResult(
                JwtStatus.OK,
                "valid",
                issuer=str(issuer),
                subject=sub if isinstance(sub, str) else None,
                claims=_normalize_claims(payload),
                provider=provider,
                token_location=where,
            )
        failure = outcome
    return failure


def _verify_for(
    provider: JwtProvider, token: str, header: dict[str, Any], payload: dict[str, Any], now: float
) -> JwtResult | None:
    nbf, exp = payload.get("nbf"), payload.get("exp")
    if isinstance(nbf, int | float) and now + CLOCK_SKEW_SECONDS < nbf:
        return _fail("Jwt not yet valid")
    if isinstance(exp, int | float) and exp and now > exp + CLOCK_SKEW_SECONDS:
        return _fail("Jwt is expired")
    if provider.audiences and not _audience_allowed(provider.audiences, payload.get("aud")):
        return JwtResult(JwtStatus.AUDIENCE, "Audiences in Jwt are not allowed", provider=provider)
    if provider.keys is None:
        return _fail(f"Jwks remote fetch is failed ({provider.jwks_problem})")
    if not _signature_valid(provider.keys, token, header):
        return _fail("Jwt verification fails")
    return None


def _signature_valid(keys: tuple[pyjwt.PyJWK, ...], token: str, header: dict[str, Any]) -> bool:
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in _ALGORITHMS or alg == "none":
        return False
    signing_input, _, signature_b64 = token.rpartition(".")
    try:
        signature = _b64(signature_b64)
    except ValueError:
        return False
    for key in keys:
        if kid is not None and key.key_id is not None and key.key_id != kid:
            continue
        if key.algorithm_name not in (alg, None) and key.algorithm_name != "":
            continue
        algorithm = _ALGORITHMS[alg]
        try:
            prepared = algorithm.prepare_key(key.key) if not _is_prepared(key) else key.key
            if algorithm.verify(signing_input.encode(), prepared, signature):
                return True
        except (pyjwt.PyJWTError, ValueError, TypeError):
            continue
    return False


def _is_prepared(key: pyjwt.PyJWK) -> bool:
    return not isinstance(key.key, str | bytes)


def _audience_allowed(allowed: tuple[str, ...], aud: Any) -> bool:
    values = [aud] if isinstance(aud, str) else [a for a in aud or () if isinstance(a, str)]
    wanted = {_sanitize_audience(a) for a in allowed}
    return any(_sanitize_audience(v) in wanted for v in values)


def _sanitize_audience(value: str) -> str:
    for scheme in ("http://", "https://"):
        if value.startswith(scheme):
            value = value[len(scheme) :]
            break
    return value[:-1] if value.endswith("/") else value


def _normalize_claims(payload: dict[str, Any]) -> dict[str, Any]:
    claims = dict(payload)
    for name in SPACE_DELIMITED_CLAIMS:
        if isinstance(claims.get(name), str):
            claims[name] = claims[name].split()
    return claims


def _cookies(lines: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        for part in line.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep:
                out.setdefault(name, value)
    return out


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _fail(message: str) -> JwtResult:
    return JwtResult(JwtStatus.UNAUTHENTICATED, message)
