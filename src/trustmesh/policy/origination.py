"""TLS origination towards ServiceEntry hosts, at a gateway or a sidecar: the
:class:`~trustmesh.policy.upstream_tls.UpstreamTls` of the proxy's cluster to the host,
whether a sidecar can originate it at all, and how it leaves the proxy, in words.
"""

from __future__ import annotations

from trustmesh.api import models as m
from trustmesh.envoy_json import mesh_sni
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.derived import Derived
from trustmesh.policy.destination_rules import (
    cluster_tls_setting,
    origination_rule,
    rule_subset,
)
from trustmesh.policy.upstream_tls import FieldRef, UpstreamMode, UpstreamTls, tls_credentials


def origination_tls(
    mesh: MeshPolicy,
    client_namespace: str,
    entry_namespace: str,
    host: str,
    port: int,
    subset: str = "",
) -> UpstreamTls:
    """The client TLS of a proxy's cluster to ServiceEntry ``host``:``port`` (its
    ``subset`` cluster, when named) — a gateway's (Istio's egress gateway with TLS
    origination) or a sidecar's (Istio's "egress TLS origination"): the rule
    :func:`origination_rule` picks for the proxy's namespace, its port-level ``tls``
    first, a subset's own setting over the rule's. ISTIO_MUTUAL: the proxy's mesh
    identity, SNI ``sni`` or the mesh SNI, the server's URI SAN checked against
    ``subjectAltNames`` only; SIMPLE / MUTUAL: SNI ``sni`` or the host, the certificate
    must name ``subjectAltNames`` or, without them and without ``sni``, the host (Istio's
    auto SAN validation with ``ENABLE_AUTO_SNI`` and ``VERIFY_CERTIFICATE_AT_CLIENT``, on by
    default; an explicit ``sni`` turns it off), checked against ``caCertificates`` or else
    the system CA bundle."""
    key = (client_namespace, entry_namespace, host, port, subset)
    return _ORIGINATION_TLS.get(mesh, key)


def _origination_tls(mesh: MeshPolicy, key: tuple[str, str, str, int, str]) -> UpstreamTls:
    client_namespace, entry_namespace, host, port, subset = key
    rule = origination_rule(mesh, client_namespace, entry_namespace, host)
    found = cluster_tls_setting(rule, port, subset) if rule is not None else None
    if rule is None or found is None:
        return UpstreamTls(UpstreamMode.PLAINTEXT)
    tls, path = found
    ref, location = f"{rule.namespace}/{rule.name}", FieldRef(rule, path)
    if tls.mode is m.TlsMode.DISABLE:
        return UpstreamTls(UpstreamMode.PLAINTEXT, rule=ref, setting=location)
    if tls.mode is m.TlsMode.ISTIO_MUTUAL:
        return UpstreamTls(
            UpstreamMode.ISTIO_MUTUAL,
            sni=tls.sni or mesh_sni(port, host, subset if rule_subset(rule, subset) else ""),
            subject_alt_names=tuple(tls.subject_alt_names),
            rule=ref,
            setting=location,
        )
    auto = not tls.sni and host.startswith("*")
    automatic = () if tls.sni or auto else (host,)
    return UpstreamTls(
        UpstreamMode.MUTUAL if tls.mode is m.TlsMode.MUTUAL else UpstreamMode.SIMPLE,
        sni="" if auto else tls.sni or host,
        # Istio's auto SAN validation (the SNI it derives) only when no `sni` is given
        subject_alt_names=tuple(tls.subject_alt_names or automatic),
        credentials=tls_credentials(tls, rule, path),
        rule=ref,
        setting=location,
        auto_sni=auto,
    )


# (proxy namespace, ServiceEntry namespace, host, port, subset) → the cluster's TLS.
_ORIGINATION_TLS: Derived[MeshPolicy, tuple[str, str, str, int, str], UpstreamTls] = Derived(
    "origination TLS", _origination_tls
)


def sidecar_origination_problem(upstream: UpstreamTls) -> str | None:
    """Why a sidecar cannot originate ``upstream`` (SIMPLE / MUTUAL), or None.

    ``credentialName``: istiod builds no TLS for it at a sidecar unless the
    DestinationRule has a ``workloadSelector`` (``buildUpstreamClusterTLSContext``: the
    cluster is left in plaintext), and trustmesh does not model selector-scoped rules, so
    the cluster is left out instead (503, never plaintext). MUTUAL without
    ``clientCertificate`` and ``privateKey`` has no key pair to present."""
    tls = upstream.credentials
    if upstream.mode not in (UpstreamMode.SIMPLE, UpstreamMode.MUTUAL) or tls is None:
        return None
    if tls.credential_name:
        return (
            f"tls.credentialName {tls.credential_name} is not applied at sidecars (istiod"
            " reads it there only for a DestinationRule with a workloadSelector, which"
            " trustmesh does not model, and would otherwise send plaintext): give"
            " caCertificates (and clientCertificate / privateKey for MUTUAL) files, or"
            " originate TLS at an egress gateway"
        )
    if upstream.mode is UpstreamMode.MUTUAL and not (tls.certificate_chain and tls.private_key):
        return "tls.mode MUTUAL needs clientCertificate and privateKey at a sidecar"
    return None


def describe_origination(upstream: UpstreamTls, host: str) -> str:
    """How a sidecar's request to ServiceEntry ``host`` leaves it, in words."""
    if upstream.mode is UpstreamMode.PLAINTEXT:
        if upstream.rule:
            return f"it leaves the sidecar in plaintext ({upstream.why})"
        return "it leaves the sidecar as the application sent it (no DestinationRule sets TLS)"
    if upstream.mode is UpstreamMode.ISTIO_MUTUAL:
        return f"the sidecar sends it over mesh mTLS, SNI {upstream.sni} ({upstream.why})"
    tls = upstream.credentials
    assert tls is not None
    problem = sidecar_origination_problem(upstream)
    if problem is not None:
        return f"the sidecar has no cluster for it (503): {problem} ({upstream.why})"
    if not tls.verify:
        check = "without checking its certificate (insecureSkipVerify)"
    else:
        ca = tls.ca_file or "the system CA bundle"
        if upstream.subject_alt_names:
            names = " for " + ", ".join(upstream.subject_alt_names)
        elif upstream.auto_sni:
            names = " for the request's Host"
        else:
            names = " (any name: an explicit sni turns the automatic name check off)"
        check = f"checking its certificate against {ca}{names}"
    sni = "the request's Host" if upstream.auto_sni else upstream.sni
    client = (
        f", presenting the client certificate {tls.certificate_chain}"
        if upstream.mode is UpstreamMode.MUTUAL
        else ""
    )
    return (
        f"the sidecar originates TLS ({upstream.why}): SNI {sni}, {check}{client};"
        f" {host} sees the sidecar's request"
    )
