"""``GET /metrics`` over plain HTTP, as istiod serves its monitoring port (15014).

The text is made per request: the control plane's own families on the event loop's
thread (dict reads), the sidecars' in a worker thread (:func:`~trustmesh.metrics.sidecars.scrape`
waits on sockets, bounded). A client that connects and sends nothing is dropped after
``REQUEST_TIMEOUT``; anything but ``GET /metrics`` gets 404 / 405. What the answer may
carry is decided by the families (see :mod:`trustmesh.metrics.controlplane`): no
addresses, no node ids.

Example::

    server = MetricsServer("127.0.0.1", 0, plane_text=metrics.render, sidecars=read_sidecars)
    port = await server.start()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from trustmesh.metrics.exposition import render
from trustmesh.metrics.sidecars import SidecarCounts, families

__all__ = ["CONTENT_TYPE", "METRICS_PATH", "MetricsServer"]

_log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0

SidecarSource = Callable[[], Sequence[SidecarCounts]]
"""Blocking: reads every sidecar now (run in a worker thread)."""


def _response(status: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class MetricsServer:
    """Serves ``plane_text()`` followed by the families of ``sidecars()`` (if given)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        plane_text: Callable[[], str],
        sidecars: SidecarSource | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._plane_text = plane_text
        self._sidecars = sidecars
        self._server: asyncio.Server | None = None
        self._inflight: asyncio.Future[Sequence[SidecarCounts]] | None = None

    async def start(self) -> int:
        """Listen; the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("MetricsServer already started")
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=MAX_REQUEST_HEAD, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def text(self) -> str:
        """The whole exposition, as a scrape gets it."""
        own = self._plane_text()
        if self._sidecars is None:
            return own
        return own + render(families(await self._read_sidecars(self._sidecars)))

    async def _read_sidecars(self, source: SidecarSource) -> Sequence[SidecarCounts]:
        # Scrapes that arrive while the sidecars are being read share that reading: any
        # local caller can ask, and must not multiply the requests to every Envoy.
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(asyncio.to_thread(source))
        return await asyncio.shield(self._inflight)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await self._reply(reader))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the client went away or sent no request
        except Exception:  # a bug must not end the server: say so to the client and the log
            _log.exception("metrics: answering a scrape failed")
            with contextlib.suppress(OSError):
                writer.write(_response("500 Internal Server Error", b"error\n", "text/plain"))
        finally:
            writer.close()

    async def _reply(self, reader: asyncio.StreamReader) -> bytes:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        method, _, rest = head.decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if path != METRICS_PATH:
            return _response("404 Not Found", b"not found: GET /metrics\n", "text/plain")
        if method != "GET":
            return _response("405 Method Not Allowed", b"GET only\n", "text/plain")
        body = (await self.text()).encode()
        return _response("200 OK", body, CONTENT_TYPE)
