"""DestinationRule client TLS: Istio's admission checks, and what sidecars cannot originate.

Istio's webhook (``pkg/config/validation``, ``validateTLS``) refuses a ``tls`` that names
``credentialName`` together with ``clientCertificate`` / ``privateKey`` /
``caCertificates``, and a ``MUTUAL`` without ``credentialName`` that lacks the client
certificate or the private key: errors on the field.

At a sidecar, istiod builds no TLS context for SIMPLE / MUTUAL with ``credentialName``
unless the rule has a ``workloadSelector`` (``buildUpstreamClusterTLSContext``): the
cluster is left in plaintext. trustmesh's sidecars leave such a cluster out instead (503,
never plaintext) and report it here, on the ``credentialName`` line, for every
ServiceEntry host and port the setting covers that some sidecar sees: an error where the
application speaks plaintext to the sidecar (the sidecar was asked to encrypt it), a
warning on a ``TLS`` / ``HTTPS`` port (the application's own TLS passes through, as in
Istio). Gateways read ``credentialName`` as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.dataplane import MeshMode
from trustmesh.api.diagnostics import Diagnostic, error, warning
from trustmesh.api.gateway import exported_to
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import ConfigSnapshot, Service

__all__ = ["destination_rule_tls_problems"]

_Path = tuple[str | int, ...]
_L4 = frozenset({"", "TCP", "UDP", "SCTP"})


def destination_rule_tls_problems(snapshot: ConfigSnapshot) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    sidecar_namespaces = sorted(
        {w.namespace for w in snapshot.workloads if w.dataplane.mode is MeshMode.SIDECAR}
    )
    entries = list(snapshot.of_kind("ServiceEntry"))
    for rule in snapshot.of_kind("DestinationRule"):
        for tls, path, ports in _settings(rule.spec):
            out.extend(_admission(rule, tls, path))
            if tls.credential_name and tls.mode in (m.TlsMode.SIMPLE, m.TlsMode.MUTUAL):
                out.extend(
                    _at_sidecars(
                        rule, tls, path, ports, snapshot.services, entries, sidecar_namespaces
                    )
                )
    return out


@dataclass(frozen=True, slots=True)
class _Ports:
    """The ports a ``tls`` is for: ``numbers``, or every port but them (``excluded``)."""

    numbers: frozenset[int]
    excluded: bool

    def covers(self, number: int) -> bool:
        return (number in self.numbers) != self.excluded


def _settings(
    spec: m.DestinationRuleSpec,
) -> Iterator[tuple[m.ClientTlsSettings, _Path, _Ports]]:
    """Every ``tls`` of the rule, its path, and the ports it is for (a top-level one:
    every port but those a port-level entry of the same policy names)."""
    policies: list[tuple[m.TrafficPolicy, _Path]] = []
    if spec.traffic_policy is not None:
        policies.append((spec.traffic_policy, ("trafficPolicy",)))
    for i, subset in enumerate(spec.subsets):
        if subset.traffic_policy is not None:
            policies.append((subset.traffic_policy, ("subsets", i, "trafficPolicy")))
    for policy, base in policies:
        named = frozenset(p.port.number for p in policy.port_level_settings if p.port is not None)
        if policy.tls is not None:
            yield policy.tls, (*base, "tls"), _Ports(named, excluded=True)
        for i, level in enumerate(policy.port_level_settings):
            if level.tls is not None and level.port is not None:
                path = (*base, "portLevelSettings", i, "tls")
                yield level.tls, path, _Ports(frozenset({level.port.number}), excluded=False)


def _admission(rule: Resource[Any], tls: m.ClientTlsSettings, path: _Path) -> Iterator[Diagnostic]:
    if tls.credential_name and (tls.client_certificate or tls.private_key or tls.ca_certificates):
        yield error(
            "invalid-field",
            rule.location(*path, "credentialName"),
            "cannot specify client certificates or CA certificate if credentialName is set",
        )
    if tls.mode is m.TlsMode.MUTUAL and not tls.credential_name:
        if not tls.client_certificate:
            yield error(
                "invalid-field",
                rule.location(*path, "mode"),
                "client certificate required for mutual tls (clientCertificate)",
            )
        if not tls.private_key:
            yield error(
                "invalid-field",
                rule.location(*path, "mode"),
                "private key required for mutual tls (privateKey)",
            )


def _at_sidecars(
    rule: Resource[Any],
    tls: m.ClientTlsSettings,
    path: _Path,
    ports: _Ports,
    services: Sequence[Service],
    entries: list[Resource[Any]],
    sidecar_namespaces: list[str],
) -> Iterator[Diagnostic]:
    host = _fqdn(str(rule.spec.host).lower(), rule.namespace)
    seen_by = [n for n in sidecar_namespaces if rule.namespace == n or exported_to(rule, n)]
    if not seen_by:
        return
    targets: list[tuple[str, str, str]] = []  # (which port, its name, its protocol)
    for service in services:
        if _matches(host, service.hostname):
            targets.extend(
                (f"port {p.port} of Service {service.namespace}/{service.name}", p.name, p.protocol)
                for p in service.ports
                if ports.covers(p.port)
            )
    for entry in entries:
        spec: m.ServiceEntrySpec = entry.spec
        if not any(_matches(host, h.lower()) for h in spec.hosts):
            continue
        if not any(exported_to(entry, n) for n in seen_by):
            continue
        targets.extend(
            (f"port {p.number} of ServiceEntry {entry.namespace}/{entry.name}", p.name, p.protocol)
            for p in spec.ports
            if ports.covers(p.number)
        )
    location = rule.location(*path, "credentialName")
    for target, name, protocol in targets:
        what = (
            "sidecars do not apply credentialName (istiod reads it at a sidecar only for a"
            " DestinationRule with a workloadSelector, which trustmesh does not model, and"
            f" otherwise leaves the cluster in plaintext): {target}"
        )
        if _speaks_tls(name, protocol):
            yield warning(
                "destination-rule-tls-not-at-sidecar",
                location,
                f"{what} carries the application's own TLS unchanged",
            )
        else:
            yield error(
                "destination-rule-tls-not-at-sidecar",
                location,
                f"{what} would leave in plaintext: give caCertificates (and clientCertificate /"
                " privateKey for MUTUAL) files, or originate TLS at an egress gateway (the entry"
                " exported to its namespace only)",
            )


def _matches(pattern: str, host: str) -> bool:
    if pattern in ("*", host):
        return True
    return pattern.startswith("*.") and host.endswith(pattern[1:])


def _speaks_tls(name: str, protocol: str) -> bool:
    chosen = protocol if protocol not in _L4 else name
    return chosen.lower().split("-", 1)[0] in ("tls", "https")


def _fqdn(host: str, namespace: str) -> str:
    """A DestinationRule host as istiod resolves it: a short name in the rule's
    namespace, ``name.ns`` under ``svc.cluster.local``."""
    if host.startswith("*"):
        return host
    parts = host.split(".")
    if len(parts) == 1:
        return f"{host}.{namespace}.svc.cluster.local"
    if len(parts) == 2:
        return f"{host}.svc.cluster.local"
    return host
