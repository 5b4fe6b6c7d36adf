"""End-user JWTs as Envoy's jwt_authn filter checks them (its ``jwt_verify_lib``).

:mod:`trustmesh.policy.jwt_filter` finds the tokens of a request and combines the
verdicts the way Istio's requirement shape does; this module holds the providers and
decides one token for one provider, in Envoy's order: parse (three non-empty
``.``-separated parts, base64url as abseil decodes it, JSON objects, the types of
``alg``/``kid``/``iss``/``sub``/``iat``/``nbf``/``exp``/``jti``/``aud``), issuer, time
(60 s skew, whole seconds), audience (→ 403), then the signature with the provider's keys.

Where Envoy's parser is lenient, so is this one (each fact checked against Envoy 1.40 by
the ``jwt-extraction`` cases of ``tests/xds/test_rbac_differential.py``): whitespace
inside a part is skipped, ``=`` / ``.`` padding is optional, empty parts are dropped
(``h..p.s`` is ``h.p.s``), unused low bits are not checked, and an ECDSA signature is read
as its first ``len/2`` bytes for ``r`` and the next ``len/2`` for ``s`` (one extra byte is
ignored). The signed input is the header and payload parts exactly as they appear in the
token.

Signatures are verified for real with the provider's JWKS. ``now`` is always passed in.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import jwt as pyjwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

CLOCK_SKEW_SECONDS = 60
SPACE_DELIMITED_CLAIMS = ("permission", "scope")
# jwt_verify_lib's isImplemented(): any other ``alg`` (``none`` too) is refused.
IMPLEMENTED_ALGORITHMS: Final = frozenset(
    {"ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512"}
    | {"PS256", "PS384", "PS512", "EdDSA"}
)
BAD_FORMAT: Final = (
    "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
)
UNKNOWN_ISSUER: Final = "Jwt issuer is not configured"
_BASE64URL: Final = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
)}  # fmt: skip
_ASCII_SPACE: Final = frozenset(" \t\n\v\f\r")  # absl::ascii_isspace
_UINT64_LIMIT: Final = float(2**64)  # a double: what jwt_verify_lib compares with


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
    jwks_inline: str = ""  # the rule's own ``jwks`` text: used instead of fetching jwksUri
    timeout: str = ""  # the rule's ``timeout`` for fetching jwksUri ("" : Istio's 5s)

    @property
    def default_locations(self) -> bool:
        """Envoy's defaults apply: no header, parameter or cookie is configured."""
        return not (self.from_headers or self.from_params or self.from_cookies)

    def locations(self) -> tuple[tuple[str, str], ...]:
        """The header locations: (lower-case name, value prefix)."""
        return (("authorization", "Bearer "),) if self.default_locations else self.from_headers

    def params(self) -> tuple[str, ...]:
        return ("access_token",) if self.default_locations else self.from_params

    def sanitized_headers(self) -> tuple[str, ...]:
        """What the filter removes from every request before it looks at this provider:
        the headers it writes itself (a client cannot forge them)."""
        names = [header for header, _ in self.output_claim_to_headers]
        if self.output_payload_to_header:
            names.append(self.output_payload_to_header)
        return tuple(name.lower() for name in names)


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


class Check(enum.Enum):
    """One token against one provider."""

    OK = "ok"
    UNKNOWN_ISSUER = "unknown issuer"  # Envoy's JwtUnknownIssuer: combined differently
    AUDIENCE = "audience"  # 403
    FAILED = "failed"  # every other failure: 401


@dataclass(frozen=True, slots=True)
class TokenCheck:
    outcome: Check
    message: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    payload_segment: str = ""  # the payload part as it appears in the token


@dataclass(frozen=True, slots=True)
class ParsedJwt:
    header_segment: str
    payload_segment: str
    alg: str
    kid: str
    issuer: str
    payload: Mapping[str, Any]
    audiences: tuple[str, ...]
    nbf: int
    exp: int
    signature: bytes


def parse_token(token: str) -> ParsedJwt | str:
    """jwt_verify_lib's ``Jwt::parseFromString``: the parsed token, or Envoy's message."""
    parts = [part for part in token.split(".") if part]
    if len(parts) != 3:
        return BAD_FORMAT
    decoded = absl_base64url_decode(parts[0])
    if decoded is None:
        return "Jwt header is an invalid Base64url encoded"
    header = _json_object(decoded)
    if header is None:
        return "Jwt header is an invalid JSON"
    alg = header.get("alg")
    if not isinstance(alg, str):
        return "Jwt header [alg] field is required and must be a string"
    if alg not in IMPLEMENTED_ALGORITHMS:
        return "Jwt header [alg] is not supported"
    kid = header.get("kid", "")
    if not isinstance(kid, str):
        return "Jwt header [kid] field is not a string"
    decoded = absl_base64url_decode(parts[1])
    if decoded is None:
        return "Jwt payload is an invalid Base64url encoded"
    payload = _json_object(decoded)
    if payload is None:
        return "Jwt payload is an invalid JSON"
    for name in ("iss", "sub"):
        if name in payload and not isinstance(payload[name], str):
            return f"Jwt payload [{name}] field is not a string"
    times: dict[str, int] = {}
    for name in ("iat", "nbf", "exp"):
        value = _uint64(payload, name)
        if isinstance(value, str):
            return value
        times[name] = value
    if "jti" in payload and not isinstance(payload["jti"], str):
        return "Jwt payload [jti] field is not a string"
    audiences = _string_list(payload)
    if audiences is None:
        return "Jwt payload [aud] field is not a string or string list"
    signature = absl_base64url_decode(parts[2])
    if signature is None:
        return "Jwt signature is an invalid Base64url encoded"
    return ParsedJwt(
        header_segment=parts[0],
        payload_segment=parts[1],
        alg=alg,
        kid=kid,
        issuer=payload.get("iss", ""),
        payload=payload,
        audiences=audiences,
        nbf=times["nbf"],
        exp=times["exp"],
        signature=signature,
    )


def check_token(provider: JwtProvider, token: str, now: float) -> TokenCheck:
    """Envoy's authenticator for ``provider``'s own locations: parse, issuer, time,
    audience, signature — the first failure is the answer."""
    parsed = parse_token(token)
    if isinstance(parsed, str):
        return TokenCheck(Check.FAILED, parsed)
    if parsed.issuer != provider.issuer:
        return TokenCheck(Check.UNKNOWN_ISSUER, UNKNOWN_ISSUER)
    seconds = int(now)
    if seconds + CLOCK_SKEW_SECONDS < parsed.nbf:
        return TokenCheck(Check.FAILED, "Jwt not yet valid")
    if parsed.exp and seconds > parsed.exp + CLOCK_SKEW_SECONDS:
        return TokenCheck(Check.FAILED, "Jwt is expired")
    if provider.audiences and not _audience_allowed(provider.audiences, parsed.audiences):
        return TokenCheck(Check.AUDIENCE, "Audiences in Jwt are not allowed")
    if provider.keys is None:
        return TokenCheck(Check.FAILED, f"Jwks remote fetch is failed ({provider.jwks_problem})")
    problem = _signature_problem(provider.keys, parsed)
    if problem is not None:
        return TokenCheck(Check.FAILED, problem)
    return TokenCheck(Check.OK, "valid", parsed.payload, parsed.payload_segment)


def absl_base64url_decode(text: str) -> bytes | None:
    """``absl::WebSafeBase64Unescape``: ASCII whitespace anywhere is skipped; ``=`` or
    ``.`` end the data and may be followed only by whitespace and padding, none or the
    exact amount; one leftover character is an error; unused low bits are ignored."""
    values: list[int] = []
    end = len(text)
    for index, char in enumerate(text):
        value = _BASE64URL.get(char)
        if value is not None:
            values.append(value)
        elif char in "=.":
            end = index
            break
        elif char not in _ASCII_SPACE:
            return None
    padding_chars = 0
    for char in text[end:]:
        if char in "=.":
            padding_chars += 1
        elif char not in _ASCII_SPACE:
            return None
    leftover = len(values) % 4
    if leftover == 1 or padding_chars not in (0, {0: 0, 2: 2, 3: 1}[leftover]):
        return None
    out = bytearray()
    for start in range(0, len(values) - leftover, 4):
        a, b, c, d = values[start : start + 4]
        out += ((a << 18) | (b << 12) | (c << 6) | d).to_bytes(3, "big")
    if leftover == 2:
        a, b = values[-2:]
        out.append(((a << 6) | b) >> 4 & 0xFF)
    elif leftover == 3:
        a, b, c = values[-3:]
        out += (((a << 12) | (b << 6) | c) >> 2 & 0xFFFF).to_bytes(2, "big")
    return bytes(out)


def normalized_claims(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload as Istio's RBAC reads it from metadata: ``scope`` and ``permission``
    split at spaces (``normalize_payload_in_metadata``)."""
    claims = dict(payload)
    for name in SPACE_DELIMITED_CLAIMS:
        if isinstance(claims.get(name), str):
            claims[name] = [part for part in claims[name].split(" ") if part]
    return claims


def claim_header_value(payload: Mapping[str, Any], claim: str) -> str | None:
    """What ``claim_to_headers`` writes for ``claim`` (``a.b`` reads a nested claim):
    strings as they are, booleans as ``true``/``false``, numbers as a whole number when
    they are one and in ``uint64`` range, else C's ``%f``; nothing for other types or ''."""
    value: Any = payload
    for name in claim.split("."):
        if not isinstance(value, Mapping) or name not in value:
            return None
        value = value[name]
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        number = float(value)
        whole = 0 <= number < _UINT64_LIMIT and number.is_integer()
        text = str(int(number)) if whole else f"{number:f}"
    else:
        return None
    return text or None


def _json_object(raw: bytes | None) -> dict[str, Any] | None:
    """A JSON object as protobuf's JSON parser reads it into a Struct, or None."""
    if raw is None:
        return None
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _uint64(payload: Mapping[str, Any], name: str) -> int | str:
    """StructUtils::GetUInt64: absent → 0; a number in [0, 2**64) → truncated; else the
    message Envoy answers with."""
    if name not in payload:
        return 0
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"Jwt payload [{name}] field is not an integer"
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not 0 <= number < _UINT64_LIMIT:
        return f"Jwt payload [{name}] field is not a positive 64 bit integer"
    return int(number)


def _string_list(payload: Mapping[str, Any]) -> tuple[str, ...] | None:
    if "aud" not in payload:
        return ()
    value = payload["aud"]
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return None


def _audience_allowed(allowed: tuple[str, ...], audiences: tuple[str, ...]) -> bool:
    wanted = {_sanitize_audience(a) for a in allowed}
    return any(_sanitize_audience(a) in wanted for a in audiences)


def _sanitize_audience(value: str) -> str:
    """jwt_verify_lib's sanitizeAudience: one ``http://`` or ``https://`` prefix and one
    trailing ``/`` are not part of an audience."""
    for scheme in ("http://", "https://"):
        if value.startswith(scheme):
            value = value[len(scheme) :]
            break
    return value[:-1] if value.endswith("/") else value


_DIGESTS: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}


def _digest(alg: str) -> hashes.HashAlgorithm:
    # jwt_verify_lib picks the hash from the token's alg, SHA-256 unless it says 384/512.
    return _DIGESTS.get(alg[-3:], hashes.SHA256)()


def _signature_problem(keys: tuple[pyjwt.PyJWK, ...], parsed: ParsedJwt) -> str | None:
    """``verifyJwtWithoutTimeChecking``: None when some key verifies the signature."""
    signed = f"{parsed.header_segment}.{parsed.payload_segment}".encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        jwk: Mapping[str, Any] = getattr(key, "_jwk_data", {})
        key_id, key_alg = jwk.get("kid") or "", jwk.get("alg") or ""
        if parsed.kid and key_id and key_id != parsed.kid:
            continue
        if key_alg and key_alg != parsed.alg:
            continue
        matched = True
        kty = jwk.get("kty")
        if kty == "OKP" and jwk.get("crv") == "Ed25519" and len(parsed.signature) != 64:
            return "Jwt ED25519 signature is wrong length"
        if _verifies(kty, _public(key.key), parsed, signed):
            return None
    if not matched:
        return "Jwks doesn't have key to match kid or alg from Jwt"
    return "Jwt verification fails"


def _public(key: Any) -> Any:
    """A JWKS may carry private members; only the public half verifies."""
    private = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
    return key.public_key() if isinstance(key, private) else key


def _verifies(kty: Any, key: Any, parsed: ParsedJwt, signed: bytes) -> bool:
    signature, alg = parsed.signature, parsed.alg
    try:
        if kty == "EC" and isinstance(key, ec.EllipticCurvePublicKey):
            half = len(signature) // 2
            r = int.from_bytes(signature[:half], "big")
            s = int.from_bytes(signature[half : 2 * half], "big")
            key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(_digest(alg)))
            return True
        if kty == "RSA" and isinstance(key, rsa.RSAPublicKey):
            if len(signature) != (key.key_size + 7) // 8:  # BoringSSL: exactly the modulus
                return False
            if alg.startswith("RS"):
                key.verify(signature, signed, padding.PKCS1v15(), _digest(alg))
                return True
            if alg.startswith("PS"):
                pss = padding.PSS(padding.MGF1(_digest(alg)), padding.PSS.AUTO)
                key.verify(signature, signed, pss, _digest(alg))
                return True
            return False
        if kty == "oct" and isinstance(key, bytes):
            digest = {"HS384": hashlib.sha384, "HS512": hashlib.sha512}.get(alg, hashlib.sha256)
            return hmac.compare_digest(hmac.new(key, signed, digest).digest(), signature)
        if kty == "OKP" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, signed)
            return True
    except (InvalidSignature, ValueError):
        return False
    return False
