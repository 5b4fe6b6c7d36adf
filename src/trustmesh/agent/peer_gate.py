"""A Unix socket that lets only chosen processes through, by their kernel credentials.

Every sidecar's Envoy runs as uid 1337, so file permissions on the SDS socket cannot tell
this pod's Envoy from another pod's. The kernel can: ``SO_PEERCRED`` gives the pid, uid
and gid of the process that connected. :class:`PeerGate` listens on the public socket,
asks ``allow(pid, uid, gid)`` for each connection, closes refused ones at once (the
latest in ``refused``, all counted in ``refused_total``) and relays accepted ones byte for
byte to the real server's socket (gRPC offers no hook at accept time). The relay is
cheap: SDS carries a few kilobytes per certificate rotation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PeerCredentials", "PeerGate"]

_log = logging.getLogger(__name__)
_UCRED = struct.Struct("3i")
# The refused connections kept for inspection: the latest ones only, so a local process
# that connects again and again cannot grow the agent's memory.
REFUSED_KEPT = 64


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()


class PeerGate:
    """Listens on ``public`` (mode 0600), relays connections ``allow`` accepts to
    ``upstream``."""

    def __init__(
        self, public: str, upstream: str, allow: Callable[[PeerCredentials], bool]
    ) -> None:
        self.public = public
        self.upstream = upstream
        self._allow = allow
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused: collections.deque[PeerCredentials] = collections.deque(maxlen=REFUSED_KEPT)
        self.refused_total = 0

    async def start(self) -> None:
        # Bound inside a fresh 0700 directory and renamed into place after the chmod, so
        # there is no moment at which the socket is open to everyone.
        bind_dir = tempfile.mkdtemp(prefix=".gate-", dir=os.path.dirname(self.public))
        bind_path = os.path.join(bind_dir, "s")
        try:
            self._server = await asyncio.start_unix_server(self._handle, bind_path)
            os.chmod(bind_path, 0o600)
            os.replace(bind_path, self.public)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(bind_path)
            os.rmdir(bind_dir)
        self._inode = os.stat(self.public).st_ino

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(OSError):
            if os.stat(self.public).st_ino == self._inode:
                os.unlink(self.public)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        try:
            peer = peer_credentials(sock)
        except OSError:
            writer.close()
            return
        if not self._allow(peer):
            self.refused.append(peer)
            self.refused_total += 1
            _log.warning(
                "refused a connection to %s from pid %d (uid %d): not this sidecar's Envoy",
                self.public,
                peer.pid,
                peer.uid,
            )
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.upstream)
        except OSError as exc:
            _log.warning("cannot reach %s: %s", self.upstream, exc)
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            if task is not None:
                self._tasks.discard(task)
