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

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.dataplane import MeshMode
from trustmesh.api.diagnostics import Diagnostic, error, warning
from trustmesh.api.gateway import exported_to
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import ConfigSnapshot

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
                out.extend(_at_sidecars(rule, tls, path, ports, entries, sidecar_namespaces))
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
    entries: list[Resource[Any]],
    sidecar_namespaces: list[str],
) -> Iterator[Diagnostic]:
    host = str(rule.spec.host).lower()
    seen_by = [n for n in sidecar_namespaces if rule.namespace == n or exported_to(rule, n)]
    for entry in entries:
        spec: m.ServiceEntrySpec = entry.spec
        if not any(_matches(host, h.lower()) for h in spec.hosts):
            continue
        if not any(exported_to(entry, n) for n in seen_by):
            continue
        for port in spec.ports:
            if not ports.covers(port.number):
                continue
            what = (
                f"sidecars do not apply credentialName (istiod reads it at a sidecar only for"
                f" a DestinationRule with a workloadSelector, which trustmesh does not model,"
                f" and otherwise leaves the cluster in plaintext): port {port.number} of"
                f" ServiceEntry {entry.namespace}/{entry.name}"
            )
            location = rule.location(*path, "credentialName")
            if _speaks_tls(port):
                yield warning(
                    "destination-rule-tls-not-at-sidecar",
                    location,
                    f"{what} carries the application's own TLS unchanged",
                )
            else:
                yield error(
                    "destination-rule-tls-not-at-sidecar",
                    location,
                    f"{what} would leave in plaintext: give caCertificates (and"
                    " clientCertificate / privateKey for MUTUAL) files, or originate TLS at an"
                    " egress gateway (the entry exported to its namespace only)",
                )


def _matches(pattern: str, host: str) -> bool:
    if pattern in ("*", host):
        return True
    return pattern.startswith("*.") and host.endswith(pattern[1:])


def _speaks_tls(port: m.ServicePort) -> bool:
    protocol = port.protocol if port.protocol not in _L4 else port.name
    return protocol.lower().split("-", 1)[0] in ("tls", "https")
