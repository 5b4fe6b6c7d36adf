"""The ``when`` condition keys of an AuthorizationPolicy: the one table that validation,
the evaluator, the Envoy translation and the analyzer read.

Istio's list (``security/authz/model``): plain keys, the keyed ``request.headers[NAME]``
and ``request.auth.claims[NAME]…``, and ``experimental.envoy.filters.*`` (filter metadata
nothing offline can know). Each key says where Istio puts it in Envoy's RBAC (the
principal or the permission side), whether it needs an HTTP request (dropped from rules
on TCP ports) and whether it reads the peer's mTLS identity.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["ConditionKey", "KeyKind", "Side", "condition_key", "is_http_only_key"]


class Side(enum.Enum):
    """Where Istio's RBAC builder puts a key: who asks, or what is asked for."""

    PRINCIPAL = "principal"
    PERMISSION = "permission"


class KeyKind(enum.Enum):
    SOURCE_IP = "source.ip"
    REMOTE_IP = "remote.ip"
    SOURCE_NAMESPACE = "source.namespace"
    SOURCE_PRINCIPAL = "source.principal"
    SOURCE_SERVICE_ACCOUNT = "source.serviceAccount"
    SOURCE_TRUST_DOMAIN = "source.trustDomain"
    REQUEST_PRINCIPAL = "request.auth.principal"
    REQUEST_AUDIENCES = "request.auth.audiences"
    REQUEST_PRESENTER = "request.auth.presenter"
    DESTINATION_IP = "destination.ip"
    DESTINATION_PORT = "destination.port"
    CONNECTION_SNI = "connection.sni"
    REQUEST_HEADER = "request.headers[]"
    REQUEST_CLAIM = "request.auth.claims[]"
    ENVOY_FILTER_METADATA = "experimental.envoy.filters.*"


_PEER_IDENTITY = frozenset(
    {
        KeyKind.SOURCE_NAMESPACE,
        KeyKind.SOURCE_PRINCIPAL,
        KeyKind.SOURCE_SERVICE_ACCOUNT,
        KeyKind.SOURCE_TRUST_DOMAIN,
    }
)
_PERMISSION_SIDE = frozenset(
    {
        KeyKind.DESTINATION_IP,
        KeyKind.DESTINATION_PORT,
        KeyKind.CONNECTION_SNI,
        KeyKind.ENVOY_FILTER_METADATA,
    }
)
_ADDRESS = frozenset({KeyKind.SOURCE_IP, KeyKind.REMOTE_IP, KeyKind.DESTINATION_IP})
_KEYED = re.compile(r"^(request\.headers|request\.auth\.claims)((?:\[[^\[\]]+\])+)$")
_BRACKETED = re.compile(r"\[([^\[\]]+)\]")


@dataclass(frozen=True, slots=True)
class ConditionKey:
    """One ``when`` key as written, classified. ``names`` holds the bracketed parts: the
    header name, or the claim path (``request.auth.claims[a][b]`` → ``("a", "b")``)."""

    key: str
    kind: KeyKind
    names: tuple[str, ...] = ()

    @property
    def side(self) -> Side:
        return Side.PERMISSION if self.kind in _PERMISSION_SIDE else Side.PRINCIPAL

    @property
    def http_only(self) -> bool:
        return is_http_only_key(self.key)

    @property
    def peer_identity(self) -> bool:
        """Reads the peer's mTLS certificate (never true over plaintext)."""
        return self.kind in _PEER_IDENTITY

    @property
    def address(self) -> bool:
        """Its values are IP addresses or CIDR blocks."""
        return self.kind in _ADDRESS


def is_http_only_key(key: str) -> bool:
    """Needs an HTTP request (headers, JWT): Istio drops it from rules on TCP ports."""
    return key.startswith("request.")


_PLAIN = {k.value: k for k in KeyKind if not k.value.endswith(("[]", "*"))}


def condition_key(key: str) -> ConditionKey | None:
    """``key`` classified, or None when Istio does not know it (a validation error)."""
    plain = _PLAIN.get(key)
    if plain is not None:
        return ConditionKey(key, plain)
    keyed = _KEYED.match(key)
    if keyed:
        if keyed.group(1) == "request.headers":
            # Istio's extractNameInBrackets: everything between the first [ and the last ].
            return ConditionKey(key, KeyKind.REQUEST_HEADER, (keyed.group(2)[1:-1],))
        names = tuple(_BRACKETED.findall(keyed.group(2)))
        return ConditionKey(key, KeyKind.REQUEST_CLAIM, names)
    if key.startswith("experimental.envoy.filters."):
        return ConditionKey(key, KeyKind.ENVOY_FILTER_METADATA)
    return None
