"""The workload and its clients for the control-plane tests (test_controlplane).

Provides ``app_server`` (the HTTP app behind httpbin's sidecar, on ``APP_PORT``, echoing
what it saw as JSON), ``Connection`` / ``request_once`` (HTTP/1.1 over mesh mTLS to the
sidecar), ``Traffic`` (paced background POSTs that record every failure) and ``since``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

from tests.envoy.conftest import eventually

APP_PORT = 8000


@contextlib.asynccontextmanager
async def app_server(address: str) -> AsyncIterator[None]:
    """The workload: answers every request (keep-alive) with what it saw, as JSON."""
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *lines = head.removesuffix("\r\n\r\n").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)
                }
                await reader.readexactly(int(headers.get("content-length", "0")))
                method, path, _ = request_line.split(" ", 2)
                xfcc = headers.get("x-forwarded-client-cert")
                body = json.dumps({"method": method, "path": path, "xfcc": xfcc}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        writers.discard(writer)
        writer.transport.abort()

    server = await asyncio.start_server(serve, address, APP_PORT)
    try:
        yield
    finally:
        server.close()
        for writer in list(writers):
            writer.transport.abort()
        await server.wait_closed()


class Connection:
    """One HTTP/1.1 connection to httpbin's sidecar, reused for every request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, at: tuple[str, int], tls: ssl.SSLContext | None) -> Connection:
        return cls(*await asyncio.open_connection(*at, ssl=tls))

    async def request(self, method: str = "GET", path: str = "/get") -> tuple[int, bytes]:
        self._writer.write(f"{method} {path} HTTP/1.1\r\nHost: httpbin.foo:8000\r\n\r\n".encode())
        async with asyncio.timeout(5):
            head = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            status_line, *lines = head.strip().split("\r\n")
            headers = {k.strip(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
            # A connection Envoy means to close is not a test of open connections.
            assert headers.get("connection") != "close", head
            body = await self._reader.readexactly(int(headers.get("content-length", "0")))
            return int(status_line.split()[1]), body

    def close(self) -> None:
        self._writer.transport.abort()  # no TLS close_notify wait


async def request_once(
    at: tuple[str, int], tls: ssl.SSLContext | None, method: str = "GET"
) -> tuple[int, bytes]:
    connection = await Connection.open(at, tls)
    try:
        return await connection.request(method, "/get" if method == "GET" else "/post")
    finally:
        connection.close()


@dataclass
class Traffic:
    """Paced POSTs from sleep on keep-alive connections and on a fresh connection each
    (a new mTLS handshake per request); anything but 200 is a failure."""

    at: tuple[str, int]
    tls: ssl.SSLContext
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks += [asyncio.create_task(self._worker(keep)) for keep in (True, True, False)]

    async def _worker(self, keep_alive: bool) -> None:
        connection: Connection | None = None
        while not self.stop.is_set() and self.ok < 50_000:
            try:
                connection = connection or await Connection.open(self.at, self.tls)
                status, body = await connection.request("POST", "/post")
                self.ok += status == 200
                if status != 200:
                    self.failures.append(f"status {status}: {body[:80]!r}")
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                if connection is not None:
                    connection.close()
                connection = None
            if not keep_alive and connection is not None:
                connection.close()
                connection = None
            await asyncio.sleep(0.002)  # paced: traffic flows, it does not saturate 2 cores
        if connection is not None:
            connection.close()

    async def more(self, count: int) -> None:
        """Wait until ``count`` more requests succeeded."""
        target = self.ok + count

        async def reached() -> bool:
            return self.ok >= target

        await eventually(reached, what=f"{count} more requests", timeout=10)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


def since(waiting: Awaitable[Any]) -> asyncio.Task[float]:
    """The loop time at which ``waiting`` is done, measured while the test goes on."""

    async def finished() -> float:
        await waiting
        return asyncio.get_running_loop().time()

    return asyncio.create_task(finished())
