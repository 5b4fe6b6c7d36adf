"""Authorization checks on what rules match: negative matches, path and host bypasses,
allow-all rules and HTTP-only rules on TCP ports (TM-AUTHZ-003 … TM-AUTHZ-007).

Findings come from the compiled model the evaluator enforces: which workloads a policy
applies to is read off each WorkloadPolicy (root-namespace scope, selectors, targetRef and
dry-run already resolved), rule matching uses the compiled rules, and a bypass is only
reported once :func:`trustmesh.policy.evaluate.evaluate` shows the variant request allowed.
Policies enforced on no sidecar workload are left to the scope checks in ``authz_scope``,
which also holds the helpers both modules share.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from trustmesh.analyze.checks.authz_probe import (
    Probe,
    Requirement,
    allowed_probes,
    bypass_probes,
    dimension,
    probes_matching,
    sample_path,
)
from trustmesh.analyze.checks.authz_scope import (
    PLAINTEXT_REACH,
    PROBE_IP,
    Policy,
    PortKind,
    WorkloadPort,
    compiled,
    enforced_on,
    http_only_fields,
    http_ports,
    label,
    matches_tcp,
    policies,
    reachability,
    refs,
    tcp_ports,
    workload_ports,
)
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue
from trustmesh.analyze.findings import Severity as S
from trustmesh.analyze.registry import rule
from trustmesh.api import models as m
from trustmesh.policy import matchers as mt
from trustmesh.policy import rule_tree as rt
from trustmesh.policy.authz import CompiledRule, rule_name
from trustmesh.policy.compose import WorkloadPolicy
from trustmesh.policy.decision import Verdict
from trustmesh.policy.pathnorm import PathNormalization, PathRejected, normalize_path
from trustmesh.policy.request import Attributes

# --- proving a finding with the evaluator ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Flip:
    """Two requests that differ in one attribute and get opposite decisions."""

    workload: str
    base: Probe
    variant: Probe
    rule: str  # the Envoy policy name that decided the base request


def compiled_rule(wp: WorkloadPolicy, policy: Policy, index: int) -> CompiledRule | None:
    """Rule ``index`` of ``policy`` as compiled for ``wp``'s HTTP filter chain."""
    a = wp.authz
    group = {
        m.Action.ALLOW: a.allow,
        m.Action.DENY: a.deny,
        m.Action.CUSTOM: a.custom,
        m.Action.AUDIT: a.audit,
    }[policy.spec.action]
    return compiled(group.http.rules, policy, index)


def admitted(
    ctx: AnalysisContext,
    wp: WorkloadPolicy,
    policy: Policy,
    index: int,
    operation: int,
    **fixed: str,
) -> list[Probe]:
    """Requests rule ``index`` of ``policy`` matches through its ``to[operation]`` entry."""
    rule = compiled_rule(wp, policy, index)
    if rule is None:
        return []
    return probes_matching(ctx, wp, [Requirement(rule, operation)], **fixed)


def escaping(
    ctx: AnalysisContext,
    wp: WorkloadPolicy,
    policy: Policy,
    index: int,
    operation: int,
    variant: dict[str, str],
    **fixed: str,
) -> Iterator[Probe]:
    """Requests rule ``index`` of ``policy`` denies whose ``variant`` form an ALLOW rule of
    ``wp`` (if any applies) admits: the sources that could really use a bypass."""
    rule = compiled_rule(wp, policy, index)
    if rule is None:
        return iter(())
    return bypass_probes(ctx, wp, Requirement(rule, operation), variant, **fixed)


def find_flip(
    ctx: AnalysisContext,
    wp: WorkloadPolicy,
    probes: Iterable[Probe],
    change: Callable[[Probe], Probe],
    *,
    to: Verdict,
    by: Policy,
) -> tuple[bool, Flip | None]:
    """Prove that changing one attribute flips the decision ``by`` makes.

    ``to=ALLOW``: a probe a rule of ``by`` denies whose changed form is allowed (a bypass);
    ``to=DENY``: a probe a rule of ``by`` admits whose changed form is denied. Returns
    whether ``by`` decided any probe at all (else nothing could be proven), and the first
    flip found.
    """
    base_verdict = Verdict.DENY if to is Verdict.ALLOW else Verdict.ALLOW
    prefix = rule_name(by.namespace, by.name, 0)[: -len("0]")]
    decided_any = False
    for probe in probes:
        base = probe.decide(ctx, wp.workload.ref)
        if base is None or base.verdict is not base_verdict:
            continue
        if base.rule is None or not base.rule.startswith(prefix):
            continue
        decided_any = True
        variant = change(probe)
        after = variant.decide(ctx, wp.workload.ref)
        if after is not None and after.verdict is to:
            return True, Flip(wp.workload.ref, probe, variant, base.rule)
    return decided_any, None


def same_decisions(
    ctx: AnalysisContext,
    targets: Iterable[WorkloadPolicy],
    *,
    host_fixed: bool,
    extra: Callable[[WorkloadPolicy], object] = lambda wp: None,
) -> list[tuple[WorkloadPolicy, tuple[str, ...]]]:
    """Targets grouped so that one evaluation answers for a whole group: (first, refs).

    For a plaintext or principal source the evaluator's answer depends on the compiled
    rules and JWT providers (objects shared by workloads the same policies select), the
    number and mTLS mode of each port and, only when some rule reads them, the workload's
    own default Host, SNI and IP. Namespace-wide policies over many workloads then cost
    one evaluation per distinct policy set instead of one per workload.
    """
    groups: dict[object, list[WorkloadPolicy]] = defaultdict(list)
    for wp in targets:
        key: object = wp.workload.ref
        if not _reads_own_attributes(wp, host_fixed):
            ports = tuple((p.number, wp.mtls.for_port(p.number).mode) for p in http_ports(ctx, wp))
            key = (id(wp.authz), id(wp.jwt_providers), ports, extra(wp))
        groups[key].append(wp)
    return [(wps[0], refs(wps)) for wps in groups.values()]


def _reads_own_attributes(wp: WorkloadPolicy, host_fixed: bool) -> bool:
    a = wp.authz
    for group in (a.custom, a.deny, a.allow, a.audit, a.dry_run_deny, a.dry_run_allow):
        for one in group.http.rules:
            for leaf in one.tree.leaves() if one.tree is not None else ():
                if isinstance(leaf, rt.ConnectionSni | rt.DestinationIp):
                    return True
                if not host_fixed and isinstance(leaf, rt.Host):
                    return True
    return False


def _undecidable(rule: CompiledRule | None) -> bool:
    """Does the rule read attributes a probe cannot set (so the evaluator may not match)?"""
    if rule is None:
        return False
    clauses = (*(rule.sources or ()), *(rule.operations or ()), rule.conditions)
    return any(dimension(c) == "fixed" for clause in clauses for c in clause)


def with_path(path: str) -> Callable[[Probe], Probe]:
    return lambda probe: replace(probe, path=path)


def with_host(host: str) -> Callable[[Probe], Probe]:
    return lambda probe: replace(probe, host=host)


# --- TM-AUTHZ-003 ----------------------------------------------------------------------

_PEERS = "any other peer, plaintext clients (no identity) included"
# (positive field, negative field, what the negative one lets through)
_NEGATIVE_SOURCE = (
    ("principals", "notPrincipals", _PEERS),
    ("namespaces", "notNamespaces", _PEERS),
    ("serviceAccounts", "notServiceAccounts", _PEERS),
    ("ipBlocks", "notIpBlocks", "any other source address"),
    ("remoteIpBlocks", "notRemoteIpBlocks", "any other client address (X-Forwarded-For)"),
    ("requestPrincipals", "notRequestPrincipals", "any other JWT, and requests without one"),
)
_NEGATIVE_OPERATION = (
    ("hosts", "notHosts", "any other Host, `host:port` forms of the listed hosts included"),
    ("ports", "notPorts", "every other port, ports added later included"),
    ("methods", "notMethods", "any other method, unexpected verbs (PATCH, custom) included"),
    ("paths", "notPaths", "any other path, other spellings of the listed ones (`//a`) included"),
)


def _values(model: Any, camel: str) -> tuple[str, ...]:
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    values: tuple[str, ...] = getattr(model, snake)
    return values


@dataclass(frozen=True, slots=True)
class Negative:
    """A negative match that admits requests on its own (it narrows no positive one)."""

    path: tuple[str | int, ...]  # relative to the rule, for resource.location()
    positive: str
    values: tuple[str, ...]
    admits: str


def negatives(r: m.Rule) -> list[Negative]:
    out: list[Negative] = []
    for j, f in enumerate(r.from_):
        for positive, negative, admits in _NEGATIVE_SOURCE:
            values = _values(f.source, negative)
            if values and not _values(f.source, positive):
                out.append(Negative(("from", j, "source", negative), positive, values, admits))
    for j, t in enumerate(r.to):
        for positive, negative, admits in _NEGATIVE_OPERATION:
            values = _values(t.operation, negative)
            if values and not _values(t.operation, positive):
                out.append(Negative(("to", j, "operation", negative), positive, values, admits))
    for j, c in enumerate(r.when):
        if c.not_values and not c.values:
            admits = f"any other {c.key} value, the attribute being absent included"
            out.append(Negative(("when", j, "notValues"), "values", c.not_values, admits))
    return out


@rule(
    "TM-AUTHZ-003",
    title="ALLOW rule matches by exclusion (notPaths, notMethods, notPrincipals, notValues…)",
    severity=S.WARNING,
    family="authz",
    rationale="An ALLOW rule written as 'everything except X' allows whatever its author did "
    "not think of: other spellings of X, new ports and methods, clients without an identity. "
    "Allow-lists fail closed; exclusions inside an ALLOW fail open.",
)
def allow_negative_match(ctx: AnalysisContext) -> Iterator[Issue]:
    for policy in policies(ctx):
        spec: m.AuthorizationPolicySpec = policy.spec
        enforced = enforced_on(ctx, policy) if spec.action is m.Action.ALLOW else ()
        for i, r in enumerate(spec.rules or () if enforced else ()):
            found = negatives(r)
            # A rule with an HTTP-only field is dropped whole on TCP ports: only workloads
            # that may speak HTTP get what it admits.
            targets = (
                tuple(wp for wp in enforced if http_ports(ctx, wp))
                if http_only_fields(r)
                else enforced
            )
            if not found or not targets:
                continue
            strict = PLAINTEXT_REACH not in {
                reachability(wp, [p.number for p in workload_ports(ctx, wp)]) for wp in targets
            }
            for neg in found:
                admits = neg.admits
                if strict and admits == _PEERS:
                    admits = "any other mesh identity"
                yield Issue(
                    message=(
                        f"ALLOW rule {i} of {label(policy)} matches {neg.path[-1]}"
                        f" {list(neg.values)}, so it allows {admits}, on"
                        f" {', '.join(refs(targets))} (when the rest of the rule matches)"
                    ),
                    location=policy.location("rules", i, *neg.path),
                    resource=policy.key,
                    workloads=refs(targets),
                    fix=f"Allow-list instead: replace {neg.path[-1]} with {neg.positive} naming"
                    " what is allowed, or move the exclusion to a DENY policy.",
                )


# --- TM-AUTHZ-004 ----------------------------------------------------------------------

_PATH_FIX = """\
meshConfig:
  pathNormalization:
    normalization: DECODE_AND_MERGE_SLASHES
"""


def path_variants(path: str, whole: bool = False) -> list[tuple[str, str]]:
    """Spellings of ``path`` that many backends serve as ``path`` itself.

    Dot segments, doubled and escaped slashes are undone by the stronger mesh
    normalizations. A trailing slash never is (``/admin/`` stays ``/admin/``): tried when
    the policy value matches ``path`` as a whole (``whole``: exact or URI template), since
    then ``/admin/`` is outside it while most frameworks route it to ``/admin``.
    """
    out = [("/." + path, "dot-segment"), ("/" + path, "double-slash")]
    cut = path.rfind("/")
    if cut > 0:
        out.append((f"{path[:cut]}%2F{path[cut + 1 :]}", "encoded-slash"))
    if whole and not path.endswith("/"):
        out += [(path + "/", "trailing-slash"), (path + "%2F", "encoded trailing-slash")]
    return out


def _matches_whole(value: str) -> bool:
    """An exact path or a URI template: nothing after the matched path is accepted."""
    return mt.is_path_template(value) or "*" not in value


@rule(
    "TM-AUTHZ-004",
    title="DENY/CUSTOM path match bypassable by another spelling of the path",
    severity=S.WARNING,
    family="authz",
    rationale="RBAC matches the path after Envoy's normalization. Under NONE or BASE `//admin` "
    "and `/admin%2Fsecret` reach RBAC unchanged, so a DENY on `/admin/secret` misses them while "
    "many backends serve them as the same resource; only DECODE_AND_MERGE_SLASHES closes both. "
    "No normalization removes a trailing slash: an exact `/admin` misses `/admin/`.",
    fixable=True,
)
def deny_path_normalization(ctx: AnalysisContext) -> Iterator[Issue]:
    mode = ctx.mesh.path_normalization
    setting = ctx.mesh_location("pathNormalization", "normalization")
    where = f"set at {setting}" if setting else "the default"
    for policy in policies(ctx):
        spec: m.AuthorizationPolicySpec = policy.spec
        if spec.action not in (m.Action.DENY, m.Action.CUSTOM):
            continue
        targets = tuple(wp for wp in enforced_on(ctx, policy) if http_ports(ctx, wp))
        for i, r in enumerate(spec.rules or () if targets else ()):
            for j, t in enumerate(r.to):
                for k, value in enumerate(t.operation.paths):
                    found = _path_bypass(ctx, policy, targets, i, j, value, mode)
                    if found is None:
                        continue
                    message, workloads, fix = found
                    yield Issue(
                        message=f"{message} (pathNormalization {mode.value}, {where})",
                        location=policy.location("rules", i, "to", j, "operation", "paths", k),
                        resource=policy.key,
                        workloads=workloads,
                        fix=fix,
                    )


def _path_fix(value: str, op: m.Operation, escaped: list[str], mode: PathNormalization) -> str:
    """The mesh setting when it closes a spelling, the policy change when none does."""
    matcher = mt.path_match(op.paths)
    strongest = PathNormalization.DECODE_AND_MERGE_SLASHES
    needs_policy = needs_mesh = False
    for variant in escaped:
        try:
            closed = matcher(normalize_path(variant, strongest).path)
        except PathRejected:
            closed = True
        needs_mesh |= closed and mode is not strongest
        needs_policy |= not closed
    fix = _PATH_FIX if needs_mesh else ""
    if needs_policy:
        under = f"{value}/{{**}}" if mt.is_path_template(value) else f"{value}/*"
        fix += (
            "# and in the policy, match what lies under the path too (paths are exact):\n"
            f'#   paths: ["{value}", "{under}"]\n'
        )
    return fix


def _path_bypass(
    ctx: AnalysisContext,
    policy: Policy,
    targets: tuple[WorkloadPolicy, ...],
    index: int,
    operation: int,
    value: str,
    mode: PathNormalization,
) -> tuple[str, tuple[str, ...], str] | None:
    sample = sample_path(value)
    if sample is None:
        return None
    op = (policy.spec.rules or ())[index].to[operation].operation
    action = policy.spec.action.value
    groups = same_decisions(ctx, targets, host_fixed=bool(op.hosts))
    flips: list[tuple[str, Flip]] = []
    proven: set[str] = set()
    decided_any = False
    variants = path_variants(sample, _matches_whole(value))
    for variant, kind in variants:
        for wp, members in groups:
            probes = escaping(ctx, wp, policy, index, operation, {"path": variant}, path=sample)
            change = with_path(variant)
            decided, flip = find_flip(ctx, wp, probes, change, to=Verdict.ALLOW, by=policy)
            decided_any = decided_any or decided
            if flip is not None:
                flips.append((kind, flip))
                proven.update(members)
    if flips:
        spelled = {flip.variant.path: kind for kind, flip in flips}
        first = flips[0][1]
        listed = ", ".join(f"`{path}` ({kind})" for path, kind in spelled.items())
        return (
            f"{action} {first.rule} matches path {value!r}, but {listed} escape it:"
            f" {first.base.describe()} is denied while {first.variant.describe()} is allowed"
            f" on {first.workload}:{first.variant.port.number}",
            tuple(sorted(proven)),
            _path_fix(value, op, list(spelled), mode),
        )
    if decided_any:
        return None  # every variant is denied anyway (another rule, or no ALLOW matches)
    if not any(_undecidable(compiled_rule(wp, policy, index)) for wp, _ in groups):
        # Every request the rule matches was built and decided: none it denies has an
        # allowed spelling (the ALLOW rules admit other methods, say), or none exists.
        return None
    # The rule reads what no offline request sets (the destination address, SNI, filter
    # metadata): judge the path match alone, and keep only variants some client can get
    # through with.
    matcher = mt.path_match(op.paths)
    found: list[str] = []
    reached: set[str] = set()
    for variant, _kind in variants:
        try:
            seen = normalize_path(variant, mode).path
        except PathRejected:
            continue
        if matcher(seen):
            continue
        through = {
            ref
            for wp, members in groups
            if any(
                (d := p.decide(ctx, wp.workload.ref)) is not None and d.verdict is Verdict.ALLOW
                for p in allowed_probes(ctx, wp, path=variant)
            )
            for ref in members
        }
        if through:
            found.append(variant)
            reached |= through
    if not found:
        return None
    listed = ", ".join(f"`{v}` ({dict(variants)[v]})" for v in found)
    return (
        f"{action} policy {label(policy)} matches path {value!r}, but {listed}"
        f" reach RBAC unchanged, escape it and are allowed on {', '.join(sorted(reached))};"
        " not confirmed against a request the rule denies (none could be built offline)",
        tuple(sorted(reached)),
        _path_fix(value, op, found, mode),
    )


# --- TM-AUTHZ-005 ----------------------------------------------------------------------

_PROBE_PRINCIPALS = (None, "cluster.local/ns/trustmesh-probe/sa/probe")
_PROBE_IPS = (PROBE_IP, ipaddress.ip_address("203.0.113.7"))


def _matches_everything(r: CompiledRule | None, ports: Iterable[int], is_http: bool) -> bool:
    """Does the compiled rule match requests of every shape, from anyone, on ``ports``?"""
    if r is None:
        return False
    for port in ports:
        for principal in _PROBE_PRINCIPALS:
            for ip in _PROBE_IPS:
                base = Attributes(
                    principal=principal,
                    source_ip=ip,
                    remote_ip=ip,
                    destination_port=port,
                    is_http=is_http,
                )
                if not is_http:
                    if not r.matches(base):
                        return False
                    continue
                for method in ("GET", "POST", "DELETE"):
                    for path in ("/", "/admin/secret"):
                        for host in ("probe.invalid", f"probe.invalid:{port}"):
                            if not r.matches(replace(base, method=method, path=path, host=host)):
                                return False
    return True


@rule(
    "TM-AUTHZ-005",
    title="ALLOW rule that matches every request (allow-all)",
    severity=S.WARNING,
    family="authz",
    rationale="A rule like `rules: [{}]` (or one whose every field is a wildcard) allows all "
    "traffic to the workloads it applies to and cancels a default-deny (allow-nothing) for "
    'them. `principals: ["*"]` is not allow-all: plaintext clients never match it.',
)
def allow_all(ctx: AnalysisContext) -> Iterator[Issue]:
    for policy in policies(ctx):
        spec: m.AuthorizationPolicySpec = policy.spec
        targets = enforced_on(ctx, policy) if spec.action is m.Action.ALLOW else ()
        for i, r in enumerate(spec.rules or () if targets else ()):
            if negatives(r):
                continue  # an exclusion is reported by TM-AUTHZ-003
            hit: list[WorkloadPolicy] = []
            for wp in targets:
                ports = workload_ports(ctx, wp) or (WorkloadPort(8000, PortKind.UNKNOWN),)
                http = [p.number for p in ports if p.kind is not PortKind.TCP]
                tcp = [p.number for p in ports if p.kind is PortKind.TCP]
                if http and not _matches_everything(
                    compiled(wp.authz.allow.http.rules, policy, i), http, True
                ):
                    continue
                if tcp and not _matches_everything(
                    compiled(wp.authz.allow.tcp.rules, policy, i), tcp, False
                ):
                    continue
                hit.append(wp)
            if not hit:
                continue
            reaches = {reachability(wp, [p.number for p in workload_ports(ctx, wp)]) for wp in hit}
            reach = PLAINTEXT_REACH if PLAINTEXT_REACH in reaches else reaches.pop()
            yield Issue(
                message=(
                    f"ALLOW rule {i} of {label(policy)} matches every request: it lets {reach}"
                    f" send anything to {', '.join(refs(hit))}, whatever default-deny is in place"
                ),
                location=policy.location("rules", i),
                resource=policy.key,
                workloads=refs(hit),
                fix="Name who may call and what, e.g.\n"
                "  rules:\n  - from:\n    - source:\n"
                '        principals: ["cluster.local/ns/<client-ns>/sa/<client-sa>"]\n'
                '    to:\n    - operation:\n        methods: ["GET"]\n',
            )


# --- TM-AUTHZ-006 ----------------------------------------------------------------------


def _hosts_without_port(hosts: Iterable[str]) -> list[tuple[int, str]]:
    values = [h.lower() for h in hosts]
    return [
        (k, host)
        for k, host in enumerate(values)
        if "*" not in host
        and ":" not in host
        and not any(v.startswith(host + ":") for v in values)  # `host:*` written alongside
    ]


def _dialed_port(ctx: AnalysisContext, wp: WorkloadPolicy) -> int:
    """The port clients put in Host: a Service port of an HTTP port, else the port itself."""
    ports = http_ports(ctx, wp)
    return next((p.service_port for p in ports if p.service_port), ports[0].number)


@rule(
    "TM-AUTHZ-006",
    title="hosts entry without its `host:*` port form",
    severity=S.WARNING,
    family="authz",
    rationale="`hosts` is an exact (case-insensitive) match on :authority, and clients dialing "
    "a non-default port send `host:port`. An exact host in an ALLOW rule then denies them; in "
    "a DENY rule it is bypassed by adding the port.",
)
def hosts_without_port(ctx: AnalysisContext) -> Iterator[Issue]:
    for policy in policies(ctx):
        spec: m.AuthorizationPolicySpec = policy.spec
        if spec.action not in (m.Action.ALLOW, m.Action.DENY):
            continue
        targets = tuple(wp for wp in enforced_on(ctx, policy) if http_ports(ctx, wp))
        for i, r in enumerate(spec.rules or () if targets else ()):
            for j, t in enumerate(r.to):
                for k, host in _hosts_without_port(t.operation.hosts):
                    issue = _host_issue(ctx, policy, targets, i, j, host)
                    if issue is not None:
                        yield replace(
                            issue,
                            location=policy.location("rules", i, "to", j, "operation", "hosts", k),
                        )


def _host_issue(
    ctx: AnalysisContext,
    policy: Policy,
    targets: tuple[WorkloadPolicy, ...],
    index: int,
    operation: int,
    host: str,
) -> Issue | None:
    allow = policy.spec.action is m.Action.ALLOW
    flips: list[Flip] = []
    proven: set[str] = set()
    considered: set[str] = set()
    decided_any = False
    port_of = functools.partial(_dialed_port, ctx)
    for wp, members in same_decisions(ctx, targets, host_fixed=True, extra=port_of):
        if allow and port_of(wp) == 80:
            continue  # clients leave the default port out of Host: nothing breaks
        considered.update(members)
        dialed_host = f"{host}:{port_of(wp)}"
        probes: Iterable[Probe]
        if allow:
            probes = admitted(ctx, wp, policy, index, operation, host=host)
        else:
            probes = escaping(ctx, wp, policy, index, operation, {"host": dialed_host}, host=host)
        dialed = with_host(dialed_host)
        to = Verdict.DENY if allow else Verdict.ALLOW
        decided, flip = find_flip(ctx, wp, probes, dialed, to=to, by=policy)
        decided_any = decided_any or decided
        if flip is not None:
            flips.append(flip)
            proven.update(members)
    fix = f'Add the port form next to it: hosts: ["{host}", "{host}:*"]'
    if flips:
        first = flips[0]
        outcome = (
            f"{first.base.describe()} is allowed but {first.variant.describe()} is denied"
            if allow
            else f"{first.base.describe()} is denied but {first.variant.describe()} is allowed"
        )
        message = (
            f"{policy.spec.action.value} {first.rule} matches Host {host!r} only without a port:"
            f" {outcome} on {first.workload}"
        )
        workloads = tuple(sorted(proven))
    elif allow and considered and not decided_any:
        # Nothing this rule admits could be built offline; the match itself is certain.
        workloads = tuple(sorted(considered))
        message = (
            f"ALLOW policy {label(policy)} matches Host {host!r} only without a port: requests"
            f" sending `Host: {host}:<port>` never match it on {', '.join(workloads)}"
        )
    else:
        return None  # the port form gets the same decision: nothing escapes or breaks
    return Issue(message, None, policy.key, workloads, fix)


# --- TM-AUTHZ-007 ----------------------------------------------------------------------


def _scoped_by_port(r: m.Rule) -> bool:
    return any(t.operation.ports or t.operation.not_ports for t in r.to) or any(
        c.key == "destination.port" for c in r.when
    )


@rule(
    "TM-AUTHZ-007",
    title="HTTP-only rules on a workload with TCP ports (DENY blocks all TCP / ALLOW denies all)",
    severity=S.WARNING,
    family="authz",
    rationale="On TCP filter chains Istio drops HTTP-only fields: a DENY rule keeps what is "
    "left and then matches every TCP connection; an ALLOW rule using them is dropped whole, "
    "and with no ALLOW rule left every TCP connection is denied.",
)
def http_only_on_tcp(ctx: AnalysisContext) -> Iterator[Issue]:
    # (policy key, rule index or -1 for a whole ALLOW policy) -> [(workload, ports)]
    hits: dict[tuple[str, int], list[tuple[str, tuple[int, ...]]]] = defaultdict(list)
    by_key = {p.key: p for p in policies(ctx)}
    for wp in ctx.sidecar_workloads():
        ports = tcp_ports(ctx, wp)
        if not ports:
            continue  # only HTTP or undeclared ports: nothing here is TCP for sure
        allow = wp.authz.allow
        # Under an allow-nothing policy TCP is denied on purpose until a rule names it.
        if allow.http and not allow.tcp and all(p.spec.rules for p in allow.policies):
            for p in allow.policies:
                hits[(p.key, -1)].append((wp.workload.ref, ports))
        for cr in wp.authz.deny.tcp.rules:
            written = cr.policy.spec.rules[cr.rule_index]
            if not http_only_fields(written) or _scoped_by_port(written):
                continue
            denied = tuple(p for p in ports if matches_tcp(ctx, cr, p))
            if denied:
                hits[(cr.policy.key, cr.rule_index)].append((wp.workload.ref, denied))
    for (key, index), found in sorted(hits.items()):
        policy = by_key[key]
        shown = "; ".join(f"{ref} ports {', '.join(map(str, ports))}" for ref, ports in found)
        if index < 0:
            fields = sorted({f for r in policy.spec.rules for f in http_only_fields(r)})
            message = (
                f"every rule of ALLOW {label(policy)} uses HTTP-only fields ({', '.join(fields)}),"
                " which drop the rule on TCP: with no ALLOW rule left for TCP, every connection"
                f" to {shown} is denied"
            )
            where = policy.location("rules")
            fix = (
                "Add a rule for the TCP ports (or narrow the selector to HTTP workloads):\n"
                '  - to:\n    - operation:\n        ports: ["<tcp-port>"]\n'
            )
        else:
            fields = http_only_fields(policy.spec.rules[index])
            message = (
                f"DENY rule {index} of {label(policy)} uses HTTP-only attributes"
                f" ({', '.join(fields)}) and no ports: on TCP they are dropped and what is left"
                f" denies TCP connections to {shown}"
            )
            where = policy.location("rules", index)
            fix = (
                "Scope the rule to the HTTP ports it is meant for:\n"
                '    to:\n    - operation:\n        ports: ["<http-port>"]\n'
            )
        yield Issue(message, where, key, tuple(ref for ref, _ in found), fix)
