"""A gateway's clusters to ServiceEntry hosts, with DestinationRule TLS origination (pure).

What Istio's "egress gateways" and "egress gateway with TLS origination" tasks need at the
gateway (``pilot/pkg/networking/core/cluster_builder.go``, ``cluster_tls.go``):

* a cluster ``outbound|<port>||<host>`` per host and port of every ServiceEntry exported
  to the gateway's namespace (``exportTo``: ``.``, ``*`` or namespace names; none: all);
* endpoints as the entry's ``resolution`` says: STATIC → its ``endpoints`` (addresses,
  the port named like the entry's port in ``endpoints[].ports``, else ``targetPort``,
  else the port number); DNS → STRICT_DNS over the endpoints' addresses, or over the host
  itself when there are none; DNS_ROUND_ROBIN → LOGICAL_DNS (one name); NONE →
  ORIGINAL_DST, as Istio builds it;
* the upstream TLS of the DestinationRule for the host (the gateway's namespace first,
  then the entry's, then the root namespace; a rule naming the host exactly before a
  wildcard one, then the oldest; ``exportTo`` honoured), port-level ``tls`` first:

  - DISABLE (or no rule): plaintext;
  - ISTIO_MUTUAL: mesh mTLS with the gateway's own SPIFFE certificate;
  - SIMPLE: TLS origination, the server's certificate checked against the CA of
    ``credentialName`` (Secret ``NAME-cacert``, else ``NAME``'s ``ca.crt``, served over
    ADS from the gateway's namespace as ``kubernetes://NAME-cacert``), or
    ``caCertificates``, or the system bundle; SNI ``sni`` or the host; the certificate
    must name ``subjectAltNames`` or, without them and without ``sni``, the host — Istio's
    ``VERIFY_CERTIFICATE_AT_CLIENT`` auto SAN validation against the SNI, which at a
    gateway routing to the entry is the host; ``insecureSkipVerify: true`` checks nothing;
  - MUTUAL: SIMPLE plus the client certificate of ``credentialName`` (``tls.crt`` /
    ``tls.key``, as ``kubernetes://NAME``) or ``clientCertificate`` / ``privateKey``.

A credential that is missing or unreadable is reported on the DestinationRule's field
(the gateway keeps its last configuration) instead of a cluster that never warms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.diagnostics import Diagnostic, error
from trustmesh.api.gateway import (
    CA_SUFFIX,
    SECRET_PREFIX,
    ca_certificate,
    tls_credential,
)
from trustmesh.api.resources import Resource
from trustmesh.envoy_json import (
    CERTIFICATE_SECRET,
    UPSTREAM_TLS_TYPE,
    mesh_validation,
    sds_secret,
)
from trustmesh.identity.pki import key_pair_problem, load_certs
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.origination import origination_tls
from trustmesh.policy.traffic_policy import origination_traffic_policy
from trustmesh.policy.upstream_tls import UpstreamMode, UpstreamTls
from trustmesh.xds.cache import TYPE_SECRET
from trustmesh.xds.outbound import MESH_CLIENT_ALPN, SYSTEM_CA_BUNDLE
from trustmesh.xds.service_entries import entry_cluster, visible_entries
from trustmesh.xds.traffic_policy import apply_traffic_policy

__all__ = ["EgressClusters", "service_entry_clusters"]

_ADS = {"ads": {}, "resource_api_version": "V3"}
_TLS_SOCKET = "envoy.transport_sockets.tls"


@dataclass(frozen=True)
class EgressClusters:
    """The ServiceEntry clusters of one gateway, the SDS secrets their TLS names, and the
    clusters that could not be built, with why (they are left out: a gateway whose routes
    name one reports it; one nothing routes to does not break the gateway's other
    traffic, as in Istio, where only that cluster would never warm)."""

    clusters: tuple[dict[str, Any], ...]
    secrets: tuple[dict[str, Any], ...]
    broken: Mapping[str, tuple[Diagnostic, ...]]


def service_entry_clusters(
    mesh: MeshPolicy, gateway_namespace: str, sds_cluster: str
) -> EgressClusters:
    clusters: dict[str, dict[str, Any]] = {}
    secrets: dict[str, dict[str, Any]] = {}
    broken: dict[str, tuple[Diagnostic, ...]] = {}
    for entry in visible_entries(mesh, gateway_namespace):
        spec: m.ServiceEntrySpec = entry.spec
        for host in dict.fromkeys(h.lower() for h in spec.hosts):
            for index, port in enumerate(spec.ports):
                name = f"outbound|{port.number}||{host}"
                if name in clusters or name in broken:
                    continue  # the oldest entry declaring a host and port wins
                cluster = entry_cluster(entry, host, index)
                own_secrets: dict[str, dict[str, Any]] = {}
                problems: list[Diagnostic] = []
                _apply_destination_rule(
                    cluster, mesh, gateway_namespace, entry, host, port.number, sds_cluster,
                    own_secrets, problems,
                )  # fmt: skip
                if problems:
                    broken[name] = tuple(problems)
                    continue
                clusters[name] = cluster
                secrets.update(own_secrets)
    return EgressClusters(
        clusters=tuple(clusters[n] for n in sorted(clusters)),
        secrets=tuple(secrets[n] for n in sorted(secrets)),
        broken=broken,
    )


# ------------------------------------------------------------------------------ TLS


def _apply_destination_rule(
    cluster: dict[str, Any],
    mesh: MeshPolicy,
    gateway_namespace: str,
    entry: Resource[Any],
    host: str,
    port: int,
    sds_cluster: str,
    secrets: dict[str, dict[str, Any]],
    problems: list[Diagnostic],
) -> None:
    policy = origination_traffic_policy(mesh, gateway_namespace, entry.namespace, host, port)
    if policy is None:
        return  # no DestinationRule names the host
    apply_traffic_policy(cluster, policy)
    upstream = origination_tls(mesh, gateway_namespace, entry.namespace, host, port)
    socket = _socket(upstream, gateway_namespace, mesh, sds_cluster, secrets, problems)
    if socket is not None:
        cluster["transport_socket"] = socket


def _socket(
    upstream: UpstreamTls,
    namespace: str,
    mesh: MeshPolicy,
    sds_cluster: str,
    secrets: dict[str, dict[str, Any]],
    problems: list[Diagnostic],
) -> dict[str, Any] | None:
    """The ``transport_socket`` of a decided origination TLS, with the SDS secrets its
    ``credentialName`` needs (read from the gateway's namespace; a missing or unreadable
    one is reported on the rule's field and the cluster left out)."""
    if upstream.mode is UpstreamMode.PLAINTEXT:
        return None
    common: dict[str, Any] = {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_2",
            "tls_maximum_protocol_version": "TLSv1_3",
        }
    }
    if upstream.mode is UpstreamMode.ISTIO_MUTUAL:
        common["alpn_protocols"] = list(MESH_CLIENT_ALPN)
        common["tls_certificate_sds_secret_configs"] = [sds_secret(CERTIFICATE_SECRET, sds_cluster)]
        validation = mesh_validation(sds_cluster)
        if upstream.subject_alt_names:
            validation["default_validation_context"]["match_typed_subject_alt_names"] = [
                {"san_type": "URI", "matcher": {"exact": s}} for s in upstream.subject_alt_names
            ]
        common["combined_validation_context"] = validation
        return _upstream(common, upstream.sni)
    tls = upstream.credentials
    assert tls is not None, upstream
    mutual = upstream.mode is UpstreamMode.MUTUAL
    sans = [
        {"san_type": kind, "matcher": {"exact": san}}
        for san in upstream.subject_alt_names
        for kind in ("DNS", "URI")
    ]
    if tls.credential_name:
        name = tls.credential_name
        assert tls.credential_location is not None
        if mutual:
            credential = tls_credential(mesh.snapshot, namespace, name)
            if isinstance(credential, str):
                problems.append(
                    error(
                        "gateway-credential",
                        tls.credential_location,
                        f"{credential} (a gateway reads credentialName from its own namespace)",
                    )
                )
                return None
            chain = _certificates(credential.certificate_chain)
            if not chain:
                problems.append(
                    error(
                        "gateway-credential",
                        credential.certificate_location,
                        "is not a PEM certificate chain",
                    )
                )
                return None
            problem = key_pair_problem(credential.private_key.encode(), chain[0])
            if problem is not None:
                problems.append(error("gateway-credential", credential.key_location, problem))
                return None
            secrets[SECRET_PREFIX + name] = {
                "@type": TYPE_SECRET,
                "name": SECRET_PREFIX + name,
                "tls_certificate": {
                    "certificate_chain": {"inline_string": credential.certificate_chain},
                    "private_key": {"inline_string": credential.private_key},
                },
            }
            common["tls_certificate_sds_secret_configs"] = [
                {"name": SECRET_PREFIX + name, "sds_config": _ADS}
            ]
        if tls.verify:
            ca = ca_certificate(mesh.snapshot, namespace, name)
            if ca is None:
                problems.append(
                    error(
                        "gateway-credential",
                        tls.credential_location,
                        f"tls.mode {upstream.mode.value} checks the server's certificate: Secret "
                        f"{namespace}/{name}{CA_SUFFIX} does not exist and {namespace}/{name} "
                        "has no ca.crt (or set insecureSkipVerify: true)",
                    )
                )
                return None
            if not _certificates(ca.pem):
                problems.append(
                    error("gateway-credential", ca.location, "is not a PEM CA certificate")
                )
                return None
            secrets[SECRET_PREFIX + name + CA_SUFFIX] = {
                "@type": TYPE_SECRET,
                "name": SECRET_PREFIX + name + CA_SUFFIX,
                "validation_context": {"trusted_ca": {"inline_string": ca.pem}},
            }
            common["combined_validation_context"] = {
                "default_validation_context": {"match_typed_subject_alt_names": sans},
                "validation_context_sds_secret_config": {
                    "name": SECRET_PREFIX + name + CA_SUFFIX,
                    "sds_config": _ADS,
                },
            }
    else:
        if mutual:
            if not (tls.certificate_chain and tls.private_key):
                assert tls.mode_location is not None
                problems.append(
                    error(
                        "invalid-field",
                        tls.mode_location,
                        "tls.mode MUTUAL needs credentialName, or clientCertificate and privateKey",
                    )
                )
                return None
            common["tls_certificates"] = [
                {
                    "certificate_chain": {"filename": tls.certificate_chain},
                    "private_key": {"filename": tls.private_key},
                }
            ]
        if tls.verify:
            common["validation_context"] = {
                "trusted_ca": {"filename": tls.ca_file or SYSTEM_CA_BUNDLE},
                "match_typed_subject_alt_names": sans,
            }
    return _upstream(common, upstream.sni)


def _upstream(common: dict[str, Any], sni: str) -> dict[str, Any]:
    return {
        "name": _TLS_SOCKET,
        "typed_config": {"@type": UPSTREAM_TLS_TYPE, "sni": sni, "common_tls_context": common},
    }


def _certificates(pem: str) -> list[Any]:
    try:
        return list(load_certs(pem.encode()))
    except ValueError:
        return []
