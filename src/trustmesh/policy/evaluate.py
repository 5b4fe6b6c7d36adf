"""The evaluator: would Istio + Envoy let this request through, and which rule decided?

Order is the inbound filter chain's: TLS (PeerAuthentication vs. the client's TLS
choice), the HTTP codec (methods, Host, header lines: :mod:`trustmesh.policy.headers`) and
path normalization, trustmesh's request guards (an ambiguous Host, a repeated header a
policy reads), CUSTOM (ext_authz), JWT authentication, dry-run shadow rules, DENY, AUDIT,
ALLOW. The trace records the same steps the verdict
comes from; with ``trace=False`` nothing is formatted.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from trustmesh.api import models as m
from trustmesh.api.dataplane import MeshMode
from trustmesh.api.gateway import gateway_servers, num_trusted_proxies
from trustmesh.api.gateway_models import ServerTlsMode
from trustmesh.api.snapshot import Workload
from trustmesh.policy.authz import CompiledRule
from trustmesh.policy.client_routes import RouteKind, sidecar_client_route
from trustmesh.policy.client_tls import ClientTls, client_tls
from trustmesh.policy.compose import ActionRules, MeshPolicy, WorkloadPolicy
from trustmesh.policy.custom import custom_providers
from trustmesh.policy.decision import Decision, RequestError, ShadowResult, Verdict
from trustmesh.policy.derived import Derived
from trustmesh.policy.egress import egress_decision
from trustmesh.policy.endpoints import service_for
from trustmesh.policy.forwarded import trusted_client_address
from trustmesh.policy.headers import (
    HOST_GUARD_POLICY,
    authority_problem,
    authority_rejected,
    repeated,
    sent_authority,
    split_absolute_form,
    strip_trailing_host_dot,
)
from trustmesh.policy.jwt import JwtStatus
from trustmesh.policy.jwt_filter import run_jwt_filter
from trustmesh.policy.pathnorm import PathRejected, normalize_path
from trustmesh.policy.request import Attributes, IpAddress, Request, SourceKind
from trustmesh.policy.request_headers import (
    ISTIO_GATEWAY,
    TRUSTMESH_SIDECAR,
    UNKNOWN_CERT_HASH,
    XFCC,
    ClientProxy,
    ClientProxyKind,
    filter_headers,
    wire_lines,
    xfcc_depends_on_hash,
    xfcc_parts,
)
from trustmesh.policy.trace import (
    AllowPhase,
    DataplaneSeen,
    ExtAuthzAnswer,
    JwtOutcome,
    JwtStep,
    NoRuleForProtocol,
    PeerAuthentication,
    PeerPrincipal,
    RuleEvaluated,
    ShadowEvaluated,
    Step,
    TlsChoice,
    TlsReset,
    TraceEvent,
)
from trustmesh.policy.ztunnel_eval import ambient_source_tls, evaluate_ztunnel

# Methods Envoy's HTTP/1 codec accepts; anything else (or lower-case) is a 400.
HTTP1_METHODS = frozenset(
    [
        "ACL",
        "BIND",
        "CHECKOUT",
        "CONNECT",
        "COPY",
        "DELETE",
        "GET",
        "HEAD",
        "LINK",
        "LOCK",
        "M-SEARCH",
        "MERGE",
        "MKACTIVITY",
        "MKCALENDAR",
        "MKCOL",
        "MOVE",
        "NOTIFY",
        "OPTIONS",
        "PATCH",
        "POST",
        "PROPFIND",
        "PROPPATCH",
        "PURGE",
        "PUT",
        "QUERY",
        "REBIND",
        "REPORT",
        "SEARCH",
        "SOURCE",
        "SUBSCRIBE",
        "TRACE",
        "UNBIND",
        "UNLINK",
        "UNLOCK",
        "UNSUBSCRIBE",
    ]
)
ACCESS_DENIED = "RBAC: access denied"


@dataclass(slots=True)
class _Run:
    """Per-decision scratch: the trace (None when off) and shadow results."""

    trace: list[TraceEvent] | None
    shadow: list[ShadowResult] = field(default_factory=list)
    assumptions: tuple[str, ...] = ()  # rarely set: no list built per decision

    def note(self, template: str | TraceEvent, *args: object) -> None:
        """Record an event, or a step told in words (a :class:`Step`, formatted only
        when tracing is on)."""
        if self.trace is not None:
            if isinstance(template, str):
                template = Step(template.format(*args) if args else template)
            self.trace.append(template)


def evaluate(
    mesh: MeshPolicy,
    request: Request,
    *,
    now: float,
    trace: bool = False,
    ext_authz: Mapping[str, bool | None] | None = None,
) -> Decision:
    """Decide ``request`` against the compiled mesh. ``now`` is seconds since the epoch.

    ``ext_authz`` answers CUSTOM providers (name → allowed; None: the authorizer cannot
    be reached, so its ``failOpen`` / ``statusOnError`` decide); a provider with no
    answer is taken to deny (fail closed) and the trace says so.
    """
    decision = _decide(mesh, request, now=now, trace=trace, ext_authz=ext_authz)
    if decision.verdict is Verdict.ALLOW and request.destination_host is None:
        return _unless_nothing_listens(mesh, request, decision)
    return decision


def _decide(
    mesh: MeshPolicy,
    request: Request,
    *,
    now: float,
    trace: bool,
    ext_authz: Mapping[str, bool | None] | None,
) -> Decision:
    run = _Run([] if trace else None)
    source_workload = _source_workload(mesh, request)
    if source_workload is not None and (
        run.trace is not None or source_workload.dataplane.uncertain
    ):
        _dataplane(run, "source", source_workload)
    if request.destination_host is not None:
        return _egress(mesh, request, source_workload, run)
    target = mesh.for_workload(request.destination)
    if target is None:
        raise RequestError(f"unknown destination workload {request.destination!r}")
    port = _port(request, target.workload)
    is_http = request.http is not None
    destination = target.workload.dataplane
    if run.trace is not None or destination.uncertain:
        _dataplane(run, "destination", target.workload)
    if destination.mode is _GATEWAY and is_http:
        return _at_gateway(mesh, request, source_workload, target, port, run, ext_authz, now)
    if destination.mode is not _SIDECAR:
        return _without_sidecar(mesh, request, source_workload, target, port, run)

    mode = target.mtls.for_port(port)
    if run.trace is not None:
        run.trace.append(
            PeerAuthentication(
                target.workload.ref,
                port,
                mode.mode.value,
                mode.scope if mode.policy else None,
                mode.policy or None,
            )
        )
    passthrough: ClientTls | None = None
    host = _client_authority(request)
    sidecar_client = source_workload is not None and source_workload.dataplane.mode is _SIDECAR
    if source_workload and sidecar_client and (host is not None or not _covered(target, port)):
        route = sidecar_client_route(mesh, source_workload, target, port, host, is_http=is_http)
        if route.kind is RouteKind.PASSTHROUGH:  # noted below, as the client's TLS choice
            passthrough = ClientTls(False, None, None, True, route.explanation)
        else:
            run.note(route.explanation)
        if route.kind is RouteKind.BLOCKED:
            return _finish(run, Verdict.DENY, 502, None, route.explanation)
        if route.kind is RouteKind.CLOSED:
            return _finish(run, Verdict.RESET, None, None, route.explanation)
    # Only workload sources are remembered: their number is bounded by the config.
    remembered = _CLIENT_TLS.table(mesh) if source_workload else None
    tls_key = (request.source.value, target.workload.ref, port, request.subset)
    tls = remembered.get(tls_key) if remembered is not None else None
    if tls is None and source_workload and source_workload.dataplane.mode is _AMBIENT:
        tls, unsupported = ambient_source_tls(mesh, source_workload, target, port, mode.mode)
        if unsupported is not None:
            run.note(unsupported)
            return _finish(run, Verdict.UNSUPPORTED, None, None, unsupported)
    if tls is None:
        tls = client_tls(
            mesh, request.source, source_workload, target, port, mode.mode, request.subset
        )
        if remembered is not None:
            remembered[tls_key] = tls
    tls = passthrough or tls
    if run.trace is not None:
        run.trace.append(TlsChoice(tls.explanation))
    reset = tls.conflict or _tls_mismatch(tls, mode.mode)
    if reset:
        run.note(TlsReset(reset))
        status = 503 if is_http and tls.client_has_sidecar else None
        return _finish(run, Verdict.RESET, status, None, reset)

    attrs = Attributes(
        principal=tls.principal,
        source_ip=_ip(request.source.ip or (source_workload.ip if source_workload else None)),
        destination_ip=_ip(target.workload.ip),
        destination_port=port,
        sni=tls.sni,
        is_http=is_http,
    )
    attrs.remote_ip = attrs.source_ip
    if tls.principal and run.trace is not None:
        run.trace.append(PeerPrincipal(tls.principal))
    if request.http is not None:
        proxy = None
        if tls.client_has_sidecar:
            gateway = source_workload is not None and source_workload.dataplane.mode is _GATEWAY
            proxy = ISTIO_GATEWAY if gateway else TRUSTMESH_SIDECAR
        rejected = _http_attributes(mesh, request, target, port, attrs, run, proxy)
        if rejected is not None:
            return rejected
    return _authorize(mesh, target, attrs, run, ext_authz or {}, now)


def _at_gateway(
    mesh: MeshPolicy,
    request: Request,
    source: Workload | None,
    target: WorkloadPolicy,
    port: int,
    run: _Run,
    ext_authz: Mapping[str, bool | None] | None,
    now: float,
) -> Decision:
    """An HTTP request to a gateway pod: its own policy filters decide (xds.gateway gives
    them the sidecar's), with the client address from X-Forwarded-For as Envoy takes it
    behind ``gatewayTopology.numTrustedProxies`` proxies. A client certificate's identity
    is only known when the request names one (``--principal``)."""
    assert request.http is not None
    peer = _ip(request.source.ip or (source.ip if source is not None else None))
    forwarded = [v for k, v in request.http.header_lines() if k.lower() == "x-forwarded-for"]
    hops = num_trusted_proxies(mesh.snapshot, target.workload)
    remote = trusted_client_address(forwarded, peer, hops)
    principal = request.source.value if request.source.kind is SourceKind.PRINCIPAL else None
    if principal is None and source is not None and _mesh_client_at(mesh, source, target, port):
        # An ISTIO_MUTUAL server (an egress gateway's): the client's sidecar presents its
        # workload certificate, so source.principals sees the client's identity.
        principal = source.principal(mesh.snapshot.mesh.trust_domain)
        run.note(f"gateway port {port} is ISTIO_MUTUAL: peer principal {principal}")
    run.note(
        "destination {} is a gateway ({}): numTrustedProxies {}, client address {}",
        target.workload.ref,
        target.workload.dataplane.reason,
        hops,
        remote if remote is not None else "unknown",
    )
    attrs = Attributes(
        principal=principal,
        source_ip=peer,
        destination_ip=_ip(target.workload.ip),
        destination_port=port,
        is_http=True,
    )
    attrs.remote_ip = remote
    rejected = _http_attributes(mesh, request, target, port, attrs, run, None)
    if rejected is not None:
        return rejected
    decision = _authorize(mesh, target, attrs, run, ext_authz or {}, now)
    if decision.verdict is Verdict.ALLOW and decision.trace:
        note = Step("then the gateway's routes answer (VirtualService; none matching: 404)")
        return decision._replace(trace=(*decision.trace, note))
    return decision


def _mesh_client_at(mesh: MeshPolicy, source: Workload, target: WorkloadPolicy, port: int) -> bool:
    """Whether ``source`` (a sidecar or gateway of the mesh) reaches the gateway's
    ``port`` over mesh mTLS: every server there is ISTIO_MUTUAL."""
    if source.dataplane.mode not in (_SIDECAR, _GATEWAY):
        return False
    servers, _ = gateway_servers(mesh.snapshot, target.workload)
    here = [s for s in servers if s.listen_port == port]
    return bool(here) and all(
        s.server.tls is not None and s.server.tls.mode is ServerTlsMode.ISTIO_MUTUAL for s in here
    )


def _authorize(
    mesh: MeshPolicy,
    target: WorkloadPolicy,
    attrs: Attributes,
    run: _Run,
    ext_authz: Mapping[str, bool | None],
    now: float,
) -> Decision:
    authz = target.authz
    is_http = attrs.is_http
    denied_status = 403 if is_http else None

    custom = None
    plans = custom_providers(target, mesh)
    if not is_http and len(plans) == 1 and not plans[0].used_on_tcp():
        # Istio builds no TCP filter for an HTTP provider: CUSTOM does not apply to TCP.
        run.note(f"CUSTOM provider {plans[0].name!r} is an HTTP authorizer: not used on TCP")
    else:
        custom = _first(authz.custom, attrs, run, "CUSTOM")
    if custom is not None:
        provider = custom.provider or ""
        plan = next(p for p in plans if p.name == provider)
        if plan.provider is None:
            # Every rule became a DENY, one filter per provider in provider order: the
            # first matching rule by the name Envoy reports decides.
            matched = [r for r in authz.custom.for_protocol(is_http).rules if r.matches(attrs)]
            first = min(matched, key=lambda r: custom_rule_name(r, configured=False))
            run.note(plan.why_denied)
            rule = custom_rule_name(first, configured=False)
            return _finish(run, Verdict.DENY, denied_status, rule, plan.why_denied)
        found = plan.provider
        rule = custom_rule_name(custom, configured=True)
        allowed = ext_authz.get(provider)
        if allowed is None and provider in ext_authz:
            # The authorizer cannot be reached: Envoy applies failOpen / statusOnError.
            config = found.config
            assert config is not None
            if config.fail_open:
                run.note(f"external authorizer {provider!r} unreachable: failOpen, allowed")
            else:
                status = int(config.status_on_error or 403) if is_http else None
                reason = f"external authorizer {provider!r} unreachable (failOpen is false)"
                run.note(reason)
                return _finish(run, Verdict.DENY, status, rule, reason)
        elif allowed is None:
            reason = (
                f"external authorizer {provider!r} would be asked; no answer given offline"
                " (--ext-authz), taken as deny"
            )
            run.note(reason)
            return _finish(run, Verdict.DENY, denied_status, rule, reason)
        else:
            run.note(ExtAuthzAnswer(provider, allowed))
            if not allowed:
                return _finish(run, Verdict.DENY, denied_status, rule, f"denied by {provider}")

    upstream: tuple[tuple[str, str], ...] = ()
    if is_http and target.jwt_providers:
        jwt = run_jwt_filter(target.jwt_providers, attrs.headers, attrs.query, attrs.method, now)
        if run.trace is not None:
            run.trace.extend([JwtStep(step) for step in jwt.steps])
            run.trace.append(JwtOutcome(jwt.status.value, jwt.message))
        if jwt.status is JwtStatus.UNAUTHENTICATED:
            return _finish(run, Verdict.UNAUTHENTICATED, 401, None, jwt.message)
        if jwt.status is JwtStatus.AUDIENCE:
            return _finish(run, Verdict.DENY, 403, None, jwt.message)
        # What RBAC reads next: verified tokens' headers removed, claim headers added.
        attrs.headers, attrs.query = jwt.headers, jwt.query
        if jwt.status is JwtStatus.OK:
            attrs.issuer, attrs.subject, attrs.claims = jwt.issuer, jwt.subject, jwt.claims
            upstream = jwt.added

    # Envoy's RBAC filters run AUDIT, then DENY (its dry-run rules as shadow rules), then
    # ALLOW (likewise): dry-run ALLOW rules are never evaluated for a denied request.
    audit = _first(authz.audit, attrs, run, "AUDIT")
    audit_name = audit.name if audit else None
    _shadow(authz.dry_run_deny, "DENY", attrs, run)
    deny = _first(authz.deny, attrs, run, "DENY")
    if deny is not None:
        return _finish(
            run, Verdict.DENY, denied_status, deny.name, ACCESS_DENIED, attrs, upstream, audit_name
        )
    _shadow(authz.dry_run_allow, "ALLOW", attrs, run)
    if not authz.allow.applies:
        run.note(AllowPhase("none-apply", "HTTP" if is_http else "TCP"))
        return _finish(
            run,
            Verdict.ALLOW,
            200 if is_http else None,
            None,
            "no ALLOW policy applies",
            attrs,
            upstream,
            audit_name,
        )
    allow = _first(authz.allow, attrs, run, "ALLOW")
    if allow is None:
        if run.trace is not None:
            protocol: Literal["HTTP", "TCP"] = "HTTP" if is_http else "TCP"
            if not authz.allow.for_protocol(is_http):
                run.trace.append(AllowPhase("no-rule-for-protocol", protocol))
            else:
                run.trace.append(AllowPhase("no-match", protocol))
        why = ACCESS_DENIED
        return _finish(run, Verdict.DENY, denied_status, None, why, attrs, upstream, audit_name)
    return _finish(
        run,
        Verdict.ALLOW,
        200 if is_http else None,
        allow.name,
        "allowed by ALLOW rule",
        attrs,
        upstream,
        audit_name,
    )


# Only workload sources are remembered: their number is bounded by the config.
_CLIENT_TLS: Derived[MeshPolicy, tuple[str, str, int, str], ClientTls] = Derived("client TLS")
_LISTENING: Derived[MeshPolicy, str, frozenset[int]] = Derived(
    "listening ports", lambda mesh, ref: listening_ports(mesh.workloads[ref])
)
_DEFAULT_HOST: Derived[MeshPolicy, tuple[str, int], str] = Derived(
    "default host", lambda mesh, key: _default_host(mesh.workloads[key[0]], key[1])
)
_LOCAL_PRINCIPAL: Derived[MeshPolicy, str, str] = Derived(
    "local principal",
    lambda mesh, ref: mesh.workloads[ref].workload.principal(mesh.snapshot.mesh.trust_domain),
)


def custom_rule_name(rule: CompiledRule, *, configured: bool) -> str:
    """The name Envoy reports for a CUSTOM rule, as Istio's authz builder generates it:
    ``istio-ext-authz-<provider>-ns[..]-policy[..]-rule[..]`` (the RBAC rule that sends
    the request to the provider), with ``-deny-due-to-bad-CUSTOM-action`` when the
    provider is not configured and the rule became a DENY (what the access log's
    ``rbac_access_denied_matched_policy[…]`` then names)."""
    prefix = f"istio-ext-authz-{rule.provider}-" if rule.provider else "istio-ext-authz-"
    return prefix + rule.name + ("" if configured else "-deny-due-to-bad-CUSTOM-action")


def _first(rules: ActionRules, attrs: Attributes, run: _Run, label: str) -> CompiledRule | None:
    if not rules.applies:
        return None
    rule_set = rules.for_protocol(attrs.is_http)
    found = rule_set.first_match(attrs)
    if run.trace is not None:
        run.trace.extend([RuleEvaluated(label, outcome) for outcome in rule_set.outcomes(attrs)])
        if not rule_set:
            run.trace.append(NoRuleForProtocol(label, len(rules.policies)))
    return found


def _shadow(rules: ActionRules, action: str, attrs: Attributes, run: _Run) -> None:
    if not rules.applies:
        return
    matched = _first(rules, attrs, run, f"dry-run {action}")
    if action == "DENY":
        result = ShadowResult(
            action, "denied" if matched else "allowed", matched.name if matched else None
        )
    else:
        result = ShadowResult(
            action, "allowed" if matched else "denied", matched.name if matched else None
        )
    run.shadow.append(result)
    run.note(ShadowEvaluated(result))


def _finish(
    run: _Run,
    verdict: Verdict,
    status: int | None,
    rule: str | None,
    reason: str,
    attrs: Attributes | None = None,
    upstream: tuple[tuple[str, str], ...] = (),
    audit: str | None = None,
    *,
    principal: str | None = None,
) -> Decision:
    return Decision(
        verdict=verdict,
        status=status,
        rule=rule,
        reason=reason,
        dry_run=tuple(run.shadow),
        audit=audit,
        trace=tuple(run.trace or ()),
        upstream_headers=upstream if verdict is Verdict.ALLOW else (),
        principal=attrs.principal if attrs else principal,
        request_principal=attrs.request_principal if attrs else None,
        assumptions=run.assumptions,
    )


_SIDECAR, _AMBIENT, _GATEWAY = MeshMode.SIDECAR, MeshMode.AMBIENT, MeshMode.GATEWAY


def _without_sidecar(
    mesh: MeshPolicy,
    request: Request,
    source: Workload | None,
    target: WorkloadPolicy,
    port: int,
    run: _Run,
) -> Decision:
    """A destination whose inbound traffic no sidecar decides: ztunnel, a gateway, nothing."""
    destination = target.workload.dataplane
    if destination.mode is MeshMode.AMBIENT:
        verdict, status, rule, reason, principal = evaluate_ztunnel(
            mesh, request, source, target, port, run.note, tracing=run.trace is not None
        )
        return _finish(run, verdict, status, rule, reason, principal=principal)
    if destination.mode is MeshMode.GATEWAY:
        reason = (
            f"unsupported: gateway: destination {target.workload.ref} is a gateway"
            f" ({destination.reason}): its listeners come from Gateway / VirtualService"
            " resources, which trustmesh does not model; it decides sidecar and ztunnel"
            " enforcement only"
        )
        run.note(reason)
        return _finish(run, Verdict.UNSUPPORTED, None, None, reason)
    if source is not None and source.dataplane.mode is _SIDECAR and not _covered(target, port):
        route = sidecar_client_route(
            mesh, source, target, port, _client_authority(request), is_http=request.http is not None
        )
        run.note(route.explanation)
        if route.kind is RouteKind.BLOCKED:
            return _finish(run, Verdict.DENY, 502, None, route.explanation)
        if route.kind is RouteKind.CLOSED:
            return _finish(run, Verdict.RESET, None, None, route.explanation)
    run.note("destination {} has no sidecar: no policy is enforced", target.workload.ref)
    reason = "destination has no sidecar"
    if destination.mode is MeshMode.UNKNOWN:
        reason = "destination's sidecar injection is unknown: answered as not injected"
    return _finish(run, Verdict.ALLOW, 200 if request.http is not None else None, None, reason)


def listening_ports(target: WorkloadPolicy) -> frozenset[int]:
    """The ports the workload declares (container ports, Service target ports): what is
    known to listen. Empty when it declares none (then nothing is assumed)."""
    ports = set(target.workload.ports)
    named: dict[str, int] = {}
    spec = target.workload.resource.spec
    pod = getattr(spec, "spec", None) or getattr(getattr(spec, "template", None), "spec", None)
    if isinstance(pod, m.PodSpec):
        named = {p.name: p.container_port for c in pod.containers for p in c.ports if p.name}
    for service in target.services:
        for sp in service.ports:
            if isinstance(sp.target_port, int):
                ports.add(sp.target_port)
            elif sp.target_port in named:
                ports.add(named[sp.target_port])
    return frozenset(ports)


def _unless_nothing_listens(mesh: MeshPolicy, request: Request, decision: Decision) -> Decision:
    """An allowed request to a port the workload does not declare reaches nothing: the
    mesh let it through (Istio's sidecar captures every port and enforces policy first),
    then the connection to the app is refused — a 503 from the sidecar for HTTP, a
    closed connection for TCP."""
    target = mesh.for_workload(request.destination)
    if target is None or request.port is None:
        return decision  # the port was the workload's only one
    ports = _LISTENING.get(mesh, target.workload.ref)
    if not ports or request.port in ports:
        return decision
    source = _source_workload(mesh, request)
    client_sidecar = request.source.kind is SourceKind.PRINCIPAL or (
        source is not None and source.dataplane.mode in (_SIDECAR, MeshMode.GATEWAY)
    )
    proxy = target.workload.dataplane.mode is _SIDECAR or client_sidecar
    http = request.http is not None
    declared = ", ".join(map(str, sorted(ports)))
    reason = (
        f"nothing listens on port {request.port} of {target.workload.ref} (it declares"
        f" {declared}): the connection to the app is refused"
        + (", its sidecar answers 503" if http and proxy else "")
    )
    return decision._replace(
        verdict=Verdict.RESET,
        status=503 if http and proxy else None,
        reason=reason,
        trace=(*decision.trace, Step(reason)) if decision.trace else (),
        upstream_headers=(),
    )


def _dataplane(run: _Run, role: Literal["source", "destination"], workload: Workload) -> None:
    """Trace how ``workload`` meets the mesh; keep it when the input does not show it."""
    dataplane = workload.dataplane
    if run.trace is not None:
        run.trace.append(DataplaneSeen(role, workload.ref, dataplane.describe()))
    if dataplane.uncertain:
        run.assumptions += (f"{role} {workload.ref}: {dataplane.describe()}",)


def _http_attributes(
    mesh: MeshPolicy,
    request: Request,
    target: WorkloadPolicy,
    port: int,
    attrs: Attributes,
    run: _Run,
    proxy: ClientProxyKind | None,
) -> Decision | None:
    """The request as the destination's policy filters read it. ``proxy``: it comes
    through the client's own sidecar or gateway, which reads and forwards it first."""
    http = request.http
    assert http is not None
    if http.method not in HTTP1_METHODS:
        reason = f"method {http.method!r} is rejected by Envoy's HTTP/1 codec"
        run.note(reason)
        return _finish(run, Verdict.BAD_REQUEST, 400, None, reason)
    try:
        uri_authority, target_path = split_absolute_form(http.path)
    except PathRejected as exc:
        run.note("request target rejected: {}", exc.reason)
        return _finish(run, Verdict.BAD_REQUEST, exc.status, None, exc.reason)
    lines = http.header_lines()
    first_line_host = http.host
    written = lines
    read: Sequence[tuple[str, str]] = lines
    if first_line_host is not None and ("\n" in first_line_host or "\r" in first_line_host):
        written, first_line_host = (("host", first_line_host), *lines), None
    if written:
        try:
            read = wire_lines(written)
        except PathRejected as exc:
            run.note("request refused by Envoy's codec: {}", exc.reason)
            return _finish(run, Verdict.BAD_REQUEST, exc.status, None, exc.reason)
    if read is not written:
        hosts_sent = any(name.lower() == "host" for name, _ in written)
        lines = tuple(read)
        # curl still sends its own Host first when the one read here was inside a value.
        if http.host is None and not hosts_sent and any(n.lower() == "host" for n, _ in lines):
            first_line_host = _remembered_default_host(mesh, target, port)
        run.note(
            "line breaks inside header values: Envoy's codec reads the lines {}",
            "; ".join(f"{name}: {value}" for name, value in lines),
        )
    if uri_authority is not None:
        run.note("absolute-form target: authority {}", uri_authority)
    sent = sent_authority(http.path, first_line_host, lines)
    host = sent if sent is not None else _remembered_default_host(mesh, target, port)
    local = None
    if attrs.principal is not None:  # only an mTLS peer gets Envoy's xfcc, which names it
        local = _LOCAL_PRINCIPAL.get(mesh, target.workload.ref)
    # An upgrade with no configuration (403) is refused only after the codec's authority
    # check and path normalization have passed the request (measured: 400 wins).
    refused_upgrade: PathRejected | None = None
    # The first Host line: the request's own, or curl's when it sends none (the authority).
    first_host: tuple[str, ...] = ()
    if first_line_host is not None:
        first_host = (first_line_host,)
    elif sent is None or (
        uri_authority is not None and not any(name.lower() == "host" for name, _ in lines)
    ):
        first_host = (host,)
    try:
        headers = filter_headers(
            lines,
            peer=attrs.principal,
            local=local,
            request_line=f"{http.method} {http.path} HTTP/1.1",
            host_lines=first_host,
            client_proxy=(
                ClientProxy(proxy, http.method, target_path, host) if proxy is not None else None
            ),
        )
    except PathRejected as exc:
        if exc.status == 403 and proxy is not None:  # by the client's proxy, before all this
            run.note("request refused by {}: {}", proxy.name, exc.reason)
            return _finish(run, Verdict.DENY, 403, None, exc.reason)
        if exc.status != 403:
            run.note("request refused before any filter: {}", exc.reason)
            return _finish(run, Verdict.BAD_REQUEST, exc.status, None, exc.reason)
        headers, refused_upgrade = {}, exc
    if run.trace is not None and refused_upgrade is None:
        _note_envoy_headers(run, lines, headers, target.authz.condition_headers)
    if authority_rejected(host):
        reason = f"Host {host!r} has characters Envoy's authority check refuses"
        run.note(reason)
        return _finish(run, Verdict.BAD_REQUEST, 400, None, reason)
    try:
        normalized = normalize_path(target_path, mesh.path_normalization)
    except PathRejected as exc:
        run.note("path rejected: {}", exc.reason)
        return _finish(run, Verdict.BAD_REQUEST, exc.status, None, exc.reason)
    if normalized.full != target_path:
        run.note(
            "path {} normalized to {} ({})",
            target_path,
            normalized.full,
            mesh.path_normalization.value,
        )
    if refused_upgrade is not None:
        run.note("request refused before any filter: {}", refused_upgrade.reason)
        return _finish(run, Verdict.DENY, 403, None, refused_upgrade.reason)
    if attrs.principal is not None and XFCC in target.authz.condition_headers:
        before, after = xfcc_parts(attrs.principal, local)
        if xfcc_depends_on_hash(_xfcc_patterns(target), before, after):
            reason = (
                f"unsupported: a policy condition on {XFCC} depends on the SHA-256 of the"
                " client's certificate, which Envoy writes there over mTLS and trustmesh"
                " cannot know offline"
            )
            run.note(reason)
            return _finish(run, Verdict.UNSUPPORTED, None, None, reason)
    stripped = strip_trailing_host_dot(host)
    if stripped != host:
        run.note("Host {} has its trailing dot stripped: {}", host, stripped)
        host = stripped
    headers[":authority"] = headers["host"] = (host,)
    attrs.method, attrs.path, attrs.query = http.method, normalized.path, normalized.query
    attrs.host, attrs.headers = host, headers
    forwarded = headers.get("x-forwarded-for")
    if forwarded:
        # Sidecars run with use_remote_address: false, so Envoy takes the client address
        # (remote.ip / remoteIpBlocks) from the last X-Forwarded-For entry.
        last = ",".join(forwarded).rsplit(",", 1)[-1].strip()
        with contextlib.suppress(ValueError):  # not an address: the peer address stays
            attrs.remote_ip = ipaddress.ip_address(last)
    return _guards(mesh, target, attrs, run)


def _note_envoy_headers(
    run: _Run,
    lines: tuple[tuple[str, str], ...],
    headers: dict[str, tuple[str, ...]],
    named: frozenset[str],
) -> None:
    """Trace what the connection manager removed before the filters read the request, and
    what it set or replaced of the headers a policy names."""
    sent = {name.lower() for name, _ in lines} - {"host"}
    removed = sorted(sent - headers.keys())
    if removed:
        run.note(
            "Envoy removes {} before any filter (hop-by-hop, named in Connection or internal)",
            ", ".join(removed),
        )
    for name in sorted(named & (headers.keys() - sent)):
        run.note("Envoy sets {}: {}", name, _shown(headers[name][0]))
    if XFCC in named and XFCC in sent and XFCC in headers:
        run.note("Envoy replaces the client's {}: {}", XFCC, _shown(headers[XFCC][0]))


def _shown(value: str) -> str:
    return value.replace(f"Hash={UNKNOWN_CERT_HASH}", "Hash=<SHA-256 of the client certificate>")


def _xfcc_patterns(target: WorkloadPolicy) -> list[str]:
    """The values of every applicable ``request.headers[x-forwarded-client-cert]``
    condition (values and notValues)."""
    authz = target.authz
    groups = (authz.custom, authz.deny, authz.allow, authz.audit)
    policies = [p for g in (*groups, authz.dry_run_deny, authz.dry_run_allow) for p in g.policies]
    key = f"request.headers[{XFCC}]"
    return [
        value
        for policy in policies
        for rule in policy.spec.rules or ()
        for condition in rule.when
        if condition.key.lower() == key
        for value in (*condition.values, *condition.not_values)
    ]


def _covered(target: WorkloadPolicy, port: int) -> bool:
    """Does a Service of the destination target ``port`` (so a client dials a Service)?"""
    return service_for(target, port)[1] is not None


def _client_authority(request: Request) -> str | None:
    """The authority a client sidecar routes the request by (None: it names none)."""
    http = request.http
    if http is None:
        return None
    try:
        return sent_authority(http.path, http.host, http.header_lines())
    except PathRejected:
        return None  # refused further on, by the destination's codec


def _guards(
    mesh: MeshPolicy, target: WorkloadPolicy, attrs: Attributes, run: _Run
) -> Decision | None:
    """trustmesh's request-smuggling guards, in front of every policy filter, each where a
    policy could be fooled: Host where one reads it, repeated headers where one reads them."""
    host = attrs.host or ""
    problem = authority_problem(host) if target.authz.reads_host else None
    if problem is not None:
        reason = f"Host {host!r} is not one plain host[:port]: {problem}; refused before any policy"
        run.note("{}: {}", HOST_GUARD_POLICY, reason)
        return _finish(run, Verdict.DENY, 403, HOST_GUARD_POLICY, reason, attrs)
    names = target.authz.condition_headers
    if not names:
        return None
    twice = repeated(attrs.headers, names)
    if not twice:
        return None
    lines = ", ".join(f"{name} ({len(attrs.headers[name])} lines)" for name in twice)
    if mesh.snapshot.mesh.repeated_policy_headers is m.RepeatedPolicyHeaders.FORWARD:
        run.note(
            "repeated {}: forwarded (meshConfig.repeatedPolicyHeaders: FORWARD); a condition"
            " on it matches if any one line matches",
            lines,
        )
        return None
    reason = (
        f"repeated header {lines} named by a policy condition: refused"
        " (meshConfig.repeatedPolicyHeaders: REJECT)"
    )
    run.note(reason)
    return _finish(run, Verdict.BAD_REQUEST, 400, None, reason, attrs)


def _remembered_default_host(mesh: MeshPolicy, target: WorkloadPolicy, port: int) -> str:
    return _DEFAULT_HOST.get(mesh, (target.workload.ref, port))


def _default_host(target: WorkloadPolicy, port: int) -> str:
    """What ``curl http://SVC.NS:PORT/`` sends as Host, as in the istio.io tasks."""
    service, service_port = service_for(target, port)
    if service is None:
        return f"{target.workload.name}.{target.workload.namespace}:{port}"
    suffix = f":{service_port}" if service_port is not None else ""
    return f"{service.name}.{service.namespace}{suffix}"


def _tls_mismatch(tls: ClientTls, mode: m.MtlsMode) -> str | None:
    if mode is m.MtlsMode.STRICT and not tls.mtls:
        return "plaintext to a STRICT port finds no filter chain: connection reset"
    if mode is m.MtlsMode.DISABLE and tls.mtls:
        return "mTLS to a DISABLE port: the server expects plaintext, connection reset"
    return None


def _source_workload(mesh: MeshPolicy, request: Request) -> Workload | None:
    if request.source.kind is not SourceKind.WORKLOAD:
        return None
    found = mesh.snapshot.workload(request.source.value)
    if found is None:
        raise RequestError(f"unknown source workload {request.source.value!r}")
    return found


def _port(request: Request, workload: Workload) -> int:
    if request.port is not None:
        if not 1 <= request.port <= 65535:
            raise RequestError(f"port {request.port} is out of range")
        return request.port
    if len(set(workload.ports)) == 1:
        return workload.ports[0]
    raise RequestError(f"{workload.ref} declares ports {sorted(set(workload.ports))}: give --port")


def _ip(value: str | None) -> IpAddress | None:
    if not value:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise RequestError(f"{value!r} is not an IP address") from None


def _egress(mesh: MeshPolicy, request: Request, source: Workload | None, run: _Run) -> Decision:
    verdict, status, reason = egress_decision(mesh, request, source)
    run.note(reason)
    return _finish(run, verdict, status, None, reason)
