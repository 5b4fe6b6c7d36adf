"""End-user authentication checks (TM-AUTHN-*): RequestAuthentication and JWT conditions.

Every answer comes from the compiled model: which RequestAuthentications select a
workload is ``WorkloadPolicy.jwt_providers`` (selection, root namespace, ``targetRef``
already resolved), and whether a rule can match a request that carries no token is
decided by running the rule's own compiled checks on a token-less request, so the
checks agree with the evaluator by construction.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api import models as m
from trustmesh.api.diagnostics import Location
from trustmesh.api.resources import Resource
from trustmesh.policy import rule_tree as rt
from trustmesh.policy.authz import Check, CompiledRule
from trustmesh.policy.compose import WorkloadPolicy
from trustmesh.policy.decision import RequestError, Verdict
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import Attributes, HttpRequest, Request, Source

# Service-port protocols (appProtocol or name prefix) Istio never treats as HTTP inbound:
# a JWT is only ever read on HTTP, so a workload serving only these has nothing to protect.
_NOT_HTTP = frozenset({"tcp", "tls", "https", "mongo", "mysql", "redis", "udp", "sctp"})
# JWK members that only a private or symmetric key has (RFC 7518 §6.2.2, §6.3.2, §6.4).
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_SHOWN = 5  # workloads described in one message; all are listed in Issue.workloads
_METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "instance-data"})
_CLUSTER_SUFFIXES = (".svc", ".svc.cluster.local", ".cluster.local", ".internal", ".local")


# --- token-less evaluation of compiled rules ----------------------------------------------


def _reads_only(check: Check, kinds: tuple[type, ...]) -> bool:
    """Whether every matcher of the check's tree field is one of ``kinds``."""
    if check.tree_field is None:
        return False
    leaves = list(rt.leaves(check.tree_field.matcher))
    return bool(leaves) and all(isinstance(leaf, kinds) for leaf in leaves)


def _is_token_check(check: Check) -> bool:
    """Checks that read only the verified JWT (issuer, subject, claims)."""
    return _reads_only(check, (rt.RequestPrincipal, rt.JwtClaim))


def _is_port_check(check: Check) -> bool:
    return _reads_only(check, (rt.DestinationPort,))


def _tokenless(port: int = 0) -> Attributes:
    return Attributes(is_http=True, destination_port=port)


def _can_match_without_token(rule: CompiledRule) -> bool:
    """False when the rule's token checks alone rule out every request without a JWT.

    Token checks read nothing but the JWT, so their answer on an empty token-less request
    is their answer on every token-less request; other checks are assumed satisfiable.
    """
    probe = _tokenless()

    def clause_open(clause: Sequence[Check]) -> bool:
        return all(c.test(probe) for c in clause if _is_token_check(c))

    if rule.sources is not None and not any(clause_open(c) for c in rule.sources):
        return False
    return clause_open(rule.conditions)


def _token_checks(rule: CompiledRule, passing: bool) -> list[str]:
    """Labels of the rule's token checks that a token-less request passes (or fails)."""
    probe = _tokenless()
    checks = [*(c for clause in rule.sources or () for c in clause), *rule.conditions]
    labels = [c.label for c in checks if _is_token_check(c) and c.test(probe) == passing]
    return list(dict.fromkeys(labels))


def _denies_all_tokenless(rule: CompiledRule, port: int) -> bool:
    """A DENY rule that matches every token-less request to ``port``, whatever else it says.

    Only rules constraining nothing but the token and the port qualify; those checks are
    then decided exactly on a token-less request to that port.
    """
    probe = _tokenless(port)

    def clause_all(clause: Sequence[Check], allowed: Callable[[Check], bool]) -> bool:
        return all(allowed(c) and c.test(probe) for c in clause)

    sources = rule.sources is None or any(clause_all(c, _is_token_check) for c in rule.sources)
    operations = rule.operations is None or any(
        clause_all(c, _is_port_check) for c in rule.operations
    )
    conditions = clause_all(rule.conditions, lambda c: _is_token_check(c) or _is_port_check(c))
    return sources and operations and conditions


def _http_ports(policy: WorkloadPolicy) -> tuple[int, ...]:
    """Target ports that may carry HTTP: declared HTTP, or undeclared (sniffed)."""
    declared: dict[int, bool] = {}
    for service in policy.services:
        for sp in service.ports:
            if not isinstance(sp.target_port, int):
                continue
            protocol = sp.protocol if sp.protocol.upper() not in ("TCP", "") else sp.name
            prefix = protocol.lower().split("-", 1)[0]
            http = prefix not in _NOT_HTTP
            declared[sp.target_port] = declared.get(sp.target_port, False) or http
    ports = set(policy.workload.ports) | set(declared)
    return tuple(sorted(p for p in ports if declared.get(p, True)))


# --- TM-AUTHN-001 -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Exposure:
    """How token-less requests fare at one workload."""

    ports: tuple[int, ...]  # HTTP ports where they get past authorization
    open_rules: tuple[str, ...]  # ALLOW rules that do not need a token ("" = no ALLOW applies)
    partial: bool  # some ALLOW rules do need a token
    custom: bool  # a CUSTOM authorizer runs first and may check tokens itself
    proof: str  # an evaluated request that is allowed without a token, if one was found


def _exposure(
    ctx: AnalysisContext, policy: WorkloadPolicy, peers: dict[str, list[str]]
) -> _Exposure | None:
    ports = _http_ports(policy)
    authz = policy.authz
    if not ports:
        return None  # no HTTP port: JWTs are never read here
    deny = authz.deny.http.rules if authz.deny.applies else ()
    open_ports = tuple(p for p in ports if not any(_denies_all_tokenless(r, p) for r in deny))
    if not open_ports:
        return None
    open_rules: tuple[str, ...] = ("",)
    partial = False
    if authz.allow.applies:
        rules = authz.allow.http.rules
        open_rules = tuple(r.name for r in rules if _can_match_without_token(r))
        if not open_rules:
            return None  # every ALLOW rule needs a request principal (or none exists: deny all)
        partial = len(open_rules) < len(rules)
    custom = authz.custom.applies and bool(authz.custom.http)
    proof = _proof(ctx, policy, open_ports, open_rules, peers)
    return _Exposure(open_ports, open_rules, partial, custom, proof)


def _peers(ctx: AnalysisContext) -> dict[str, list[str]]:
    """A few sidecar clients per namespace ("" = anywhere), to send witness requests from."""
    out: dict[str, list[str]] = {"": []}
    for policy in sorted(ctx.sidecar_workloads(), key=lambda p: p.workload.ref):
        for key in (policy.workload.namespace, ""):
            if len(out.setdefault(key, [])) < 3:
                out[key].append(policy.workload.ref)
    return out


def _proof(
    ctx: AnalysisContext,
    policy: WorkloadPolicy,
    ports: tuple[int, ...],
    rules: tuple[str, ...],
    peers: dict[str, list[str]],
) -> str:
    """Ask the evaluator for a token-less request that is allowed: a witness, not a guess."""
    target = policy.workload
    refs = [*peers.get(target.namespace, []), *peers[""]]
    refs = [r for r in dict.fromkeys(refs) if r != target.ref][:3]
    sources = [Source.workload(r) for r in refs] + [Source.plaintext()]
    paths = ["/"]
    by_name = {r.name: r for r in policy.authz.allow.http.rules}
    for name in rules:
        found = by_name.get(name)
        if found is not None:
            paths.extend(_sample_paths(found))
    for port in ports[:2]:
        for source in sources:
            for path in dict.fromkeys(paths[:4]):
                request = Request(source, target.ref, port, HttpRequest("GET", path))
                try:
                    decision = evaluate(ctx.mesh, request, now=0.0)
                except RequestError:
                    continue
                if decision.verdict is Verdict.ALLOW:
                    by = f"rule {decision.rule}" if decision.rule else decision.reason
                    who = source.describe()
                    return f"GET {path} from {who} to port {port} with no token: allowed ({by})"
    return ""


def _sample_paths(compiled: CompiledRule) -> list[str]:
    """Paths the rule's ``to`` entries name (``paths``, as written), to try requests on."""
    if compiled.tree is None:
        return []
    out = []
    for clause in compiled.tree.operations or ():
        for tree_field in clause:
            if tree_field.name != "paths" or tree_field.negated:
                continue
            for path in tree_field.written:
                if path.startswith("/") and "{" not in path:
                    out.append(path.rstrip("*") or "/")
    return out


@rule(
    "TM-AUTHN-001",
    title="RequestAuthentication without a policy that requires a token",
    severity=Severity.WARNING,
    family="authn",
    rationale=(
        "A RequestAuthentication only rejects invalid tokens: a request that carries no token "
        "passes with no request principal. Unless an AuthorizationPolicy requires a request "
        "principal, leaving the token out bypasses end-user authentication."
    ),
    fixable=True,
)
def token_not_required(ctx: AnalysisContext) -> Iterator[Issue]:
    """Workloads selected by a RequestAuthentication that serve token-less HTTP requests."""
    exposures: dict[str, _Exposure | None] = {}
    peers = _peers(ctx)
    for policy in ctx.sidecar_workloads():
        if policy.jwt_providers:
            exposures[policy.workload.ref] = _exposure(ctx, policy, peers)
    for ra in ctx.resources("RequestAuthentication"):
        source = f"{ra.namespace}/{ra.name}"
        hit = [
            (ref, exposure)
            for ref, exposure in exposures.items()
            if exposure is not None
            and any(p.source == source for p in ctx.mesh.workloads[ref].jwt_providers)
        ]
        if hit:
            yield _token_issue(ra, hit)


def _token_issue(ra: Resource[Any], hit: list[tuple[str, _Exposure]]) -> Issue:
    parts = []
    for ref, e in hit:
        listed = ", ".join(map(str, e.ports))
        if e.open_rules == ("",):
            why = "no ALLOW policy applies and no DENY rejects a missing token"
        else:
            why = f"ALLOW rule(s) {', '.join(e.open_rules)} match without a request principal"
        note = " (a CUSTOM authorizer runs first and may check tokens itself)" if e.custom else ""
        proof = f"; e.g. {e.proof}" if e.proof else ""
        parts.append(f"{ref} port {listed}: {why}{note}{proof}")
    mild = all(e.partial or e.custom for _, e in hit)
    more = f"; and {len(parts) - _SHOWN} more workloads" if len(parts) > _SHOWN else ""
    message = (
        f"RequestAuthentication {ra.namespace}/{ra.name} rejects only invalid tokens; requests "
        f"without a token still pass at " + "; ".join(parts[:_SHOWN]) + more
    )
    ports = sorted({p for _, e in hit for p in e.ports})
    return Issue(
        message=message,
        location=ra.location("jwtRules"),
        resource=ra.key,
        workloads=tuple(ref for ref, _ in hit),
        fix=_require_token_yaml(ra, ports),
        severity=Severity.INFO if mild else None,
        properties={"ports": ports, "proofs": [e.proof for _, e in hit if e.proof]},
    )


def _require_token_yaml(ra: Resource[Any], ports: list[int]) -> str:
    """A DENY of token-less requests: unlike an extra ALLOW it holds whatever else allows.

    Restricted to the HTTP ports because on TCP chains Istio drops the HTTP-only
    ``notRequestPrincipals`` from a DENY and what is left would deny every connection.
    """
    spec: m.RequestAuthenticationSpec = ra.spec
    lines = [
        "apiVersion: security.istio.io/v1",
        "kind: AuthorizationPolicy",
        "metadata:",
        f"  name: require-jwt-{ra.name}",
        f"  namespace: {ra.namespace}",
        "spec:",
    ]
    if spec.selector is not None and spec.selector.match_labels:
        lines += ["  selector:", "    matchLabels:"]
        lines += [
            f"      {k}: {json.dumps(v)}" for k, v in sorted(spec.selector.match_labels.items())
        ]
    lines += [
        "  action: DENY",
        "  rules:",
        "  - from:",
        "    - source:",
        '        notRequestPrincipals: ["*"]',
    ]
    if ports:
        quoted = ", ".join(f'"{p}"' for p in ports)
        lines += ["    to:", "    - operation:", f"        ports: [{quoted}]"]
    return "\n".join(lines) + "\n"


# --- TM-AUTHN-002 -------------------------------------------------------------------------


def _token_field(policy: Resource[Any], index: int) -> Location:
    """Where rule ``index`` first reads the JWT."""
    spec_rule: m.Rule = (policy.spec.rules or ())[index]
    for j, entry in enumerate(spec_rule.from_):
        for name in ("request_principals", "not_request_principals"):
            if getattr(entry.source, name):
                camel = (
                    "requestPrincipals" if name == "request_principals" else "notRequestPrincipals"
                )
                return policy.location("rules", index, "from", j, "source", camel)
    for k, cond in enumerate(spec_rule.when):
        if cond.key.startswith("request.auth."):
            return policy.location("rules", index, "when", k, "key")
    return policy.location("rules", index)


def _issuers(policy: Resource[Any], index: int) -> list[str]:
    spec_rule: m.Rule = (policy.spec.rules or ())[index]
    found = []
    for entry in spec_rule.from_:
        for value in (*entry.source.request_principals, *entry.source.not_request_principals):
            issuer = value.rpartition("/")[0]
            if issuer and "*" not in issuer:
                found.append(issuer)
    return list(dict.fromkeys(found))


@rule(
    "TM-AUTHN-002",
    title="JWT conditions on a workload with no RequestAuthentication",
    severity=Severity.WARNING,
    family="authn",
    rationale=(
        "requestPrincipals and request.auth.* are only set by a RequestAuthentication. Without "
        "one no request has a request principal: a DENY on them never denies (a bypass), an "
        "ALLOW on them never allows, and their negative forms match every request."
    ),
)
def jwt_conditions_without_authn(ctx: AnalysisContext) -> Iterator[Issue]:
    """Enforced ALLOW/DENY rules reading the JWT on workloads no RequestAuthentication selects."""
    found: dict[tuple[str, int], list[str]] = {}
    rules: dict[tuple[str, int], CompiledRule] = {}
    for policy in ctx.sidecar_workloads():
        if policy.jwt_providers:
            continue
        authz = policy.authz
        for action in (authz.deny, authz.allow):
            if not action.applies:
                continue
            for compiled in action.http.rules:
                if not any(
                    _is_token_check(c)
                    for c in (*(c for s in compiled.sources or () for c in s), *compiled.conditions)
                ):
                    continue
                key = (compiled.policy.key, compiled.rule_index)
                found.setdefault(key, []).append(policy.workload.ref)
                rules[key] = compiled
    for key in sorted(found):
        yield _jwt_condition_issue(rules[key], tuple(found[key]))


def _jwt_condition_issue(compiled: CompiledRule, workloads: tuple[str, ...]) -> Issue:
    policy = compiled.policy
    deny = compiled.action is m.Action.DENY
    names = ", ".join(workloads)
    where = f"AuthorizationPolicy {policy.namespace}/{policy.name} ({compiled.name})"
    no_ra = f"no RequestAuthentication selects {names}, so no request has a request principal"
    never = _token_checks(compiled, passing=False)
    always = _token_checks(compiled, passing=True)
    if not _can_match_without_token(compiled):
        if deny:
            severity = Severity.ERROR
            effect = "this DENY rule never denies anything: the requests it targets get through"
        else:
            severity = Severity.INFO
            effect = "this ALLOW rule never allows (fails closed, even for valid tokens)"
    elif never:
        # Some ``from`` entries can never match, others still can.
        part = f"the source entries using {', '.join(never)} never match"
        if deny:
            severity, effect = Severity.WARNING, f"{part}, so that part of the DENY never denies"
        else:
            severity, effect = Severity.INFO, f"{part}, so that part of the ALLOW never allows"
    else:
        vacuous = ", ".join(always)
        if deny:
            severity = Severity.INFO
            effect = f"{vacuous} match every request, so this DENY rule denies regardless of tokens"
        else:
            severity = Severity.WARNING
            effect = (
                f"{vacuous} match every request, so this ALLOW rule allows regardless of tokens"
            )
    return Issue(
        message=f"{where}: {no_ra}; {effect}",
        location=_token_field(policy, compiled.rule_index),
        resource=policy.key,
        workloads=workloads,
        fix=_request_authentication_yaml(policy, _issuers(policy, compiled.rule_index)),
        severity=severity,
    )


def _request_authentication_yaml(policy: Resource[Any], issuers: list[str]) -> str:
    spec: m.AuthorizationPolicySpec = policy.spec
    lines = [
        "# validate the tokens these conditions read (fill in the issuer's JWKS URL)",
        "apiVersion: security.istio.io/v1",
        "kind: RequestAuthentication",
        "metadata:",
        f"  name: {policy.name}-jwt",
        f"  namespace: {policy.namespace}",
        "spec:",
    ]
    if spec.selector is not None and spec.selector.match_labels:
        lines += ["  selector:", "    matchLabels:"]
        lines += [
            f"      {k}: {json.dumps(v)}" for k, v in sorted(spec.selector.match_labels.items())
        ]
    lines.append("  jwtRules:")
    for issuer in issuers or ["<issuer>"]:
        lines += [f"  - issuer: {json.dumps(issuer)}", '    jwksUri: "https://<issuer>/jwks.json"']
    return "\n".join(lines) + "\n"


# --- TM-AUTHN-003 -------------------------------------------------------------------------


def _uri_problems(uri: str) -> list[tuple[Severity, str]]:
    """Why fetching ``uri`` (istiod does it, from inside the cluster) is unsafe, if it is."""
    problems: list[tuple[Severity, str]] = []
    try:
        parts = urlsplit(uri)
        host = (parts.hostname or "").lower().rstrip(".")
    except ValueError:
        return problems
    if parts.scheme.lower() == "http":
        problems.append(
            (
                Severity.WARNING,
                "it is fetched over plain http: anyone on the path can swap in their own keys "
                "and mint tokens the mesh accepts",
            )
        )
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        if address.is_loopback or address.is_unspecified:
            problems.append((Severity.ERROR, f"{host} is a loopback address (SSRF against istiod)"))
        elif address.is_link_local:
            problems.append(
                (Severity.ERROR, f"{host} is link-local (cloud metadata endpoint; SSRF)")
            )
        elif not address.is_global:  # RFC 1918, ULA, CGNAT, reserved ranges
            problems.append(
                (Severity.WARNING, f"{host} is a private address (SSRF into the network)")
            )
    elif host == "localhost" or host.endswith(".localhost"):
        problems.append((Severity.ERROR, f"{host} is loopback (SSRF against istiod)"))
    elif host in _METADATA_HOSTS:
        problems.append((Severity.ERROR, f"{host} is a cloud metadata endpoint (SSRF)"))
    elif "." not in host or host.endswith(_CLUSTER_SUFFIXES):
        problems.append(
            (
                Severity.INFO,
                f"{host} is a cluster-internal name: whoever controls that Service controls "
                "which tokens are valid, and istiod will request any in-cluster URL written here",
            )
        )
    return problems


def _private_keys(text: str) -> list[str]:
    """Descriptions of JWKS entries holding private or symmetric key material."""
    try:
        data = json.loads(text)
    except ValueError:
        return []
    keys = data.get("keys") if isinstance(data, dict) else None
    out = []
    for i, key in enumerate(keys if isinstance(keys, list) else ()):
        if not isinstance(key, dict):
            continue
        members = [p for p in _PRIVATE_MEMBERS if p in key]
        if members:
            name = key.get("kid") or f"keys[{i}]"
            kind = "symmetric secret" if "k" in members else "private key"
            out.append(f"{name} ({key.get('kty', '?')} {kind}: {', '.join(members)})")
    return out


def _public_jwks(text: str) -> str:
    data = json.loads(text)
    keys = [
        {k: v for k, v in key.items() if k not in _PRIVATE_MEMBERS}
        for key in data.get("keys", [])
        if isinstance(key, dict) and "k" not in key
    ]
    return json.dumps({"keys": keys}, separators=(",", ":"))


@rule(
    "TM-AUTHN-003",
    title="Unsafe JWKS: jwksUri over http or to internal addresses, private keys in jwks",
    severity=Severity.WARNING,
    family="authn",
    rationale=(
        "The JWKS decides which tokens are genuine. Fetched over http it can be replaced in "
        "transit; pointed at loopback, link-local or private addresses it makes istiod fetch "
        "internal URLs (SSRF); and private or symmetric keys written into jwks let anyone who "
        "can read the RequestAuthentication mint valid tokens."
    ),
)
def unsafe_jwks(ctx: AnalysisContext) -> Iterator[Issue]:
    """Per jwtRules entry: where its keys come from and what they contain."""
    for ra in ctx.resources("RequestAuthentication"):
        source = f"{ra.namespace}/{ra.name}"
        workloads = tuple(
            p.workload.ref
            for p in ctx.sidecar_workloads()
            if any(j.source == source for j in p.jwt_providers)
        )
        spec: m.RequestAuthenticationSpec = ra.spec
        for i, jwt_rule in enumerate(spec.jwt_rules):
            if jwt_rule.jwks_uri:
                problems = _uri_problems(jwt_rule.jwks_uri)
                if problems:
                    yield Issue(
                        message=(
                            f"RequestAuthentication {source} issuer {jwt_rule.issuer!r}: jwksUri "
                            f"{jwt_rule.jwks_uri}: " + "; ".join(text for _, text in problems)
                        ),
                        location=ra.location("jwtRules", i, "jwksUri"),
                        resource=ra.key,
                        workloads=workloads,
                        fix=(
                            "serve the JWKS over https from the issuer's public endpoint, or "
                            "inline the public keys with `jwks:`"
                        ),
                        severity=max(severity for severity, _ in problems),
                    )
            if jwt_rule.jwks:
                leaked = _private_keys(jwt_rule.jwks)
                if leaked:
                    yield Issue(
                        message=(
                            f"RequestAuthentication {source} issuer {jwt_rule.issuer!r}: jwks "
                            f"contains {', '.join(leaked)}; anyone who can read this resource "
                            "can sign tokens the mesh accepts — rotate the key"
                        ),
                        location=ra.location("jwtRules", i, "jwks"),
                        resource=ra.key,
                        workloads=workloads,
                        fix=(
                            "publish only public members (symmetric keys have no public form: "
                            "switch the issuer to RS256/ES256):\n"
                            f"jwks: '{_public_jwks(jwt_rule.jwks)}'"
                        ),
                        severity=Severity.ERROR,
                    )
