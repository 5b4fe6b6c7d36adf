"""RequestAuthentication → Envoy's jwt_authn HTTP filter, in the shape Istio generates.

Istio (``pilot/pkg/security/authn/policy_applier.go``) merges every RequestAuthentication
that selects a workload into one filter: the ``jwtRules`` sorted by issuer, provider ``i``
named ``origins-<i>``, and one rule for every path whose requirement lets a request
without a token through while any token present must verify:

* one provider: ``requires_any[origins-0, allow_missing]``;
* N providers: ``requires_any[origins-0, …, origins-(N-1),
  requires_all[requires_any[origins-0, allow_missing], …]]``.

Each provider puts the verified payload in dynamic metadata under ``payload`` (read by the
RBAC ``requestPrincipals`` / ``request.auth.*`` matchers) and splits the space-delimited
``scope`` and ``permission`` claims into lists, as the offline evaluator does.

Keys: an inline ``jwks`` becomes ``local_jwks`` (its public members only). A ``jwksUri``
becomes ``remote_jwks`` fetched by Envoy through a cluster emitted by
:func:`jwks_clusters` (``jwksuri-autogen-<host>-<port>``, Istio's name), cached 5 minutes.
That is Istio with ``PILOT_JWT_ENABLE_REMOTE_JWKS``; default Istio fetches in istiod and
inlines the keys. The offline evaluator, given no document for a URI, treats its keys as
unreachable (every token 401) — Envoy agrees when the URI is unreachable from the proxy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from trustmesh.envoy_json import dns_cluster
from trustmesh.policy.jwt import SPACE_DELIMITED_CLAIMS, JwtProvider
from trustmesh.xds.outbound import SYSTEM_CA_BUNDLE

__all__ = [
    "JWT_FILTER",
    "JWT_TYPE",
    "PAYLOAD_METADATA_KEY",
    "jwks_cluster_name",
    "jwks_clusters",
    "jwt_authn_config",
]

JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
PAYLOAD_METADATA_KEY = "payload"  # RBAC reads [payload, iss] / [payload, sub] / claims
_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_DEFAULT_TIMEOUT = "5s"
_CACHE_DURATION = "300s"
# JWK members that only a private key has; Envoy verifies with public keys only and a
# private key has no business in a proxy's config dump.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})


def jwt_authn_config(providers: Sequence[JwtProvider]) -> dict[str, Any]:
    """The typed config of the jwt_authn filter for ``providers`` (already sorted by issuer,
    as :class:`~trustmesh.policy.compose.WorkloadPolicy` holds them).

    With no providers the filter has no rule and lets every request through, like having
    no filter at all (useful as a fixed ECDS slot). Each provider carries what its
    ``jwtRules`` entry said (inline JWKS, fetch timeout): no raw config is read here.
    """
    config: dict[str, Any] = {"@type": JWT_TYPE}
    if not providers:
        return config
    names = [f"origins-{i}" for i in range(len(providers))]
    config["providers"] = {
        name: _provider(provider) for name, provider in zip(names, providers, strict=True)
    }
    config["rules"] = [{"match": {"prefix": "/"}, "requires": _requirement(names)}]
    config["bypass_cors_preflight"] = True
    return config


def _requirement(names: Sequence[str]) -> dict[str, Any]:
    def any_or_missing(name: str) -> dict[str, Any]:
        return {"requires_any": {"requirements": [{"provider_name": name}, {"allow_missing": {}}]}}

    if len(names) == 1:
        return any_or_missing(names[0])
    # Istio's composite: some provider accepts the token, and no token present is invalid.
    return {
        "requires_any": {
            "requirements": [
                *({"provider_name": name} for name in names),
                {"requires_all": {"requirements": [any_or_missing(name) for name in names]}},
            ]
        }
    }


def _provider(provider: JwtProvider) -> dict[str, Any]:
    out: dict[str, Any] = {"issuer": provider.issuer}
    if provider.audiences:
        out["audiences"] = list(provider.audiences)
    if provider.jwks_uri and not provider.jwks_inline:
        host, port, _ = _split_uri(provider.jwks_uri)
        out["remote_jwks"] = {
            "http_uri": {
                "uri": provider.jwks_uri,
                "cluster": jwks_cluster_name(host, port),
                "timeout": _timeout(provider),
            },
            "cache_duration": _CACHE_DURATION,
        }
    else:
        out["local_jwks"] = {"inline_string": _public_jwks(provider.jwks_inline)}
    # Absent locations mean Envoy's defaults (Authorization: Bearer, then ?access_token),
    # which are the same defaults the evaluator's JwtProvider.locations() applies.
    if provider.from_headers:
        out["from_headers"] = [
            {"name": name, "value_prefix": prefix} if prefix else {"name": name}
            for name, prefix in provider.from_headers
        ]
    if provider.from_params:
        out["from_params"] = list(provider.from_params)
    if provider.from_cookies:
        out["from_cookies"] = list(provider.from_cookies)
    out["forward"] = provider.forward_original_token
    if provider.output_payload_to_header:
        out["forward_payload_header"] = provider.output_payload_to_header
    out["payload_in_metadata"] = PAYLOAD_METADATA_KEY
    out["normalize_payload_in_metadata"] = {
        "space_delimited_claims": sorted(SPACE_DELIMITED_CLAIMS)
    }
    if provider.output_claim_to_headers:
        out["claim_to_headers"] = [
            {"header_name": header, "claim_name": claim}
            for header, claim in provider.output_claim_to_headers
        ]
    return out


def _timeout(provider: JwtProvider) -> str:
    return provider.timeout or _DEFAULT_TIMEOUT


def _public_jwks(text: str) -> str:
    """The JWKS with private members dropped; unparsable text is passed on unchanged
    (validation rejects it before here; Envoy would then fail every token with 401)."""
    try:
        document = json.loads(text)
        keys = document["keys"]
        if not isinstance(keys, list):
            return text
        public = [
            {k: v for k, v in key.items() if k not in _PRIVATE_MEMBERS or key.get("kty") == "oct"}
            if isinstance(key, dict)
            else key
            for key in keys
        ]
    except (ValueError, KeyError, TypeError):
        return text
    return json.dumps({**document, "keys": public}, sort_keys=True, separators=(",", ":"))


def _split_uri(uri: str) -> tuple[str, int, bool]:
    parts = urlsplit(uri)
    tls = parts.scheme == "https"
    return parts.hostname or "", parts.port or (443 if tls else 80), tls


def jwks_cluster_name(host: str, port: int) -> str:
    """Istio's name for the cluster a ``jwksUri`` is fetched through."""
    return f"jwksuri-autogen-{host}-{port}"


def jwks_clusters(providers: Sequence[JwtProvider]) -> list[dict[str, Any]]:
    """One STRICT_DNS cluster per ``jwksUri`` host and port the providers fetch from."""
    clusters: dict[str, dict[str, Any]] = {}
    for provider in providers:
        if not provider.jwks_uri or provider.jwks_inline:
            continue
        host, port, tls = _split_uri(provider.jwks_uri)
        name = jwks_cluster_name(host, port)
        if not host or name in clusters:
            continue
        cluster = dns_cluster(name, [(host, port)])
        if tls:
            cluster["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": _UPSTREAM_TLS,
                    "sni": host,
                    "common_tls_context": {
                        "tls_params": {"tls_maximum_protocol_version": "TLSv1_3"},
                        "validation_context": {
                            "trusted_ca": {"filename": SYSTEM_CA_BUNDLE},
                            "match_typed_subject_alt_names": [
                                {"san_type": "DNS", "matcher": {"exact": host}}
                            ],
                        },
                    },
                },
            }
        clusters[name] = cluster
    return [clusters[name] for name in sorted(clusters)]
