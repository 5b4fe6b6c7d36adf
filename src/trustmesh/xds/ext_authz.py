"""CUSTOM authorization's Envoy filters: ext_authz for one provider (pure).

Istio's shape (``pilot/pkg/security/authz/builder``), one pair per CUSTOM provider, in
front of jwt_authn and the other RBAC filters:

1. an RBAC filter whose CUSTOM rules are ``shadow_rules`` (action DENY, stat prefix
   ``istio_ext_authz_``): it never denies, it only records the first matching rule's name
   in its dynamic metadata, ``istio_ext_authz_shadow_effective_policy_id``;
2. the ext_authz filter, enabled only when that id starts with
   ``istio-ext-authz-<provider>`` (``filter_enabled_metadata``): a request no CUSTOM rule
   matches never reaches the authorizer.

The authorizer is reached through the sidecar's outbound cluster of the provider's
service (``outbound|<port>||<hostname>``, with the mesh's own mTLS when the authorizer
has a sidecar). ``statusOnError`` and ``failOpen`` decide what happens when it cannot be
reached (Envoy's default status is 403); ``timeout`` defaults to 600 s.

gRPC providers also get a network ext_authz filter for TCP chains; HTTP providers have
none, and a CUSTOM policy using one is left out of TCP chains, as in Istio.

Outputs are proto3-JSON dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.extension_providers import ExtAuthzProvider

__all__ = [
    "EXT_AUTHZ_POLICY_PREFIX",
    "EXT_AUTHZ_SHADOW_PREFIX",
    "HTTP_EXT_AUTHZ",
    "HTTP_EXT_AUTHZ_TYPE",
    "NETWORK_EXT_AUTHZ",
    "NETWORK_EXT_AUTHZ_TYPE",
    "http_ext_authz_config",
    "network_ext_authz_config",
]

Json = dict[str, Any]

HTTP_EXT_AUTHZ = "envoy.filters.http.ext_authz"
NETWORK_EXT_AUTHZ = "envoy.filters.network.ext_authz"
HTTP_EXT_AUTHZ_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
NETWORK_EXT_AUTHZ_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.ext_authz.v3.ExtAuthz"
)
EXT_AUTHZ_POLICY_PREFIX = "istio-ext-authz"
EXT_AUTHZ_SHADOW_PREFIX = "istio_ext_authz_"
_DEFAULT_TIMEOUT = "600s"
_HTTP_RBAC = "envoy.filters.http.rbac"
_NETWORK_RBAC = "envoy.filters.network.rbac"


def http_ext_authz_config(provider: ExtAuthzProvider) -> Json:
    """The HTTP ext_authz filter's typed config for a usable ``provider``."""
    config = _usable(provider)
    out: Json = {"@type": HTTP_EXT_AUTHZ_TYPE}
    status = _status(config.status_on_error)
    if status is not None:
        out["status_on_error"] = status
    if config.fail_open:
        out["failure_mode_allow"] = True
    out["transport_api_version"] = "V3"
    if isinstance(config, m.EnvoyExtAuthzGrpc):
        out["grpc_service"] = _grpc_service(provider, config)
    else:
        out["http_service"] = _http_service(provider, config)
        allowed = _headers(config.include_request_headers_in_check) or _headers(
            config.include_headers_in_check  # deprecated; only when the new field is unset
        )
        if allowed is not None:
            out["allowed_headers"] = allowed
    out["filter_enabled_metadata"] = _enabled_by(_HTTP_RBAC, provider.name)
    body = config.include_request_body_in_check
    if body is not None:
        buffer: Json = {}
        if body.max_request_bytes:
            buffer["max_request_bytes"] = body.max_request_bytes
        if body.allow_partial_message:
            buffer["allow_partial_message"] = True
        if body.pack_as_bytes:
            buffer["pack_as_bytes"] = True
        out["with_request_body"] = buffer
    return out


def network_ext_authz_config(provider: ExtAuthzProvider) -> Json | None:
    """The network ext_authz filter's typed config, or None for an HTTP provider."""
    config = _usable(provider)
    if not isinstance(config, m.EnvoyExtAuthzGrpc):
        return None
    out: Json = {"@type": NETWORK_EXT_AUTHZ_TYPE, "stat_prefix": "tcp."}
    if config.fail_open:
        out["failure_mode_allow"] = True
    out["transport_api_version"] = "V3"
    out["grpc_service"] = _grpc_service(provider, config)
    out["filter_enabled_metadata"] = _enabled_by(_NETWORK_RBAC, provider.name)
    return out


def _usable(provider: ExtAuthzProvider) -> m.EnvoyExtAuthzHttp | m.EnvoyExtAuthzGrpc:
    if not provider.usable or provider.config is None:
        raise ValueError(f"provider {provider.name!r} is unusable: {provider.why_unusable()}")
    return provider.config


def _status(status_on_error: str) -> Json | None:
    return {"code": int(status_on_error)} if status_on_error else None


def _grpc_service(provider: ExtAuthzProvider, config: m.EnvoyExtAuthzGrpc) -> Json:
    return {
        "envoy_grpc": {"cluster_name": provider.cluster, "authority": provider.hostname},
        "timeout": config.timeout or _DEFAULT_TIMEOUT,
    }


def _http_service(provider: ExtAuthzProvider, config: m.EnvoyExtAuthzHttp) -> Json:
    service: Json = {
        "server_uri": {
            # Envoy requires a uri; the cluster decides where the check goes.
            "uri": f"http://{provider.hostname}",
            "cluster": provider.cluster,
            "timeout": config.timeout or _DEFAULT_TIMEOUT,
        }
    }
    if config.path_prefix:
        service["path_prefix"] = config.path_prefix
    additional = config.include_additional_headers_in_check
    if additional:
        service["authorization_request"] = {
            "headers_to_add": [{"key": k, "value": additional[k]} for k in sorted(additional)]
        }
    if (
        config.headers_to_upstream_on_allow
        or config.headers_to_downstream_on_deny
        or config.headers_to_downstream_on_allow
    ):
        response: Json = {}
        for field, values in (
            ("allowed_upstream_headers", config.headers_to_upstream_on_allow),
            ("allowed_client_headers", config.headers_to_downstream_on_deny),
            ("allowed_client_headers_on_success", config.headers_to_downstream_on_allow),
        ):
            matcher = _headers(values)
            if matcher is not None:
                response[field] = matcher
        service["authorization_response"] = response
    return service


def _headers(names: Sequence[str]) -> Json | None:
    """Istio's header lists: ``x-*`` prefix, ``*-id`` suffix, otherwise exact; names are
    matched without regard to case."""
    if not names:
        return None
    patterns = []
    for name in names:
        if name.startswith("*"):
            patterns.append({"suffix": name[1:], "ignore_case": True})
        elif name.endswith("*"):
            patterns.append({"prefix": name[:-1], "ignore_case": True})
        else:
            patterns.append({"exact": name, "ignore_case": True})
    return {"patterns": patterns}


def _enabled_by(rbac_filter: str, provider: str) -> Json:
    return {
        "filter": rbac_filter,
        "path": [{"key": f"{EXT_AUTHZ_SHADOW_PREFIX}shadow_effective_policy_id"}],
        "value": {"string_match": {"prefix": f"{EXT_AUTHZ_POLICY_PREFIX}-{provider}"}},
    }
