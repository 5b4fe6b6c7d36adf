"""Deciding a connection to an ambient workload the way its node's ztunnel does.

ztunnel sees a TCP connection, never an HTTP request: the peer identity (HBONE always
carries mTLS between ambient pods), the source and destination address and port. What it
enforces is :mod:`trustmesh.policy.ztunnel`'s conversion of the workload's selector-,
namespace- and root-scoped policies. What trustmesh does not model exactly is answered
``unsupported`` with the reason: traffic through a waypoint (L7 policy attached with
``targetRefs``, and the waypoint's identity at the destination), and TLS choices of a
client sidecar that Istio makes from feature flags the input does not show.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.dataplane import MeshMode
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import Workload
from trustmesh.policy.client_tls import ClientTls
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.decision import RequestError, Verdict
from trustmesh.policy.derived import Derived
from trustmesh.policy.destination_rules import destination_rule_tls
from trustmesh.policy.endpoints import service_for
from trustmesh.policy.request import Attributes, IpAddress, Request, SourceKind
from trustmesh.policy.trace import AllowPhase, PolicySkipped
from trustmesh.policy.ztunnel import (
    ZtunnelPolicy,
    compile_ztunnel,
    plaintext_refused,
    sent_to_ztunnel,
    sidecars_speak_hbone,
    waypoint_for,
)

Note = Callable[..., None]
Answer = tuple[Verdict, int | None, str | None, str, str | None]  # + the peer principal
CLOSED = "ztunnel closes the connection (no HTTP response; curl exits 56)"


def evaluate_ztunnel(
    mesh: MeshPolicy,
    request: Request,
    source: Workload | None,
    target: WorkloadPolicy,
    port: int,
    note: Note,
    *,
    tracing: bool = True,
) -> Answer:
    """ztunnel's decision for ``request`` to the ambient workload ``target``; ``note``
    records trace steps (explanations are only worked out when ``tracing``)."""
    workload = target.workload
    waypoint = waypoint_for(mesh, target)
    if waypoint is not None:
        reason = (
            f"unsupported: ambient: traffic to {workload.ref} goes through waypoint {waypoint};"
            " trustmesh does not model a waypoint's enforcement (policies attached with"
            " targetRefs, HTTP rules) nor the waypoint identity ztunnel then sees"
        )
        note(reason)
        return Verdict.UNSUPPORTED, None, None, reason, None
    principal, how, unsupported = _peer(mesh, request, source, target, port)
    if unsupported is not None:
        note(unsupported)
        return Verdict.UNSUPPORTED, None, None, unsupported, None
    note("destination {} is ambient (no waypoint): ztunnel enforces L4 policy", workload.ref)
    note(how)
    if request.http is not None:
        note("ztunnel sees a TCP connection: method, path, host and headers are not visible")
    refused, via = _PLAINTEXT_REFUSED.get(mesh, (workload.ref, port))
    note("port {}: plaintext {} ({})", port, "refused" if refused else "accepted", via)
    if principal is None and refused:
        reason = f"plaintext to a STRICT port ({via}): {CLOSED}"
        return Verdict.RESET, None, None, reason, None
    attrs = Attributes(
        principal=principal,
        source_ip=_ip(request.source.ip or (source.ip if source else None)),
        destination_ip=_ip(workload.ip),
        destination_port=port,
    )
    attrs.remote_ip = attrs.source_ip
    if tracing:
        _not_enforced(target, note)
    deny, allow = _policies(mesh, target, note if tracing else None)
    if tracing:
        for policy in deny:
            _explain(policy, attrs, note)
    denied = sorted(r.name for p in deny if (r := p.first_match(attrs)) is not None)
    if denied:
        return Verdict.DENY, None, denied[0], f"denied by ztunnel: {CLOSED}", principal
    if not allow:
        note(AllowPhase("none-apply", "TCP", "ztunnel"))
        return Verdict.ALLOW, _ok(request), None, "no ALLOW policy applies", principal
    if tracing:
        for policy in allow:
            _explain(policy, attrs, note)
    allowed = sorted(r.name for p in allow if (r := p.first_match(attrs)) is not None)
    if allowed:
        return Verdict.ALLOW, _ok(request), allowed[0], "allowed by ALLOW rule", principal
    note(AllowPhase("no-match", "TCP", "ztunnel"))
    return Verdict.DENY, None, None, f"no ALLOW rule matched: {CLOSED}", principal


def ambient_source_tls(
    mesh: MeshPolicy, source: Workload, target: WorkloadPolicy, port: int, mode: m.MtlsMode
) -> tuple[ClientTls | None, str | None]:
    """How an ambient client's ztunnel reaches a sidecar: HBONE, or unsupported."""
    principal = source.principal(mesh.snapshot.mesh.trust_domain)
    destination = target.workload
    if not sidecars_speak_hbone(mesh.snapshot, destination):
        return None, (
            f"unsupported: ambient: {source.ref} is ambient and {destination.ref} has a sidecar;"
            " ztunnel tunnels to a sidecar over HBONE only when the pod is labelled"
            " networking.istio.io/tunnel=http (proxy metadata ISTIO_META_ENABLE_HBONE=true,"
            " Istio's ambient profile), and the input shows neither"
        )
    if mode is m.MtlsMode.DISABLE:
        return None, (
            f"unsupported: ambient: {source.ref} is ambient and port {port} of"
            f" {destination.ref} is DISABLE; how a sidecar treats an HBONE tunnel there is not"
            " modelled"
        )
    explanation = f"ambient source {source.ref}: ztunnel tunnels over HBONE, mTLS as {principal}"
    return ClientTls(True, principal, None, False, explanation), None


def _peer(
    mesh: MeshPolicy,
    request: Request,
    source: Workload | None,
    target: WorkloadPolicy,
    port: int,
) -> tuple[str | None, str, str | None]:
    """(peer principal, explanation, unsupported reason) as the destination ztunnel sees it."""
    kind = request.source.kind
    if kind is SourceKind.PLAINTEXT:
        return None, "plaintext client: no peer identity", None
    if kind is SourceKind.PRINCIPAL:
        value = request.source.value
        return value, f"mTLS peer presenting {value}", None
    assert source is not None
    principal = source.principal(mesh.snapshot.mesh.trust_domain)
    mode = source.dataplane.mode
    if mode is MeshMode.AMBIENT:
        return principal, f"ambient source {source.ref}: HBONE, mTLS as {principal}", None
    if mode in (MeshMode.SIDECAR, MeshMode.GATEWAY):
        service, service_port = service_for(target, port)
        setting = None
        if service is not None:
            setting = destination_rule_tls(mesh, source.namespace, service, service_port)
        if setting is not None:
            rule, tls = setting
            return (
                None,
                "",
                f"unsupported: ambient: the client proxy of {source.ref} follows DestinationRule"
                f" {rule.namespace}/{rule.name} (tls {tls.mode.value}) towards an ambient pod;"
                " how Istio combines it with HBONE is not modelled",
            )
        if not mesh.snapshot.mesh.enable_auto_mtls:
            return (
                None,
                "",
                f"unsupported: ambient: auto mTLS is off and {source.ref} has a proxy; whether it"
                " still sends HBONE to an ambient pod is not modelled",
            )
        return principal, f"{mode.value} {source.ref} sends HBONE: mTLS as {principal}", None
    return None, f"source {source.ref} is not in the mesh: plaintext, no peer identity", None


def _not_enforced(target: WorkloadPolicy, note: Note) -> None:
    a = target.authz
    for policy in (
        *a.custom.policies,
        *a.audit.policies,
        *a.dry_run_deny.policies,
        *a.dry_run_allow.policies,
    ):
        note(PolicySkipped(f"{policy.namespace}/{policy.name}", str(sent_to_ztunnel(policy))))
    if target.jwt_providers:
        note("RequestAuthentication is not enforced by ztunnel (it needs a waypoint)")


def _policies(
    mesh: MeshPolicy, target: WorkloadPolicy, note: Note | None
) -> tuple[list[ZtunnelPolicy], list[ZtunnelPolicy]]:
    compiled_policies = _ZTUNNEL_POLICIES.table(mesh)

    def compiled(policy: Resource[Any]) -> ZtunnelPolicy:
        # The mesh holds every policy for its lifetime, so id() is a stable key here.
        found = compiled_policies.get(id(policy))
        if found is None:
            found = compiled_policies[id(policy)] = compile_ztunnel(policy)
        return found

    deny = [compiled(p) for p in target.authz.deny.policies]
    allow = [compiled(p) for p in target.authz.allow.policies]
    if note is not None:
        for policy in (*deny, *allow):
            weakened = policy.weakening()
            if weakened:
                note("{} {}: {}", policy.action.value, policy.key, weakened)
    return deny, allow


def _explain(policy: ZtunnelPolicy, attrs: Attributes, note: Note) -> None:
    if not policy.rules:
        note("{} {}: no rule ztunnel can match", policy.action.value, policy.key)
    for rule in policy.rules:
        _, why = rule.explain(attrs)
        note("{} {}: {}", policy.action.value, rule.name, why)


def _ok(request: Request) -> int | None:
    return 200 if request.http is not None else None


def _ip(value: str | None) -> IpAddress | None:
    if not value:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise RequestError(f"{value!r} is not an IP address") from None


_PLAINTEXT_REFUSED: Derived[MeshPolicy, tuple[str, int], tuple[bool, str]] = Derived(
    "ztunnel plaintext",
    lambda mesh, key: plaintext_refused(mesh.snapshot, mesh.workloads[key[0]].workload, key[1]),
)
# id(policy) → the policy as ztunnel enforces it.
_ZTUNNEL_POLICIES: Derived[MeshPolicy, int, ZtunnelPolicy] = Derived("ztunnel policies")
