"""The hand-written Envoy configs of the data-plane benchmark: the app (a
``direct_response``), and the minimal mTLS + RBAC client/server pair a user could write,
with certificates from trustmesh's CA inline in the bootstraps."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchlib.dataplane_topology import APP_PORT, BODY, HTTPBIN, SLEEP
from trustmesh.identity import pki
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.xds.outbound_listeners import OUTBOUND_HTTP_PORT

_T = "type.googleapis.com/"
HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
_RBAC = _T + "envoy.extensions.filters.http.rbac.v3.RBAC"
_DOWNSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_UPSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A workload certificate as the agent installs it: leaf (+ intermediates), key, roots."""

    chain_pem: str
    key_pem: str
    roots_pem: str


def issue(ca: CertificateAuthority, identity: SpiffeId, now: dt.datetime) -> Credentials:
    key = pki.generate_key(ca.config.key_type)
    issued = ca.issue(pki.build_csr(key, [identity.uri]), identity, now)
    return Credentials(
        "".join(issued.chain_pem[:-1]),  # without the root, as the agent serves it over SDS
        pki.key_to_pem(key).decode(),
        ca.bundle_pem(now).decode(),
    )


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _static_cluster(name: str, host: str, port: int, **extra: Any) -> dict[str, Any]:
    endpoint = {"endpoint": {"address": _address(host, port)}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
        **extra,
    }


def _bootstrap(
    name: str, listener: dict[str, Any], clusters: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "node": {"id": name, "cluster": name},
        # Port 0: Envoy picks it and EnvoyProcess reads it back, no port race.
        "admin": {"address": _address("127.0.0.1", 0)},
        "static_resources": {"listeners": [listener], "clusters": list(clusters)},
    }


def _hcm(
    name: str, route: dict[str, Any], filters: Sequence[dict[str, Any]] = (), **extra: Any
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": name,
            "route_config": {
                "virtual_hosts": [{"name": name, "domains": ["*"], "routes": [route]}]
            },
            "http_filters": [
                *filters,
                {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
            ],
            **extra,
        },
    }


def app_bootstrap(address: str) -> dict[str, Any]:
    """The app: a listener answering every request itself with ``BODY``."""
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": BODY}},
    }
    listener = {
        "name": "app",
        "address": _address(address, APP_PORT),
        "filter_chains": [{"filters": [_hcm("app", route)]}],
    }
    return _bootstrap("app", listener, [])


def _tls_certificate(creds: Credentials) -> dict[str, Any]:
    return {
        "certificate_chain": {"inline_string": creds.chain_pem},
        "private_key": {"inline_string": creds.key_pem},
    }


def upstream_tls(creds: Credentials) -> dict[str, Any]:
    """Client side of mTLS: our certificate, the server pinned by its SPIFFE ID."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _UPSTREAM_TLS,
            "common_tls_context": {
                "tls_certificates": [_tls_certificate(creds)],
                "validation_context": {
                    "trusted_ca": {"inline_string": creds.roots_pem},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": HTTPBIN.uri}}
                    ],
                },
            },
        },
    }


def downstream_tls(creds: Credentials) -> dict[str, Any]:
    """Server side of mTLS: a client certificate from the mesh's roots is required."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _DOWNSTREAM_TLS,
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [_tls_certificate(creds)],
                "validation_context": {"trusted_ca": {"inline_string": creds.roots_pem}},
            },
        },
    }


def allow_sleep_rbac() -> dict[str, Any]:
    """The HTTP RBAC filter ALLOWing sleep's principal (the policy of both benchmarks)."""
    principal = {"authenticated": {"principal_name": {"exact": SLEEP.uri}}}
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": _RBAC,
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "allow-sleep": {"permissions": [{"any": True}], "principals": [principal]}
                },
            },
        },
    }


def handwritten_client_bootstrap(
    address: str, server: str, creds: Credentials, access_log: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """HTTP proxy listener → cluster over mTLS, the server pinned by its SPIFFE ID."""
    route = {"match": {"prefix": "/"}, "route": {"cluster": "server"}}
    # Absolute-form requests need no option: Envoy's HTTP/1 codec accepts them by default.
    manager = _hcm("client", route, access_log=list(access_log))
    listener = {
        "name": "client",
        "address": _address(address, OUTBOUND_HTTP_PORT),
        "filter_chains": [{"filters": [manager]}],
    }
    cluster = _static_cluster("server", server, APP_PORT, transport_socket=upstream_tls(creds))
    return _bootstrap("handwritten-client", listener, [cluster])


def handwritten_server_bootstrap(
    address: str, app: str, creds: Credentials, access_log: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """mTLS listener (client certificate required) → RBAC ALLOW sleep → router → app."""
    route = {"match": {"prefix": "/"}, "route": {"cluster": "app"}}
    manager = _hcm("server", route, [allow_sleep_rbac()], access_log=list(access_log))
    listener = {
        "name": "server",
        "address": _address(address, APP_PORT),
        "filter_chains": [{"transport_socket": downstream_tls(creds), "filters": [manager]}],
    }
    return _bootstrap("handwritten-server", listener, [_static_cluster("app", app, APP_PORT)])
