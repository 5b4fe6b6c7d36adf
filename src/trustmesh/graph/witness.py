"""Example requests for a conditional edge, decided by the real evaluator.

A clause says which requests a rule admits (``method GET and path /api*``); a request
is built that satisfies it and, where it can, none of the denying clauses, and then the
evaluator — not this module — decides it. For every attribute the candidates are the
values the rules name (``/api*`` → ``/api``, ``*.css`` → ``/x.css``) and neutral ones;
the first one every atom of the clause accepts, falsifying most denying atoms, is taken.

End-user JWTs: nobody's signing key is at hand, so the example is evaluated against a
copy of the mesh in which every JWT provider also trusts one graph probe key, and the
token is signed with it: it stands for "a valid token of that issuer with these claims",
which is exactly what a ``requestPrincipals`` / ``request.auth.claims`` rule admits.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jwt as pyjwt

from trustmesh.graph.model import Atom, Clause, Example
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.decision import Decision, RequestError, Verdict
from trustmesh.policy.evaluate import HTTP1_METHODS, evaluate
from trustmesh.policy.jwt import JwtProvider
from trustmesh.policy.pathnorm import PathNormalization, PathRejected, normalize_path
from trustmesh.policy.request import Attributes, HttpRequest, IpAddress, Request, Source

_KEY_ID = "trustmesh-graph-probe"
_SECRET = b"trustmesh graph: example tokens, never a real credential"
_SUBJECT = "graph-user"
_OUTSIDER = ipaddress.ip_address("203.0.113.9")
_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
_TOKEN_ATTRIBUTES = ("request principal", "JWT ")


@dataclass(frozen=True, slots=True)
class Token:
    issuer: str
    subject: str
    claims_json: str = "{}"

    def describe(self) -> str:
        claims = json.loads(self.claims_json)
        extra = ", ".join(f"{k}={v}" for k, v in sorted(claims.items()))
        return f"a valid JWT {self.issuer}/{self.subject}" + (f" ({extra})" if extra else "")


@dataclass(frozen=True, slots=True)
class Shape:
    """The request attributes an example chooses."""

    method: str = "GET"
    path: str = "/"
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    remote_ip: IpAddress | None = None
    source_ip: IpAddress | None = None
    token: Token | None = None

    def describe(self) -> str:
        parts = [f"{self.method} {self.path}"]
        if self.host is not None:
            parts.append(f"Host {self.host}")
        parts += [f"{name}: {value}" for name, value in self.headers]
        if self.remote_ip is not None:
            parts.append(f"x-forwarded-for: {self.remote_ip}")
        if self.source_ip is not None:
            parts.append(f"from {self.source_ip}")
        if self.token is not None:
            parts.append("with " + self.token.describe())
        return ", ".join(parts)


class Examples:
    """Builds and decides example requests to one destination of one mesh."""

    def __init__(self, mesh: MeshPolicy, now: float) -> None:
        self.mesh = mesh
        self.now = now
        self._probe_mesh: MeshPolicy | None = None

    def decide(
        self,
        source: Source,
        target: WorkloadPolicy,
        port: int,
        host: str,
        satisfy: Clause | None,
        avoid: Sequence[Clause],
        *,
        is_http: bool = True,
    ) -> Example | None:
        """The evaluator's answer for a request meeting ``satisfy`` (any request: None)
        and, where possible, none of ``avoid``; for TCP only the source address varies.
        None: no such request could be built."""
        shape = self.shape(target, port, host, satisfy.atoms if satisfy else (), avoid)
        if shape is None:
            return None
        decision = self._evaluate(source, target, port, host, shape, is_http)
        if decision is None:
            return None
        shown = shape.describe() if is_http else f"TCP connection from {shape.source_ip}"
        return Example(shown, decision.verdict.value, decision.rule)

    def shape(
        self,
        target: WorkloadPolicy,
        port: int,
        host: str,
        required: Sequence[Atom],
        avoid: Sequence[Clause],
    ) -> Shape | None:
        by_attribute: dict[str, list[Atom]] = {}
        for atom in required:
            by_attribute.setdefault(_family(atom), []).append(atom)
        avoided: dict[str, list[tuple[int, Atom]]] = {}
        for index, clause in enumerate(avoid):
            for atom in clause.atoms:
                avoided.setdefault(_family(atom), []).append((index, atom))
        mode = self.mesh.path_normalization
        chosen: dict[str, Any] = {}
        families = set(by_attribute) | set(avoided)
        for family in sorted(families):
            options = _candidates(
                family,
                [*by_attribute.get(family, ()), *(a for _, a in avoided.get(family, ()))],
                target,
            )
            best: tuple[int, Any] | None = None
            for value in options:
                attrs = _attributes(family, value, host, port, mode)
                if attrs is None or not all(a.test(attrs) for a in by_attribute.get(family, ())):
                    continue
                falsified = len({i for i, a in avoided.get(family, ()) if not a.test(attrs)})
                if best is None or falsified > best[0]:
                    best = (falsified, value)
            if best is None:
                return None
            chosen[family] = best[1]
        headers = tuple(
            (family[len("header ") :], value)
            for family, value in sorted(chosen.items())
            if family.startswith("header ") and value is not None
        )
        token = chosen.get("token")
        if token is not None and not target.jwt_providers:
            return None  # no RequestAuthentication: no token is ever validated
        return Shape(
            method=chosen.get("method", "GET"),
            path=chosen.get("path", "/"),
            host=chosen.get("host"),
            headers=headers,
            remote_ip=chosen.get("remote"),
            source_ip=chosen.get("source"),
            token=token,
        )

    def _evaluate(
        self,
        source: Source,
        target: WorkloadPolicy,
        port: int,
        host: str,
        shape: Shape,
        is_http: bool,
    ) -> Decision | None:
        mesh = self.mesh if shape.token is None else self.probe_mesh()
        headers = list(shape.headers)
        path = shape.path
        if shape.remote_ip is not None:
            headers.append(("x-forwarded-for", str(shape.remote_ip)))
        if shape.token is not None:
            provider = next(
                (p for p in target.jwt_providers if p.issuer == shape.token.issuer), None
            )
            if provider is None:
                return None
            headers, path = _place(provider, _sign(shape.token), headers, path)
        if shape.source_ip is not None:
            source = replace(source, ip=str(shape.source_ip))
        http: HttpRequest | None = None
        if is_http:
            http = HttpRequest(shape.method, path, shape.host or host, tuple(headers))
        try:
            return evaluate(mesh, Request(source, target.workload.ref, port, http), now=self.now)
        except RequestError:
            return None

    def probe_mesh(self) -> MeshPolicy:
        """The mesh with every JWT provider also trusting the probe key."""
        if self._probe_mesh is None:
            secret = base64.urlsafe_b64encode(_SECRET).rstrip(b"=").decode()
            jwk = pyjwt.PyJWK({"kty": "oct", "k": secret, "alg": "HS256", "kid": _KEY_ID})
            shared: dict[int, tuple[JwtProvider, ...]] = {}
            workloads: dict[str, WorkloadPolicy] = {}
            for ref, policy in self.mesh.workloads.items():
                providers = policy.jwt_providers
                if providers:
                    if id(providers) not in shared:
                        shared[id(providers)] = tuple(
                            replace(p, keys=(*(p.keys or ()), jwk), jwks_problem="")
                            for p in providers
                        )
                    policy = replace(policy, jwt_providers=shared[id(providers)])
                workloads[ref] = policy
            self._probe_mesh = replace(self.mesh, workloads=workloads)
        return self._probe_mesh


def _family(atom: Atom) -> str:
    attribute = atom.attribute
    if attribute.startswith(_TOKEN_ATTRIBUTES):
        return "token"
    if attribute.startswith("remote ip"):
        return "remote"
    if attribute == "source ip":
        return "source"
    return attribute  # method, path, host, header NAME


def _sample(value: str) -> str:
    """A value an Istio string match accepts: ``a*`` → ``a``, ``*a`` → ``xa``, ``*`` → ``x``."""
    if value == "*":
        return "x"
    if value.endswith("*"):
        return value[:-1]
    if value.startswith("*"):
        return "x" + value[1:]
    return value


def _sample_path(value: str) -> str:
    if value in ("*", "/*"):
        return "/"
    if "{" in value:
        return value.replace("{**}", "x").replace("{*}", "x")
    if value.startswith("*"):
        return "/x" + value[1:]
    return value[:-1] if value.endswith("*") else value


def _addresses(cidrs: Iterable[str]) -> list[IpAddress]:
    out: list[IpAddress] = []
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue
        out.append(network.network_address + 1 if network.num_addresses > 2 else network[0])
    return out


def _candidates(family: str, atoms: Sequence[Atom], target: WorkloadPolicy) -> list[Any]:
    values = [v for a in atoms for v in a.values]
    if family == "method":
        return [v for v in dict.fromkeys([*values, *_METHODS]) if v in HTTP1_METHODS]
    if family == "path":
        return list(dict.fromkeys([*(_sample_path(v) for v in values), "/", "/x", "/graph-probe"]))
    if family == "host":
        return [None, *dict.fromkeys(_sample(v) for v in values)]
    if family.startswith("header "):
        return [None, *dict.fromkeys(_sample(v) for v in values), "graph-probe"]
    if family == "remote":
        return [None, *dict.fromkeys(_addresses(values)), _OUTSIDER]
    if family == "source":
        return [*dict.fromkeys(_addresses(values)), _OUTSIDER]
    if family == "token":
        return [None, *_tokens(atoms, target.jwt_providers)]
    return [None]


def _tokens(atoms: Sequence[Atom], providers: Sequence[JwtProvider]) -> list[Token]:
    """Tokens of each provider's issuer carrying the subjects and claims the atoms name."""
    issuers = list(dict.fromkeys(p.issuer for p in providers))
    subjects: dict[str, list[str]] = {}
    claims: dict[str, Any] = {}
    for atom in atoms:
        if atom.negated:
            continue
        if atom.attribute.startswith("request principal"):
            for value in atom.values:
                issuer, _, subject = value.rpartition("/")
                if issuer and "*" not in issuer:
                    subjects.setdefault(issuer, []).append(_sample(subject or "x"))
                else:  # a wildcard issuer: any provider's
                    for known in issuers:
                        subjects.setdefault(known, []).append(_sample(subject or "x"))
        elif atom.attribute.startswith("JWT claim ") and atom.values:
            path = atom.attribute[len("JWT claim ") :].split(".")
            node = claims
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = [_sample(v) for v in atom.values]
        elif atom.attribute == "JWT audience" and atom.values:
            claims["aud"] = [_sample(v) for v in atom.values]
        elif atom.attribute.startswith("JWT presenter") and atom.values:
            claims["azp"] = _sample(atom.values[0])
    out: list[Token] = []
    for provider in providers:
        own = dict(claims)
        if "aud" not in own and provider.audiences:
            own["aud"] = list(provider.audiences[:1])
        for subject in [*subjects.get(provider.issuer, ()), _SUBJECT]:
            out.append(Token(provider.issuer, subject, json.dumps(own, sort_keys=True)))
    return list(dict.fromkeys(out))


def _attributes(
    family: str, value: Any, host: str, port: int, mode: PathNormalization
) -> Attributes | None:
    """Attributes carrying only ``value`` for ``family``, as the rule checks read them."""
    a = Attributes(destination_port=port, is_http=True)
    if family == "method":
        a.method = value
    elif family == "path":
        try:
            a.path = normalize_path(value, mode).path
        except PathRejected:
            return None
    elif family == "host":
        a.host = value if value is not None else host
    elif family.startswith("header "):
        a.headers = {family[len("header ") :]: (value,)} if value is not None else {}
    elif family == "remote":
        a.remote_ip = value
    elif family == "source":
        a.source_ip = a.remote_ip = value
    elif family == "token" and value is not None:
        a.issuer, a.subject = value.issuer, value.subject
        a.claims = json.loads(value.claims_json)
    return a


def _sign(token: Token) -> str:
    payload = {"iss": token.issuer, "sub": token.subject, **json.loads(token.claims_json)}
    return pyjwt.encode(payload, _SECRET, algorithm="HS256", headers={"kid": _KEY_ID})


def _place(
    provider: JwtProvider, token: str, headers: list[tuple[str, str]], path: str
) -> tuple[list[tuple[str, str]], str]:
    """Where the issuer's provider reads the token: its first header, else its parameter."""
    locations = provider.locations()
    if locations:
        name, prefix = locations[0]
        return [*headers, (name, prefix + token)], path
    params = provider.params()
    if params:
        return headers, f"{path}{'&' if '?' in path else '?'}{params[0]}={token}"
    return headers, path


def allowed(example: Example | None) -> bool:
    return example is not None and example.verdict == Verdict.ALLOW.value


__all__ = ["Examples", "Shape", "Token", "allowed"]
