"""The Envoy side of the RBAC differential test (test_rbac_differential, and the
listener builders test_rbac_golden reuses).

Provides the Envoy config (``http_listener`` with Istio's path normalization and a JSON
access log, ``tcp_listener``, ``jwt_filter`` (translate()'s), ``static_cluster``,
``bootstrap``), the answers compared (``Answer``: ``offline`` from the evaluator,
``from_envoy`` from the wire and the access log), and ``run_envoy``, which sends every
probe of every case through one Envoy and returns the ``Outcome``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import random
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.xds.rbac_cases import CLIENT, Case, Probe
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.decision import Decision
from trustmesh.policy.evaluate import ACCESS_DENIED, evaluate
from trustmesh.policy.request import HttpRequest, Request, Source
from trustmesh.xds.guards import request_guard_filters
from trustmesh.xds.inbound import inbound_request_fields
from trustmesh.xds.jwt import JWT_FILTER, jwt_authn_config
from trustmesh.xds.rbac import http_custom_filters, http_rbac_filters, network_rbac_filters

_T = "type.googleapis.com/envoy.extensions."
_HCM = _T + "filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = _T + "filters.http.router.v3.Router"
_TCP_PROXY = _T + "filters.network.tcp_proxy.v3.TcpProxy"
_FILE_LOG = _T + "access_loggers.file.v3.FileAccessLog"
# Dynamic metadata the RBAC filters write, by the name this test reports it under.
_METADATA = {
    "allow-id": "enforced_effective_policy_id",
    "tcp-allow-id": "observed_allow_shadow_effective_policy_id",  # see allow_observer
    "shadow-deny": "istio_dry_run_deny_shadow_engine_result",
    "shadow-deny-id": "istio_dry_run_deny_shadow_effective_policy_id",
    "shadow-allow": "istio_dry_run_allow_shadow_engine_result",
    "shadow-allow-id": "istio_dry_run_allow_shadow_effective_policy_id",
}
_SHADOW_KEYS = tuple(k for k in _METADATA if k.startswith("shadow"))
_OBSERVED = "observed_allow_"
_HTTP_RBAC, _NETWORK_RBAC = "envoy.filters.http.rbac", "envoy.filters.network.rbac"


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
        # The rig's own Connection: close line (Probe.wire) is part of what Envoy sees.
        lines = (*probe.headers, ("connection", "close"))
        http = HttpRequest(probe.method, probe.path, probe.host, lines)
    source = (
        Source.plaintext(probe.client)
        if probe.peer is None
        else Source.principal(probe.peer, probe.client)
    )
    request = Request(source, case.destination, case.port, http)
    # Envoy checks JWT expiry against the real clock: so does the offline side.
    decision = evaluate(case.mesh, request, now=time.time())
    if http is None:
        # A closed connection names the denying rule ("none": no ALLOW rule matched); an
        # echoed one the ALLOW rule that let it through (see allow_observer).
        if decision.verdict.value == "allow":
            return Answer(200, decision.rule or "-", _shadow(decision))
        closed = decision.rule or ("none" if decision.reason == ACCESS_DENIED else "-")
        return Answer(0, closed, _shadow(decision))
    assert decision.status is not None
    shadow = _shadow(decision)
    # A 403 without a rule is RBAC's "no ALLOW matched" — or jwt_authn's audience check,
    # which Envoy logs without any policy.
    denied = decision.rule or ("none" if decision.reason == ACCESS_DENIED else "-")
    # On a 200, Envoy logs the last RBAC filter's matched policy: the ALLOW rule, else an
    # AUDIT rule (AUDIT runs first and nothing after it matched).
    allowed = decision.rule or decision.audit or "-"
    rule = {200: allowed, 403: denied}.get(decision.status, "-")
    return Answer(decision.status, rule, shadow)


def _shadow(decision: Decision) -> tuple[tuple[str, str], ...]:
    shadow = dict.fromkeys(_SHADOW_KEYS, "-")
    for result in decision.dry_run:
        shadow[f"shadow-{result.action.lower()}"] = result.result
        shadow[f"shadow-{result.action.lower()}-id"] = result.rule or "-"
    return tuple(shadow.items())


def from_envoy(status: int, logged: dict[str, Any]) -> Answer:
    """Envoy's answer: the status on the wire (TCP: 200 echoed, 0 closed) and the
    request's (connection's) access-log line — empty when the HTTP codec refused the
    request before the HCM saw it. A denial names its policy in the response (connection
    termination) details, ``rbac_access_denied_matched_policy[NAME]``, ``none`` when no
    ALLOW policy matched; an allow in the RBAC filters' dynamic metadata."""

    def value(key: str) -> str:
        found = logged.get(_METADATA.get(key, key))
        return "-" if found is None else str(found)

    rule, details = "-", value("details")
    if status in (0, 403) and details.startswith("rbac_access_denied_matched_policy["):
        rule = details.removeprefix("rbac_access_denied_matched_policy[").removesuffix("]")
    elif status == 200:
        rule = value("allow-id" if "probe" in logged else "tcp-allow-id")
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


def jwt_filter(wp: WorkloadPolicy, mesh: MeshPolicy) -> list[dict[str, Any]]:
    """The jwt_authn filter translate() gives the workload: Istio's shape (providers in
    issuer order, ``requires_any[provider, allow_missing]``, payload in metadata)."""
    if not wp.jwt_providers:
        return []
    config = jwt_authn_config(wp.jwt_providers)
    return [{"name": JWT_FILTER, "typed_config": config}]


def access_log(path: Path) -> list[dict[str, Any]]:
    """A JSON line per request, written as the stream ends, after every RBAC filter has
    recorded its results. (Local-reply headers cannot carry them: with Envoy 1.40 a 403's
    headers lacked the denying filter's own shadow results.)"""
    fields = {"probe": "%REQ(x-probe)%", "details": "%RESPONSE_CODE_DETAILS%"}
    fields |= {key: f"%DYNAMIC_METADATA({_HTTP_RBAC}:{key})%" for key in _METADATA.values()}
    config = {"@type": _FILE_LOG, "path": str(path), "log_format": {"json_format": fields}}
    return [{"name": "envoy.access_loggers.file", "typed_config": config}]


def connection_log(path: Path) -> list[dict[str, Any]]:
    """A listener's JSON line per connection, keyed by the client's address and port:
    the network RBAC filters' termination details and dynamic metadata."""
    fields = {"peer": "%DOWNSTREAM_REMOTE_ADDRESS%", "details": "%CONNECTION_TERMINATION_DETAILS%"}
    fields |= {key: f"%DYNAMIC_METADATA({_NETWORK_RBAC}:{key})%" for key in _METADATA.values()}
    config = {"@type": _FILE_LOG, "path": str(path), "log_format": {"json_format": fields}}
    return [{"name": "envoy.access_loggers.file", "typed_config": config}]


def http_listener(
    name: str,
    address: str,
    port: int,
    filters: list[dict[str, Any]],
    mode: str,
    log: Path,
    tls: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """HCM (normalization per ``mode``, request headers as trustmesh's inbound listener
    treats them) → ``filters`` → a router answering 200 itself."""
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
    manager = {
        "@type": _HCM,
        "stat_prefix": name,
        "codec_type": "HTTP1",
        "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": [route]}]},
        "http_filters": [*filters, {"name": "router", "typed_config": {"@type": _ROUTER}}],
        "access_log": access_log(log),
        **normalization(mode),
        **inbound_request_fields(),
    }
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
    return _listener(name, address, port, [hcm], tls)


def tcp_listener(
    name: str,
    address: str,
    port: int,
    filters: list[dict[str, Any]],
    cluster: str,
    tls: dict[str, Any] | None = None,
    log: Path | None = None,
) -> dict[str, Any]:
    proxy = {"@type": _TCP_PROXY, "stat_prefix": name, "cluster": cluster}
    chain = [*filters, {"name": "tcp", "typed_config": proxy}]
    listener = _listener(name, address, port, chain, tls)
    if log is not None:
        listener["access_log"] = connection_log(log)
    return listener


def allow_observer(filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A last network RBAC filter that enforces nothing and holds the ALLOW filter's
    policies as shadow rules: Envoy's network RBAC reports the policy that denied a
    connection (termination details), but not the one that allowed it — this copy makes
    Envoy name it (``observed_allow_shadow_effective_policy_id``). Nothing if no ALLOW
    filter is there."""
    allow = [
        f["typed_config"]["rules"]
        for f in filters
        if f["name"] == _NETWORK_RBAC
        and f["typed_config"].get("rules", {}).get("action") == "ALLOW"
    ]
    if not allow:
        return []
    config = {
        "@type": _T + "filters.network.rbac.v3.RBAC",
        "stat_prefix": "observed.",
        "shadow_rules": allow[-1],
        "shadow_rules_stat_prefix": _OBSERVED,
    }
    return [{"name": _NETWORK_RBAC, "typed_config": config}]


def _listener(
    name: str, address: str, port: int, filters: list[Any], tls: dict[str, Any] | None = None
) -> dict[str, Any]:
    socket_address = {"address": address, "port_value": port}
    chain: dict[str, Any] = {"filters": filters}
    if tls is not None:
        chain["transport_socket"] = tls
    return {"name": name, "address": {"socket_address": socket_address}, "filter_chains": [chain]}


class MeshPeers:
    """mTLS for listeners with ``Case.tls``: the server presents a foo/httpbin mesh
    certificate and requires a client certificate from the same root; each probe's
    ``peer`` (``td/ns/NS/sa/SA``) is a client certificate made for it."""

    def __init__(self, workdir: Path) -> None:
        from tests.envoy.conftest import MiniCA, mesh_client_tls

        self._ca, self._make_client, self._workdir = MiniCA(), mesh_client_tls, workdir
        server = self._ca.issue("foo", "httpbin")
        (workdir / "server.pem").write_bytes(server.cert_chain_pem)
        (workdir / "server.key").touch(mode=0o600)
        (workdir / "server.key").write_bytes(server.private_key_pem)
        (workdir / "root.pem").write_bytes(server.trust_bundle_pem)
        self._clients: dict[str, ssl.SSLContext] = {}

    def transport_socket(self) -> dict[str, Any]:
        files = {
            name: str(self._workdir / name) for name in ("server.pem", "server.key", "root.pem")
        }
        context = {
            "@type": _T + "transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": files["server.pem"]},
                        "private_key": {"filename": files["server.key"]},
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": files["root.pem"]}},
            },
        }
        return {"name": "envoy.transport_sockets.tls", "typed_config": context}

    def client(self, peer: str) -> ssl.SSLContext:
        """A client presenting ``spiffe://PEER`` (made once per principal)."""
        if peer not in self._clients:
            domain, _, rest = peer.partition("/ns/")
            namespace, _, account = rest.partition("/sa/")
            secret = self._ca.issue(namespace, account, domain)
            self._clients[peer] = self._make_client(secret, self._workdir)
        return self._clients[peer]


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


async def send(
    case: Case,
    probe: Probe,
    number: int,
    timeout: float = 5,
    tls: ssl.SSLContext | None = None,
    peers: dict[int, str] | None = None,
    source_ports: Iterator[int] | None = None,
) -> int:
    """Send ``probe`` raw (over ``tls`` when given); the HTTP status, or for TCP 200 if
    echoed and 0 if closed. ``peers`` records the client address of TCP probe
    ``number`` (``ip:port``), which Envoy's connection log names it by; the port comes
    from ``source_ports`` (never one used before in the run, so no two connections of
    a run share an address)."""
    async with asyncio.timeout(timeout):
        reader, writer = await _connect(case, probe, tls, source_ports)
        try:
            writer.write(probe.wire(number))
            if probe.method is None:
                if peers is not None:
                    host, port = writer.get_extra_info("sockname")[:2]
                    peers[number] = f"{host}:{port}"
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


async def _connect(
    case: Case, probe: Probe, tls: ssl.SSLContext | None, source_ports: Iterator[int] | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if source_ports is None or probe.method is not None:
        return await asyncio.open_connection(
            case.address, case.port, local_addr=(probe.client, 0), ssl=tls
        )
    for _ in range(100):
        local = (probe.client, next(source_ports))
        try:
            return await asyncio.open_connection(case.address, case.port, local_addr=local, ssl=tls)
        except OSError as refused:
            if refused.errno != errno.EADDRINUSE:
                raise
    raise RuntimeError(f"no free source port on {probe.client}")


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
    log, tcp_log = workdir / "access.log", workdir / "connections.log"
    peers = MeshPeers(workdir) if any(case.tls for case in (*http, *tcp)) else None

    def tls(case: Case) -> dict[str, Any] | None:
        return peers.transport_socket() if case.tls and peers is not None else None

    async with echo_server() as echo_port:
        listeners, clusters = [], [static_cluster("echo", CLIENT, echo_port)]
        for i, case in enumerate(http):
            wp = case.mesh.for_workload(case.destination)
            assert wp is not None
            filters = [*request_guard_filters(wp, case.mesh), *http_custom_filters(wp, case.mesh)]
            filters += jwt_filter(wp, case.mesh)
            filters += http_rbac_filters(wp, case.mesh)
            mode = case.mesh.path_normalization.value
            listeners.append(
                http_listener(f"http{i}", case.address, case.port, filters, mode, log, tls(case))
            )
        for i, case in enumerate(tcp):
            wp = case.mesh.for_workload(case.destination)
            assert wp is not None
            filters = network_rbac_filters(wp, case.mesh, case.port)
            filters += allow_observer(filters)
            listeners.append(
                tcp_listener(
                    f"tcp{i}", case.address, case.port, filters, "echo", tls(case), tcp_log
                )
            )
        jobs = [(case, probe) for case in (*http, *tcp) for probe in case.probes]
        envoy = EnvoyProcess(bootstrap(listeners, clusters), workdir=workdir, concurrency=2)
        with reaped(envoy):
            await envoy.start(timeout=15)
            try:
                limit = asyncio.Semaphore(16)
                client_addresses: dict[int, str] = {}
                source_ports = itertools.count(random.randrange(20_000, 30_000))

                async def one(number: int, case: Case, probe: Probe) -> int:
                    client = None
                    if probe.peer is not None:
                        assert peers is not None and case.tls, (case.name, probe)
                        client = peers.client(probe.peer)
                    async with limit:
                        return await send(
                            case,
                            probe,
                            number,
                            tls=client,
                            peers=client_addresses,
                            source_ports=source_ports,
                        )

                started = time.perf_counter()
                statuses = await asyncio.gather(*(one(n, *job) for n, job in enumerate(jobs)))
                seconds = time.perf_counter() - started
            finally:
                await envoy.stop()  # Envoy flushes its access log as it exits
    logged = {}
    for line in log.read_text().splitlines() if log.exists() else ():
        entry = json.loads(line)
        if entry.get("probe") is not None:
            logged[int(entry["probe"])] = entry
    connections = {}
    for line in tcp_log.read_text().splitlines() if tcp_log.exists() else ():
        entry = json.loads(line)
        connections[entry.get("peer")] = entry
    outcome = Outcome(seconds=seconds)
    for number, ((case, probe), status) in enumerate(zip(jobs, statuses, strict=True)):
        if probe.method is None:
            got = from_envoy(status, connections.get(client_addresses.get(number), {}))
        else:
            got = from_envoy(status, logged.get(number, {}))
        outcome.results.append((case, probe, got, offline(case, probe)))
    return outcome
