"""A closed-loop HTTP/1.1 load generator in worker processes, and its latency statistics.

Each worker process keeps keep-alive connections on non-blocking sockets (``selectors``),
one request in flight per connection, a prebuilt request, responses framed by
Content-Length. :class:`LoadGenerator` starts the workers once (spawn) and reuses them;
:func:`merge` turns their samples into requests/s and latency percentiles. Also
:func:`probe` / :func:`wait_serving`: single requests until a path serves.

A job or probe with ``tls`` (:class:`TlsClient`) speaks HTTPS: each connection does its
handshake (SNI, the server verified against a CA file) before the window, then the same
keep-alive loop over the TLS socket.

A job or probe with ``netns`` opens its connections inside that network namespace (a
pod's, as its app would: the pod's capture rules apply to them); a socket keeps the
namespace it was made in.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import selectors
import socket
import ssl
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any


@dataclass(frozen=True, slots=True)
class TlsClient:
    """HTTPS: the SNI sent (and the name verified) and the CA file that signed the server."""

    server_name: str
    cafile: str

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cafile)


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
    netns: str | None = None  # connect from inside this network namespace
    tls: TlsClient | None = None  # HTTPS (handshake at connect, before the window)


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


def _connect(
    host: str, port: int, tls: ssl.SSLContext | None = None, sni: str = ""
) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=sni)  # handshakes here, blocking
    sock.setblocking(False)
    return sock


def _receive(sock: socket.socket) -> bytes | None:
    """What arrived (b"": closed); None when TLS read only a non-data record (a TLS 1.3
    session ticket). Decrypted bytes TLS still holds are drained too: the selector does not
    see them."""
    try:
        data = sock.recv(65536)
    except ssl.SSLWantReadError:
        return None
    if isinstance(sock, ssl.SSLSocket):
        while data and sock.pending():
            data += sock.recv(sock.pending())
    return data


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


@contextlib.contextmanager
def _inside(netns: str | None) -> Iterator[None]:
    """This thread in network namespace ``netns`` for the block (no-op for None)."""
    if netns is None:
        yield
        return
    from trustmesh.runtime.netns import entered  # pyroute2: only where namespaces are used

    with entered(netns):
        yield


def run_load(job: Job) -> JobResult:
    """Closed loop on ``job.connections`` connections; latencies of the measured window."""
    with _inside(job.netns):
        return _run_load(job)


def _run_load(job: Job) -> JobResult:
    selector = selectors.DefaultSelector()
    clock = time.perf_counter_ns  # CLOCK_MONOTONIC, like time.monotonic()
    latencies: array[int] = array("q")
    errors, first_error = 0, ""
    context = job.tls.context() if job.tls is not None else None
    sni = job.tls.server_name if job.tls is not None else ""

    def connect() -> socket.socket:
        return _connect(job.host, job.port, context, sni)

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
            fresh = _Conn(connect())
            selector.register(fresh.sock, selectors.EVENT_READ, fresh)
            send(fresh)

    conns = [_Conn(connect()) for _ in range(job.connections)]
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
                data = _receive(conn.sock)
            except OSError as exc:
                replace(conn, repr(exc))
                continue
            if data is None:
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


def probe(
    host: str, port: int, request: bytes, netns: str | None = None, tls: TlsClient | None = None
) -> tuple[bytes, bytes]:
    """One request on a fresh connection (from ``netns``, over ``tls``): (status line, body)."""
    with _inside(netns):
        sock = socket.create_connection((host, port), timeout=5)
    if tls is not None:
        sock = tls.context().wrap_socket(sock, server_hostname=tls.server_name)
    with sock:
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


async def wait_serving(
    host: str,
    port: int,
    request: bytes,
    expected: bytes,
    timeout: float = 10,
    netns: str | None = None,
    tls: TlsClient | None = None,
) -> None:
    """Until ``request`` through ``host:port`` gets 200 and the ``expected`` body (the
    listeners on the way warmed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = await asyncio.to_thread(probe, host, port, request, netns, tls)
            if status.endswith(b"200 OK") and body == expected:
                return
            last = f"{status!r} {body[:200]!r}"
        except OSError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host}:{port} does not serve the app: {last}")
        await asyncio.sleep(0.1)
