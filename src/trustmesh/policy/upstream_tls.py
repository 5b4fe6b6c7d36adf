"""The client TLS of a proxy's outbound cluster to a mesh Service, decided once as a value.

Client TLS follows Istio: an explicit DestinationRule ``tls`` setting always wins (found
by :mod:`trustmesh.policy.destination_rules`); otherwise auto mTLS uses ISTIO_MUTUAL
towards endpoints with a sidecar whose port is not DISABLE, and plaintext elsewhere.

:func:`upstream_tls` gives the :class:`UpstreamTls` of one outbound cluster (client
namespace, service, port, subset) — its mode, SNI, the identities it pins, where its keys
come from and which DestinationRule says so. The evaluator
(:func:`trustmesh.policy.client_tls.client_tls`) reads it for one request;
``trustmesh.xds.outbound`` maps it to an Envoy ``transport_socket`` and decides nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.diagnostics import Location
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import Service, Workload
from trustmesh.envoy_json import mesh_sni
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.derived import Derived
from trustmesh.policy.destination_rules import (
    FieldPath,
    cluster_tls_setting,
    destination_rule_for,
    rule_subset,
)
from trustmesh.policy.endpoints import service_workloads


class UpstreamMode(enum.Enum):
    """How a client proxy's cluster for a service port talks to its endpoints."""

    PLAINTEXT = "plaintext"  # DestinationRule DISABLE, or auto mTLS off and no rule
    ISTIO_MUTUAL = "ISTIO_MUTUAL"  # DestinationRule ISTIO_MUTUAL: mesh mTLS to every endpoint
    SIMPLE = "SIMPLE"  # DestinationRule SIMPLE: TLS with the rule's CA
    MUTUAL = "MUTUAL"  # DestinationRule MUTUAL: TLS with the rule's key pair and CA
    AUTO = "auto"  # auto mTLS: mesh mTLS to endpoints that speak it, plaintext to the rest


@dataclass(frozen=True, slots=True)
class FieldRef:
    """A field of a resource, its :class:`Location` looked up only when asked: finding a
    line composes the YAML document (about 0.5 ms), and most decisions are never shown."""

    resource: Resource[Any]
    path: tuple[str | int, ...]

    @property
    def location(self) -> Location:
        return self.resource.location(*self.path)


@dataclass(frozen=True, slots=True)
class TlsCredentials:
    """Where SIMPLE / MUTUAL TLS takes its keys from: an SDS secret named by
    ``credentialName`` (key pair ``name``, CA ``name-cacert``), else files."""

    credential_name: str = ""
    certificate_chain: str = ""  # file (MUTUAL without credentialName)
    private_key: str = ""  # file
    ca_file: str = ""  # "" with ``verify``: the system CA bundle
    verify: bool = True  # False: insecureSkipVerify
    credential_field: FieldRef | None = field(default=None, compare=False)  # credentialName
    mode_field: FieldRef | None = field(default=None, compare=False)  # the rule's ``tls.mode``

    @property
    def credential_location(self) -> Location | None:
        return self.credential_field.location if self.credential_field is not None else None

    @property
    def mode_location(self) -> Location | None:
        return self.mode_field.location if self.mode_field is not None else None


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """The client TLS of one outbound cluster ``outbound|port|subset|fqdn``.

    ``sni``: what the client sends (mesh modes: ``outbound_.port_.subset_.fqdn`` unless the
    rule names one; SIMPLE / MUTUAL: the rule's, else the host). ``peer_ids``: the SPIFFE
    IDs (with ``spiffe://``) a mesh-mTLS server certificate must carry — the service's
    sidecar workloads in every trust domain of the bundle; ``subject_alt_names``: what
    the rule asks of the server certificate. ``rule`` / ``location``: the DestinationRule
    (``ns/name``) and the ``tls`` field that decided; empty when auto mTLS (or its absence)
    did."""

    mode: UpstreamMode
    sni: str = ""
    peer_ids: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    credentials: TlsCredentials | None = None
    rule: str = ""
    setting: FieldRef | None = field(default=None, compare=False)  # the deciding ``tls``
    # SIMPLE / MUTUAL to a wildcard host without `sni`: the SNI (and, checking the server,
    # the name its certificate must carry) is each request's Host, Envoy's `auto_sni` /
    # `auto_san_validation` (Istio's ENABLE_AUTO_SNI)
    auto_sni: bool = False

    @property
    def location(self) -> Location | None:
        """Where the deciding ``tls`` is written (looked up when asked)."""
        return self.setting.location if self.setting is not None else None

    @property
    def why(self) -> str:
        if self.rule:
            where = f" ({self.location})" if self.location is not None else ""
            return f"DestinationRule {self.rule} tls {self.setting_mode}{where}"
        if self.mode is UpstreamMode.AUTO:
            return "auto mTLS"
        return "auto mTLS is off and no DestinationRule sets TLS"

    @property
    def setting_mode(self) -> str:
        """The DestinationRule's ``tls.mode`` as written (DISABLE for plaintext)."""
        return "DISABLE" if self.mode is UpstreamMode.PLAINTEXT else self.mode.value


def upstream_tls(
    mesh: MeshPolicy,
    client_namespace: str,
    service: Service,
    port: int | None,
    subset: str = "",
) -> UpstreamTls:
    """The client TLS of a proxy in ``client_namespace`` towards ``service``'s ``port``
    (its ``subset`` cluster, when named): decided once per compiled mesh."""
    decided = _UPSTREAM_TLS.table(mesh)
    key = (client_namespace, service.namespace, service.name, port, subset)
    found = decided.get(key)
    if found is None:
        found = decided[key] = _upstream_tls(mesh, client_namespace, service, port, subset)
    return found


def _upstream_tls(
    mesh: MeshPolicy, client_namespace: str, service: Service, port: int | None, subset_name: str
) -> UpstreamTls:
    rule = destination_rule_for(mesh, client_namespace, service)
    found = cluster_tls_setting(rule, port, subset_name)
    sni_subset = subset_name if rule_subset(rule, subset_name) is not None else ""
    if found is None:
        if not mesh.snapshot.mesh.enable_auto_mtls:
            return UpstreamTls(UpstreamMode.PLAINTEXT)
        return UpstreamTls(
            UpstreamMode.AUTO,
            sni=mesh_sni(port, service.hostname, sni_subset) if port is not None else "",
            peer_ids=_peer_ids(mesh, service),
        )
    assert rule is not None
    tls, path = found
    ref, location = f"{rule.namespace}/{rule.name}", FieldRef(rule, path)
    if tls.mode is m.TlsMode.DISABLE:
        return UpstreamTls(UpstreamMode.PLAINTEXT, rule=ref, setting=location)
    if tls.mode is m.TlsMode.ISTIO_MUTUAL:
        # `sni` overrides the mesh SNI (Istio's egress gateway task names the external host)
        sni = tls.sni or (mesh_sni(port, service.hostname, sni_subset) if port is not None else "")
        return UpstreamTls(
            UpstreamMode.ISTIO_MUTUAL,
            sni=sni,
            peer_ids=_peer_ids(mesh, service),
            rule=ref,
            setting=location,
        )
    return UpstreamTls(
        UpstreamMode.MUTUAL if tls.mode is m.TlsMode.MUTUAL else UpstreamMode.SIMPLE,
        sni=tls.sni or service.hostname,
        subject_alt_names=tuple(tls.subject_alt_names),
        credentials=tls_credentials(tls, rule, path),
        rule=ref,
        setting=location,
    )


def tls_credentials(
    tls: m.ClientTlsSettings, rule: Resource[Any], path: FieldPath
) -> TlsCredentials:
    return TlsCredentials(
        credential_name=tls.credential_name,
        certificate_chain=tls.client_certificate,
        private_key=tls.private_key,
        ca_file=tls.ca_certificates,
        verify=tls.insecure_skip_verify is not True,
        credential_field=FieldRef(rule, (*path, "credentialName")),
        mode_field=FieldRef(rule, (*path, "mode")),
    )


# (client namespace, service namespace, service name, port, subset) → its client TLS.
_UPSTREAM_TLS: Derived[MeshPolicy, tuple[str, str, str, int | None, str], UpstreamTls] = Derived(
    "upstream TLS"
)


def _peer_ids(mesh: MeshPolicy, service: Service) -> tuple[str, ...]:
    """The SPIFFE IDs a mesh client pins for ``service``: its sidecar workloads', in every
    trust domain of the bundle (none known: nothing pinned, as Istio)."""
    return tuple(
        sorted(
            {
                f"spiffe://{w.principal(domain)}"
                for w in service_workloads(mesh, service)
                if w.has_sidecar
                for domain in mesh.bundle.domains
            }
        )
    )


def speaks_mesh_mtls(mesh: MeshPolicy, workload: Workload, port: int) -> bool:
    """Auto mTLS towards one endpoint (Istio's ``tlsMode: istio`` label): it has a sidecar
    and its PeerAuthentication does not DISABLE the port."""
    if not workload.has_sidecar:
        return False
    policy = mesh.for_workload(workload.ref)
    return policy is None or policy.mtls.for_port(port).mode is not m.MtlsMode.DISABLE
