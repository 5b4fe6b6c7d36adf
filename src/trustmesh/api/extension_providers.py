"""``meshConfig.extensionProviders`` for CUSTOM authorization: checked and resolved (pure).

What istiod does with each entry before a CUSTOM AuthorizationPolicy may use it
(``pilot/pkg/security/authz/builder/extauthz.go`` and the mesh config validation):

* only ``envoyExtAuthzHttp`` and ``envoyExtAuthzGrpc`` entries are authorizers; an entry of
  another kind (tracing, logging) is not one, and a CUSTOM policy naming it is denied;
* the name must be non-empty, unique, and a DNS-1123 label (it goes into metadata keys
  and RBAC policy names); ``port`` 1..65535; ``statusOnError`` an HTTP status Envoy
  knows; ``pathPrefix`` starting with ``/``; no lone ``*`` in a header list;
* ``service`` is ``[<namespace>/]<hostname>`` and must name one Service (``<name>.<ns>.
  svc.cluster.local``) or ServiceEntry host; without the namespace the hostname must be
  unique across namespaces. The authorizer is then reached through the sidecar's own
  outbound cluster ``outbound|<port>||<hostname>`` (Istio's ``LookupCluster``).

A provider with any problem is unusable: every CUSTOM rule naming it becomes a DENY
(Istio's ``-deny-due-to-bad-CUSTOM-action``), offline and in Envoy alike.
:func:`provider_diagnostics` reports each problem at the file, line and field where the
provider was written: field errors as errors (istiod refuses such a mesh config), a
service missing from the registry as a warning (the mesh may simply not list it yet).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.diagnostics import Diagnostic, Location, error, warning
from trustmesh.api.snapshot import ConfigSnapshot

__all__ = [
    "ENVOY_STATUS_CODES",
    "ExtAuthzProvider",
    "ProviderKind",
    "ProviderProblem",
    "custom_policy_diagnostics",
    "ext_authz_providers",
    "provider_diagnostics",
]

# Envoy's ``envoy.type.v3.StatusCode`` values (0, "Empty", is refused by Envoy's own
# validation of HttpStatus): what ``statusOnError`` may be.
ENVOY_STATUS_CODES = frozenset(
    {100, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305}
    | {307, 308, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413}
    | {414, 415, 416, 417, 421, 422, 423, 424, 426, 428, 429, 431, 500, 501, 502, 503}
    | {504, 505, 506, 507, 508, 510, 511}
)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DURATION = re.compile(r"^\d+(\.\d{1,9})?s$")
_HEADER_LISTS = (
    "include_headers_in_check",
    "include_request_headers_in_check",
    "headers_to_upstream_on_allow",
    "headers_to_downstream_on_deny",
    "headers_to_downstream_on_allow",
)


class ProviderKind(enum.Enum):
    """How the authorizer is asked."""

    HTTP = "envoyExtAuthzHttp"
    GRPC = "envoyExtAuthzGrpc"


@dataclass(frozen=True, slots=True)
class ProviderProblem:
    """What makes a provider unusable; ``field`` is relative to its entry."""

    field: tuple[str | int, ...]
    message: str
    is_error: bool = True


@dataclass(frozen=True, slots=True)
class ExtAuthzProvider:
    """One authorizer as a CUSTOM policy sees it: usable when ``problems`` is empty."""

    name: str
    index: int  # position in meshConfig.extensionProviders
    kind: ProviderKind | None  # None: another kind of provider (not an authorizer)
    config: m.EnvoyExtAuthzHttp | m.EnvoyExtAuthzGrpc | None
    hostname: str = ""  # resolved from ``service``
    problems: tuple[ProviderProblem, ...] = ()

    @property
    def usable(self) -> bool:
        return self.kind is not None and self.config is not None and not self.problems

    @property
    def cluster(self) -> str:
        """Istio's outbound cluster of the authorizer's service port."""
        assert self.config is not None
        return f"outbound|{self.config.port}||{self.hostname}"

    @property
    def serves_tcp(self) -> bool:
        """Only a gRPC authorizer has a TCP (network) ext_authz filter; Istio leaves a
        CUSTOM policy with an HTTP provider out of TCP chains."""
        return self.kind is ProviderKind.GRPC

    def why_unusable(self) -> str:
        if self.kind is None:
            return f"extension provider {self.name!r} is not envoyExtAuthzHttp / envoyExtAuthzGrpc"
        return "; ".join(p.message for p in self.problems)


def ext_authz_providers(snapshot: ConfigSnapshot) -> Mapping[str, ExtAuthzProvider]:
    """Every named extension provider, checked and resolved (a later duplicate wins and
    is unusable, as in istiod)."""
    resolved: dict[str, ExtAuthzProvider] = {}
    for index, entry in enumerate(snapshot.mesh.extension_providers):
        provider = _resolve(snapshot, index, entry, duplicate=entry.name in resolved)
        if entry.name:
            resolved[entry.name] = provider
    return resolved


def provider_diagnostics(snapshot: ConfigSnapshot) -> list[Diagnostic]:
    """Each problem of each ext_authz provider, at the field where it was written."""
    out: list[Diagnostic] = []
    for index, entry in enumerate(snapshot.mesh.extension_providers):
        seen = any(e.name == entry.name for e in snapshot.mesh.extension_providers[:index])
        provider = _resolve(snapshot, index, entry, duplicate=seen and bool(entry.name))
        for problem in provider.problems:
            where = _location(snapshot, (index, *problem.field))
            text = f"extension provider {entry.name or '#' + str(index)}: {problem.message}"
            make = error if problem.is_error else warning
            out.append(make("invalid-extension-provider", where, text))
    return out


def _location(snapshot: ConfigSnapshot, path: tuple[str | int, ...]) -> Location:
    """Where ``extensionProviders[path]`` was written: the last mesh config layer that sets
    ``extensionProviders`` (layers replace the whole list)."""
    for layer in reversed(snapshot.mesh_layers):
        if isinstance(layer.body, dict) and "extensionProviders" in layer.body:
            return layer.document.location((*layer.path, "extensionProviders", *path))
    return Location("<mesh config>", 0, f"extensionProviders[{path[0]}]")


def _resolve(
    snapshot: ConfigSnapshot, index: int, entry: m.ExtensionProvider, *, duplicate: bool
) -> ExtAuthzProvider:
    problems = list(_name_problems(entry.name, duplicate, authorizer=_is_authorizer(entry)))
    kinds = [
        (kind, config)
        for kind, config in (
            (ProviderKind.HTTP, entry.envoy_ext_authz_http),
            (ProviderKind.GRPC, entry.envoy_ext_authz_grpc),
        )
        if config is not None
    ]
    if not kinds:
        return ExtAuthzProvider(entry.name, index, None, None, problems=tuple(problems))
    if len(kinds) > 1:
        problems.append(ProviderProblem((), "set one of envoyExtAuthzHttp or envoyExtAuthzGrpc"))
    kind, config = kinds[0]
    base = (_camel(kind),)
    problems += [
        ProviderProblem((*base, *p.field), p.message, p.is_error) for p in _config_problems(config)
    ]
    hostname, ports, lookup = _lookup(snapshot, config.service)
    if lookup is not None and config.service:
        problems.append(ProviderProblem((*base, "service"), lookup, is_error=False))
    elif lookup is None and 1 <= config.port <= 65535 and config.port not in ports:
        # Istio would point Envoy at a cluster that does not exist; trustmesh refuses.
        problems.append(
            ProviderProblem(
                (*base, "port"),
                f"{hostname} has no port {config.port} (ports: "
                f"{', '.join(map(str, sorted(ports))) or 'none'}): CUSTOM policies using this"
                " provider deny every request they match",
                is_error=False,
            )
        )
    return ExtAuthzProvider(entry.name, index, kind, config, hostname, tuple(problems))


def _camel(kind: ProviderKind) -> str:
    return kind.value


def _is_authorizer(entry: m.ExtensionProvider) -> bool:
    return entry.envoy_ext_authz_http is not None or entry.envoy_ext_authz_grpc is not None


def _name_problems(name: str, duplicate: bool, *, authorizer: bool) -> Iterator[ProviderProblem]:
    if not name:
        yield ProviderProblem(("name",), "name must not be empty")
        return
    if duplicate:
        yield ProviderProblem(("name",), f"name must be unique, {name!r} is defined again")
    # Only an authorizer's name goes into metadata keys and RBAC policy names.
    if authorizer and not _DNS_LABEL.match(name):
        yield ProviderProblem(
            ("name",),
            f"name {name!r} must be lower-case letters, digits and '-' (a DNS-1123 label, "
            "at most 63 characters): it becomes part of metadata keys and policy names",
        )


def _config_problems(
    config: m.EnvoyExtAuthzHttp | m.EnvoyExtAuthzGrpc,
) -> Iterator[ProviderProblem]:
    if not 1 <= config.port <= 65535:
        yield ProviderProblem(("port",), f"port must be 1..65535, found {config.port}")
    yield from _service_problems(config.service)
    if config.status_on_error:
        try:
            code = int(config.status_on_error)
        except ValueError:
            code = -1
        if code not in ENVOY_STATUS_CODES:
            yield ProviderProblem(
                ("statusOnError",),
                f"statusOnError {config.status_on_error!r} is not an HTTP status Envoy knows"
                " (e.g. 403, 500, 503)",
            )
    if config.timeout and not _DURATION.match(config.timeout):
        yield ProviderProblem(
            ("timeout",), f"timeout {config.timeout!r} must be seconds like '10s' or '0.5s'"
        )
    if isinstance(config, m.EnvoyExtAuthzHttp):
        prefix = config.path_prefix
        if prefix and (not prefix.startswith("/") or any(c in prefix for c in " ?#")):
            yield ProviderProblem(
                ("pathPrefix",), f"pathPrefix must be a path starting with /: {prefix!r}"
            )
        for name in _HEADER_LISTS:
            values: tuple[str, ...] = getattr(config, name)
            for i, value in enumerate(values):
                if value == "*":
                    field = _to_camel(name)
                    yield ProviderProblem(
                        (field, i),
                        f'a lone "*" is not supported in {field}: use a prefix ("x-*") or '
                        'a suffix ("*-id")',
                    )


def _to_camel(snake: str) -> str:
    first, *rest = snake.split("_")
    return first + "".join(part.capitalize() for part in rest)


def _service_problems(service: str) -> Iterator[ProviderProblem]:
    if not service:
        yield ProviderProblem(("service",), "service must not be empty")
        return
    namespace, slash, host = service.rpartition("/")
    if slash and (not namespace or "/" in namespace or not _is_host(host, wildcard=False)):
        yield ProviderProblem(
            ("service",), f"service must be [<namespace>/]<hostname>: {service!r}"
        )
    elif not slash and not _is_host(service, wildcard=False) and not _is_ip(service):
        yield ProviderProblem(("service",), f"service must be a hostname or an IP: {service!r}")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_host(text: str, *, wildcard: bool) -> bool:
    labels = text.split(".")
    if wildcard and labels[0] == "*":
        labels = labels[1:]
    return (
        bool(labels)
        and len(text) <= 253
        and all(re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?", x) for x in labels)
    )


def _lookup(snapshot: ConfigSnapshot, service: str) -> tuple[str, frozenset[int], str | None]:
    """``service`` → (hostname, its ports, problem or None), as Istio's ``LookupCluster``."""
    namespace, slash, host = service.rpartition("/")
    found: dict[str, tuple[str, frozenset[int]]] = {}  # namespace → hostname, ports
    for svc in snapshot.services:
        if svc.hostname == host:
            found[svc.namespace] = (svc.hostname, frozenset(p.port for p in svc.ports))
    for entry in snapshot.of_kind("ServiceEntry"):
        spec: Any = entry.spec
        if host in spec.hosts:
            found.setdefault(entry.namespace, (host, frozenset(p.number for p in spec.ports)))
    if slash:
        if namespace in found:
            return (*found[namespace], None)
    elif len(found) == 1:
        return (*next(iter(found.values())), None)
    elif len(found) > 1:
        return (
            "",
            frozenset(),
            (
                f"{service} is defined in namespaces {', '.join(sorted(found))}: write it as "
                "<namespace>/<hostname>"
            ),
        )
    return (
        "",
        frozenset(),
        (
            f"no Service or ServiceEntry {service} in the configuration: CUSTOM policies using "
            "this provider deny every request they match"
        ),
    )


def custom_policy_diagnostics(snapshot: ConfigSnapshot) -> list[Diagnostic]:
    """A CUSTOM AuthorizationPolicy whose provider cannot be used: where it names it."""
    providers = ext_authz_providers(snapshot)
    out: list[Diagnostic] = []
    for policy in snapshot.of_kind("AuthorizationPolicy"):
        spec: m.AuthorizationPolicySpec = policy.spec
        if spec.action is not m.Action.CUSTOM or spec.provider is None or not spec.provider.name:
            continue
        name = spec.provider.name
        found = providers.get(name)
        if found is not None and found.usable:
            continue
        why = (
            "is not in meshConfig.extensionProviders"
            if found is None
            else f"cannot be used ({found.why_unusable()})"
        )
        out.append(
            warning(
                "custom-provider-unusable",
                policy.location("provider", "name"),
                f"CUSTOM provider {name!r} {why}: every request this policy's rules match is"
                " denied (fails closed, as in Istio)",
            )
        )
    return out
