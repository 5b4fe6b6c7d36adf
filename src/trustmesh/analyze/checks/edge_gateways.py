"""Gateways as the TM-EDGE checks see them: servers, the workloads they run on, routes.

Not a check module (it registers nothing). ``api.models`` keeps only a Gateway's and a
VirtualService's ``hosts``, so servers, TLS settings and HTTP routes are read here from
the raw documents, with field locations from the resource's own YAML.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trustmesh.analyze.context import AnalysisContext
from trustmesh.api.diagnostics import Location
from trustmesh.api.resources import Resource

_TERMINATING = frozenset({"SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL", "ISTIO_MUTUAL"})
_PLAIN_HTTP = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY"})
_TLS_RANK = {"TLSV1_0": 10, "TLSV1_1": 11, "TLSV1_2": 12, "TLSV1_3": 13}
# Secret-producing kinds whose output name is known from the manifest alone.
_SECRET_SOURCES = {
    "Secret": (),
    "SealedSecret": ("spec", "template", "metadata", "name"),
    "ExternalSecret": ("spec", "target", "name"),
    "Certificate": ("spec", "secretName"),
}


def host_part(host: str) -> str:
    """``ns/host`` → ``host`` (Gateway hosts may carry a namespace), lower-cased."""
    return host.rpartition("/")[2].lower()


def covers(pattern: str, host: str) -> bool:
    """Istio host matching: ``*`` anything, ``*.x`` any name under ``x``, else exact."""
    pattern, host = pattern.lower(), host.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return host.endswith(pattern[1:]) and host != pattern[2:]
    return pattern == host


def intersects(a: str, b: str) -> bool:
    return covers(a, b) or covers(b, a)


def tls_rank(version: object) -> int:
    """Comparable TLS version; unset / TLS_AUTO is Envoy's server default, TLS 1.2."""
    return _TLS_RANK.get(str(version).upper(), 12) if version else 12


def raw_spec(resource: Resource[Any]) -> Mapping[str, Any]:
    """The document's ``spec`` as written, for fields the API model does not keep."""
    spec = resource.raw_spec()
    return spec if isinstance(spec, Mapping) else {}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


@dataclass(frozen=True, slots=True)
class Server:
    """One ``servers[i]`` entry of a Gateway."""

    gateway: Resource[Any]
    index: int
    number: int | None
    protocol: str  # upper-case, as Istio parses it
    hosts: tuple[str, ...]
    tls: Mapping[str, Any]
    selector: Mapping[str, str]
    workloads: tuple[str, ...]  # NS/NAME of the gateway workloads it runs on

    @property
    def ref(self) -> str:
        return f"{self.gateway.namespace}/{self.gateway.name}"

    def location(self, *path: str | int) -> Location:
        return self.gateway.location("servers", self.index, *path)

    @property
    def mode(self) -> str:
        """``tls.mode``; unset is PASSTHROUGH (the enum's zero value)."""
        return str(self.tls.get("mode") or "PASSTHROUGH").upper() if self.tls else ""

    @property
    def is_tls(self) -> bool:
        return self.protocol in ("HTTPS", "TLS")

    @property
    def terminates(self) -> bool:
        return self.is_tls and self.mode in _TERMINATING

    @property
    def plain_http(self) -> bool:
        return self.protocol in _PLAIN_HTTP

    @property
    def requires_client_cert(self) -> bool:
        return self.mode in ("MUTUAL", "ISTIO_MUTUAL")

    def credentials(self) -> list[tuple[tuple[str | int, ...], str]]:
        """(field path in the server, ``name`` or ``ns/name``) of each Secret it reads."""
        listed: list[tuple[tuple[str | int, ...], str]] = [
            (("tls", "credentialNames", k), str(n))
            for k, n in enumerate(_list(self.tls.get("credentialNames")))
            if n
        ]
        if not listed and self.tls.get("credentialName"):
            listed = [(("tls", "credentialName"), str(self.tls["credentialName"]))]
        out: list[tuple[tuple[str | int, ...], str]] = []
        for path, name in listed:
            if "://" in name and not name.startswith("kubernetes://"):
                continue  # builtin://, configmap://, kubernetes-gateway://: not a Secret here
            out.append((path, name.removeprefix("kubernetes://")))
        return out


@dataclass(slots=True)
class GatewayIndex:
    """Every Gateway server, its workloads, the VirtualServices and Secrets of the input."""

    ctx: AnalysisContext
    servers: list[Server] = field(default_factory=list)
    _groups: dict[str, tuple[object, ...]] = field(default_factory=dict)
    _secrets: dict[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        workloads = {w.ref: w for w in self.ctx.snapshot.workloads}
        for gateway in self.ctx.resources("Gateway"):
            spec = raw_spec(gateway)
            selector = {str(k): str(v) for k, v in _mapping(spec.get("selector")).items()}
            refs = tuple(
                sorted(
                    ref
                    for ref, w in workloads.items()
                    if selector and all(w.labels.get(k) == v for k, v in selector.items())
                )
            )
            # Servers share a listener when their Gateways select a common workload; with
            # no workload in the input, only when they use the same selector.
            self._groups[gateway.key] = refs or (tuple(sorted(selector.items())),)
            for i, raw in enumerate(_list(spec.get("servers"))):
                server = _mapping(raw)
                port = _mapping(server.get("port"))
                number = port.get("number")
                self.servers.append(
                    Server(
                        gateway=gateway,
                        index=i,
                        number=number if isinstance(number, int) else None,
                        protocol=str(port.get("protocol") or "").upper(),
                        hosts=tuple(str(h) for h in _list(server.get("hosts"))),
                        tls=_mapping(server.get("tls")),
                        selector=selector,
                        workloads=refs,
                    )
                )
        for secret in self.ctx.resources("Secret"):  # typed since gateways read them
            body: Any = secret.document.body
            for part in secret.base_path:
                body = body[part]
            self._secrets[(secret.namespace, secret.name)] = _mapping(body)
        for item in self.ctx.unknown_resources:
            path = _SECRET_SOURCES.get(item.kind)
            if path is None:
                continue
            name: Any = item.body
            for part in path:
                name = _mapping(name).get(part)
            key = (item.namespace, str(name) if path and name else item.name)
            self._secrets[key] = _mapping(item.body) if item.kind == "Secret" else {}

    # --- gateways and workloads ---------------------------------------------------------

    def same_proxy(self, a: Server, b: Server) -> bool:
        ga, gb = self._groups[a.gateway.key], self._groups[b.gateway.key]
        return bool(set(ga) & set(gb))

    def workload_namespaces(self, server: Server) -> list[str]:
        return sorted({ref.partition("/")[0] for ref in server.workloads})

    def gateway_workloads(self) -> set[str]:
        return {ref for s in self.servers for ref in s.workloads}

    def egress_gateways(self) -> list[Server]:
        return [s for s in self.servers if s.selector.get("istio") == "egressgateway"]

    # --- virtual services ---------------------------------------------------------------

    @property
    def has_virtual_services(self) -> bool:
        return bool(self.ctx.resources("VirtualService"))

    def _gateway_refs(self, vs: Resource[Any]) -> set[str]:
        refs = set()
        for ref in vs.spec.gateways:
            if ref != "mesh":
                refs.add(ref if "/" in ref else f"{vs.namespace}/{ref}")
        return refs

    def bound_servers(self, vs: Resource[Any]) -> list[Server]:
        refs = self._gateway_refs(vs)
        return [s for s in self.servers if s.ref in refs]

    def admits(self, server: Server, host: str, vs: Resource[Any]) -> bool:
        """Whether server host ``host`` (``ns/name`` form) lets ``vs`` bind."""
        namespace = host.rpartition("/")[0]
        if namespace in ("", "*"):
            return True
        if namespace == ".":
            return vs.namespace == server.gateway.namespace
        return vs.namespace == namespace

    def routes_for(self, server: Server, name: str) -> list[Resource[Any]]:
        """VirtualServices that answer Host ``name`` on ``server``, most specific domain only.

        Envoy picks the exact domain first, then the longest wildcard suffix.
        """
        candidates: list[tuple[int, Resource[Any]]] = []
        for vs in self.ctx.resources("VirtualService"):
            if server.ref not in self._gateway_refs(vs):
                continue
            for host in vs.spec.hosts:
                admitted = any(
                    intersects(host_part(h), host) and self.admits(server, h, vs)
                    for h in server.hosts
                )
                if admitted and covers(host, name):
                    rank = 10_000 if host.lower() == name else len(host)
                    candidates.append((rank, vs))
        if not candidates:
            return []
        best = max(rank for rank, _ in candidates)
        chosen = {vs.key: vs for rank, vs in candidates if rank == best}
        return list(chosen.values())

    @staticmethod
    def disabled(vs: Resource[Any]) -> bool:
        """Every HTTP route aborts or answers directly (Istio's 421 recipe)."""
        routes = [_mapping(r) for r in _list(raw_spec(vs).get("http"))]

        def closed(route: Mapping[str, Any]) -> bool:
            if route.get("directResponse"):
                return True
            abort = _mapping(_mapping(route.get("fault")).get("abort"))
            percent = _mapping(abort.get("percentage")).get("value", 100)
            return bool(abort) and isinstance(percent, int | float) and percent >= 100

        return bool(routes) and all(closed(r) for r in routes)

    @staticmethod
    def destinations(services: Sequence[Resource[Any]]) -> set[str]:
        out = set()
        for vs in services:
            for route in _list(raw_spec(vs).get("http")):
                for dest in _list(_mapping(route).get("route")):
                    host = str(_mapping(_mapping(dest).get("destination")).get("host") or "")
                    if not host:
                        continue
                    parts = host.lower().split(".")
                    if len(parts) == 1:
                        parts.append(vs.namespace)
                    if len(parts) == 2:
                        parts += ["svc", "cluster", "local"]
                    out.add(".".join(parts))
        return out

    # --- secrets ------------------------------------------------------------------------

    @property
    def has_secrets(self) -> bool:
        return bool(self._secrets)

    def secret(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self._secrets.get((namespace, name))

    def secret_namespaces(self, name: str) -> list[str]:
        return sorted(ns for ns, n in self._secrets if n == name)

    def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        """Data keys of a Secret given in full; None when they are not known."""
        body = self._secrets.get((namespace, name)) or {}
        keys = {*_mapping(body.get("data")), *_mapping(body.get("stringData"))}
        return keys or None
