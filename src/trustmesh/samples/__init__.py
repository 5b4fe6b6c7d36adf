"""Sample workloads for the local mesh: the apps that examples and tests put behind sidecars.

They stand in for Istio's samples: :mod:`~trustmesh.samples.httpbin` (an HTTP echo server
like httpbin.org), :mod:`~trustmesh.samples.tcp_echo` (Istio's ``tcp-echo``) and
:mod:`~trustmesh.samples.sleep` (the client pod that idles). Standard library only, so a
sample runs wherever trustmesh does. Each server module exposes
``async def serve(host, port, *, stop, ready=None, ...)``: it listens, calls
``ready(host, port)`` with the address actually bound (port 0 picks a free one), and returns
once ``stop`` is set, after closing every open connection.

This module holds what the servers share: the connection bookkeeping and the address format.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable

__all__ = ["Handler", "Ready", "format_address", "serve_connections"]

Ready = Callable[[str, int], None]
"""Called once with the bound (host, port) when a server accepts connections."""

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""Serves one accepted connection; the caller closes it afterwards."""

# A stopping server gives its connections this long to finish the response in flight.
_DRAIN_SECONDS = 2.0


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, with brackets around an IPv6 host (``[::1]:8000``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_connections(
    handler: Handler,
    host: str,
    port: int,
    *,
    stop: asyncio.Event,
    ready: Ready | None = None,
) -> None:
    """Run ``handler`` for every connection to ``host:port`` until ``stop`` is set.

    ``asyncio.Server.close`` leaves accepted connections open (a keep-alive client would
    keep its handler alive forever), so open connections are tracked and closed here.
    """
    writers: set[asyncio.StreamWriter] = set()
    tasks: set[asyncio.Task[object]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            tasks.add(task)
        writers.add(writer)
        _no_delay(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer went away; nothing left to answer
        finally:
            writers.discard(writer)
            if task is not None:
                tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(tracked, host, port)
    try:
        if ready is not None:
            bound = server.sockets[0].getsockname()
            ready(str(bound[0]), int(bound[1]))
        await stop.wait()
    finally:
        server.close()
        for writer in list(writers):
            writer.close()
        pending = set(tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=_DRAIN_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await server.wait_closed()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    # Envoy-notes pitfall 10: with Nagle on, small responses wait for the peer's delayed
    # ACK (~40 ms) and benchmarks measure that stall instead of the mesh. asyncio already
    # sets TCP_NODELAY on TCP streams; setting it here keeps that a guarantee, not a default.
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
