"""A seeded generator of random AuthorizationPolicy sets and the requests to ask them.

Every set is one listener of the differential rig (tests/xds/rbac_rig.py): HTTP sets
protect foo/httpbin (port 8000), TCP sets foo/tcp-echo (ports 9000-9002). Values are
drawn from small vocabularies that collide on purpose — paths that are prefixes,
suffixes and URI templates of one another, headers present, absent and repeated, client
addresses inside and outside the blocks — so that rules overlap and the deciding rule
(the smallest matching name, rule[10] sorting before rule[2]) is often contested.

The same seed always gives the same set and requests (``random.Random(seed)``), so a
disagreement found by ``make fuzz`` is reproduced with ``--seed``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from tests.xds.rbac_cases import CLIENT, OTHER_CLIENT, TOKENS, Probe, _scenario_text

PATHS = (
    "/",
    "/get",
    "/admin",
    "/admin/",
    "/admin/users",
    "/api/v1/items",
    "/api/v2/items",
    "/api/v1/items/7/info",
    "/static/app.js",
    "/x/info",
    "/ADMIN",
    "/get?admin=1",
    "//admin",
    "/a/../admin",
    "/api/%2e%2e/admin",
)
PATH_PATTERNS = (
    "/get",
    "/admin",
    "/admin/*",
    "*/info",
    "/api/*",
    "/api/v1/*",
    "*.js",
    "*",
    "/api/{*}/items",
    "/api/{**}/info",
    "/ADMIN",
)
METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD")
HOSTS = ("httpbin.foo", "httpbin.foo:8000", "internal.foo", "HTTPBIN.FOO", "evil.example")
HOST_PATTERNS = ("httpbin.foo", "httpbin.foo:8000", "*.foo", "internal.*", "*", "HTTPBIN.foo")
HEADER_NAMES = ("x-user", "x-role")
HEADER_VALUES = ("alice", "ops", "ops-admin", "", "Admin")
HEADER_PATTERNS = ("alice", "ops*", "*admin", "*", "Admin")
CLIENTS = (CLIENT, OTHER_CLIENT)
IP_BLOCKS = ("127.0.0.1", "127.0.0.0/24", "127.0.0.66/32", "10.0.0.0/8", "127.0.0.64/30")
XFF = ("10.1.2.3", "127.0.0.66", "10.1.2.3, 127.0.0.66")
TCP_PORTS = ("9000", "9001", "9002")
HTTP_PORTS = ("8000", "9000")
# mTLS peers of the TLS sets, and the identity patterns policies use: trust domains the
# mesh has (cluster.local, and old.local when aliased), one it does not, one that only
# extends cluster.local's name.
PEERS = (
    "cluster.local/ns/foo/sa/sleep",
    "cluster.local/ns/bar/sa/sleep",
    "cluster.local/ns/foo/sa/admin",
    "old.local/ns/foo/sa/sleep",
    "partner.example/ns/bar/sa/api",
    "cluster.local.evil/ns/foo/sa/sleep",
)
PRINCIPALS = (
    "cluster.local/ns/foo/sa/sleep",
    "old.local/ns/foo/sa/sleep",
    "*/ns/foo/sa/sleep",
    "cluster.local/ns/bar/*",
    "*/sa/admin",
    "*",
)
NAMESPACES = ("foo", "bar", "*", "b*")
SERVICE_ACCOUNTS = ("foo/sleep", "bar/sleep", "foo/admin")
TRUST_DOMAINS = ("cluster.local", "old.local", "*.example", "cluster.*", "partner.example")
ALIASES = "trustDomain: cluster.local\ntrustDomainAliases: [old.local]\n"
# End-user JWTs: scenario 10's RequestAuthentication (issuer testing@secure.istio.io) and
# its tokens (valid, with groups, expired, signed by another key), plus garbage.
REQUEST_AUTHENTICATION = _scenario_text("10-jwt-require-principal").split("---")[0] + "---\n"
BEARERS = (*TOKENS.values(), "not-a-jwt")
REQUEST_PRINCIPALS = (
    "testing@secure.istio.io/testing@secure.istio.io",
    "testing@secure.istio.io/*",
    "*/other",
    "*",
)
CLAIMS = {
    "request.auth.claims[groups]": ("group1", "group2", "*"),
    "request.auth.claims[iss]": ("testing@secure.istio.io", "other"),
    "request.auth.audiences": ("*", "svc"),
    "request.auth.principal": REQUEST_PRINCIPALS,
}


@dataclass(frozen=True, slots=True)
class FuzzSet:
    """One generated policy set: its YAML, the workload it protects, and the probes."""

    name: str
    text: str
    mesh: str  # meshConfig YAML ("" for none)
    tcp: bool
    tls: bool  # mTLS listener: every probe presents a peer certificate
    port: int  # the destination port the listener serves (the workload's target port)
    probes: tuple[Probe, ...]


def generate(seed: int, *, probes: int = 20) -> FuzzSet:
    rng = random.Random(seed)
    tcp = rng.random() < 0.2
    tls = rng.random() < 0.4
    jwt = not tcp and rng.random() < 0.3
    app = "tcp-echo" if tcp else "httpbin"
    policies = [_policy(rng, f"p{i}", app, tcp, jwt) for i in range(rng.randint(1, 4))]
    text = (REQUEST_AUTHENTICATION if jwt else "") + "".join(policies)
    mesh = ALIASES if rng.random() < 0.3 else ""
    grid = tuple(_tcp_probe(rng, tls) if tcp else _http_probe(rng, tls, jwt) for _ in range(probes))
    port = int(rng.choice(TCP_PORTS)) if tcp else 8000
    return FuzzSet(f"seed-{seed}", text, mesh, tcp, tls, port, grid)


def _policy(rng: random.Random, name: str, app: str, tcp: bool, jwt: bool) -> str:
    action = rng.choices(("ALLOW", "DENY", "AUDIT"), (5, 4, 1))[0]
    dry_run = action != "AUDIT" and rng.random() < 0.15
    annotations = ', annotations: {"istio.io/dry-run": "true"}' if dry_run else ""
    selector = rng.random() < 0.85
    spec: dict[str, object] = {"action": action}
    if selector:
        spec["selector"] = {"matchLabels": {"app": app}}
    if rng.random() < 0.05:
        pass  # no rules: ALLOW matches nothing, DENY / AUDIT match nothing
    else:
        spec["rules"] = [_rule(rng, tcp, jwt) for _ in range(rng.choice((1, 1, 2, 3, 11)))]
    head = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    meta = f"metadata: {{name: {name}, namespace: foo{annotations}}}\n"
    return f"{head}{meta}spec: {json.dumps(spec)}\n---\n"


def _pick(rng: random.Random, values: tuple[str, ...], most: int = 2) -> list[str]:
    return rng.sample(values, rng.randint(1, min(most, len(values))))


def _rule(rng: random.Random, tcp: bool, jwt: bool) -> dict[str, object]:
    rule: dict[str, object] = {}
    if rng.random() < 0.5:
        rule["from"] = [{"source": _source(rng, jwt)} for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.6:
        rule["to"] = [{"operation": _operation(rng, tcp)} for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.4:
        rule["when"] = [_condition(rng, tcp, jwt) for _ in range(rng.randint(1, 2))]
    return rule


_ACCOUNT_FIELDS = frozenset({"serviceAccounts", "notServiceAccounts"})
_PEER_FIELDS = frozenset({"principals", "notPrincipals", "namespaces", "notNamespaces"})


def _source(rng: random.Random, jwt: bool) -> dict[str, object]:
    fields = {
        "ipBlocks": IP_BLOCKS,
        "notIpBlocks": IP_BLOCKS,
        "remoteIpBlocks": IP_BLOCKS,
        "notRemoteIpBlocks": IP_BLOCKS,
        "principals": PRINCIPALS,
        "notPrincipals": PRINCIPALS,
        "namespaces": NAMESPACES,
        "notNamespaces": NAMESPACES,
        "serviceAccounts": SERVICE_ACCOUNTS,
        "notServiceAccounts": SERVICE_ACCOUNTS,
        "trustDomains": TRUST_DOMAINS,
        "notTrustDomains": TRUST_DOMAINS,
    }
    if jwt:
        fields |= {"requestPrincipals": REQUEST_PRINCIPALS}
        fields |= {"notRequestPrincipals": REQUEST_PRINCIPALS}
    chosen = rng.sample(sorted(fields), rng.randint(1, 2))
    if not _PEER_FIELDS.isdisjoint(chosen) and rng.random() < 0.95:
        # Istio refuses serviceAccounts beside principals / namespaces: mostly keep apart.
        chosen = [n for n in chosen if n not in _ACCOUNT_FIELDS] or chosen
    return {name: _pick(rng, fields[name]) for name in chosen}


def _operation(rng: random.Random, tcp: bool) -> dict[str, object]:
    fields: dict[str, tuple[str, ...]] = {"ports": TCP_PORTS if tcp else HTTP_PORTS}
    fields["notPorts"] = fields["ports"]
    # HTTP-only fields in TCP sets too: Istio drops the ALLOW rule / the field there.
    if not tcp or rng.random() < 0.3:
        fields |= {
            "paths": PATH_PATTERNS,
            "notPaths": PATH_PATTERNS,
            "methods": METHODS,
            "notMethods": METHODS,
            "hosts": HOST_PATTERNS,
            "notHosts": HOST_PATTERNS,
        }
    chosen = rng.sample(sorted(fields), rng.randint(1, 2))
    return {name: _pick(rng, fields[name]) for name in chosen}


def _condition(rng: random.Random, tcp: bool, jwt: bool) -> dict[str, object]:
    keys: dict[str, tuple[str, ...]] = {
        "source.ip": IP_BLOCKS,
        "remote.ip": IP_BLOCKS,
        "destination.port": TCP_PORTS if tcp else HTTP_PORTS,
        "source.namespace": NAMESPACES,
        "source.principal": PRINCIPALS,
        "source.serviceAccount": SERVICE_ACCOUNTS,
        "source.trustDomain": TRUST_DOMAINS,
    }
    if not tcp or rng.random() < 0.3:
        keys |= {f"request.headers[{name}]": HEADER_PATTERNS for name in HEADER_NAMES}
    if jwt:
        keys |= CLAIMS
    key = rng.choice(sorted(keys))
    field = rng.choice(("values", "notValues"))
    return {"key": key, field: _pick(rng, keys[key])}


def _http_probe(rng: random.Random, tls: bool, jwt: bool) -> Probe:
    headers: list[tuple[str, str]] = []
    for name in HEADER_NAMES:
        roll = rng.random()
        if roll < 0.4:
            headers.append((name, rng.choice(HEADER_VALUES)))
        elif roll < 0.45:  # a repeated line: refused (400) unless forwarded
            headers += [(name, rng.choice(HEADER_VALUES)), (name, rng.choice(HEADER_VALUES))]
    if rng.random() < 0.2:
        headers.append(("x-forwarded-for", rng.choice(XFF)))
    if jwt and rng.random() < 0.7:
        headers.append(("authorization", f"Bearer {rng.choice(BEARERS)}"))
    return Probe(
        rng.choice(METHODS),
        rng.choice(PATHS),
        rng.choice(HOSTS),
        tuple(headers),
        rng.choice(CLIENTS),
        rng.choice(PEERS) if tls else None,
    )


def _tcp_probe(rng: random.Random, tls: bool) -> Probe:
    return Probe(None, client=rng.choice(CLIENTS), peer=rng.choice(PEERS) if tls else None)
