"""A TCP echo server like Istio's ``tcp-echo`` sample: each line comes back after a prefix.

Istio's server (samples/tcp-echo/src/main.go) reads newline-terminated lines and answers
``"<prefix> <line>"``, so ``echo world | nc tcp-echo 9000`` prints ``hello world``. Lines,
not read() chunks, are the unit because a proxy in between may split or merge chunks;
lines survive that. Two small additions: with no prefix the line is echoed unchanged, and a
last line without a newline is still answered when the client half-closes.

Example::

    stop = asyncio.Event()
    await serve("127.0.0.1", 9000, stop=stop, prefix="hello")
"""

from __future__ import annotations

import asyncio

from trustmesh.samples import Ready, serve_connections

__all__ = ["DEFAULT_PORT", "MAX_LINE", "echo_line", "serve"]

DEFAULT_PORT = 9000
MAX_LINE = 64 * 1024
"""Longest line held in memory; longer input is answered in pieces of this size."""


def echo_line(line: bytes, prefix: str) -> bytes:
    """The answer to one line: ``b"hello world\\n"`` for ``b"world\\n"`` and prefix hello."""
    return f"{prefix} ".encode() + line if prefix else line


async def serve(
    host: str,
    port: int,
    *,
    stop: asyncio.Event,
    ready: Ready | None = None,
    prefix: str = "",
) -> None:
    """Echo every line on every connection to ``host:port`` until ``stop`` is set."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending = b""
        while chunk := await reader.read(MAX_LINE):
            pending += chunk
            answer = bytearray()
            while (end := pending.find(b"\n")) >= 0 or len(pending) >= MAX_LINE:
                cut = end + 1 if end >= 0 else MAX_LINE
                answer += echo_line(pending[:cut], prefix)
                pending = pending[cut:]
            if answer:
                writer.write(answer)
                await writer.drain()
        if pending:
            writer.write(echo_line(pending, prefix))
            await writer.drain()

    await serve_connections(handle, host, port, stop=stop, ready=ready)
