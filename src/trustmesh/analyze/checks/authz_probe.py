"""Requests built to satisfy authorization rules, so a check can prove a finding with the
evaluator instead of guessing.

A bypass is only real if some client can send it: a DENY on ``/admin`` escaped by
``//admin`` matters when a source the workload's ALLOW rules admit sends ``//admin``. So
requests are synthesised from the rules themselves: every compiled rule a request must
match (the DENY rule, plus one ALLOW rule of the workload) is read check by check, each
check reads one attribute (peer principal, source address, JWT, method, path, host, port,
a header), and for each attribute the first candidate value every check on it accepts is
taken. Candidates come from the values the rules name (principals, namespaces, service
accounts, ip blocks, request principals, claims, hosts…), the identities of the workloads
in the inputs, and neutral defaults. Then :meth:`Probe.decide` asks the real evaluator.

End-user JWTs: the analyzer holds no issuer's signing key, so it evaluates against a copy
of the compiled mesh in which every JWT provider also trusts one probe key, and signs
tokens with it. Such a token stands for "a valid token of that issuer", which is what a
``requestPrincipals`` rule admits; everything else about the decision is unchanged.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice, product
from typing import Any

import jwt as pyjwt

from trustmesh.analyze.checks.authz_scope import (
    MAX_SOURCES,
    PROBE_IP,
    WorkloadPort,
    http_ports,
    mesh_principals,
)
from trustmesh.analyze.context import AnalysisContext
from trustmesh.api.conditions import KeyKind, Side
from trustmesh.policy import matchers as mt
from trustmesh.policy import rule_tree as rt
from trustmesh.policy.authz import Check, CompiledRule
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.decision import Decision, RequestError
from trustmesh.policy.derived import Derived
from trustmesh.policy.endpoints import service_for
from trustmesh.policy.evaluate import HTTP1_METHODS, evaluate
from trustmesh.policy.jwt import JwtProvider
from trustmesh.policy.pathnorm import PathRejected, normalize_path
from trustmesh.policy.request import Attributes, HttpRequest, IpAddress, Request, Source

# Probe tokens carry no exp/nbf, so the clock never matters; a constant keeps runs equal.
_NOW = 0.0
_KEY_ID = "trustmesh-analyze-probe"
_SECRET = b"trustmesh analyze: probe tokens, never a real credential"
_OUTSIDER_IP = ipaddress.ip_address("203.0.113.7")
_PROBE_SUBJECT = "probe-user"
_MAX_COMBINATIONS = 12  # ways to pick one `from` and one `to` entry per required rule
_MAX_ALLOW_RULES = 16  # ALLOW rules tried per probe target


@dataclass(frozen=True, slots=True)
class ProbeToken:
    """An end-user JWT to send: issuer, subject and extra claims (JSON, sorted)."""

    issuer: str
    subject: str
    claims_json: str = "{}"

    @property
    def principal(self) -> str:
        return f"{self.issuer}/{self.subject}"


@dataclass(frozen=True, slots=True)
class Probe:
    """An HTTP request shaped to satisfy some rules, as a client would send it."""

    source: Source
    port: WorkloadPort
    method: str
    path: str
    host: str | None
    headers: tuple[tuple[str, str], ...]
    token: ProbeToken | None = None

    def decide(self, ctx: AnalysisContext, destination: str) -> Decision | None:
        # Remembered: several checks (and several variants within one) ask the same request.
        decided = _DECISIONS.table(ctx)
        key = (destination, self)
        if key in decided:
            return decided[key]
        mesh = ctx.mesh if self.token is None else probe_mesh(ctx)
        target = mesh.for_workload(destination)
        headers, path = self.headers, self.path
        if self.token is not None and target is not None:
            headers, path = _place_token(target.jwt_providers, self.token, headers, path)
        http = HttpRequest(self.method, path, self.host, headers)
        try:
            decision: Decision | None = evaluate(
                mesh, Request(self.source, destination, self.port.number, http), now=_NOW
            )
        except RequestError:
            decision = None
        decided[key] = decision
        return decision

    def describe(self) -> str:
        host = f" (Host: {self.host})" if self.host else ""
        who = f"peer {self.source.value}" if self.source.value else "a plaintext client"
        extras = [f"{name}: {value}" for name, value in self.headers]
        if self.source.ip:
            who += f" at {self.source.ip}"
        if self.token is not None:
            claims = json.loads(self.token.claims_json)
            shown_claims = (
                f"{k}={','.join(map(str, v)) if isinstance(v, list) else json.dumps(v)}"
                if not isinstance(v, str)
                else f"{k}={v}"
                for k, v in sorted(claims.items())
            )
            more = f" ({', '.join(shown_claims)})" if claims else ""
            who += f" with a valid JWT for {self.token.principal}{more}"
        shown = f" (headers {'; '.join(extras)})" if extras else ""
        return f"`{self.method} {self.path}`{host}{shown} from {who}"


@dataclass(frozen=True, slots=True)
class Requirement:
    """A compiled rule the probe must match, optionally through one of its ``to`` entries.

    ``overrides`` are attributes the caller varies for *this* rule: an ALLOW rule must
    admit the variant request (``//admin``), not the base one the DENY rule matches. Its
    checks on them are not used to shape the request; :func:`bypass_probes` keeps only
    ALLOW rules that can admit the variant, and the evaluator has the last word.
    """

    rule: CompiledRule
    operation: int | None = None
    overrides: tuple[tuple[str, str], ...] = ()


# --- the probe mesh: every JWT provider also trusts the probe key ---------------------


def _probe_jwk() -> pyjwt.PyJWK:
    secret = base64.urlsafe_b64encode(_SECRET).rstrip(b"=").decode()
    return pyjwt.PyJWK({"kty": "oct", "k": secret, "alg": "HS256", "kid": _KEY_ID})


def probe_mesh(ctx: AnalysisContext) -> MeshPolicy:
    """The mesh with the probe key trusted by every JWT provider (once per analysis)."""
    return _PROBE_MESH.get(ctx, None)


def _probe_mesh(ctx: AnalysisContext, _: None) -> MeshPolicy:
    jwk = _probe_jwk()
    trusted: dict[int, tuple[JwtProvider, ...]] = {}
    workloads: dict[str, WorkloadPolicy] = {}
    for ref, wp in ctx.mesh.workloads.items():
        providers = wp.jwt_providers
        if providers:
            if id(providers) not in trusted:
                trusted[id(providers)] = tuple(
                    replace(p, keys=(*(p.keys or ()), jwk), jwks_problem="") for p in providers
                )
            wp = replace(wp, jwt_providers=trusted[id(providers)])
        workloads[ref] = wp
    return replace(ctx.mesh, workloads=workloads)


def _sign(token: ProbeToken) -> str:
    payload = {"iss": token.issuer, "sub": token.subject, **json.loads(token.claims_json)}
    return pyjwt.encode(payload, _SECRET, algorithm="HS256", headers={"kid": _KEY_ID})


def _place_token(
    providers: Sequence[JwtProvider],
    token: ProbeToken,
    headers: tuple[tuple[str, str], ...],
    path: str,
) -> tuple[tuple[tuple[str, str], ...], str]:
    """Where the issuer's provider looks for the token: its first header, else its param."""
    provider = next((p for p in providers if p.issuer == token.issuer), None)
    signed = _sign(token)
    if provider is None or provider.locations():
        name, prefix = provider.locations()[0] if provider else ("authorization", "Bearer ")
        return (*headers, (name, prefix + signed)), path
    param = provider.params()[0] if provider.params() else "access_token"
    return headers, f"{path}{'&' if '?' in path else '?'}{param}={signed}"


# --- which attribute a compiled check reads -----------------------------------------

_READS: dict[type, str] = {  # a leaf matcher's type → the attribute probes vary for it
    rt.Principal: "principal",
    rt.SourceNamespace: "principal",
    rt.ServiceAccount: "principal",
    rt.TrustDomain: "principal",
    rt.SourceIp: "source_ip",
    rt.RemoteIp: "remote_ip",
    rt.RequestPrincipal: "token",
    rt.JwtClaim: "token",
    rt.DestinationPort: "port",
    rt.Host: "host",
    rt.Method: "method",
    rt.Path: "path",
    rt.PathTemplate: "path",
    rt.DestinationIp: "fixed",
    rt.ConnectionSni: "fixed",
    rt.FilterMetadata: "fixed",
}


def dimension(check: Check) -> str:
    """The attribute a check reads, from its tree field's matchers (``notPaths`` → path,
    ``request.headers[X]`` → ``header:x``, a JWT claim → token)."""
    tree_field = check.tree_field
    if tree_field is not None:
        for leaf in rt.leaves(tree_field.matcher):
            if isinstance(leaf, rt.RequestHeader):
                return "header:" + leaf.name.lower()
            if (found := _READS.get(type(leaf))) is not None:
                return found
    return "principal" if tree_field is None or tree_field.side is Side.PRINCIPAL else "fixed"


# --- candidate values per attribute ----------------------------------------------------


def sample_value(value: str) -> str:
    """A concrete value an Istio string match accepts (``a*`` → ``a``, ``*a`` → ``xa``)."""
    if value == "*":
        return "x"
    if value.endswith("*"):
        return value[:-1]
    if value.startswith("*"):
        return "x" + value[1:]
    return value


def sample_path(value: str) -> str | None:
    """A path the ``paths`` entry matches, with a segment after a trailing ``/``."""
    if value in ("*", "/*"):
        return None  # every path: no spelling escapes it
    if mt.is_path_template(value):
        path = value.replace("{**}", "x").replace("{*}", "x")
    elif value.startswith("*"):
        path = "/x" + value[1:]
    else:
        path = value[:-1] if value.endswith("*") else value
        if path.endswith("/"):
            path += "x"
    return path if path.startswith("/") else None


@dataclass(slots=True)
class _Values:
    """Values the rules name, gathered per attribute (positive and negative forms alike)."""

    principals: list[str] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)
    remote_ips: list[str] = field(default_factory=list)
    request_principals: list[str] = field(default_factory=list)
    claims: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    headers: dict[str, list[str]] = field(default_factory=dict)


def _gather(ctx: AnalysisContext, rules: Iterable[CompiledRule]) -> _Values:
    td = ctx.snapshot.mesh.trust_domain
    accounts = _accounts(ctx)
    out = _Values()

    def in_namespace(namespace: str) -> list[str]:
        namespace = namespace.replace("*", "x")
        return [f"{td}/ns/{namespace}/sa/{sa}" for sa in accounts.get(namespace, ["default"])]

    def account(value: str, policy_namespace: str) -> str:
        namespace, _, name = value.rpartition("/")
        return f"{td}/ns/{namespace or policy_namespace}/sa/{name}"

    known = _known_principals(ctx)

    def sample(value: str) -> list[str]:
        return _principal_samples(value, td, known)

    def source(name: str, values: tuple[str, ...], negated: bool, own: str) -> None:
        if name == "principals" and not negated:
            out.principals += [x for p in values if p != "*" for x in sample(p)]
        elif name == "namespaces" and not negated:
            out.principals += [n for ns in values if ns != "*" for n in in_namespace(ns)]
        elif name == "serviceAccounts" and not negated:
            out.principals += [account(a, own) for a in values]
        elif name == "ipBlocks":
            out.ips += values
        elif name == "remoteIpBlocks":
            out.remote_ips += values
        elif name == "requestPrincipals" and not negated:
            out.request_principals += values

    for cr in rules:
        tree = cr.tree
        if tree is None:
            continue
        own = cr.policy.namespace
        for clause in tree.sources or ():
            # the attributes in the order probes try them; each field's values as written
            for name in _SOURCE_ORDER:
                for f in clause:
                    if f.name == name:
                        source(name, f.written, f.negated, own)
        for clause in tree.operations or ():
            for f in clause:
                if f.negated:
                    continue
                if f.name == "methods":
                    out.methods += f.written
                elif f.name == "paths":
                    out.paths += [p for v in f.written if (p := sample_path(v))]
                elif f.name == "hosts":
                    out.hosts += [sample_value(h) for h in f.written]
        for f in tree.when:
            condition = f.condition
            if condition is None:
                continue
            kind, values, negated = condition.kind, f.written, f.negated
            if kind in _SOURCE_KEYS:
                source(_SOURCE_KEYS[kind], values, negated, own)
            elif kind is KeyKind.REQUEST_HEADER:
                name = condition.names[0].lower()
                out.headers.setdefault(name, []).extend(sample_value(v) for v in values)
            elif kind in _CLAIMS and not negated:
                path = _CLAIMS[kind] or condition.names
                out.claims.setdefault(path, []).append(sample_value(values[0]))
    return out


_SOURCE_ORDER = (
    "principals",
    "namespaces",
    "serviceAccounts",
    "ipBlocks",
    "remoteIpBlocks",
    "requestPrincipals",
)
_SOURCE_KEYS = {
    KeyKind.SOURCE_PRINCIPAL: "principals",
    KeyKind.SOURCE_NAMESPACE: "namespaces",
    KeyKind.SOURCE_SERVICE_ACCOUNT: "serviceAccounts",
    KeyKind.SOURCE_IP: "ipBlocks",
    KeyKind.REMOTE_IP: "remoteIpBlocks",
    KeyKind.REQUEST_PRINCIPAL: "requestPrincipals",
}
_CLAIMS: dict[KeyKind, tuple[str, ...]] = {  # () : the claim path the key names
    KeyKind.REQUEST_AUDIENCES: ("aud",),
    KeyKind.REQUEST_PRESENTER: ("azp",),
    KeyKind.REQUEST_CLAIM: (),
}


def _principal_samples(value: str, td: str, known: Sequence[str]) -> list[str]:
    """Principals ``value`` matches: the inputs' own identities first, then a made-up one
    shaped like a SPIFFE path (``cluster.local/ns/foo/*`` → ``…/ns/foo/sa/probe``)."""
    if "*" not in value:
        return [value]
    match = mt.string_match([value])
    found = [p for p in known if match(p)]
    if value.startswith("*"):
        found.append(td + value[1:] if value[1:].startswith("/") else "x" + value[1:])
    elif value.endswith("*"):
        head = value[:-1]
        tail = "probe"
        if head.endswith("/ns/"):
            tail = "probe/sa/probe"
        elif head.count("/") == 3 and head.split("/")[1] == "ns" and head.endswith("/"):
            tail = "sa/probe"
        found.append(head + tail)
    return found


def _known_principals(ctx: AnalysisContext) -> list[str]:
    return _KNOWN_PRINCIPALS.get(ctx, None)


def _accounts(ctx: AnalysisContext) -> dict[str, list[str]]:
    return _ACCOUNTS.get(ctx, None)


def _accounts_by_namespace(ctx: AnalysisContext, _: None) -> dict[str, list[str]]:
    by_namespace: dict[str, set[str]] = {}
    for w in ctx.snapshot.workloads:
        by_namespace.setdefault(w.namespace, set()).add(w.service_account)
    return {ns: sorted(names) for ns, names in by_namespace.items()}


_KNOWN_PRINCIPALS: Derived[AnalysisContext, None, list[str]] = Derived(
    "known principals",
    lambda ctx, _: sorted(
        {w.principal(ctx.snapshot.mesh.trust_domain) for w in ctx.snapshot.workloads}
    ),
)
_ACCOUNTS: Derived[AnalysisContext, None, dict[str, list[str]]] = Derived(
    "service accounts", _accounts_by_namespace
)


def _addresses(cidrs: Iterable[str]) -> list[IpAddress]:
    out: list[IpAddress] = []
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue
        if network.num_addresses > 2:
            out.append(network.network_address + 1)  # a host address, not the network's
        out.append(network.network_address)
    return out


def _tokens(wp: WorkloadPolicy, values: _Values) -> list[ProbeToken | None]:
    providers = wp.jwt_providers
    out: list[ProbeToken | None] = [None]
    if not providers:
        return out
    issuers = list(dict.fromkeys(p.issuer for p in providers))
    pairs: list[tuple[str, str]] = []
    for value in values.request_principals:
        if value == "*":
            continue
        issuer, _, subject = value.rpartition("/")
        subject = sample_value(subject) if subject and subject != "*" else _PROBE_SUBJECT
        if "*" in issuer or not issuer:
            match = mt.string_match([issuer or "*"])
            pairs += [(i, subject) for i in issuers if match(i)]
        else:
            pairs.append((issuer, subject))
    pairs += [(i, _PROBE_SUBJECT) for i in issuers]
    for issuer, subject in list(dict.fromkeys(pairs))[:MAX_SOURCES]:
        if issuer not in issuers:
            continue  # no provider would accept it: the token is rejected (401)
        provider = next(p for p in providers if p.issuer == issuer)
        claims: dict[str, Any] = {}
        for path, wanted in values.claims.items():
            if path == ("aud",):
                continue
            node = claims
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = list(dict.fromkeys(wanted)) if len(wanted) > 1 else wanted[0]
        audiences = [*values.claims.get(("aud",), ()), *provider.audiences[:1]]
        if audiences:
            claims["aud"] = list(dict.fromkeys(audiences))
        out.append(ProbeToken(issuer, subject, json.dumps(claims, sort_keys=True)))
    return out


# --- synthesis --------------------------------------------------------------------------


def default_host(wp: WorkloadPolicy, port: int) -> str:
    """The Host a client sends when it calls ``port`` through the workload's Service."""
    service, service_port = service_for(wp, port)
    if service is None:
        return f"{wp.workload.name}.{wp.workload.namespace}:{port}"
    return f"{service.name}.{service.namespace}" + (
        f":{service_port}" if service_port is not None else ""
    )


def _attributes(dim: str, value: Any, wp: WorkloadPolicy, port: int, mode: Any) -> Attributes:
    a = Attributes(destination_port=port, is_http=True)
    if dim == "principal":
        a.principal = value
    elif dim == "source_ip":
        a.source_ip = value
    elif dim == "remote_ip":
        a.remote_ip = value
    elif dim == "token":
        if value is not None:
            a.issuer, a.subject = value.issuer, value.subject
            a.claims = json.loads(value.claims_json)
    elif dim == "method":
        a.method = value
    elif dim == "path":
        try:
            a.path = normalize_path(value, mode).path
        except PathRejected:
            a.path = None
    elif dim == "host":
        a.host = value if value is not None else default_host(wp, port)
    elif dim == "port":
        a.destination_port = value
    elif dim.startswith("header:"):
        a.headers = {dim[len("header:") :]: (value,)} if value is not None else {}
    return a


Tests = Sequence[Check]


def _accepts(checks: Tests, dim: str, value: Any, wp: WorkloadPolicy, port: int, mode: Any) -> bool:
    """Do all ``checks`` accept ``value`` for ``dim``?"""
    attributes = _attributes(dim, value, wp, port, mode)
    return all(check.test(attributes) for check in checks)


def _choices(rule: CompiledRule, operation: int | None) -> list[tuple[Check, ...]]:
    sources = rule.sources if rule.sources is not None else ((),)
    if rule.operations is None:
        operations: tuple[tuple[Check, ...], ...] = ((),)
    elif operation is not None and operation < len(rule.operations):
        operations = (rule.operations[operation],)
    else:
        operations = rule.operations
    return [(*s, *o, *rule.conditions) for s, o in islice(product(sources, operations), 9)]


def probes_matching(
    ctx: AnalysisContext,
    wp: WorkloadPolicy,
    required: Sequence[Requirement],
    *,
    path: str | None = None,
    host: str | None = None,
) -> list[Probe]:
    """HTTP requests to ``wp`` that match every required rule, as far as offline allows.

    ``path`` / ``host`` fix those attributes of the request (the caller varies them);
    everything else is chosen. A requirement's overridden attributes are left to the
    caller (who varies them) and to the evaluator. Only candidates are returned: the
    evaluator decides. Memoized: the spellings of one path ask for the same requests.
    """
    key = (
        wp.workload.ref,
        tuple((id(r.rule), r.operation, tuple(k for k, _ in r.overrides)) for r in required),
        path,
        host,
    )
    remembered = _PROBES.table(ctx)
    cached = remembered.get(key)
    if cached is None:
        cached = remembered[key] = _probes_matching(ctx, wp, required, path, host)
    return cached


def _probes_matching(
    ctx: AnalysisContext,
    wp: WorkloadPolicy,
    required: Sequence[Requirement],
    path: str | None,
    host: str | None,
) -> list[Probe]:
    ports = http_ports(ctx, wp)
    if not ports:
        return []
    values = _gather(ctx, (r.rule for r in required))
    mode = ctx.mesh.path_normalization
    td = ctx.snapshot.mesh.trust_domain
    candidates: dict[str, list[Any]] = {
        "principal": [
            None,
            *dict.fromkeys(
                [*values.principals, *mesh_principals(ctx), f"{td}/ns/trustmesh-probe/sa/probe"]
            ),
        ],
        "source_ip": [None, *_addresses(values.ips), PROBE_IP, _OUTSIDER_IP],
        "remote_ip": [None, *_addresses(values.remote_ips), _OUTSIDER_IP],
        "token": _tokens(wp, values),
        "method": [
            *(
                v
                for v in dict.fromkeys([*values.methods, "GET", "POST", "PUT", "DELETE"])
                if v in HTTP1_METHODS
            ),
        ],
        "path": [path] if path is not None else [*dict.fromkeys([*values.paths, "/", "/x"])],
        "host": [host] if host is not None else [None, *dict.fromkeys(values.hosts)],
        "port": [p.number for p in ports],
    }
    for name, header_values in values.headers.items():
        candidates["header:" + name] = [None, *dict.fromkeys(header_values), "x"]
    combos = [_choices(r.rule, r.operation) for r in required]
    probes: dict[Probe, None] = {}
    for picked in islice(product(*combos), _MAX_COMBINATIONS):
        by_dim: dict[str, list[Check]] = {}
        for requirement, checks in zip(required, picked, strict=True):
            overridden = {k for k, _ in requirement.overrides}
            for check in checks:
                dim = dimension(check)
                if dim not in overridden:
                    by_dim.setdefault(dim, []).append(check)
        for probe in _realize(wp, candidates, by_dim, ports, mode):
            probes.setdefault(probe)
    return list(probes)


def _realize(
    wp: WorkloadPolicy,
    candidates: Mapping[str, list[Any]],
    by_dim: Mapping[str, Tests],
    ports: Sequence[WorkloadPort],
    mode: Any,
) -> Iterator[Probe]:
    """Pick, per attribute, the first candidate every check on it accepts; then the
    request for each acceptable peer. Checks the client cannot steer (destination.ip,
    connection.sni, filter metadata) are left to the evaluator."""
    for port in ports:
        number = port.number
        if not _accepts(by_dim.get("port", ()), "port", number, wp, number, mode):
            continue
        chosen: dict[str, Any] = {}
        for dim, options in candidates.items():
            if dim in ("port", "principal"):
                continue
            checks = by_dim.get(dim, ())
            for value in options:
                # No X-Forwarded-For: the client address is the peer address.
                tested = chosen.get("source_ip") if dim == "remote_ip" and value is None else value
                if _accepts(checks, dim, tested, wp, number, mode):
                    chosen[dim] = value
                    break
            else:
                break  # nothing satisfies every rule on this attribute
        else:
            checks = by_dim.get("principal", ())
            accepted = (
                v
                for v in candidates["principal"]
                if _accepts(checks, "principal", v, wp, number, mode)
            )
            yield from _probes(chosen, list(islice(accepted, MAX_SOURCES)), port)


def _probes(
    chosen: Mapping[str, Any], peers: Sequence[str | None], port: WorkloadPort
) -> Iterator[Probe]:
    headers = [
        (dim[len("header:") :], value)
        for dim, value in sorted(chosen.items())
        if dim.startswith("header:") and value is not None
    ]
    source_ip, remote_ip = chosen["source_ip"], chosen["remote_ip"]
    if remote_ip is not None and remote_ip != source_ip:
        headers.append(("x-forwarded-for", str(remote_ip)))
    ip = str(source_ip) if source_ip is not None else None
    for peer in peers:
        source = Source.plaintext(ip) if peer is None else Source.principal(peer, ip)
        yield Probe(
            source,
            port,
            chosen["method"],
            chosen["path"],
            chosen["host"],
            tuple(headers),
            chosen["token"],
        )


def bypass_probes(
    ctx: AnalysisContext,
    wp: WorkloadPolicy,
    denying: Requirement,
    variant: Mapping[str, str],
    *,
    path: str | None = None,
    host: str | None = None,
) -> Iterator[Probe]:
    """Requests ``denying`` matches, shaped so that the ``variant`` attributes (path or
    host) of the same request would be admitted by one of the workload's ALLOW rules.

    Without an ALLOW policy every request no DENY matches is allowed: the rule alone
    shapes the request. The probes come lazily; a caller stops at its first proof.
    """
    allow = wp.authz.allow
    if not allow.applies:
        yield from probes_matching(ctx, wp, [denying], path=path, host=host)
        return
    overrides = tuple(sorted(variant.items()))
    mode = ctx.mesh.path_normalization
    tried = 0
    for rule in allow.http.rules:
        if tried >= _MAX_ALLOW_RULES:
            break
        if not _admits_variant(rule, overrides, wp, mode):
            continue
        tried += 1
        yield from probes_matching(
            ctx, wp, [denying, Requirement(rule, None, overrides)], path=path, host=host
        )


def allowed_probes(
    ctx: AnalysisContext, wp: WorkloadPolicy, *, path: str | None = None
) -> Iterator[Probe]:
    """Requests with ``path`` that one of the workload's ALLOW rules admits (any request
    when no ALLOW policy applies)."""
    allow = wp.authz.allow
    if not allow.applies:
        yield from probes_matching(ctx, wp, [], path=path)
        return
    for rule in list(allow.http.rules)[:_MAX_ALLOW_RULES]:
        yield from probes_matching(ctx, wp, [Requirement(rule)], path=path)


def _admits_variant(
    rule: CompiledRule, overrides: tuple[tuple[str, str], ...], wp: WorkloadPolicy, mode: Any
) -> bool:
    """Can some ``to`` entry of ``rule`` admit the varied path / host at all?"""
    if rule.operations is None:
        return True
    fixed = dict(overrides)
    port = wp.workload.ports[0] if wp.workload.ports else 0
    return any(
        all(
            c.test(_attributes(dim, fixed[dim], wp, port, mode))
            for c in clause
            if (dim := dimension(c)) in fixed
        )
        for clause in rule.operations
    )


_DECISIONS: Derived[AnalysisContext, tuple[str, Probe], Decision | None] = Derived("decisions")
_PROBE_MESH: Derived[AnalysisContext, None, MeshPolicy] = Derived("probe mesh", _probe_mesh)
# (workload, required rules, path, host) → the candidate requests.
_PROBES: Derived[AnalysisContext, tuple[object, ...], list[Probe]] = Derived("probes")
