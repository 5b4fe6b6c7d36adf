"""Data-plane benchmark: trustmesh's sidecar pair next to a hand-written Envoy pair.

Three paths carry the same closed-loop HTTP/1.1 load, side by side in one run:

1. ``direct``: load generator → the app (plaintext).
2. ``handwritten``: load generator → a minimal client Envoy (HTTP listener, a cluster
   with an UpstreamTlsContext presenting a client certificate and pinning the server's
   SPIFFE ID) → a minimal server Envoy (DownstreamTlsContext requiring a client
   certificate, an RBAC filter allowing the client's principal, router) → the app. The
   certificates come from trustmesh's CA, inline in the bootstraps: the best case a user
   could write by hand.
3. ``trustmesh``: the same traffic through two sidecars configured by the real control
   plane — CertificateAuthority + CaServer, two WorkloadAgents (bootstrap-token
   enrollment, SDS), ControlPlane over examples/mesh/workloads.yaml + mesh-wide STRICT +
   an AuthorizationPolicy ALLOWing foo/sleep on foo/httpbin, Envoys from
   ``ads_bootstrap``. Requests go to sleep's outbound HTTP proxy (:15001) in absolute
   form, ``GET http://httpbin.foo:8000/get``, as ``HTTP_PROXY`` clients send them.

A fourth path, ``handwritten_accesslog`` (``--no-access-log-variant`` leaves it out), is
the hand-written pair plus the very ``access_log`` entries trustmesh's sidecars run (copied
from their config dumps: one JSON line per request to stdout on each side): what those
logs alone cost.

The app is a third Envoy answering a ``direct_response`` (so it is never the
bottleneck), shared by all paths. Every Envoy runs with ``--concurrency 1``.

The load generator is Python (wrk is not assumed): worker processes, each with keep-alive
connections on non-blocking sockets (``selectors``), one request in flight per
connection, a prebuilt request, responses framed by Content-Length. After a warm-up, a
fixed window is measured: requests/s, latency percentiles, errors, and the CPU time each
process spent per request (from ``/proc/<pid>/stat``), which isolates the Envoys' cost
from the generator's on a machine with few cores; ``other_cores_busy`` is the CPU the
rest of the machine used meanwhile (well above 0: another job skewed that run). Paths are
interleaved round by round so that drift hits all of them alike; medians over rounds are
reported with the ratios trustmesh / handwritten, from the medians and round by round.
The JSON also summarizes, from each proxy's admin ``/config_dump``, what runs per request
(HTTP filters, access logs, path normalization, XFCC), and the server counters that show
mTLS and RBAC at work.

Usage: python bench/bench_dataplane.py [--rounds 3] [--duration 5] [--warmup 1]
       [--workers 2] [--connections 8] [--no-access-log-variant]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import multiprocessing
import os
import platform
import selectors
import shutil
import socket
import statistics
import sys
import tempfile
import time
from array import array
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.agent.sds import SdsServer, SecretStore
from trustmesh.agent.workload import AgentConfig, WorkloadAgent
from trustmesh.agent.xds_bootstrap import ads_bootstrap
from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.xds.controlplane import ControlPlane, ProxyRegistration
from trustmesh.xds.outbound_listeners import OUTBOUND_HTTP_PORT

ROOT = Path(__file__).resolve().parents[1]
APP_PORT = 8000  # httpbin's service and container port in examples/mesh/workloads.yaml
HTTPBIN = SpiffeId("cluster.local", "foo", "httpbin")
SLEEP = SpiffeId("cluster.local", "foo", "sleep")
# A small JSON body, the size of a typical API answer; the same app serves every path.
BODY = json.dumps({"args": {}, "headers": {"host": "httpbin.foo:8000"}, "url": "/get"})
TARGETS = {"throughput_ratio_min": 0.95, "p50_increase_max": 0.10}

# One loopback address per role, so each listener has its own address and ports never
# collide.
APP_ADDRESS = "127.0.77.1"
HAND_CLIENT_ADDRESS = "127.0.77.2"
HAND_SERVER_ADDRESS = "127.0.77.3"
HAND_LOG_CLIENT_ADDRESS = "127.0.77.4"
HAND_LOG_SERVER_ADDRESS = "127.0.77.5"
SLEEP_POD_ADDRESS = "127.0.77.6"
SLEEP_OUTBOUND_ADDRESS = "127.0.77.7"
HTTPBIN_POD_ADDRESS = "127.0.77.8"

ALLOW_SLEEP = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-sleep, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [{SLEEP.uri.removeprefix("spiffe://")}]}}}}]
"""

_T = "type.googleapis.com/"
_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
_RBAC = _T + "envoy.extensions.filters.http.rbac.v3.RBAC"
_DOWNSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_UPSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def log(message: str) -> None:
    print(f"[bench_dataplane] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- load generator


@dataclass(frozen=True, slots=True)
class Job:
    """One load run for every worker: where, what, how many connections, when."""

    host: str
    port: int
    request: bytes
    connections: int
    start_at: float  # time.monotonic(): the same clock in every process on Linux
    warmup: float
    duration: float
    max_requests: int  # per worker: a bound in case the window is never reached


@dataclass(slots=True)
class JobResult:
    completed: int  # inside the measured window
    errors: int
    window_s: float
    latencies_ns: array[int]  # array('q'): nanoseconds, one per measured request
    first_error: str = ""


class _Conn:
    """One keep-alive connection with at most one request in flight."""

    __slots__ = ("buf", "sent_at", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.sent_at = 0


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def _response_end(buf: bytearray) -> int:
    """Length of the first complete response in ``buf``; 0 if incomplete, -1 if unframed."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return 0
    head = bytes(buf[:head_end]).lower()
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return -1  # chunked or close-delimited: not what these servers send
    value_end = head.find(b"\r", at + 17)
    length = int(head[at + 17 : value_end if value_end > 0 else head_end])
    total = head_end + 4 + length
    return total if len(buf) >= total else 0


def run_load(job: Job) -> JobResult:
    """Closed loop on ``job.connections`` connections; latencies of the measured window."""
    selector = selectors.DefaultSelector()
    clock = time.perf_counter_ns  # CLOCK_MONOTONIC, like time.monotonic()
    latencies: array[int] = array("q")
    errors, first_error = 0, ""

    def send(conn: _Conn) -> None:
        conn.sent_at = clock()
        conn.sock.send(job.request)  # ~100 bytes: always fits the empty send buffer

    def replace(conn: _Conn, why: str) -> None:
        nonlocal errors, first_error
        errors += 1
        first_error = first_error or why
        selector.unregister(conn.sock)
        conn.sock.close()
        with contextlib.suppress(OSError):
            fresh = _Conn(_connect(job.host, job.port))
            selector.register(fresh.sock, selectors.EVENT_READ, fresh)
            send(fresh)

    conns = [_Conn(_connect(job.host, job.port)) for _ in range(job.connections)]
    for conn in conns:
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    time.sleep(max(0.0, job.start_at - time.monotonic()))
    begin = int((job.start_at + job.warmup) * 1e9)
    end = begin + int(job.duration * 1e9)
    for conn in conns:
        send(conn)
    now = clock()
    while now < end and len(latencies) < job.max_requests:
        for key, _ in selector.select(timeout=0.05):
            conn = key.data
            try:
                data = conn.sock.recv(65536)
            except OSError as exc:
                replace(conn, repr(exc))
                continue
            if not data:
                replace(conn, "connection closed by the server")
                continue
            conn.buf += data
            size = _response_end(conn.buf)
            if size == 0:
                continue
            now = clock()
            if size < 0 or conn.buf[9:12] != b"200" or len(conn.buf) != size:
                replace(conn, bytes(conn.buf[:80]).decode("latin-1"))
                continue
            conn.buf.clear()
            if now >= begin:
                latencies.append(now - conn.sent_at)
            send(conn)
        now = clock()
    window = (min(now, end) - begin) / 1e9
    for key in list(selector.get_map().values()):
        key.data.sock.close()
    selector.close()
    return JobResult(len(latencies), errors, window, latencies, first_error)


def _worker_main(pipe: Connection) -> None:
    """A generator process: runs jobs from the pipe until it reads None."""
    while (job := pipe.recv()) is not None:
        try:
            pipe.send(run_load(job))
        except Exception as exc:  # reported to the parent, which fails the run
            pipe.send(repr(exc))


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    completed: int
    errors: int
    first_error: str

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests_per_s": round(self.requests_per_s),
            "p50_ms": round(self.p50_ms, 3),
            "p90_ms": round(self.p90_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "completed": self.completed,
            "errors": self.errors,
        }
        if self.first_error:
            out["first_error"] = self.first_error
        return out


def merge(results: Sequence[JobResult]) -> LoadResult:
    samples = sorted(x for r in results for x in r.latencies_ns)
    if not samples:
        raise RuntimeError(f"no request completed: {[r.first_error for r in results]}")

    def pct(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))] / 1e6

    return LoadResult(
        # Each worker measured the same window: their rates add up.
        requests_per_s=sum(r.completed / r.window_s for r in results),
        p50_ms=pct(0.50),
        p90_ms=pct(0.90),
        p99_ms=pct(0.99),
        completed=len(samples),
        errors=sum(r.errors for r in results),
        first_error=next((r.first_error for r in results if r.first_error), ""),
    )


class LoadGenerator:
    """Worker processes started once (spawn: the parent runs gRPC threads, fork is unsafe)
    and reused for every run, so no run pays for process start-up."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for _ in range(workers):
            parent, child = context.Pipe()
            process = context.Process(target=_worker_main, args=(child,), daemon=True)
            process.start()
            child.close()
            self._pipes.append(parent)
            self._processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def run(self, job: Job) -> LoadResult:
        for pipe in self._pipes:
            pipe.send(job)
        results = [pipe.recv() for pipe in self._pipes]
        failed = [r for r in results if isinstance(r, str)]
        if failed:
            raise RuntimeError(f"load generator failed: {failed}")
        return merge(results)

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self._processes:
            process.join(5)
            if process.is_alive():
                process.kill()  # by its own PID
                process.join()


# ---------------------------------------------------------------------------- CPU accounting

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def machine_busy_seconds() -> float:
    """CPU time every core spent not idle so far, kernel included: set against what our
    processes used, it shows load from elsewhere (another job on the machine)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK  # minus idle, iowait; no guest


# ---------------------------------------------------------------------------- bootstraps


@dataclass(frozen=True, slots=True)
class Credentials:
    """A workload certificate as the agent installs it: leaf (+ intermediates), key, roots."""

    chain_pem: str
    key_pem: str
    roots_pem: str


def issue(ca: CertificateAuthority, identity: SpiffeId, now: dt.datetime) -> Credentials:
    key = pki.generate_key(ca.config.key_type)
    issued = ca.issue(pki.build_csr(key, [identity.uri]), identity, now)
    return Credentials(
        "".join(issued.chain_pem[:-1]),  # without the root, as the agent serves it over SDS
        pki.key_to_pem(key).decode(),
        ca.bundle_pem(now).decode(),
    )


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _static_cluster(name: str, host: str, port: int, **extra: Any) -> dict[str, Any]:
    endpoint = {"endpoint": {"address": _address(host, port)}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
        **extra,
    }


def _bootstrap(
    name: str, listener: dict[str, Any], clusters: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "node": {"id": name, "cluster": name},
        # Port 0: Envoy picks it and EnvoyProcess reads it back, no port race.
        "admin": {"address": _address("127.0.0.1", 0)},
        "static_resources": {"listeners": [listener], "clusters": list(clusters)},
    }


def _hcm(
    name: str, route: dict[str, Any], filters: Sequence[dict[str, Any]] = (), **extra: Any
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM,
            "stat_prefix": name,
            "route_config": {
                "virtual_hosts": [{"name": name, "domains": ["*"], "routes": [route]}]
            },
            "http_filters": [
                *filters,
                {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
            ],
            **extra,
        },
    }


def app_bootstrap(address: str) -> dict[str, Any]:
    """The app: a listener answering every request itself with ``BODY``."""
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": BODY}},
    }
    listener = {
        "name": "app",
        "address": _address(address, APP_PORT),
        "filter_chains": [{"filters": [_hcm("app", route)]}],
    }
    return _bootstrap("app", listener, [])


def _tls_certificate(creds: Credentials) -> dict[str, Any]:
    return {
        "certificate_chain": {"inline_string": creds.chain_pem},
        "private_key": {"inline_string": creds.key_pem},
    }


def handwritten_client_bootstrap(
    address: str, server: str, creds: Credentials, access_log: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """HTTP proxy listener → cluster over mTLS, the server pinned by its SPIFFE ID."""
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _UPSTREAM_TLS,
            "common_tls_context": {
                "tls_certificates": [_tls_certificate(creds)],
                "validation_context": {
                    "trusted_ca": {"inline_string": creds.roots_pem},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": HTTPBIN.uri}}
                    ],
                },
            },
        },
    }
    route = {"match": {"prefix": "/"}, "route": {"cluster": "server"}}
    # Absolute-form requests need no option: Envoy's HTTP/1 codec accepts them by default.
    manager = _hcm("client", route, access_log=list(access_log))
    listener = {
        "name": "client",
        "address": _address(address, OUTBOUND_HTTP_PORT),
        "filter_chains": [{"filters": [manager]}],
    }
    cluster = _static_cluster("server", server, APP_PORT, transport_socket=tls)
    return _bootstrap("handwritten-client", listener, [cluster])


def handwritten_server_bootstrap(
    address: str, app: str, creds: Credentials, access_log: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """mTLS listener (client certificate required) → RBAC ALLOW sleep → router → app."""
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _DOWNSTREAM_TLS,
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [_tls_certificate(creds)],
                "validation_context": {"trusted_ca": {"inline_string": creds.roots_pem}},
            },
        },
    }
    principal = {"authenticated": {"principal_name": {"exact": SLEEP.uri}}}
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": _RBAC,
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "allow-sleep": {"permissions": [{"any": True}], "principals": [principal]}
                },
            },
        },
    }
    route = {"match": {"prefix": "/"}, "route": {"cluster": "app"}}
    manager = _hcm("server", route, [rbac], access_log=list(access_log))
    listener = {
        "name": "server",
        "address": _address(address, APP_PORT),
        "filter_chains": [{"transport_socket": tls, "filters": [manager]}],
    }
    return _bootstrap("handwritten-server", listener, [_static_cluster("app", app, APP_PORT)])


# ---------------------------------------------------------------------------- processes


async def start_envoy(
    stack: contextlib.AsyncExitStack, bootstrap: dict[str, Any], workdir: Path
) -> EnvoyProcess:
    """An Envoy with one worker thread, stopped by PID when ``stack`` closes."""
    envoy = EnvoyProcess(bootstrap, workdir=workdir, concurrency=1)
    stack.push_async_callback(envoy.stop)  # before start: a failed start is killed too
    await envoy.start(timeout=20)
    return envoy


@contextlib.asynccontextmanager
async def workload_agent(
    identity: SpiffeId, ca_server: CaServer, workdir: Path
) -> AsyncIterator[SdsServer]:
    """A workload agent enrolled with a bootstrap token, serving SDS (its Envoy's certs)."""
    now, ca = dt.datetime.now(dt.UTC), ca_server.ca
    config = AgentConfig(
        identity=identity,
        ca_address=f"127.0.0.1:{ca_server.port}",
        ca_renewal_address=f"127.0.0.1:{ca_server.renewal_port}",
        ca_roots_pem=ca.bundle_pem(now),
        token=ca.token(identity.namespace, identity.service_account, now),
        bundle_refresh_seconds=3600,
    )
    agent = WorkloadAgent(config, SecretStore())
    workdir.mkdir(parents=True)
    sds = SdsServer(agent.store, str(workdir / "sds.sock"))
    await sds.start()
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.ready.wait(), 10)
        yield sds
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await sds.stop()


def write_mesh_config(directory: Path) -> Path:
    """The istio.io example mesh, mesh-wide STRICT, and the ALLOW that turns RBAC on."""
    directory.mkdir(parents=True)
    shutil.copy(ROOT / "examples/mesh/workloads.yaml", directory / "workloads.yaml")
    strict = ROOT / "examples/scenarios/12-mesh-strict/config.yaml"
    shutil.copy(strict, directory / "mtls.yaml")
    (directory / "authz.yaml").write_text(ALLOW_SLEEP)
    return directory


@dataclass(frozen=True, slots=True)
class Pair:
    """A client proxy (where the load generator sends) and the server proxy behind it."""

    client: EnvoyProcess
    server: EnvoyProcess
    client_address: str


async def trustmesh_pair(
    stack: contextlib.AsyncExitStack, ca: CertificateAuthority, workdir: Path
) -> Pair:
    """Two sidecars configured by the real control plane over ADS + mTLS."""
    ca_server = CaServer(ca)
    stack.push_async_callback(ca_server.stop)
    await ca_server.start()
    httpbin = ProxyRegistration.sidecar("foo/httpbin", HTTPBIN_POD_ADDRESS, app_address=APP_ADDRESS)
    sleep = ProxyRegistration.sidecar(
        "foo/sleep", SLEEP_POD_ADDRESS, outbound_address=SLEEP_OUTBOUND_ADDRESS
    )
    # workloads.yaml declares Deployments (no pod IP): the runtime tells the control plane
    # where httpbin runs, for sleep's endpoint of httpbin.foo.
    plane = ControlPlane(
        [str(write_mesh_config(workdir / "config"))],
        ca=ca,
        workload_addresses={"foo/httpbin": HTTPBIN_POD_ADDRESS},
    )
    plane.register(httpbin)
    plane.register(sleep)
    stack.push_async_callback(plane.stop)
    await plane.start()
    envoys = []
    for identity, registration in ((HTTPBIN, httpbin), (SLEEP, sleep)):
        home = workdir / identity.service_account
        sds = await stack.enter_async_context(workload_agent(identity, ca_server, home))
        bootstrap = ads_bootstrap(
            node_id=registration.node_id,
            cluster=f"{identity.service_account}.{identity.namespace}",
            sds_socket=sds.socket_path,
            xds_address="127.0.0.1",
            xds_port=plane.port,
            control_plane_id=plane.spiffe_id,
        )
        envoys.append(await start_envoy(stack, bootstrap, home / "envoy"))
    server, client = envoys
    return Pair(client, server, SLEEP_OUTBOUND_ADDRESS)


async def handwritten_pair(
    stack: contextlib.AsyncExitStack,
    ca: CertificateAuthority,
    workdir: Path,
    addresses: tuple[str, str],
    access_logs: tuple[Sequence[dict[str, Any]], Sequence[dict[str, Any]]] = ((), ()),
) -> Pair:
    """The minimal static pair, certificates from the same CA (same key type, same root)."""
    now = dt.datetime.now(dt.UTC)
    client_at, server_at = addresses
    server = await start_envoy(
        stack,
        handwritten_server_bootstrap(
            server_at, APP_ADDRESS, issue(ca, HTTPBIN, now), access_logs[1]
        ),
        workdir / "server",
    )
    client = await start_envoy(
        stack,
        handwritten_client_bootstrap(client_at, server_at, issue(ca, SLEEP, now), access_logs[0]),
        workdir / "client",
    )
    return Pair(client, server, client_at)


# ---------------------------------------------------------------------------- requests

# Absolute form, as clients with HTTP_PROXY set send it: trustmesh's proxy picks the route
# by its Host. Every path gets these very bytes (servers must accept absolute form too,
# RFC 9112 §3.2.2, and Envoy does).
REQUEST = b"GET http://httpbin.foo:8000/get HTTP/1.1\r\nHost: httpbin.foo:8000\r\n\r\n"


def probe(host: str, port: int, request: bytes) -> tuple[bytes, bytes]:
    """One request on a fresh connection: (status line, body)."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(request)
        buf = bytearray()
        while (size := _response_end(buf)) == 0:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {bytes(buf)!r}")
            buf += chunk
    if size < 0:
        raise ConnectionError(f"unframed response {bytes(buf[:200])!r}")
    head, _, body = bytes(buf[:size]).partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


async def wait_serving(host: str, port: int, request: bytes, timeout: float = 10) -> None:
    """Until a request through ``host:port`` gets the app's answer (listeners warmed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = await asyncio.to_thread(probe, host, port, request)
            if status.endswith(b"200 OK") and body == BODY.encode():
                return
            last = f"{status!r} {body[:200]!r}"
        except OSError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host}:{port} does not serve the app: {last}")
        await asyncio.sleep(0.1)


def check_free(addresses: Sequence[tuple[str, int]]) -> None:
    """Fail early, with a clear message, if another process holds one of our ports."""
    for host, port in addresses:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"{host}: the benchmark listens on loopback addresses only")
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise SystemExit(f"{host}:{port} is in use ({exc}): another run?") from None


# ---------------------------------------------------------------------------- measuring


@dataclass(frozen=True, slots=True)
class LoadPath:
    """One measured path: where the load goes and which processes serve it."""

    name: str
    host: str
    port: int
    request: bytes
    roles: dict[str, int]  # role → Envoy PID, for CPU accounting


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def measure(path: LoadPath, load: LoadGenerator, args: argparse.Namespace) -> dict[str, Any]:
    """One run of ``path``: the generator's numbers and CPU per request of each process."""
    start_at = time.monotonic() + 0.2
    job = Job(
        path.host,
        path.port,
        path.request,
        args.connections,
        start_at,
        args.warmup,
        args.duration,
        max_requests=args.max_requests,
    )
    running = asyncio.create_task(asyncio.to_thread(load.run, job))
    roles = {**path.roles, "generator": 0}

    def cpu() -> dict[str, float]:
        out = {role: cpu_seconds(pid) for role, pid in path.roles.items()}
        out["generator"] = sum(cpu_seconds(pid) for pid in load.pids)
        out["machine"] = machine_busy_seconds()
        return out

    # CPU is sampled in this process at the window's edges, while the workers measure.
    await sleep_until(start_at + args.warmup)
    before = cpu()
    await sleep_until(start_at + args.warmup + args.duration)
    after = cpu()
    result = await running
    per_request = {
        # CPU microseconds per request; the generator's too, since it shares the cores.
        role: round((after[role] - before[role]) / max(result.completed, 1) * 1e6, 1)
        for role in roles
    }
    busy = {role: (after[role] - before[role]) / args.duration for role in roles}
    # Cores busy with anything but this path's processes: another job on the machine
    # makes a run slower for reasons that have nothing to do with the path.
    others = (after["machine"] - before["machine"]) / args.duration - sum(busy.values())
    return {
        **result.as_json(),
        "cpu_us_per_request": per_request,
        "cpu_cores_busy": {role: round(value, 2) for role, value in busy.items()},
        "other_cores_busy": round(others, 2),
    }


# ---------------------------------------------------------------------------- evidence


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def _listeners(dump: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for config in dump["configs"]:
        for entry in config.get("static_listeners", []):
            yield entry["listener"]
        for entry in config.get("dynamic_listeners", []):
            if "active_state" in entry:
                yield entry["active_state"]["listener"]


def _short(type_url: str) -> str:
    return type_url.rpartition(".")[2]


def per_request_features(dump: dict[str, Any]) -> dict[str, Any]:
    """What an HTTP request meets in this Envoy, listener by listener, from /config_dump:
    the things that cost per request rather than per connection."""
    out: dict[str, Any] = {}
    for listener in _listeners(dump):
        for node in _walk(listener.get("filter_chains", [])):
            if node.get("@type") != _HCM:
                continue
            features: dict[str, Any] = {
                "http_filters": [f["name"] for f in node.get("http_filters", [])],
                "access_logs": [_access_log_summary(a) for a in node.get("access_log", [])],
            }
            for key in (
                "codec_type",
                "normalize_path",
                "merge_slashes",
                "path_with_escaped_slashes_action",
                "forward_client_cert_details",
                "set_current_client_cert_details",
                "use_remote_address",
                "generate_request_id",
            ):
                if key in node:
                    features[key] = node[key]
            routes = [
                r
                for v in node.get("route_config", {}).get("virtual_hosts", [])
                for r in v["routes"]
            ]
            features["virtual_hosts"] = len(node.get("route_config", {}).get("virtual_hosts", []))
            features["routes"] = len(routes)
            out[listener["name"]] = features  # chains of one listener share the same HCM
    ecds = {
        e["ecds_filter"]["name"]: _ecds_summary(e["ecds_filter"]["typed_config"])
        for config in dump["configs"]
        for e in config.get("ecds_filters", [])
    }
    if ecds:
        out["ecds_filters"] = ecds
    return out


def _access_log_summary(entry: dict[str, Any]) -> str:
    """E.g. ``StdoutAccessLog, json 19 fields, unfiltered``: what each request pays."""
    config = entry["typed_config"]
    log_format = config.get("log_format", {})
    if "json_format" in log_format:
        shape = f"json {len(log_format['json_format'])} fields"
    else:
        shape = "text" if log_format else "default format"
    when = "filtered" if "filter" in entry else "every request"
    return f"{_short(config['@type'])}, {shape}, {when}"


def _ecds_summary(config: dict[str, Any]) -> str:
    kind = _short(config["@type"])
    if kind == "RBAC":
        if "rules" not in config:
            return "RBAC (no rules: pass-through)"
        rules = config["rules"]
        return f"RBAC {rules.get('action', 'ALLOW')} {len(rules.get('policies', {}))} policies"
    if kind == "JwtAuthentication":
        return "jwt_authn " + ("with providers" if config.get("providers") else "(no providers)")
    return kind


async def stats(envoy: EnvoyProcess, pattern: str) -> dict[str, int]:
    """Non-zero counters matching ``pattern`` (a regex for admin /stats)."""
    body = (await envoy.admin_get(f"/stats?usedonly&filter={pattern}")).body.decode()
    out = {}
    for line in body.splitlines():
        key, _, value = line.partition(": ")
        if value.isdigit() and int(value):
            out[key] = int(value)
    return out


async def config_dump(envoy: EnvoyProcess) -> dict[str, Any]:
    return json.loads((await envoy.admin_get("/config_dump", timeout=10)).body)  # type: ignore[no-any-return]


def access_logs_of(dump: dict[str, Any], listener_name: str) -> list[dict[str, Any]]:
    """The access_log entries of a listener's HTTP connection manager."""
    for listener in _listeners(dump):
        if listener["name"] == listener_name:
            for node in _walk(listener["filter_chains"]):
                if node.get("@type") == _HCM:
                    return list(node.get("access_log", []))
    raise LookupError(f"no HTTP listener {listener_name!r}")


# ---------------------------------------------------------------------------- the run


def summarize(rounds: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per path, the median over rounds of each number."""
    out: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        out[name] = {
            key: round(statistics.median(run[key] for run in runs), 3)
            for key in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms")
        }
        out[name]["errors"] = sum(run["errors"] for run in runs)
        out[name]["cpu_us_per_request"] = {
            role: round(statistics.median(run["cpu_us_per_request"][role] for run in runs), 1)
            for role in runs[0]["cpu_us_per_request"]
        }
    return out


def compare(
    rounds: Sequence[dict[str, dict[str, Any]]],
    medians: dict[str, dict[str, Any]],
    path: str,
    baseline: str,
) -> dict[str, Any]:
    """``path`` against ``baseline``: from the medians, and round by round (paired runs)."""
    ours, theirs = medians[path], medians[baseline]

    def sidecars(cpu: dict[str, float]) -> float:
        return cpu["client"] + cpu["server"]

    throughput = ours["requests_per_s"] / theirs["requests_per_s"]
    p50 = ours["p50_ms"] / theirs["p50_ms"] - 1
    return {
        "throughput_ratio": round(throughput, 3),
        "p50_change": round(p50, 3),
        "p99_change": round(ours["p99_ms"] / theirs["p99_ms"] - 1, 3),
        "sidecar_cpu_ratio": round(
            sidecars(ours["cpu_us_per_request"]) / sidecars(theirs["cpu_us_per_request"]), 3
        ),
        "throughput_ratio_per_round": [
            round(r[path]["requests_per_s"] / r[baseline]["requests_per_s"], 3) for r in rounds
        ],
        "p50_change_per_round": [
            round(r[path]["p50_ms"] / r[baseline]["p50_ms"] - 1, 3) for r in rounds
        ],
        "meets_targets": throughput >= TARGETS["throughput_ratio_min"]
        and p50 <= TARGETS["p50_increase_max"],
    }


async def setup_paths(
    stack: contextlib.AsyncExitStack, workdir: Path, args: argparse.Namespace
) -> tuple[list[LoadPath], dict[str, Pair]]:
    """Start the app, both pairs (and the access-log variant); the paths to measure."""
    ca = CertificateAuthority.init(workdir / "ca", CaConfig(), dt.datetime.now(dt.UTC))
    app = await start_envoy(stack, app_bootstrap(APP_ADDRESS), workdir / "app")
    log("app Envoy up; starting the trustmesh control plane, agents and sidecars")
    pairs = {"trustmesh": await trustmesh_pair(stack, ca, workdir / "trustmesh")}
    log("trustmesh sidecars up; starting the hand-written pair")
    pairs["handwritten"] = await handwritten_pair(
        stack, ca, workdir / "handwritten", (HAND_CLIENT_ADDRESS, HAND_SERVER_ADDRESS)
    )
    if args.access_log_variant:
        # The hand-written pair plus the very access_log entries trustmesh's sidecars run
        # (from their config dumps): what the access logs alone cost.
        tm = pairs["trustmesh"]
        logs = (
            access_logs_of(await config_dump(tm.client), "outbound_http"),
            access_logs_of(await config_dump(tm.server), "virtualInbound"),
        )
        pairs["handwritten_accesslog"] = await handwritten_pair(
            stack,
            ca,
            workdir / "handwritten_accesslog",
            (HAND_LOG_CLIENT_ADDRESS, HAND_LOG_SERVER_ADDRESS),
            logs,
        )
    assert app.pid is not None
    paths = [LoadPath("direct", APP_ADDRESS, APP_PORT, REQUEST, {"app": app.pid})]
    for name in ("handwritten", "trustmesh", "handwritten_accesslog"):
        if name in pairs:
            pair = pairs[name]
            assert pair.client.pid is not None and pair.server.pid is not None
            roles = {"client": pair.client.pid, "server": pair.server.pid, "app": app.pid}
            paths.append(LoadPath(name, pair.client_address, OUTBOUND_HTTP_PORT, REQUEST, roles))
    for path in paths:
        await wait_serving(path.host, path.port, path.request)
    return paths, pairs


async def evidence(pairs: dict[str, Pair]) -> dict[str, Any]:
    """Per-request configuration of each proxy and the counters that prove mTLS + RBAC."""
    config: dict[str, Any] = {}
    counters: dict[str, Any] = {}
    for name, pair in pairs.items():
        config[name] = {
            "client": per_request_features(await config_dump(pair.client)),
            "server": per_request_features(await config_dump(pair.server)),
        }
        counters[name] = {
            "server_rbac": await stats(pair.server, r"rbac\.(allowed|denied)"),
            "server_tls": await stats(
                pair.server, r"listener\..*ssl\.(versions|ciphers|handshake)"
            ),
        }
    return {"config": config, "counters": counters}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    ports = [(APP_ADDRESS, APP_PORT), (HAND_CLIENT_ADDRESS, OUTBOUND_HTTP_PORT)]
    ports += [(HAND_SERVER_ADDRESS, APP_PORT), (HTTPBIN_POD_ADDRESS, APP_PORT)]
    # sleep's outbound listeners: the HTTP proxy, TCP services, TLS egress.
    ports += [(SLEEP_OUTBOUND_ADDRESS, p) for p in (OUTBOUND_HTTP_PORT, 9000, 9001, 9002, 443)]
    if args.access_log_variant:
        ports += [
            (HAND_LOG_CLIENT_ADDRESS, OUTBOUND_HTTP_PORT),
            (HAND_LOG_SERVER_ADDRESS, APP_PORT),
        ]
    check_free(ports)
    load = LoadGenerator(args.workers)  # spawning overlaps with the setup below
    try:
        with tempfile.TemporaryDirectory(prefix="bench-dataplane-") as tmp:
            async with contextlib.AsyncExitStack() as stack:
                paths, pairs = await setup_paths(stack, Path(tmp), args)
                setup_s = time.monotonic() - started
                log(f"all paths serve ({setup_s:.1f}s); measuring {[p.name for p in paths]}")
                rounds: list[dict[str, dict[str, Any]]] = []
                for number in range(args.rounds):
                    rounds.append({})
                    for path in paths:
                        rounds[-1][path.name] = await measure(path, load, args)
                        got = rounds[-1][path.name]
                        log(
                            f"round {number + 1} {path.name}: {got['requests_per_s']} req/s, "
                            f"p50 {got['p50_ms']} ms, errors {got['errors']}"
                        )
                proof = await evidence(pairs)
                version = json.loads(
                    (await pairs["trustmesh"].client.admin_get("/server_info")).body
                )
    finally:
        load.close()
    medians = summarize(rounds)
    comparisons = {"trustmesh_vs_handwritten": compare(rounds, medians, "trustmesh", "handwritten")}
    if args.access_log_variant:
        comparisons["handwritten_accesslog_vs_handwritten"] = compare(
            rounds, medians, "handwritten_accesslog", "handwritten"
        )
        comparisons["trustmesh_vs_handwritten_accesslog"] = compare(
            rounds, medians, "trustmesh", "handwritten_accesslog"
        )
    return {
        "machine": {
            "python": sys.version.split()[0],
            "cpu": platform.machine(),
            "cores": os.cpu_count(),
        },
        "setup": {
            "envoy_version": version.get("version", "?").split("/")[1],
            "envoy_concurrency": 1,  # every Envoy: app, both clients, both servers
            "load_generator": "python selectors, closed loop, keep-alive HTTP/1.1",
            "wrk_installed": shutil.which("wrk") is not None,
            "workers": args.workers,
            "connections_per_worker": args.connections,
            "in_flight": args.workers * args.connections,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "body_bytes": len(BODY),
            "request": REQUEST.decode(),
            "setup_s": round(setup_s, 1),
        },
        "targets": TARGETS,
        "median": medians,
        "ratios": comparisons,
        "rounds": rounds,
        **proof,
        "runtime_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--connections", type=int, default=8, help="per generator process")
    parser.add_argument("--max-requests", type=int, default=2_000_000, help="per worker and run")
    parser.add_argument(
        "--access-log-variant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the hand-written pair running trustmesh's access logs",
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
