"""What a decision is asked about, and the attributes Envoy would see for it.

:class:`Request` is the question (who, to where, what). :class:`Attributes` is the
view of it an Envoy filter chain has once TLS, path normalization and JWT
authentication have run: the only thing rule matching reads.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class SourceKind(enum.Enum):
    WORKLOAD = "workload"  # NS/NAME: identity and TLS come from the config
    PRINCIPAL = "principal"  # an mTLS peer with this principal (no ``spiffe://``)
    PLAINTEXT = "plaintext"  # no client certificate at all


@dataclass(frozen=True, slots=True)
class Source:
    kind: SourceKind
    value: str = ""
    ip: str | None = None

    @classmethod
    def workload(cls, ref: str, ip: str | None = None) -> Source:
        return cls(SourceKind.WORKLOAD, ref, ip)

    @classmethod
    def principal(cls, principal: str, ip: str | None = None) -> Source:
        return cls(SourceKind.PRINCIPAL, principal.removeprefix("spiffe://"), ip)

    @classmethod
    def plaintext(cls, ip: str | None = None) -> Source:
        return cls(SourceKind.PLAINTEXT, "", ip)

    def describe(self) -> str:
        if self.kind is SourceKind.PLAINTEXT:
            return "plaintext client"
        return f"{self.kind.value} {self.value}"


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """An HTTP/1.1 request as a client sends it.

    ``path`` is the request target: origin form (``/x?q``) or absolute form
    (``http://host/x``, whose authority Envoy takes over Host). ``host`` is the first Host
    line (None: what ``curl`` would send); ``Host`` entries in ``headers`` are further Host
    lines. ``headers`` keeps every line in order, repeated names and their spelling too.
    """

    method: str = "GET"
    path: str = "/"
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    jwt: str | None = None  # shorthand for ``Authorization: Bearer <jwt>``

    def header_lines(self) -> tuple[tuple[str, str], ...]:
        if self.jwt is None:
            return self.headers
        return (*self.headers, ("authorization", f"Bearer {self.jwt}"))


@dataclass(frozen=True, slots=True)
class Request:
    """One question: may ``source`` reach ``destination`` (NS/NAME) on ``port`` with this?

    ``http`` is None for a plain TCP connection. ``destination_host`` instead of a
    workload asks an egress question (a host outside the workload list). ``subset``: the
    DestinationRule subset whose cluster the client's route picked ("" for the service's
    own): its client TLS and SNI apply.
    """

    source: Source
    destination: str
    port: int | None = None
    http: HttpRequest | None = None
    destination_host: str | None = None
    subset: str = ""


@dataclass(slots=True)
class Attributes:
    """Connection and request attributes after TLS, normalization and JWT authn."""

    principal: str | None = None  # peer certificate URI SAN without spiffe://, mTLS only
    source_ip: IpAddress | None = None
    remote_ip: IpAddress | None = None
    destination_ip: IpAddress | None = None
    destination_port: int = 0
    sni: str | None = None
    is_http: bool = False
    method: str | None = None
    path: str | None = None  # normalized, without query
    query: str = ""  # "" or "?…" as sent
    host: str | None = None
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    issuer: str | None = None
    subject: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)

    @property
    def request_principal(self) -> str | None:
        if self.issuer is None:
            return None
        return f"{self.issuer}/{self.subject or ''}"
