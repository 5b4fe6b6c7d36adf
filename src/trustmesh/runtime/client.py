"""Requests sent *as* a workload of a running local mesh (``trustmesh request``).

A pod with a sidecar talks the way its app does: HTTP through the sidecar's HTTP proxy
(``$OUTBOUND_IP:15001``, absolute-form request target), TCP to ``$OUTBOUND_IP:<port>``;
the sidecar then opens the mTLS connection with the pod's identity. A pod without one
connects straight to the service's endpoint (the runtime's plan plays kube-proxy), from
its own pod IP, in plaintext — exactly the "legacy" client of the Istio tasks.

In a sandboxed mesh (netns isolation) the caller passes an ``opener``: a function making
a socket inside the client's network namespace (as its app's uid), and ``direct``: the
address the app dials (a ClusterIP, a pod IP) — the pod's capture rules do the rest.

Outcomes are data: :class:`HttpResult` or :class:`TcpResult`; a connection that is reset
or closed before any answer is ``reset=True`` with the reason, as ``curl`` exit 56 / 35.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from trustmesh.runtime.plan import HTTP_PROXY_PORT, MeshPlan, PodPlan

__all__ = [
    "HttpResult",
    "Opener",
    "RequestError",
    "TcpResult",
    "http_request",
    "outside_pod",
    "tcp_exchange",
]

MAX_BODY = 4 * 1024 * 1024
_READ_ERRORS = (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)
# Makes a TCP socket where the client lives (its network namespace, its uid).
Opener = Callable[[], socket.socket]


class RequestError(ValueError):
    """The request cannot be sent as asked (unknown host, bad URL); nothing was sent."""


@dataclass(frozen=True, slots=True)
class HttpResult:
    status: int = 0  # 0 when reset
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    reset: bool = False
    why: str = ""  # for a reset: what the client saw

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass(frozen=True, slots=True)
class TcpResult:
    received: bytes = b""
    reset: bool = False
    why: str = ""
    sent: bytes = field(default=b"", repr=False)
    tls_peer: str = ""  # for a TLS exchange: the handshake completed with this server

    @property
    def echoed(self) -> bool:
        return bool(self.sent) and self.received.rstrip(b"\n").endswith(self.sent.rstrip(b"\n"))

    @property
    def connected(self) -> bool:
        return self.echoed or bool(self.tls_peer)


TLS_PORT = 443


def speaks_tls(plan: MeshPlan, host: str, port: int) -> bool:
    """An app's https:// connection: port 443 to a host outside the mesh's services."""
    return port == TLS_PORT and f"{host}:{port}" not in plan.services


def outside_pod(address: str = "127.0.0.1") -> PodPlan:
    """A client outside the mesh (no sidecar, no identity) at ``address``."""
    return PodPlan("", "outside", "", False, address, address, None, (), ("-",))


def _split_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise RequestError(f"only http:// URLs are sent (TLS origination is the sidecar's): {url}")
    if not parts.hostname:
        raise RequestError(f"no host in {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or 80, target


def _resolve(plan: MeshPlan, host: str, port: int) -> tuple[str, int]:
    """Where a client without a sidecar connects for ``host:port`` (no DNS here): the
    service's first endpoint (kube-proxy would pick one)."""
    targets = plan.services.get(f"{host}:{port}")
    if targets:
        return targets[0].address, targets[0].port
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return host, port
    raise RequestError(
        f"{host}:{port} is not a service port of this mesh; a pod without a sidecar has no "
        "DNS here (use a service name or an IP)"
    )


async def _connect(
    address: str,
    port: int,
    source: str,
    timeout: float,
    opener: Opener | None = None,
    tls: tuple[ssl.SSLContext, str] | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect from ``source`` (with an ``opener``: from its socket, bound to ``source``
    when given); ``tls``: then handshake with this context and server name."""
    context, server_name = tls if tls is not None else (None, None)
    if opener is None:
        return await asyncio.wait_for(
            asyncio.open_connection(
                address,
                port,
                local_addr=(source, 0),
                limit=MAX_BODY,
                ssl=context,
                server_hostname=server_name,
            ),
            timeout,
        )
    sock = opener()
    try:
        sock.setblocking(False)
        if source:
            sock.bind((source, 0))
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
            return await asyncio.open_connection(
                sock=sock, limit=MAX_BODY, ssl=context, server_hostname=server_name
            )
    except BaseException:
        sock.close()
        raise


async def http_request(
    plan: MeshPlan,
    pod: PodPlan,
    url: str,
    *,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    timeout: float = 10.0,
    direct: tuple[str, int] | None = None,
    opener: Opener | None = None,
) -> HttpResult:
    """Send one HTTP/1.1 request as ``pod`` and read the whole answer.

    ``direct``: connect to this address and port from the pod's own IP in plaintext,
    not through its sidecar — one endpoint of a service, as kube-proxy would pick it
    for a pod without a sidecar, or what a sidecar's passthrough sends on. With an
    ``opener`` (a sandboxed pod), ``direct`` is what the app dials, captured or not by
    its namespace's rules.
    """
    host, port, target = _split_url(url)
    authority = host if port == 80 else f"{host}:{port}"
    if direct is not None:
        (address, connect_port), source = direct, pod.pod_ip
        request_target = target
    elif pod.sidecar:
        assert pod.outbound_ip is not None
        address, connect_port, source = pod.outbound_ip, HTTP_PROXY_PORT, pod.app_ip
        request_target = f"http://{authority}{target}"  # what an app with HTTP_PROXY sends
    else:
        (address, connect_port), source = _resolve(plan, host, port), pod.pod_ip
        request_target = target
    names = {k.lower() for k, _ in headers}
    lines = [f"{method} {request_target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {authority}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    wire = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    try:
        reader, writer = await _connect(address, connect_port, source, timeout, opener)
    except (OSError, TimeoutError) as exc:
        return HttpResult(reset=True, why=f"connect to {address}:{connect_port}: {exc}")
    try:
        writer.write(wire)
        await writer.drain()
        return await asyncio.wait_for(_read_response(reader, method), timeout)
    except _READ_ERRORS as exc:
        return HttpResult(reset=True, why=f"{type(exc).__name__}: {exc}")
    except TimeoutError:
        return HttpResult(reset=True, why=f"no answer within {timeout:.0f}s")
    except ValueError:  # a status line or chunk size that is not a number
        return HttpResult(reset=True, why="the answer is not HTTP/1.1")
    finally:
        writer.transport.abort()


async def _read_response(reader: asyncio.StreamReader, method: str = "GET") -> HttpResult:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        _, status, reason = [*status_line.split(" ", 2), ""][:3]
        headers = tuple(
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in header_lines)
        )
        result = HttpResult(int(status), reason, headers)
        if not 100 <= result.status < 200 or result.status == 101:
            break  # an interim 1xx answer (100 Continue) is followed by the real one
    length = result.header("content-length")
    if method == "HEAD" or result.status in (204, 304) or 100 <= result.status < 200:
        # RFC 9110: no body follows, whatever Content-Length says (for HEAD it is the
        # length a GET would get); waiting for one would take the timeout for a reset.
        body = b""
    elif (result.header("transfer-encoding") or "").lower() == "chunked":
        body = await _read_chunked(reader)
    elif length is not None:
        body = await reader.readexactly(min(int(length), MAX_BODY))
    else:
        body = await reader.read(MAX_BODY)
    return HttpResult(result.status, result.reason, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)
        if len(body) > MAX_BODY:
            return body


async def tcp_exchange(
    plan: MeshPlan,
    pod: PodPlan,
    host: str,
    port: int,
    data: bytes = b"hello\n",
    *,
    timeout: float = 5.0,
    direct: tuple[str, int] | None = None,
    opener: Opener | None = None,
) -> TcpResult:
    """Connect as ``pod``, send ``data`` and read until a line comes back or the peer
    closes; a close without a byte is a reset (Envoy's RBAC or a refused handshake).

    To an external host on 443 it opens TLS instead (what ``curl https://host`` does, SNI
    = ``host``): the handshake completing is the answer. ``opener``: see
    :func:`http_request`.
    """
    if (direct is None or opener is not None) and speaks_tls(plan, host, port):
        return await _tls_handshake(plan, pod, host, port, timeout, direct, opener)
    if direct is not None:
        (address, connect_port), source = direct, pod.pod_ip
    elif pod.sidecar:
        assert pod.outbound_ip is not None
        address, connect_port, source = pod.outbound_ip, port, pod.app_ip
    else:
        (address, connect_port), source = _resolve(plan, host, port), pod.pod_ip
    try:
        reader, writer = await _connect(address, connect_port, source, timeout, opener)
    except ConnectionRefusedError:
        why = f"connection refused by {address}:{connect_port}"
        if pod.sidecar and direct is None:
            why += f" (the sidecar has no outbound listener for port {port}: not routed)"
        return TcpResult(reset=True, why=why, sent=data)
    except (OSError, TimeoutError) as exc:
        return TcpResult(reset=True, why=f"connect: {exc}", sent=data)
    try:
        writer.write(data)
        await writer.drain()
        received = await asyncio.wait_for(reader.readline(), timeout)
    except _READ_ERRORS as exc:
        return TcpResult(reset=True, why=f"{type(exc).__name__}: {exc}", sent=data)
    except TimeoutError:
        return TcpResult(why=f"nothing came back within {timeout:.0f}s", sent=data)
    finally:
        writer.transport.abort()
    if not received:
        return TcpResult(reset=True, why="closed by the peer before answering", sent=data)
    return TcpResult(received=received, sent=data)


async def _tls_handshake(
    plan: MeshPlan,
    pod: PodPlan,
    host: str,
    port: int,
    timeout: float,
    direct: tuple[str, int] | None = None,
    opener: Opener | None = None,
) -> TcpResult:
    if direct is not None:
        (address, port), source = direct, pod.pod_ip
    elif pod.sidecar:
        assert pod.outbound_ip is not None
        address, source = pod.outbound_ip, pod.app_ip
    else:
        (address, port), source = _resolve(plan, host, port), pod.pod_ip
    context = ssl.create_default_context()  # the public server must prove it is `host`
    try:
        _, writer = await _connect(address, port, source, timeout, opener, (context, host))
    except ssl.SSLCertVerificationError as exc:
        return TcpResult(why=f"TLS to {host}: {exc.verify_message}", tls_peer="")
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return TcpResult(reset=True, why=f"TLS to {host} via {address}:{port}: {exc}")
    writer.transport.abort()
    return TcpResult(tls_peer=host)
