"""What the RBAC differential test (test_rbac_differential) asks: the policy sets and the
requests sent to each listener.

Provides the policy sets (``KITCHEN_SINK``, ``TCP_KITCHEN_SINK``, ``JWT_KITCHEN_SINK`` and
the §7 scenarios), the request grids built from ``Probe``s (paths, methods, headers,
hosts, client addresses, JWTs), the ``Case``s that pair a compiled policy set with its
grid (``http_cases``, ``tcp_cases``), and the ports and client addresses they use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.unit.meshutil import compile_text
from tests.xds import jwt_cases
from trustmesh.policy.compose import MeshPolicy

SCENARIOS = Path(__file__).resolve().parents[2] / "examples" / "scenarios"
HTTP_PORT = 8000  # foo/httpbin's target port
TCP_PORTS = (9000, 9001, 9002)  # foo/tcp-echo's
CLIENT, OTHER_CLIENT = "127.0.0.1", "127.0.0.66"
MODES = ("NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")


def _scenario_text(name: str) -> str:
    return (SCENARIOS / name / "config.yaml").read_text()


# --- policy sets -------------------------------------------------------------------------

_HEAD = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {}, "
_DRY_RUN = 'annotations: {"istio.io/dry-run": "true"}, '


def _policy(name: str, body: str, *, dry_run: bool = False, app: str = "httpbin") -> str:
    head = _HEAD.format(name) + (_DRY_RUN if dry_run else "") + "namespace: foo}\n"
    return f"{head}spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n{body}---\n"


# Every request attribute an HTTP sidecar checks without TLS: wildcards in each position,
# notValues, URI templates, rule names that sort as strings (rule[10] < rule[2]), dry-run
# of both actions, AUDIT, and a CUSTOM rule (our stand-in fails closed, as does evaluate).
KITCHEN_SINK = (
    _policy(
        "deny-admin",
        """  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/*", "/admin"]}}]
  - when: [{key: "request.headers[x-block]", values: ["*"]}]
""",
    )
    + _policy(
        "shadow-deny",
        '  action: DENY\n  rules:\n  - to: [{operation: {paths: ["/shadow*", "/up"]}}]\n',
        dry_run=True,
    )
    + _policy("shadow-allow", '  rules:\n  - to: [{operation: {methods: ["GET"]}}]\n', dry_run=True)
    + _policy("audit", '  action: AUDIT\n  rules:\n  - to: [{operation: {paths: ["/audit"]}}]\n')
    + _policy(
        "ext",
        "  action: CUSTOM\n  provider: {name: opa}\n  rules:\n"
        '  - to: [{operation: {paths: ["/custom"]}}]\n',
    )
    + _policy(
        "allow-many",
        """  rules:
  - to: [{operation: {hosts: ["*.example.com", "HTTPBIN.foo.svc*"], methods: ["GET", "HEAD"]}}]
  - to: [{operation: {paths: ["/api/{*}/items", "/files/{**}"]}}]
  - to: [{operation: {methods: ["POST"], paths: ["*/upload", "/up"]}}]
  - to: [{operation: {notMethods: ["DELETE"], paths: ["/any/*"]}}]
    when: [{key: "request.headers[x-env]", notValues: ["prod", "stag*"]}]
  - from: [{source: {ipBlocks: ["127.0.0.0/8"], notIpBlocks: ["127.0.0.66"]}}]
    to: [{operation: {paths: ["/ip-only"]}}]
  - to: [{operation: {ports: ["8000"], paths: ["/port"]}}, {operation: {paths: ["/or"]}}]
  - to: [{operation: {notPorts: ["8000"], paths: ["/port", "/notport"]}}]
  - when: [{key: "request.headers[x-version]", values: ["v1*", "*-beta", "exact"]}]
  - to: [{operation: {paths: ["/sni"]}}]
    when: [{key: connection.sni, notValues: ["*"]}]
  - to: [{operation: {paths: ["/dport"]}}]
    when: [{key: destination.port, values: ["8000"], notValues: ["9000"]}]
  - to: [{operation: {methods: ["POST"], paths: ["/up*"]}}]
  - to: [{operation: {hosts: ["*"], paths: ["/hostany"]}}]
  - from: [{source: {remoteIpBlocks: ["127.0.0.1"]}}]
    to: [{operation: {paths: ["/remote"]}}]
  - to: [{operation: {paths: ["/srcip", "/custom", "/audit", "/shadow"]}}]
    when: [{key: source.ip, values: ["127.0.0.1/32"]}]
  - to: [{operation: {notHosts: ["*.example.com", "HTTPBIN.bar"], paths: ["/nothost"]}}]
  - to: [{operation: {methods: ["*"], paths: ["/public*", "/allow*", "/ip"]}}]
  - when: [{key: "request.headers[x-empty]", values: ["*"]}]
""",
    )
)

# TCP: ALLOW rules with HTTP-only fields drop out whole, DENY rules lose only those keys.
TCP_KITCHEN_SINK = (
    _policy(
        "tcp-allow",
        """  rules:
  - to: [{operation: {ports: ["9000"], methods: ["GET"]}}]
  - from: [{source: {ipBlocks: ["127.0.0.1"]}}]
    to: [{operation: {ports: ["9000", "9001"]}}]
  - from: [{source: {notIpBlocks: ["127.0.0.1"]}}]
    when: [{key: destination.port, values: ["9002"]}]
""",
        app="tcp-echo",
    )
    + _policy(
        "tcp-deny",
        """  action: DENY
  rules:
  - from: [{source: {requestPrincipals: ["*"], ipBlocks: ["127.0.0.66"]}}]
    to: [{operation: {notPaths: ["/x"], ports: ["9001"]}}]
  - when: [{key: "request.headers[x-a]", values: ["b"]}, {key: source.ip, values: ["10.0.0.1"]}]
""",
        app="tcp-echo",
    )
    + _policy(
        "tcp-shadow",
        '  action: DENY\n  rules:\n  - to: [{operation: {ports: ["9000"]}}]\n',
        dry_run=True,
        app="tcp-echo",
    )
)

# requestPrincipals / request.auth.* become jwt_authn metadata matchers; a jwt_authn
# filter shaped like Istio's (see jwt_filter) runs before RBAC on these listeners.
JWT_KITCHEN_SINK = (
    _scenario_text("10-jwt-require-principal").split("---")[0]
    + "---\n"
    + _policy(
        "jwt-many",
        """  rules:
  - from: [{source: {requestPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/any-token"]}}]
  - from: [{source: {requestPrincipals: ["testing@secure.istio.io/*"]}}]
    to: [{operation: {paths: ["/iss-any-sub"]}}]
  - from: [{source: {requestPrincipals: ["*/testing@secure.istio.io", "x/y"]}}]
    to: [{operation: {paths: ["/any-iss"]}}]
  - from: [{source: {notRequestPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/no-token"]}}]
  - to: [{operation: {paths: ["/scope"]}}]
    when: [{key: "request.auth.claims[scope]", values: ["scope2"]}]
  - to: [{operation: {paths: ["/foo"]}}]
    when: [{key: "request.auth.claims[foo]", values: ["ba*", "x"]}]
  - to: [{operation: {paths: ["/not-group2"]}}]
    when: [{key: "request.auth.claims[groups]", notValues: ["group2"]}]
  - to: [{operation: {paths: ["/aud"]}}]
    when: [{key: request.auth.audiences, values: ["*"]}]
  - to: [{operation: {paths: ["/principal"]}}]
    when:
    - key: request.auth.principal
      values: ["testing@secure.istio.io/testing@secure.istio.io"]
  - from: [{source: {requestPrincipals: ["testing@secure.istio.io"]}}]
    to: [{operation: {paths: ["/no-slash"]}}]
  - from: [{source: {requestPrincipals: ["testing@*/testing@secure.istio.io", "*/*"]}}]
    to: [{operation: {paths: ["/inner-wildcard"]}}]
""",
    )
)
# Request-smuggling attacks (trustmesh.policy.headers): header conditions of every kind
# (ALLOW values, DENY notValues, DENY values), a header Envoy joins itself (user-agent),
# request.headers[host], and a DENY on hosts.
SMUGGLING = (
    _policy(
        "writes-need-ops",
        """  action: DENY
  rules:
  - to: [{operation: {methods: ["POST", "PUT", "DELETE"]}}]
    when: [{key: "request.headers[x-user]", notValues: ["ops"]}]
""",
    )
    + _policy(
        "no-mallory",
        """  action: DENY
  rules:
  - when: [{key: "request.headers[X-Blocked]", values: ["mallory", "evil*"]}]
  - when: [{key: "request.headers[user-agent]", values: ["bad-bot*"]}]
  - when: [{key: "request.headers[host]", values: ["secret.foo"]}]
  - to: [{operation: {hosts: ["internal.foo"]}}]
""",
    )
    + _policy(
        "admin-needs-role",
        """  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
    when: [{key: "request.headers[x-role]", values: ["admin"]}]
  - to: [{operation: {notPaths: ["/admin*"]}}]
""",
    )
)
# Headers Envoy drops or rewrites before any filter (trustmesh.policy.request_headers):
# conditions on hop-by-hop, internal x-envoy-*, upgrade, expect, x-forwarded-* headers.
HOP_BY_HOP = _policy(
    "hop-deny",
    """  action: DENY
  rules:
  - to: [{operation: {methods: ["POST"]}}]
    when: [{key: "request.headers[x-user]", notValues: ["ops"]}]
  - when: [{key: "request.headers[x-envoy-retry-on]", values: ["*"]}]
  - when: [{key: "request.headers[te]", values: ["gzip*"]}]
  - when: [{key: "request.headers[keep-alive]", values: ["*"]}]
""",
) + _policy(
    "hop-allow",
    """  rules:
  - to: [{operation: {paths: ["/admin"]}}]
    when: [{key: "request.headers[x-role]", values: ["admin"]}]
  - to: [{operation: {paths: ["/ws"]}}]
    when: [{key: "request.headers[upgrade]", values: ["websocket", "WebSocket"]}]
  - to: [{operation: {paths: ["/expect"]}}]
    when: [{key: "request.headers[expect]", values: ["100-continue"]}]
  - to: [{operation: {paths: ["/xfcc"]}}]
    when: [{key: "request.headers[x-forwarded-client-cert]", values: ["*"]}]
  - to: [{operation: {paths: ["/rid"]}}]
    when: [{key: "request.headers[x-request-id]", values: ["*"]}]
  - to: [{operation: {paths: ["/proto"]}}]
    when: [{key: "request.headers[x-forwarded-proto]", values: ["http"]}]
  - to: [{operation: {paths: ["/envoy"]}}]
    when: [{key: "request.headers[x-envoy-original-path]", values: ["/x"]}]
  - to: [{operation: {notPaths: ["/admin", "/ws", "/expect", "/xfcc", "/rid", "/proto", "/envoy"]}}]
""",
)
HOP_BY_HOP_HEADERS: tuple[tuple[tuple[str, str], ...], ...] = (
    (), (("x-user", "ops"),), (("connection", "x-user"), ("x-user", "ops")),
    (("connection", "close, X-User"), ("x-user", "ops")), (("x-user", "  ops\t"),),
    (("x-role", "admin"),), (("connection", "x-role"), ("x-role", "admin")),
    (("x-role", " admin "),), (("connection", "x-forwarded-for"), ("x-role", "admin")),
    (("connection", "a,b,c,d,e,f,g,h,i,j"),), (("connection", "host"),),
    (("x-envoy-retry-on", "5xx"),), (("te", "gzip"),), (("te", "trailers"),),
    (("keep-alive", "timeout=5"),), (("connection", "te"), ("te", "gzip, trailers")),
    (("connection", "upgrade"), ("upgrade", "websocket")),
    (("connection", "Upgrade, x-user"), ("upgrade", "WebSocket"), ("x-user", "ops")),
    (("connection", "upgrade"), ("upgrade", "foo")), (("upgrade", "websocket"),),
    (("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c"), ("http2-settings", "A")),
    (("expect", "100-continue"),), (("x-forwarded-client-cert", "URI=spiffe://x"),),
    (("x-request-id", "abc"),), (("x-request-id", ""),), (("x-forwarded-proto", "https"),),
    (("x-envoy-original-path", "/x"),), (("connection", "x-envoy-original-path"),
    ("x-envoy-original-path", "/x")), (("x a", "1"),), (("x-user", "o\x01ps"),),
    (("connection", "a,b,c,d,e,f,g,h,i"),),  # ten tokens with the rig's own "close"
    (("content-length", "abc"),), (("transfer-encoding", "gzip"),),
    (("transfer-encoding", "chunked"), ("content-length", "0")),
    (("te", "gzip"), ("te", "trailers")),
    (("connection", "upgrade"), ("upgrade", "websocket"), ("upgrade", "foo")),
    (("x-role", "ad\rmin"),), (("x-role", "guest\r\n admin"),), (("x-a", "1\r\nx-role: admin"),),
    (("x-a", "1\nHost: internal.foo"),), (("x-a", "1\nno colon"),),
)  # fmt: skip
HOP_BY_HOP_PATHS = ("/get", "/admin", "/ws", "/expect", "/xfcc", "/rid", "/proto", "/envoy")
# Which refusal comes first when a request earns two: the codec's (bad header line, bad
# Host), the connection manager's (Connection nominations, upgrades, path normalization)
# or the Host guard's.
HOP_BY_HOP_ORDER: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = tuple(
    (path, host, headers)
    for path, host in (
        ("/xyz/.%00../abc", "httpbin.foo:8000"),
        ("/get", "user@internal.foo"),
        ("/get", "internal.foo.."),
        ("/get", "a b"),
    )
    for headers in (
        (("connection", "upgrade"), ("upgrade", "foo")),
        (("connection", "upgrade, x-forwarded-for"), ("upgrade", "foo")),
        (("connection", "x-forwarded-for"),),
        (("x a", "1"),),
        (("x-user", "ops"), ("x-user", "mallory"), ("connection", "upgrade"), ("upgrade", "x")),
    )
)

SMUGGLING_HEADERS: tuple[tuple[tuple[str, str], ...], ...] = (
    (), (("x-user", "ops"),), (("x-user", "mallory"),), (("x-user", "ops"), ("x-user", "mallory")),
    (("x-user", "mallory"), ("x-user", "ops")), (("X-User", "ops"), ("x-user", "mallory")),
    (("x-user", "ops,mallory"),), (("x-user", "ops"), ("x-user", "ops")),
    (("x-user", ""), ("x-user", "ops")), (("x-role", "admin"),),
    (("x-role", "guest"), ("x-role", "admin")), (("X-Role", "admin"), ("x-ROLE", "guest")),
    (("x-blocked", "ops"), ("x-blocked", "mallory")), (("x-blocked", "evil-twin"),),
    (("x-blocked", "ok"),), (("user-agent", "ok"), ("user-agent", "bad-bot/1")),
    (("user-agent", "bad-bot/1"), ("user-agent", "ok")),
    (("user-agent", ""), ("user-agent", "bad-bot")),
    (("x-other", "a"), ("x-other", "b")),
)  # fmt: skip
# Host as sent (the probe's Host line, then any extra Host lines) and absolute-form targets.
SMUGGLING_HOSTS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("internal.foo", ()), ("internal.foo.", ()), ("INTERNAL.FOO.", ()), ("internal.foo.:8000", ()),
    ("internal.foo..", ()), ("internal.foo:8000", ()), ("user@internal.foo", ()),
    ("internal.foo", (("Host", "httpbin.foo:8000"),)),
    ("httpbin.foo:8000", (("Host", "internal.foo"),)),
    ("internal.foo,httpbin.foo", ()), ("internal%2Efoo", ()), ("", ()), ("[::1]:8000", ()),
    ("secret.foo", ()), ("secret.foo.", ()), ("Secret.foo", ()), ("httpbin.foo", ()),
    ("internal.foo:", ()), (".internal.foo", ()), ("internal.foo x", ()), ("a{b}", ()),
    ("10.0.0.1:8000", ()), ("httpbin_x.foo", ()),
)  # fmt: skip
SMUGGLING_TARGETS = (
    "http://internal.foo/get", "HTTP://user:pw@internal.foo/get", "https://internal.foo./admin",
    "http://httpbin.foo:8000/get", "http://internal.foo", "http://internal.foo?x=1",
    "ftp://internal.foo/get", "http:///get", "http://a@b@internal.foo/get", "//internal.foo/get",
)  # fmt: skip
JWT_PATHS = ("/headers", "/any-token", "/iss-any-sub", "/any-iss", "/no-token", "/scope", "/foo",
             "/not-group2", "/aud", "/principal", "/no-slash", "/inner-wildcard")  # fmt: skip
TOKENS = {
    name: token
    for name, _, token in (
        line.strip().partition(": ")
        for line in (SCENARIOS / "jwt" / "tokens.txt").read_text().splitlines()
        if line.startswith("  ")
    )
}


# --- request grids -----------------------------------------------------------------------

PATHS = (
    "/get", "/ip", "/headers", "/admin", "/admin/secret", "//admin/secret",
    "/admin%2Fsecret", "/admin%2fsecret", "/admin/./secret", "/ADMIN/secret",
    "/%61dmin/secret", "/admin%5Csecret", "/public", "/publicity", "/public/../private",
    "/public/%2e%2e/private", "/public/../public/x", "/public/..;x/private", "/public//x",
    "/allow?x=1", "/allow/admin", "/allow/admin?x=1", "/allow/x/../admin", "/a?x=1",
    "/api/v1/items", "/api/v1/x/items", "/files/a/b/c", "/files", "/x/upload", "/up",
    "/any/thing", "/ip-only", "/port", "/or", "/notport", "/dport", "/sni", "/hostany",
    "/nothost", "/remote", "/srcip", "/shadow", "/audit", "/custom", "/xyz/.%00../abc",
    "/a/%2E%2E/b",
)  # fmt: skip
METHODS = ("GET", "POST", "DELETE", "HEAD", "PUT")
HEADER_SETS: tuple[tuple[tuple[str, str], ...], ...] = (
    (), (("x-token", "admin"),), (("x-token", "guest"),), (("x-token", ""),),
    (("x-token", "admin"), ("x-token", "guest")), (("X-Token", "ADMIN"),), (("x-block", ""),),
    (("x-env", "prod"),), (("x-env", "staging"),), (("x-env", "dev"),), (("x-version", "v1.2"),),
    (("x-version", "2-beta"),), (("x-version", "exactly"),), (("x-empty", ""),),
)  # fmt: skip
HOSTS = ("httpbin.foo", "httpbin.foo:8000", "api.example.com", "API.Example.COM:80",
         "httpbin.foo.svc.cluster.local", "HTTPBIN.bar")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Probe:
    """One request (``method`` None: a TCP connection sending one line)."""

    method: str | None
    path: str = ""
    host: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    client: str = CLIENT
    # An mTLS peer's principal (``td/ns/NS/sa/SA``), for a Case with ``tls``; None: plaintext.
    peer: str | None = None

    def wire(self, number: int) -> bytes:
        if self.method is None:
            return b"ping\n"
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"x-probe: {number}", *(f"{n}: {v}" for n, v in self.headers)]
        return "\r\n".join([*lines, "Connection: close", "", ""]).encode("latin-1")


def _path_grid() -> list[Probe]:
    return [Probe("GET", path, "httpbin.foo") for path in PATHS]


def _attribute_grid() -> list[Probe]:
    probes = [
        Probe(method, path, "httpbin.foo:8000", headers)
        for method in METHODS
        for headers in HEADER_SETS
        for path in ("/get", "/any/thing")
    ]
    probes += [
        Probe(method, path, host)
        for host in HOSTS
        for method in ("GET", "POST")
        for path in ("/get", "/hostany", "/nothost")
    ]
    probes += [
        Probe("GET", path, "httpbin.foo", client=client)
        for path in ("/ip-only", "/srcip", "/remote", "/get")
        for client in (CLIENT, OTHER_CLIENT)
    ]
    return probes + [
        Probe("GET", "/remote", "httpbin.foo", (("x-forwarded-for", xff),), client)
        for xff in ("10.1.2.3", "127.0.0.1", "10.1.2.3, 127.0.0.1")
        for client in (CLIENT, OTHER_CLIENT)
    ]


def _smuggling_grid() -> list[Probe]:
    probes = [
        Probe(method, path, "httpbin.foo:8000", headers)
        for method in ("GET", "POST")
        for path in ("/get", "/admin")
        for headers in SMUGGLING_HEADERS
    ]
    probes += [
        Probe(method, "/get", host, extra)
        for method in ("GET", "POST")
        for host, extra in SMUGGLING_HOSTS
    ]
    return probes + [
        Probe(method, target, "httpbin.foo:8000", (("x-user", "ops"),))
        for method in ("GET", "POST")
        for target in SMUGGLING_TARGETS
    ]


def _token_grid() -> list[Probe]:
    return [
        Probe(method, path, "httpbin.foo:8000", headers)
        for method in ("GET", "POST", "PUT")
        for path in ("/get", "/ip", "/headers")
        for headers in HEADER_SETS[:6]
    ]


def _jwt_grid(paths: tuple[str, ...] = JWT_PATHS) -> list[Probe]:
    tokens = [(), *((("authorization", f"Bearer {token}"),) for token in TOKENS.values())]
    tokens.append((("authorization", "Bearer not-a-jwt"),))
    return [Probe("GET", path, "httpbin.foo", headers) for path in paths for headers in tokens]


@dataclass(slots=True)
class Case:
    """One listener: a compiled policy set, the destination it protects, its probes."""

    name: str
    mesh: MeshPolicy
    destination: str
    port: int
    probes: list[Probe]
    address: str = ""
    tls: bool = False  # the listener requires a client certificate (its probes' ``peer``)


def _mesh(text: str, mode: str = "BASE", extra: str = "") -> MeshPolicy:
    return compile_text(text, mesh=f"pathNormalization:\n  normalization: {mode}\n{extra}")


def http_cases() -> list[Case]:
    def case(name: str, mesh: MeshPolicy, probes: list[Probe]) -> Case:
        return Case(name, mesh, "foo/httpbin", HTTP_PORT, probes)

    cases = [case(f"kitchen-sink/{m}", _mesh(KITCHEN_SINK, m), _path_grid()) for m in MODES]
    cases.append(case("kitchen-sink/attributes", _mesh(KITCHEN_SINK), _attribute_grid()))
    for name in ("02-deny-get", "04-deny-header-allow-ip", "15-dry-run-deny"):
        cases.append(case(name, _mesh(_scenario_text(name)), _token_grid()))
    for name in ("18-path-normalization-allow-prefix", "19-deny-exact-allow-prefix-query"):
        cases += [case(f"{name}/{m}", _mesh(_scenario_text(name), m), _path_grid()) for m in MODES]
    for name in ("10-jwt-require-principal", "11-jwt-require-group-claim"):
        cases.append(case(name, _mesh(_scenario_text(name)), _jwt_grid(("/headers",))))
    cases.append(case("jwt-kitchen-sink", _mesh(JWT_KITCHEN_SINK), _jwt_grid()))
    cases.append(case("smuggling", _mesh(SMUGGLING), _smuggling_grid()))
    forward = _mesh(SMUGGLING, extra="repeatedPolicyHeaders: FORWARD\n")
    cases.append(case("smuggling/FORWARD", forward, _smuggling_grid()))
    hop = [
        Probe(method, path, "httpbin.foo:8000", headers)
        for method in ("GET", "POST")
        for path in HOP_BY_HOP_PATHS
        for headers in HOP_BY_HOP_HEADERS
    ]
    hop += [Probe("GET", path, host, headers) for path, host, headers in HOP_BY_HOP_ORDER]
    cases.append(case("hop-by-hop", _mesh(HOP_BY_HOP), hop))
    return cases + _jwt_extraction_cases(case)


def _jwt_extraction_cases(case: Callable[[str, MeshPolicy, list[Probe]], Case]) -> list[Case]:
    """Token locations and combinations (jwt_cases): the header conditions of the ``who``
    policy are read with repeated lines forwarded, so that the JWT filter, not the
    repeated-header guard, answers two token lines."""
    tokens = jwt_cases.make_tokens()
    out = []
    for name, config in jwt_cases.policy_sets(tokens).items():
        mesh = _mesh(config + jwt_cases.who_policy(), extra="repeatedPolicyHeaders: FORWARD\n")
        probes = [
            Probe(method, path, "httpbin.foo:8000", headers)
            for method, path, headers in jwt_cases.probes(name, tokens)
        ]
        out.append(case(f"jwt-extraction/{name}", mesh, probes))
    return out


def tcp_cases() -> list[Case]:
    sets = [
        (name, _scenario_text(name)) for name in sorted(p.name for p in SCENARIOS.glob("0[5-8]-*"))
    ]
    sets.append(("tcp-kitchen-sink", TCP_KITCHEN_SINK))
    probes = [Probe(None, client=CLIENT), Probe(None, client=OTHER_CLIENT)]
    return [
        Case(f"{name}/{port}", _mesh(text), "foo/tcp-echo", port, probes)
        for name, text in sets
        for port in TCP_PORTS
    ]
