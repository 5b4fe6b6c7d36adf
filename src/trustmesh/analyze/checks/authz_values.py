"""Authorization values that can never match what they seem to name (TM-AUTHZ-009, 012).

A value that matches nothing is silent in Istio: no error, no log, the rule just never
applies. What that costs depends on where the value sits. In a DENY (or CUSTOM) rule the
requests it was meant to catch get through: a hole. In an ALLOW rule the requests it was
meant to admit are denied: the policy fails closed. In a negative field (``notPaths``,
``notValues``…) it is the other way round: an exclusion that excludes nothing makes a DENY
deny more, and an ALLOW allow what it was meant to keep out. Every finding says which, and
its severity follows.

- TM-AUTHZ-009: identities that do not exist (namespace, service account, trust domain),
  and values with a ``*`` anywhere but at the start or end, which Istio matches literally
  (``cluster.local/ns/*/sa/sleep``, ``/api/*/admin``, ``api.*.example.com``).
- TM-AUTHZ-013: values no request can carry after Envoy has parsed and normalized it: a
  method that is not upper-case, a path without a leading ``/`` or in a form normalization
  rewrites, a port the selected workloads do not expose, a host that is a URL or names
  another Service, a request principal of an issuer no RequestAuthentication accepts.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from trustmesh.analyze.checks.authz_scope import (
    Policy,
    exposed,
    label,
    policies,
    refs,
    workload_ports,
)
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue
from trustmesh.analyze.findings import Severity as S
from trustmesh.analyze.registry import rule
from trustmesh.api import models as m
from trustmesh.api.validation import is_dry_run_annotated
from trustmesh.policy import matchers as mt
from trustmesh.policy.authz import rule_name
from trustmesh.policy.compose import WorkloadPolicy
from trustmesh.policy.evaluate import HTTP1_METHODS
from trustmesh.policy.pathnorm import PathNormalization, PathRejected, normalize_path

FieldPath = tuple[str | int, ...]

# --- what a value that never matches costs, by action and polarity ---------------------


def effect(
    policy: Policy, *, negative: bool, whole_rule: bool, certain: bool = True
) -> tuple[S, str]:
    """Severity and consequence of a value in ``policy`` that never matches."""
    action: m.Action = policy.spec.action
    if action is m.Action.AUDIT:
        return S.INFO, "those requests are not audited"
    opens = (action is not m.Action.ALLOW) != negative
    if action is m.Action.CUSTOM:
        text = (
            "the external authorizer is never asked about those requests: a hole"
            if opens
            else "the external authorizer is asked about more requests than meant"
        )
    elif negative:
        text = (
            "the exclusion excludes nothing, so the ALLOW admits what it was meant to keep out:"
            " a hole"
            if opens
            else "the exclusion excludes nothing, so the DENY denies more than meant (fails closed)"
        )
    elif opens:
        text = (
            "this DENY rule never denies anything: the requests it targets get through (a hole)"
            if whole_rule
            else "the DENY does not catch the requests this value was meant to: a hole"
        )
    else:
        text = (
            "this ALLOW rule never allows anything: the traffic it was written for is denied"
            " unless another rule allows it (fails closed)"
            if whole_rule
            else "the ALLOW does not admit the requests this value was meant to (fails closed)"
        )
    if is_dry_run_annotated(policy):
        return S.INFO, text + "; the policy is dry-run, so nothing is enforced yet"
    if not opens:
        return S.INFO, text
    return (S.ERROR if whole_rule and certain else S.WARNING), text


# --- TM-AUTHZ-009 ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reference:
    path: FieldPath  # relative to the spec
    kind: str  # "principal" | "namespace" | "serviceAccount"
    value: str


_SOURCE_IDENTITIES = (
    ("principals", "principal"),
    ("notPrincipals", "principal"),
    ("namespaces", "namespace"),
    ("notNamespaces", "namespace"),
    ("serviceAccounts", "serviceAccount"),
    ("notServiceAccounts", "serviceAccount"),
)
_CONDITION_IDENTITIES = {
    "source.principal": "principal",
    "source.namespace": "namespace",
    "source.serviceAccount": "serviceAccount",
}


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


def _references(policy: Policy) -> Iterator[_Reference]:
    """Every identity a policy names, in ``from`` sources and ``when`` conditions."""
    spec: m.AuthorizationPolicySpec = policy.spec
    for i, r in enumerate(spec.rules or ()):
        for j, f in enumerate(r.from_):
            for name, kind in _SOURCE_IDENTITIES:
                for k, value in enumerate(getattr(f.source, _snake(name))):
                    yield _Reference(("rules", i, "from", j, "source", name, k), kind, value)
        for j, c in enumerate(r.when):
            kind = _CONDITION_IDENTITIES.get(c.key, "")
            for name, values in (("values", c.values), ("notValues", c.not_values)):
                for k, value in enumerate(values if kind else ()):
                    yield _Reference(("rules", i, "when", j, name, k), kind, value)


@dataclass(frozen=True, slots=True)
class _Value:
    """One string value of a rule, where it is written and whether it is a negative form."""

    path: FieldPath  # relative to the spec
    field: str  # "paths", "when[request.headers[x]]", …
    value: str
    negative: bool


# Fields whose values are Istio string matches (exact, prefix*, *suffix, * present).
# Namespaces are a regex where every `*` is `.*`; service accounts allow none at all (a
# validation error); addresses and ports are not strings.
_STRING_SOURCE = ("principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals")
_STRING_OPERATION = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_NON_STRING_KEYS = frozenset(
    {
        "source.namespace",
        "source.serviceAccount",
        "source.ip",
        "remote.ip",
        "destination.ip",
        "destination.port",
    }
)


def _string_values(policy: Policy) -> Iterator[_Value]:
    spec: m.AuthorizationPolicySpec = policy.spec
    for i, r in enumerate(spec.rules or ()):
        for j, f in enumerate(r.from_):
            for name in _STRING_SOURCE:
                for k, value in enumerate(getattr(f.source, _snake(name))):
                    path: FieldPath = ("rules", i, "from", j, "source", name, k)
                    yield _Value(path, name, value, name.startswith("not"))
        for j, t in enumerate(r.to):
            for name in _STRING_OPERATION:
                for k, value in enumerate(getattr(t.operation, _snake(name))):
                    path = ("rules", i, "to", j, "operation", name, k)
                    yield _Value(path, name, value, name.startswith("not"))
        for j, c in enumerate(r.when):
            if c.key in _NON_STRING_KEYS:
                continue
            for name, values in (("values", c.values), ("notValues", c.not_values)):
                for k, value in enumerate(values):
                    path = ("rules", i, "when", j, name, k)
                    yield _Value(path, f"when[{c.key}]", value, name == "notValues")


def literal_star(value: str) -> bool:
    """Is a ``*`` in ``value`` matched as a character? (Only a leading or trailing one, or
    ``*`` alone, is a wildcard; ``{*}`` / ``{**}`` path templates are handled apart.)"""
    if "*" not in value or value == "*":
        return False
    return value.count("*") > 1 or not (value.startswith("*") or value.endswith("*"))


def _meant(item: _Value) -> str:
    """What a value with a literal ``*`` was probably meant to be."""
    value = item.value
    if item.field in ("paths", "notPaths") and value.startswith("/"):
        segments = value.split("/")
        if all("*" not in s or s in ("*", "**") for s in segments):
            templated = "/".join(
                "{**}" if s == "**" else "{*}" if s == "*" else s for s in segments
            )
            if "{**}" not in templated or templated.endswith("{**}"):
                return f'the URI template "{templated}" (`{{*}}` is one segment, `{{**}}` the rest)'
    head, tail = value[: value.index("*")], value[value.rindex("*") + 1 :]
    options = []
    if head:
        options.append(f'the prefix "{head}*"')
    if tail:
        options.append(f'the suffix "*{tail}"')
    return " or ".join(options) + " (a `*` only works at the start or end), or list the values"


@rule(
    "TM-AUTHZ-009",
    title="Policy value that matches nothing: unknown namespace, service account or trust "
    "domain, or a `*` in the middle",
    severity=S.INFO,
    family="authz",
    rationale="An identity that exists nowhere never matches: an ALLOW entry for it lets no "
    "one in, a DENY entry keeps no one out, and a principal in a trust domain that is neither "
    "the mesh's nor an alias never matches at all (often left over from a trust-domain change). "
    "Istio has no middle wildcard: `*` works only at the start or the end of a value (and as "
    "`{*}` / `{**}` in paths); anywhere else it is an exact match on the character `*`.",
)
def dangling_references(ctx: AnalysisContext) -> Iterator[Issue]:
    domains = set(ctx.mesh.bundle.domains) | {"cluster.local"}
    namespaces = ctx.namespaces()
    judge_namespaces = bool(ctx.snapshot.namespace_labels)  # the input lists namespaces
    accounts: dict[str, set[str]] = defaultdict(set)
    for r in ctx.resources("ServiceAccount"):
        accounts[r.namespace].add(r.name)
    for w in ctx.snapshot.workloads:
        accounts[w.namespace].add(w.service_account)
    for policy in policies(ctx):
        targets = refs(exposed(ctx, policy))
        yield from _literal_stars(policy, targets)
        for ref in _references(policy):
            if "*" in ref.value:
                # A prefix/suffix namespace pattern that no namespace of the input matches
                # today is as dead as a misspelt name (istioctl's IST0101 says the same).
                if (
                    ref.kind == "namespace"
                    and judge_namespaces
                    and ref.value != "*"
                    and not any(_pattern_matches(ref.value, ns) for ns in namespaces)
                ):
                    yield Issue(
                        message=(
                            f"namespace pattern {ref.value!r} in {label(policy)} matches"
                            " no namespace of the inputs: it matches no workload today"
                        ),
                        location=policy.location(*ref.path),
                        resource=policy.key,
                        workloads=targets,
                        fix="Correct the pattern, or remove it if those namespaces are gone.",
                    )
                continue  # other wildcards match whatever exists; misplaced ones: above
            domain, namespace, account = _identity(ref, policy.namespace)
            if ref.kind == "principal" and namespace is None:
                continue  # not a SPIFFE-style principal: nothing to compare with
            problem, severity, fix = "", None, ""
            if domain is not None and domain not in domains:
                problem = (
                    f"trust domain {domain!r} is neither the mesh trust domain"
                    f" ({ctx.snapshot.mesh.trust_domain}) nor an alias: it never matches"
                )
                severity = S.WARNING
                fix = f"meshConfig:\n  trustDomainAliases: [{domain}]\n"
            elif judge_namespaces and namespace is not None and namespace not in namespaces:
                problem = f"namespace {namespace!r} does not exist: it matches no workload today"
            elif (
                account is not None
                and namespace in namespaces
                and accounts.get(namespace or "")
                and account != "default"
                and account not in accounts[namespace or ""]
            ):
                problem = (
                    f"service account {namespace}/{account} does not exist (no ServiceAccount or"
                    " workload uses it): it matches no workload today"
                )
            if not problem:
                continue
            yield Issue(
                message=f"{ref.kind} {ref.value!r} in {label(policy)}: {problem}",
                location=policy.location(*ref.path),
                resource=policy.key,
                workloads=targets,
                fix=fix or "Correct the reference, or remove it if the identity is gone.",
                severity=severity,
            )


def _pattern_matches(pattern: str, value: str) -> bool:
    """Istio's string match for a namespace: exact, `*`, `prefix*` or `*suffix`."""
    if pattern == "*":
        return bool(value)
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _literal_stars(policy: Policy, targets: tuple[str, ...]) -> Iterator[Issue]:
    for item in _string_values(policy):
        if not literal_star(item.value):
            continue
        if item.field in ("paths", "notPaths") and mt.is_path_template(item.value):
            continue  # URI templates have their own syntax (validated)
        severity, consequence = effect(policy, negative=item.negative, whole_rule=False)
        where = rule_name(policy.namespace, policy.name, int(item.path[1]))
        yield Issue(
            message=(
                f"{item.field} value {item.value!r} in {where}: Istio has no wildcard in the"
                " middle of a value, so it matches only the literal text with a `*` in it;"
                f" {consequence}"
            ),
            location=policy.location(*item.path),
            resource=policy.key,
            workloads=targets,
            fix=f"Probably meant {_meant(item)}.",
            severity=severity,
        )


def _identity(ref: _Reference, policy_namespace: str) -> tuple[str | None, str | None, str | None]:
    """(trust domain, namespace, service account) named by a reference; None = not named."""
    if ref.kind == "namespace":
        return None, ref.value, None
    if ref.kind == "serviceAccount":
        namespace, _, account = ref.value.rpartition("/")
        return None, namespace or policy_namespace, account
    parts = ref.value.split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return parts[0], parts[2], parts[4]
    return None, None, None


# --- TM-AUTHZ-013 ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Dead:
    """Why a value never matches, what was probably meant, and how sure that is."""

    reason: str
    meant: str = ""
    certain: bool = True  # False: judged from declared ports, which may not be all


def _method(value: str) -> _Dead | None:
    if "*" in value or value in HTTP1_METHODS:
        return None
    if value.startswith("/"):
        return _Dead(
            "gRPC calls are always POST: the method name is in the path",
            f'paths: ["{value}"] (with methods: ["POST"] if you want it explicit)',
        )
    if value.upper() in HTTP1_METHODS:
        return _Dead(
            "methods match case-sensitively and clients send them upper-case; Envoy's HTTP/1"
            f" codec refuses a request whose method is {value!r} (400), so only an unusual"
            " HTTP/2 client could send it",
            f'"{value.upper()}"',
        )
    return None  # an extension method (FOO): HTTP/2 clients can send it


_HOST_PORT = re.compile(r"^(?P<host>\[[^\]]*\]|[^:]*)(?::(?P<port>.*))?$")


def _path(value: str, mode: PathNormalization) -> _Dead | None:
    if mt.is_path_template(value):
        if value.startswith("/"):
            return None
        return _Dead("request paths always start with `/`", f'"/{value}"')
    if value == "*" or literal_star(value):
        return None  # anything, or a misplaced `*` (TM-AUTHZ-009)
    head = value[1:] if value.startswith("*") else value
    if "?" in head:
        return _Dead("paths are matched without the query string", f'"{value.split("?", 1)[0]}"')
    if "#" in head:
        return _Dead("Envoy refuses requests with a fragment in the path (400)")
    if value.startswith("*"):
        suffix = value[1:]
        probe = "/x" + suffix
        try:
            seen = normalize_path(probe, mode).path
        except PathRejected:
            return _Dead("Envoy refuses such paths (400)")
        if not seen.endswith(suffix):
            return _Dead(f"Envoy normalizes a path ending in it ({probe} → {seen}, {mode.value})")
        return None
    prefix = value.endswith("*")
    text = value[:-1] if prefix else value
    if not text.startswith("/"):
        return _Dead(
            "request paths always start with `/` (after normalization)",
            f'"/{value}"',
        )
    probe = text + "x" if prefix else text
    try:
        seen = normalize_path(probe, mode).path
    except PathRejected:
        return _Dead("Envoy refuses such paths (400) before any policy runs")
    if prefix and not seen.startswith(text):
        meant = seen[:-1] + "*" if seen.endswith("x") else ""
        return _Dead(
            f"Envoy normalizes such paths before RBAC ({probe} → {seen}, pathNormalization"
            f" {mode.value}), so none starts with it",
            f'"{meant}"' if meant else "",
        )
    if not prefix and seen != text:
        return _Dead(
            f"Envoy normalizes it to {seen} before RBAC (pathNormalization {mode.value})",
            f'"{seen}"',
        )
    return None


def _host(ctx: AnalysisContext, value: str, targets: Sequence[WorkloadPolicy]) -> _Dead | None:
    if value == "*":
        return None
    if "://" in value:
        host = value.split("://", 1)[1].split("/", 1)[0]
        return _Dead("hosts match the Host header (an authority), never a URL", f'"{host}"')
    if "/" in value:
        return _Dead("the Host header has no path", f'"{value.split("/", 1)[0]}"')
    if any(c.isspace() for c in value):
        return _Dead("the Host header has no white space")
    parts = _HOST_PORT.match(value)
    if parts is None or "*" in value:
        return None
    port = parts.group("port")
    if port is not None and port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
        return _Dead(f"{port!r} is not a port, so no Host header carries it")
    return _other_service(ctx, parts.group("host").lower(), port, targets)


def _other_service(
    ctx: AnalysisContext, host: str, port: str | None, targets: Sequence[WorkloadPolicy]
) -> _Dead | None:
    """A Kubernetes Service name (``svc.ns[.svc[.domain]]``) whose requests go elsewhere."""
    labels = host.split(".")
    if len(labels) < 2 or (len(labels) > 2 and labels[2] != "svc") or not targets:
        return None
    name, namespace = labels[0], labels[1]
    service = next(
        (s for s in ctx.snapshot.services if (s.name, s.namespace) == (name, namespace)), None
    )
    if service is None:
        return None
    backends = [wp.workload.ref for wp in targets if service.selects(wp.workload)]
    if not backends:
        behind = sorted(w.ref for w in ctx.snapshot.workloads if service.selects(w)) or [
            "no workload in the inputs"
        ]
        return _Dead(
            f"it names Service {namespace}/{name}, whose requests mesh clients route to"
            f" {', '.join(behind)}, never to the workloads this policy applies to"
        )
    if port is not None and port.isdigit() and int(port) not in {p.port for p in service.ports}:
        ports = ", ".join(str(p.port) for p in service.ports)
        return _Dead(
            f"Service {namespace}/{name} has no port {port} (ports: {ports}), so no client"
            " sends that Host",
            ", ".join(f'"{name}.{namespace}:{p.port}"' for p in service.ports),
        )
    return None


def _port(ctx: AnalysisContext, value: str, targets: Sequence[WorkloadPolicy]) -> _Dead | None:
    if not value.isdigit() or not targets:
        return None
    declared = [workload_ports(ctx, wp) for wp in targets]
    if not all(declared):
        return None  # a workload declares no port: nothing to compare with
    number = int(value)
    if any(p.number == number for ports in declared for p in ports):
        return None
    behind_service = sorted(
        {p.number for ports in declared for p in ports if p.service_port == number}
    )
    exposed_ports = sorted({p.number for ports in declared for p in ports})
    meant = ", ".join(f'"{n}"' for n in behind_service)
    why = (
        f"policies match the workload's (target) port, and Service port {number} leads to"
        f" {', '.join(map(str, behind_service))}"
        if behind_service
        else f"the workloads it applies to expose {', '.join(map(str, exposed_ports))}"
        " (container and Service target ports)"
    )
    return _Dead(f"no workload it applies to listens on {number}: {why}", meant, certain=False)


def _request_principal(value: str, targets: Sequence[WorkloadPolicy]) -> _Dead | None:
    if "*" in value:
        return None
    issuer, slash, _subject = value.rpartition("/")
    if not slash:
        return _Dead(
            "a request principal is `<issuer>/<subject>`; without a `/` it matches only a"
            ' token whose subject is empty (`"sub": ""`), which real tokens do not carry',
            f'"<issuer>/{value}" or "*/{value}"',
        )
    if not targets or not all(wp.jwt_providers for wp in targets):
        return None  # no RequestAuthentication at all: TM-AUTHN-002
    issuers = sorted({p.issuer for wp in targets for p in wp.jwt_providers})
    if issuer in issuers:
        return None
    close = [i for i in issuers if i.rstrip("/") == issuer.rstrip("/")]
    return _Dead(
        f"no RequestAuthentication of the workloads it applies to accepts issuer {issuer!r}"
        f" (they accept {', '.join(issuers)}): such a token is rejected (401)",
        f'"{close[0]}/{_subject}"' if close else "",
    )


def _principal(value: str, policy_namespace: str) -> _Dead | None:
    if "*" in value:
        return None
    if value.startswith("spiffe://"):
        return _Dead(
            "principals are written without `spiffe://` (Istio adds it)",
            f'"{value.removeprefix("spiffe://")}"',
        )
    slashes = value.count("/")
    if slashes >= 4:
        return None
    if slashes == 1:
        namespace, account = value.split("/")
        meant = f'"cluster.local/ns/{namespace}/sa/{account}" (or serviceAccounts: ["{value}"])'
    elif slashes == 0:
        meant = f'"cluster.local/ns/{policy_namespace}/sa/{value}"'
    else:
        meant = ""
    return _Dead(
        "mesh identities have the form `<trust-domain>/ns/<namespace>/sa/<account>`", meant
    )


def _dead(
    ctx: AnalysisContext,
    policy: Policy,
    field: str,
    value: str,
    targets: Sequence[WorkloadPolicy],
    *,
    negative: bool,
) -> _Dead | None:
    base = field.removeprefix("not")
    base = base[0].lower() + base[1:]
    if base == "methods":
        return _method(value)
    if base == "paths":
        return _path(value, ctx.mesh.path_normalization)
    if base == "hosts":
        return _host(ctx, value, targets)
    if base == "ports" or field == "when[destination.port]":
        # An excluded port nothing listens on excludes nothing that could arrive.
        return None if negative else _port(ctx, value, targets)
    if base == "requestPrincipals" or field == "when[request.auth.principal]":
        return _request_principal(value, targets)
    if base == "principals" or field == "when[source.principal]":
        return _principal(value, policy.namespace)
    return None


_OPERATION_FIELDS = (
    "hosts",
    "notHosts",
    "ports",
    "notPorts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
)
_SOURCE_FIELDS = ("principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals")
_CHECKED_KEYS = ("destination.port", "request.auth.principal", "source.principal")


@dataclass(frozen=True, slots=True)
class _Entry:
    """One ``from`` / ``to`` entry or ``when`` condition and its dead values."""

    dead: list[tuple[_Value, _Dead]]
    killers: frozenset[str]  # positive fields whose every value is dead: never matches

    @property
    def killed(self) -> bool:
        return bool(self.killers)


def _entries(
    ctx: AnalysisContext, policy: Policy, i: int, r: m.Rule, targets: Sequence[WorkloadPolicy]
) -> tuple[list[_Entry], list[_Entry], list[_Entry]]:
    def entry(base: FieldPath, model: Any, fields: Sequence[str]) -> _Entry:
        dead: list[tuple[_Value, _Dead]] = []
        killers: set[str] = set()
        for name in fields:
            values: tuple[str, ...] = getattr(model, _snake(name))
            found = [
                (_Value((*base, name, k), name, v, name.startswith("not")), d)
                for k, v in enumerate(values)
                if (d := _dead(ctx, policy, name, v, targets, negative=name.startswith("not")))
                is not None
            ]
            dead += found
            if values and not name.startswith("not") and len(found) == len(values):
                killers.add(name)
        return _Entry(dead, frozenset(killers))

    froms = [
        entry(("rules", i, "from", j, "source"), f.source, _SOURCE_FIELDS)
        for j, f in enumerate(r.from_)
    ]
    tos = [
        entry(("rules", i, "to", j, "operation"), t.operation, _OPERATION_FIELDS)
        for j, t in enumerate(r.to)
    ]
    whens: list[_Entry] = []
    for j, c in enumerate(r.when):
        if c.key not in _CHECKED_KEYS:
            continue
        field = f"when[{c.key}]"
        dead: list[tuple[_Value, _Dead]] = []
        killers: frozenset[str] = frozenset()
        for name, values in (("values", c.values), ("notValues", c.not_values)):
            found = [
                (_Value(("rules", i, "when", j, name, k), field, v, name == "notValues"), d)
                for k, v in enumerate(values)
                if (d := _dead(ctx, policy, field, v, targets, negative=name == "notValues"))
                is not None
            ]
            dead += found
            if name == "values" and values and len(found) == len(values):
                killers = frozenset({field})
        whens.append(_Entry(dead, killers))
    return froms, tos, whens


@rule(
    "TM-AUTHZ-013",
    title="AuthorizationPolicy value that can never match (method case, path form, port, "
    "host, issuer)",
    severity=S.WARNING,
    family="authz",
    rationale="Rules match what Envoy sees after parsing and normalizing a request: upper-case "
    "methods, paths that start with `/` with dot segments resolved and no query, the "
    "workload's own target ports, a Host header naming the service called, tokens of issuers "
    "a RequestAuthentication accepts. A value outside that never matches: in a DENY rule the "
    "requests it targets get through (a hole); in an ALLOW rule the traffic it was written "
    "for is denied (fails closed).",
)
def never_matching_values(ctx: AnalysisContext) -> Iterator[Issue]:
    for policy in policies(ctx):
        spec: m.AuthorizationPolicySpec = policy.spec
        targets = exposed(ctx, policy)
        workloads = refs(targets)
        for i, r in enumerate(spec.rules or ()):
            froms, tos, whens = _entries(ctx, policy, i, r, targets)
            whole = (
                (bool(froms) and all(e.killed for e in froms))
                or (bool(tos) and all(e.killed for e in tos))
                or any(e.killed for e in whens)
            )
            for entry in (*froms, *tos, *whens):
                for item, dead in entry.dead:
                    # "The rule never matches" is said by the values that make it so.
                    kills = whole and item.field in entry.killers
                    severity, consequence = effect(
                        policy, negative=item.negative, whole_rule=kills, certain=dead.certain
                    )
                    yield _never_issue(policy, i, item, dead, severity, consequence, workloads)


def _never_issue(
    policy: Policy,
    index: int,
    item: _Value,
    dead: _Dead,
    severity: S,
    consequence: str,
    workloads: tuple[str, ...],
) -> Issue:
    where = rule_name(policy.namespace, policy.name, index)
    return Issue(
        message=(
            f"{item.field} value {item.value!r} in {policy.spec.action.value} {where} can"
            f" never match: {dead.reason}; {consequence}"
        ),
        location=policy.location(*item.path),
        resource=policy.key,
        workloads=workloads,
        fix=f"Probably meant {dead.meant}." if dead.meant else "Correct or remove it.",
        severity=severity,
    )
