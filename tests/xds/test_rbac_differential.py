"""Differential test: real Envoy running our RBAC translation vs the offline evaluator.

ONE Envoy serves a plaintext listener per (policy set, path-normalization mode), each on
its own loopback address and on the destination workload's own target port (8000 for
foo/httpbin, 9000-9002 for foo/tcp-echo), so ``ports`` / ``destination.port`` rules see
the same port on both sides. HTTP chains are what a sidecar runs: the HCM with Istio's
path-normalization fields for the mode, our CUSTOM stand-in and RBAC filters, then a
router answering 200 itself. TCP chains: network RBAC, then tcp_proxy to an echo server.

Every request of a grid (paths that normalization rewrites or rejects, methods, headers
present / absent / empty / repeated, Host with and without port, two client addresses,
X-Forwarded-For, JWTs) is sent raw and must get the same answer as ``evaluate()`` gives for a
plaintext client (the destinations are PERMISSIVE): the same status, the same deciding
policy (Envoy logs it in the response code details of a 403 and in its RBAC dynamic
metadata on a 200) and the same dry-run (shadow) results. TCP: allowed or closed.

End-user JWT rules are exercised too: listeners whose mesh has a RequestAuthentication get
a jwt_authn filter shaped like Istio's before RBAC, and requests carry the scenario tokens.
Without TLS, peer-identity rules (principals, namespaces, service accounts) cannot be: the
golden tests pin their shape and ``envoy --mode validate`` checks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.unit.meshutil import compile_text
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source
from trustmesh.xds.rbac import http_custom_filters, http_rbac_filters, network_rbac_filters

SCENARIOS = Path(__file__).resolve().parents[2] / "examples" / "scenarios"
NOW = 1_790_000_000.0
HTTP_PORT = 8000  # foo/httpbin's target port
TCP_PORTS = (9000, 9001, 9002)  # foo/tcp-echo's
CLIENT, OTHER_CLIENT = "127.0.0.1", "127.0.0.66"
MODES = ("NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")
_T = "type.googleapis.com/envoy.extensions."
_HCM = _T + "filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = _T + "filters.http.router.v3.Router"
_TCP_PROXY = _T + "filters.network.tcp_proxy.v3.TcpProxy"
_FILE_LOG = _T + "access_loggers.file.v3.FileAccessLog"
_JWT_AUTHN = _T + "filters.http.jwt_authn.v3.JwtAuthentication"
# Dynamic metadata the RBAC filters write, by the name this test reports it under.
_METADATA = {
    "allow-id": "enforced_effective_policy_id",
    "shadow-deny": "istio_dry_run_deny_shadow_engine_result",
    "shadow-deny-id": "istio_dry_run_deny_shadow_effective_policy_id",
    "shadow-allow": "istio_dry_run_allow_shadow_engine_result",
    "shadow-allow-id": "istio_dry_run_allow_shadow_effective_policy_id",
}
_SHADOW_KEYS = tuple(k for k in _METADATA if k.startswith("shadow"))


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


def _mesh(text: str, mode: str = "BASE") -> MeshPolicy:
    return compile_text(text, mesh=f"pathNormalization:\n  normalization: {mode}\n")


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
    return cases


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


# --- answers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """What must be equal: status (TCP: 200 = echoed, 0 = closed), deciding policy and
    dry-run reports (``-`` = none)."""

    status: int
    rule: str = "-"
    shadow: tuple[tuple[str, str], ...] = ()


def offline(case: Case, probe: Probe) -> Answer:
    http = None
    if probe.method is not None:
        http = HttpRequest(probe.method, probe.path, probe.host, probe.headers)
    request = Request(Source.plaintext(probe.client), case.destination, case.port, http)
    decision = evaluate(case.mesh, request, now=NOW)
    if http is None:
        return Answer(200 if decision.verdict.value == "allow" else 0)
    assert decision.status is not None
    shadow = dict.fromkeys(_SHADOW_KEYS, "-")
    for result in decision.dry_run:
        shadow[f"shadow-{result.action.lower()}"] = result.result
        shadow[f"shadow-{result.action.lower()}-id"] = result.rule or "-"
    rule = {200: decision.rule or "-", 403: decision.rule or "none"}.get(decision.status, "-")
    return Answer(decision.status, rule, tuple(shadow.items()))


def from_envoy(status: int, logged: dict[str, Any]) -> Answer:
    """Envoy's answer: the status on the wire and the request's access-log line (empty
    when the HTTP codec refused the request before the HCM saw it)."""

    def value(key: str) -> str:
        found = logged.get(_METADATA.get(key, key))
        return "-" if found is None else str(found)

    rule, details = "-", value("details")
    if status == 403 and details.startswith("rbac_access_denied_matched_policy["):
        rule = details.removeprefix("rbac_access_denied_matched_policy[").removesuffix("]")
        # The CUSTOM stand-in reports Istio's fail-closed name; evaluate() the rule's own.
        rule = rule.removeprefix("istio-ext-authz-opa-").removesuffix(
            "-deny-due-to-bad-CUSTOM-action"
        )
    elif status == 200:
        rule = value("allow-id")
    return Answer(status, rule, tuple((key, value(key)) for key in _SHADOW_KEYS))


# --- Envoy configuration -----------------------------------------------------------------


def normalization(mode: str) -> dict[str, Any]:
    """The HCM fields Istio sets for ``meshConfig.pathNormalization`` (listener_builder.go)."""
    fields: dict[str, Any] = {
        "normalize_path": mode != "NONE",
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
    }
    if mode in ("MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"):
        fields["merge_slashes"] = True
    if mode == "DECODE_AND_MERGE_SLASHES":
        fields["path_with_escaped_slashes_action"] = "UNESCAPE_AND_FORWARD"
    return fields


def jwt_filter(mesh: MeshPolicy) -> list[dict[str, Any]]:
    """A jwt_authn filter shaped like Istio's (policy_applier.go) for the one inline-JWKS
    RequestAuthentication rule of ``mesh``: no token passes, a bad one is refused, the
    payload lands in metadata under ``payload`` with ``scope`` / ``permission`` split."""
    rules = [r for p in mesh.snapshot.of_kind("RequestAuthentication") for r in p.spec.jwt_rules]
    if not rules:
        return []
    assert len(rules) == 1 and rules[0].jwks, "one inline-JWKS rule is all this test builds"
    provider = {
        "issuer": rules[0].issuer,
        "local_jwks": {"inline_string": rules[0].jwks},
        "payload_in_metadata": "payload",
        "normalize_payload_in_metadata": {"space_delimited_claims": ["permission", "scope"]},
    }
    requires = {
        "requires_any": {"requirements": [{"provider_name": "origins-0"}, {"allow_missing": {}}]}
    }
    config = {
        "@type": _JWT_AUTHN,
        "providers": {"origins-0": provider},
        "rules": [{"match": {"prefix": "/"}, "requires": requires}],
        "bypass_cors_preflight": True,
    }
    return [{"name": "envoy.filters.http.jwt_authn", "typed_config": config}]


def access_log(path: Path) -> list[dict[str, Any]]:
    """A JSON line per request, written as the stream ends, after every RBAC filter has
    recorded its results. (Local-reply headers cannot carry them: with Envoy 1.40 a 403's
    headers lacked the denying filter's own shadow results.)"""
    fields = {"probe": "%REQ(x-probe)%", "details": "%RESPONSE_CODE_DETAILS%"}
    fields |= {
        key: f"%DYNAMIC_METADATA(envoy.filters.http.rbac:{key})%" for key in _METADATA.values()
    }
    config = {"@type": _FILE_LOG, "path": str(path), "log_format": {"json_format": fields}}
    return [{"name": "envoy.access_loggers.file", "typed_config": config}]


def http_listener(
    name: str, address: str, port: int, filters: list[dict[str, Any]], mode: str, log: Path
) -> dict[str, Any]:
    """HCM (normalization per ``mode``) → ``filters`` → a router answering 200 itself."""
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
    manager = {
        "@type": _HCM,
        "stat_prefix": name,
        "codec_type": "HTTP1",
        "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": [route]}]},
        "http_filters": [*filters, {"name": "router", "typed_config": {"@type": _ROUTER}}],
        "access_log": access_log(log),
        **normalization(mode),
    }
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
    return _listener(name, address, port, [hcm])


def tcp_listener(
    name: str, address: str, port: int, filters: list[dict[str, Any]], cluster: str
) -> dict[str, Any]:
    proxy = {"@type": _TCP_PROXY, "stat_prefix": name, "cluster": cluster}
    return _listener(name, address, port, [*filters, {"name": "tcp", "typed_config": proxy}])


def _listener(name: str, address: str, port: int, filters: list[Any]) -> dict[str, Any]:
    socket_address = {"address": address, "port_value": port}
    return {"name": name, "address": {"socket_address": socket_address}, "filter_chains": [
        {"filters": filters}
    ]}  # fmt: skip


def static_cluster(name: str, address: str, port: int) -> dict[str, Any]:
    endpoint = {"address": {"socket_address": {"address": address, "port_value": port}}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
        },
    }


def bootstrap(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    admin = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    resources = {"listeners": listeners, "clusters": clusters}
    return {
        "node": {"id": "rbac-test", "cluster": "rbac-test"},
        "admin": admin,
        "static_resources": resources,
    }


# --- running it ----------------------------------------------------------------------


async def send(case: Case, probe: Probe, number: int, timeout: float = 5) -> int:
    """Send ``probe`` raw; the HTTP status, or for TCP 200 if echoed and 0 if closed."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            case.address, case.port, local_addr=(probe.client, 0)
        )
        try:
            writer.write(probe.wire(number))
            if probe.method is None:
                with contextlib.suppress(ConnectionError):
                    return 200 if await reader.readline() == b"ping\n" else 0
                return 0
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *lines = head.removesuffix("\r\n\r\n").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)
            }
            if probe.method != "HEAD":
                await reader.readexactly(int(headers.get("content-length", "0")))
            return int(status_line.split()[1])
        finally:
            writer.transport.abort()  # no wait for Envoy's delayed close


def free_addresses(count: int, ports: tuple[int, ...], skip: frozenset[str]) -> list[str]:
    """Loopback addresses where all ``ports`` can be bound (Linux routes 127/8 to lo)."""
    found: list[str] = []
    for last in range(150, 250):
        address = f"127.0.0.{last}"
        if address in skip:
            continue
        try:
            for port in ports:
                with socket.socket() as taken:
                    taken.bind((address, port))
        except OSError:
            continue
        found.append(address)
        if len(found) == count:
            return found
    pytest.skip(f"not {count} loopback addresses with ports {ports} free")


@contextlib.contextmanager
def reaped(envoy: EnvoyProcess) -> Iterator[EnvoyProcess]:
    """Kill Envoy by its PID whatever happens to the test (even a timeout)."""
    try:
        yield envoy
    finally:
        if envoy.pid is not None and envoy.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(envoy.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(await reader.readline())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, CLIENT, 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@dataclass(slots=True)
class Outcome:
    """Everything one Envoy run showed, with the offline answer next to Envoy's."""

    results: list[tuple[Case, Probe, Answer, Answer]] = field(default_factory=list)
    seconds: float = 0.0

    def disagreements(self) -> list[str]:
        """Every request where Envoy and the evaluator answer differently."""
        return [
            f"{case.name}: {probe}\n    envoy   {got}\n    offline {want}"
            for case, probe, got, want in self.results
            if got != want
        ]


async def run_envoy(http: list[Case], tcp: list[Case], workdir: Path) -> Outcome:
    log = workdir / "access.log"
    async with echo_server() as echo_port:
        listeners, clusters = [], [static_cluster("echo", CLIENT, echo_port)]
        for i, case in enumerate(http):
            wp = case.mesh.for_workload(case.destination)
            assert wp is not None
            filters = [*http_custom_filters(wp, case.mesh), *jwt_filter(case.mesh)]
            filters += http_rbac_filters(wp, case.mesh)
            mode = case.mesh.path_normalization.value
            listeners.append(http_listener(f"http{i}", case.address, case.port, filters, mode, log))
        for i, case in enumerate(tcp):
            wp = case.mesh.for_workload(case.destination)
            assert wp is not None
            filters = network_rbac_filters(wp, case.mesh, case.port)
            listeners.append(tcp_listener(f"tcp{i}", case.address, case.port, filters, "echo"))
        jobs = [(case, probe) for case in (*http, *tcp) for probe in case.probes]
        envoy = EnvoyProcess(bootstrap(listeners, clusters), workdir=workdir, concurrency=2)
        with reaped(envoy):
            await envoy.start(timeout=15)
            try:
                limit = asyncio.Semaphore(16)

                async def one(number: int, case: Case, probe: Probe) -> int:
                    async with limit:
                        return await send(case, probe, number)

                started = time.perf_counter()
                statuses = await asyncio.gather(*(one(n, *job) for n, job in enumerate(jobs)))
                seconds = time.perf_counter() - started
            finally:
                await envoy.stop()  # Envoy flushes its access log as it exits
    logged = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("probe") is not None:
            logged[int(entry["probe"])] = entry
    outcome = Outcome(seconds=seconds)
    for number, ((case, probe), status) in enumerate(zip(jobs, statuses, strict=True)):
        got = from_envoy(status, logged.get(number, {})) if probe.method else Answer(status)
        outcome.results.append((case, probe, got, offline(case, probe)))
    return outcome


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    http, tcp = http_cases(), tcp_cases()
    http_addresses = free_addresses(len(http), (HTTP_PORT,), frozenset())
    for case, address in zip(http, http_addresses, strict=True):
        case.address = address
    tcp_sets = sorted({case.name.rpartition("/")[0] for case in tcp})
    tcp_addresses = free_addresses(len(tcp_sets), TCP_PORTS, frozenset(http_addresses))
    for case in tcp:
        case.address = tcp_addresses[tcp_sets.index(case.name.rpartition("/")[0])]
    workdir = tmp_path_factory.mktemp("envoy")
    return asyncio.run(asyncio.wait_for(run_envoy(http, tcp, workdir), timeout=60))


# --- tests ---------------------------------------------------------------------------


def test_envoy_and_the_evaluator_agree(outcome: Outcome) -> None:
    sent = len(outcome.results)
    print(f"\n{sent} requests/connections through one Envoy in {outcome.seconds:.2f}s")
    assert sent > 500
    disagreements = outcome.disagreements()
    assert not disagreements, f"{len(disagreements)} of {sent} disagree:\n" + "\n".join(
        disagreements
    )


def test_every_outcome_is_exercised(outcome: Outcome) -> None:
    """The grid is not vacuous: allows, denies by DENY / ALLOW / CUSTOM, rejections, dry
    runs that match, JWT rejections and both TCP outcomes all occur."""
    seen = {(got.status, got.rule.split("-policy[")[0]) for _, _, got, _ in outcome.results}
    assert {(200, "ns[foo]"), (403, "ns[foo]"), (403, "none"), (400, "-"), (401, "-")} <= seen
    assert {(0, "-"), (200, "-")} <= seen  # TCP closed / echoed
    assert any("ext" in got.rule for _, _, got, _ in outcome.results)
    shadows = {v for _, _, got, _ in outcome.results for _, v in got.shadow}
    assert {"allowed", "denied", "ns[foo]-policy[shadow-deny]-rule[0]"} <= shadows
