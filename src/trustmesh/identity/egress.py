"""Client connections that leave from a chosen source address.

gRPC's Python API cannot bind a client socket's source address (a host's agents and its
registration must connect *from the host's address*, so that the host can be told apart
from its neighbours on one machine, and cut off from the control plane as a host). So a
channel that must is given :meth:`SourceBoundProxy.channel_options`: gRPC then opens each
connection through this in-process HTTP CONNECT proxy (``grpc.address_http_proxy``,
gRPC's per-address proxy), which dials the target from ``source`` and relays bytes. TLS
stays end to end (the proxy sees ciphertext); only the allowed targets are dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Iterable

__all__ = ["SourceBoundProxy"]

_MAX_HEADER = 8192
_CONNECT_TIMEOUT = 5.0


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not IP:PORT")
    return host.strip("[]"), int(port)


class SourceBoundProxy:
    """A CONNECT proxy on loopback for this process's channels, dialling from ``source``
    to ``targets`` (IP:PORT) only."""

    def __init__(self, source: str, targets: Iterable[str]) -> None:
        ipaddress.ip_address(source)  # ValueError when not an IP
        self.source = source
        self.targets = {_split(t) for t in targets}
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        """Listen; a target given by name is allowed at the addresses it resolves to now
        (gRPC asks for the resolved address)."""
        loop = asyncio.get_running_loop()
        for host, port in list(self.targets):
            try:
                ipaddress.ip_address(host)
            except ValueError:
                found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                self.targets |= {(str(info[4][0]), port) for info in found}
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._relays):
                task.cancel()
            await asyncio.gather(*self._relays, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def channel_options(self) -> list[tuple[str, str]]:
        """gRPC channel options sending every connection to ``targets`` through here."""
        assert self.port, "start() first"
        hosts = sorted({h for h, _ in self.targets if _is_ip(h)})
        return [
            ("grpc.address_http_proxy", f"127.0.0.1:{self.port}"),
            ("grpc.address_http_proxy_enabled_addresses", ",".join(hosts)),
        ]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _CONNECT_TIMEOUT)
            if len(head) > _MAX_HEADER:
                return
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            try:
                host, port = _split(target)
            except ValueError:
                host, port = "", 0
            if method != "CONNECT" or (host, port) not in self.targets:
                writer.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, local_addr=(self.source, 0)),
                    _CONNECT_TIMEOUT,
                )
            except (OSError, TimeoutError):
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                return
            upstream = up_writer
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.LimitOverrunError:
            pass
        except asyncio.CancelledError:  # stop(): the relay ends with the proxy
            pass
        finally:
            self._relays.discard(task)
            for end in (writer, upstream):
                if end is not None:
                    with contextlib.suppress(Exception):
                        end.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()
