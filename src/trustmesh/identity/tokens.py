"""Bootstrap tokens: short-lived, signed by the CA, bound to namespace + service account.

A token is a JWT (EdDSA) with ``typ: trustmesh-bootstrap+jwt`` so it can never be
confused with an end-user token. It authorizes exactly one identity; by default it is
single use: its ``jti`` is recorded (and persisted) when it is redeemed.

A *node* token (``trustmesh ca token --node NAME``, claim ``node``) is bound to one host
instead: it lets that host register workloads under its own name only (Istio's
WorkloadEntry auto-registration, the kubelet's bootstrap token). The two kinds never
stand in for each other: a node token enrolls no workload certificate, and a workload
token registers nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import jwt as pyjwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from trustmesh.identity.spiffe import SpiffeId

TOKEN_TYPE = "trustmesh-bootstrap+jwt"
DEFAULT_AUDIENCE = "trustmesh-ca"
MAX_TOKEN_BYTES = 4096
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class TokenLedger(Protocol):
    """Where single-use tokens are burnt when the CA's records live in a shared store
    (``trustmesh.store.ca_records.EtcdCaRecords``). Without one the CA keeps today's
    ``used-tokens.jsonl`` in its directory."""

    async def consume_token(self, token_id: str, expires: dt.datetime) -> bool:
        """Burn ``token_id`` atomically: True for exactly one caller across all replicas."""
        ...

    async def record_issued(
        self, serial: int, identity: str, not_after: dt.datetime, at: dt.datetime
    ) -> None:
        """Record an issued certificate before it is handed out."""
        ...


class TokenRejected(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What a valid token authorizes."""

    namespace: str
    service_account: str
    token_id: str
    expires: dt.datetime
    single_use: bool

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)


@dataclass(frozen=True, slots=True)
class NodeGrant:
    """What a valid node token authorizes: registering workloads on ``node`` only."""

    node: str
    token_id: str
    expires: dt.datetime
    single_use: bool

    def check_host(self, host: str, what: str) -> None:
        """Refuse (:class:`TokenRejected`) a registration of ``what`` on another host."""
        if host != self.node:
            raise TokenRejected(
                "token-wrong-node",
                f"the node token of {self.node!r} cannot register {what} on host {host!r}",
            )


def issue_node_token(
    key: ed25519.Ed25519PrivateKey,
    *,
    node: str,
    now: dt.datetime,
    ttl: dt.timedelta = dt.timedelta(minutes=10),
    audience: str = DEFAULT_AUDIENCE,
    single_use: bool = True,
) -> str:
    if not is_node_name(node):
        raise ValueError(f"node name {node!r} is not a DNS-1123 label")
    claims = {
        "iss": "trustmesh-ca",
        "aud": audience,
        "node": node,
        "iat": int(now.timestamp()),
        "nbf": int(now.timestamp()) - 5,
        "exp": int((now + ttl).timestamp()),
        "jti": secrets.token_hex(16),
        "single_use": single_use,
    }
    return pyjwt.encode(claims, key, algorithm="EdDSA", headers={"typ": TOKEN_TYPE})


def is_node_name(name: str) -> bool:
    """A host's name: a DNS-1123 label, as a Kubernetes node's."""
    return bool(_NODE_NAME.fullmatch(name))


def issue_token(
    key: ed25519.Ed25519PrivateKey,
    *,
    namespace: str,
    service_account: str,
    now: dt.datetime,
    ttl: dt.timedelta = dt.timedelta(minutes=10),
    audience: str = DEFAULT_AUDIENCE,
    single_use: bool = True,
) -> str:
    SpiffeId("example.org", namespace, service_account)  # validates both names
    claims = {
        "iss": "trustmesh-ca",
        "aud": audience,
        "ns": namespace,
        "sa": service_account,
        "iat": int(now.timestamp()),
        "nbf": int(now.timestamp()) - 5,
        "exp": int((now + ttl).timestamp()),
        "jti": secrets.token_hex(16),
        "single_use": single_use,
    }
    return pyjwt.encode(claims, key, algorithm="EdDSA", headers={"typ": TOKEN_TYPE})


def verify_token(
    token: str,
    public_key: ed25519.Ed25519PublicKey,
    *,
    now: dt.datetime,
    audience: str = DEFAULT_AUDIENCE,
    already_used: Callable[[str], bool],
) -> TokenGrant:
    """Check signature, type, audience, time and reuse; raises :class:`TokenRejected`."""
    claims = _verified_claims(token, public_key, now=now, audience=audience)
    if "node" in claims:
        raise TokenRejected("token-is-node", "a node token cannot enroll a workload")
    namespace, account, token_id = claims.get("ns"), claims.get("sa"), claims["jti"]
    if (
        not isinstance(namespace, str)
        or not isinstance(account, str)
        or not isinstance(token_id, str)
    ):
        raise TokenRejected("token-invalid", "bootstrap token lacks ns/sa/jti")
    single_use = bool(claims.get("single_use", True))
    if single_use and already_used(token_id):
        raise TokenRejected("token-reused", "bootstrap token was already used")
    return TokenGrant(
        namespace,
        account,
        token_id,
        dt.datetime.fromtimestamp(claims["exp"], dt.UTC),
        single_use,
    )


def verify_node_token(
    token: str,
    public_key: ed25519.Ed25519PublicKey,
    *,
    now: dt.datetime,
    audience: str = DEFAULT_AUDIENCE,
    already_used: Callable[[str], bool],
) -> NodeGrant:
    """:func:`verify_token` for a node token; a workload token is refused."""
    claims = _verified_claims(token, public_key, now=now, audience=audience)
    node, token_id = claims.get("node"), claims["jti"]
    if node is None:
        raise TokenRejected("token-not-node", "a workload token cannot act as a node token")
    if not isinstance(node, str) or not is_node_name(node):
        raise TokenRejected("token-invalid", "node token names no valid node")
    single_use = bool(claims.get("single_use", True))
    if single_use and already_used(token_id):
        raise TokenRejected("token-reused", "node token was already used")
    return NodeGrant(node, token_id, dt.datetime.fromtimestamp(claims["exp"], dt.UTC), single_use)


def _verified_claims(
    token: str, public_key: ed25519.Ed25519PublicKey, *, now: dt.datetime, audience: str
) -> dict[str, Any]:
    """The claims of a token whose size, form, type, signature, issuer, audience and
    validity period are right (:class:`TokenRejected` otherwise)."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected("token-too-large", "bootstrap token is too large")
    # Parsed by hand rather than by a JWT library: one algorithm, one key, one type, and
    # the CA's enrollment path is hot (a library's generality costs 4x here).
    try:
        header_b64, payload_b64, signature_b64 = token.split(".")
        header = json.loads(_b64decode(header_b64))
        claims = json.loads(_b64decode(payload_b64))
        signature = _b64decode(signature_b64)
    except (ValueError, UnicodeDecodeError):
        raise TokenRejected("token-malformed", "bootstrap token is malformed") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenRejected("token-malformed", "bootstrap token is malformed")
    if header.get("typ") != TOKEN_TYPE or header.get("alg") != "EdDSA":
        raise TokenRejected("token-type", "not a trustmesh bootstrap token")
    try:
        public_key.verify(signature, f"{header_b64}.{payload_b64}".encode())
    except InvalidSignature:
        raise TokenRejected("token-signature", "bootstrap token signature is invalid") from None
    if claims.get("iss") != "trustmesh-ca" or claims.get("aud") != audience:
        raise TokenRejected("token-invalid", "bootstrap token is for another issuer or audience")
    if not isinstance(claims.get("exp"), int) or not isinstance(claims.get("jti"), str):
        raise TokenRejected("token-invalid", "bootstrap token lacks exp or jti")
    stamp = now.timestamp()
    if stamp >= claims["exp"]:
        raise TokenRejected("token-expired", "bootstrap token has expired")
    if stamp < claims.get("nbf", 0):
        raise TokenRejected("token-not-yet-valid", "bootstrap token is not valid yet")
    return claims


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
