"""Pydantic models of Istio's ``Gateway`` and ``VirtualService`` and Kubernetes' ``Secret``.

The loader keeps reading Gateways and VirtualServices loosely (the analyzer reads them raw,
whatever they hold); the gateway translation validates them again with these models, which
are strict: a field Istio does not define is an error (the API server's structural schema
refuses it), and a field Istio defines but trustmesh's gateways do not honour is reported by
:mod:`trustmesh.api.gateway` — never silently dropped.

Field names and enums follow istio/api ``networking/v1/gateway.proto`` and
``virtual_service.proto``.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import Field, model_validator

from trustmesh.api.models import Loose, Strict, Strings

__all__ = [
    "GatewaySpec",
    "HttpRoute",
    "L4MatchAttributes",
    "RouteDestination",
    "SecretObject",
    "Server",
    "ServerTlsMode",
    "ServerTlsSettings",
    "StringMatch",
    "TcpRoute",
    "TlsMatchAttributes",
    "TlsProtocol",
    "TlsRoute",
    "VirtualServiceSpec",
]


class ServerTlsMode(enum.Enum):
    PASSTHROUGH = "PASSTHROUGH"
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    AUTO_PASSTHROUGH = "AUTO_PASSTHROUGH"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"
    OPTIONAL_MUTUAL = "OPTIONAL_MUTUAL"


class TlsProtocol(enum.Enum):
    TLS_AUTO = "TLS_AUTO"
    TLSV1_0 = "TLSV1_0"
    TLSV1_1 = "TLSV1_1"
    TLSV1_2 = "TLSV1_2"
    TLSV1_3 = "TLSV1_3"

    @property
    def envoy(self) -> str:
        return {"TLS_AUTO": "TLS_AUTO"}.get(self.value, "TLSv1_" + self.value[-1])


class ServerPort(Strict):
    number: int = Field(ge=1, le=65535)
    protocol: str = Field(min_length=1)
    name: str = ""
    target_port: int | None = Field(default=None, ge=1, le=65535)


class ServerTlsSettings(Strict):
    https_redirect: bool = False
    mode: ServerTlsMode = ServerTlsMode.PASSTHROUGH
    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    ca_crl: str = ""
    credential_name: str = ""
    credential_names: Strings = ()
    ca_cert_credential_name: str = ""
    tls_certificates: tuple[dict[str, Any], ...] = ()
    subject_alt_names: Strings = ()
    verify_certificate_spki: Strings = ()
    verify_certificate_hash: Strings = ()
    min_protocol_version: TlsProtocol = TlsProtocol.TLS_AUTO
    max_protocol_version: TlsProtocol = TlsProtocol.TLS_AUTO
    cipher_suites: Strings = ()
    ecdh_curves: Strings = ()
    insecure_skip_verify: bool | None = None


class Server(Strict):
    port: ServerPort
    hosts: Strings = Field(min_length=1)
    bind: str = ""
    tls: ServerTlsSettings | None = None
    default_endpoint: str = ""
    name: str = ""


class GatewaySpec(Strict):
    servers: tuple[Server, ...] = ()
    selector: dict[str, str] = Field(default_factory=dict)


# --- VirtualService ---------------------------------------------------------------------


class StringMatch(Strict):
    """``exact`` | ``prefix`` | ``regex`` (RE2): exactly one."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> StringMatch:
        if sum(v is not None for v in (self.exact, self.prefix, self.regex)) > 1:
            raise ValueError("set one of exact, prefix or regex")
        return self


class PortSelector(Strict):
    number: int = Field(ge=1, le=65535)


class Destination(Strict):
    host: str = Field(min_length=1)
    subset: str = ""
    port: PortSelector | None = None


class HeaderOperations(Strict):
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: Strings = ()


class Headers(Strict):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HttpRouteDestination(Strict):
    destination: Destination
    weight: int = Field(default=0, ge=0)
    headers: Headers | None = None


class HttpMatchRequest(Strict):
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    port: int | None = Field(default=None, ge=1, le=65535)
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: Strings = ()
    query_params: dict[str, StringMatch] = Field(default_factory=dict)
    ignore_uri_case: bool = False
    without_headers: dict[str, StringMatch] = Field(default_factory=dict)
    source_namespace: str = ""
    stat_prefix: str = ""


class HttpRedirect(Strict):
    uri: str = ""
    authority: str = ""
    port: int | None = Field(default=None, ge=1, le=65535)
    derive_port: str = ""
    scheme: str = ""
    redirect_code: int = 301


class RegexRewrite(Strict):
    match: str
    rewrite: str = ""


class HttpRewrite(Strict):
    uri: str = ""
    authority: str = ""
    uri_regex_rewrite: RegexRewrite | None = None


class HttpRetry(Strict):
    attempts: int = Field(default=0, ge=0)
    per_try_timeout: str = ""
    retry_on: str = ""
    retry_remote_localities: bool | None = None
    backoff: str = ""


class HttpBody(Strict):
    string: str | None = None
    bytes: str | None = None


class HttpDirectResponse(Strict):
    status: int = Field(ge=200, le=599)
    body: HttpBody | None = None


class HttpRoute(Strict):
    name: str = ""
    match: tuple[HttpMatchRequest, ...] = ()
    route: tuple[HttpRouteDestination, ...] = ()
    redirect: HttpRedirect | None = None
    direct_response: HttpDirectResponse | None = None
    delegate: dict[str, Any] | None = None
    rewrite: HttpRewrite | None = None
    timeout: str = ""
    retries: HttpRetry | None = None
    fault: dict[str, Any] | None = None
    mirror: dict[str, Any] | None = None
    mirrors: tuple[dict[str, Any], ...] = ()
    mirror_percent: int | None = None
    mirror_percentage: dict[str, Any] | None = None
    cors_policy: dict[str, Any] | None = None
    headers: Headers | None = None


class L4MatchAttributes(Strict):
    """A ``tcp`` route's match (``L4MatchAttributes``)."""

    destination_subnets: Strings = ()
    port: int | None = Field(default=None, ge=1, le=65535)
    source_subnet: str = ""
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: Strings = ()
    source_namespace: str = ""


class TlsMatchAttributes(Strict):
    """A ``tls`` route's match (``TLSMatchAttributes``): ``sniHosts`` is required."""

    sni_hosts: Strings = Field(min_length=1)
    destination_subnets: Strings = ()
    port: int | None = Field(default=None, ge=1, le=65535)
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: Strings = ()
    source_namespace: str = ""


class RouteDestination(Strict):
    destination: Destination
    weight: int = Field(default=0, ge=0)


class TlsRoute(Strict):
    match: tuple[TlsMatchAttributes, ...] = Field(min_length=1)
    route: tuple[RouteDestination, ...] = ()


class TcpRoute(Strict):
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


class VirtualServiceSpec(Strict):
    hosts: Strings = ()
    gateways: Strings = ()
    http: tuple[HttpRoute, ...] = ()
    tls: tuple[TlsRoute, ...] = ()
    tcp: tuple[TcpRoute, ...] = ()
    export_to: Strings = ()


# --- Secret -----------------------------------------------------------------------------


class SecretObject(Loose):
    """A Kubernetes ``Secret`` (the whole object): ``data`` is base64, ``stringData`` not."""

    type: str = "Opaque"
    data: dict[str, str] = Field(default_factory=dict)
    string_data: dict[str, str] = Field(default_factory=dict)
