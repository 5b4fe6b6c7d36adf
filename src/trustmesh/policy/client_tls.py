"""What a client sends to a destination port for one request (the evaluator's view):
mesh mTLS and as whom, plaintext, or TLS the server side can never accept — read from the
cluster's :func:`~trustmesh.policy.upstream_tls.upstream_tls`, or from the question's
source (a plaintext client, a bare principal).
"""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh.api import models as m
from trustmesh.api.dataplane import MeshMode
from trustmesh.api.snapshot import Workload
from trustmesh.envoy_json import mesh_sni
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.endpoints import service_for
from trustmesh.policy.request import Source, SourceKind
from trustmesh.policy.upstream_tls import UpstreamMode, upstream_tls


@dataclass(frozen=True, slots=True)
class ClientTls:
    mtls: bool
    principal: str | None
    sni: str | None
    client_has_sidecar: bool
    explanation: str
    conflict: str | None = None  # a TLS the server side can never accept


def client_tls(
    mesh: MeshPolicy,
    source: Source,
    source_workload: Workload | None,
    target: WorkloadPolicy,
    port: int,
    server_mode: m.MtlsMode,
    subset: str = "",
) -> ClientTls:
    """What the client sends to ``port`` of ``target`` (through its Service's cluster, or
    the ``subset`` cluster a route names): read from :func:`upstream_tls`."""
    service, service_port = service_for(target, port)
    if source.kind is SourceKind.PLAINTEXT:
        return ClientTls(False, None, None, False, "plaintext client: no certificate")
    if source.kind is SourceKind.PRINCIPAL:
        sni = (
            mesh_sni(service_port, service.hostname)
            if service is not None and service_port is not None
            else None
        )
        return ClientTls(True, source.value, sni, True, f"mTLS peer presenting {source.value}")
    assert source_workload is not None
    if source_workload.dataplane.mode not in (MeshMode.SIDECAR, MeshMode.GATEWAY):
        return ClientTls(
            False, None, None, False, f"source {source_workload.ref} has no sidecar: plaintext"
        )
    upstream = None
    if service is not None:
        upstream = upstream_tls(mesh, source_workload.namespace, service, service_port, subset)
    sni = (upstream.sni or None) if upstream is not None else None
    principal = source_workload.principal(mesh.snapshot.mesh.trust_domain)
    if upstream is not None and upstream.rule:
        where = f"DestinationRule {upstream.rule} tls {upstream.setting_mode}"
        if upstream.mode is UpstreamMode.ISTIO_MUTUAL:
            return ClientTls(True, principal, sni, True, f"{where}: mesh mTLS as {principal}")
        if upstream.mode is UpstreamMode.PLAINTEXT:
            return ClientTls(False, None, None, True, f"{where}: plaintext")
        return ClientTls(
            False,
            None,
            None,
            True,
            f"{where}: TLS with user certificates",
            conflict=f"{where} originates TLS a sidecar does not terminate: connection reset",
        )
    if not mesh.snapshot.mesh.enable_auto_mtls:
        return ClientTls(
            False, None, None, True, "auto mTLS is off and no DestinationRule sets TLS: plaintext"
        )
    if server_mode is m.MtlsMode.DISABLE:
        return ClientTls(
            False, None, None, True, "auto mTLS: destination port is DISABLE, plaintext"
        )
    return ClientTls(
        True, principal, sni, True, f"auto mTLS: destination has a sidecar, mTLS as {principal}"
    )
