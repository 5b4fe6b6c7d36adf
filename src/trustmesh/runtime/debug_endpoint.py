"""The control plane's debug endpoint: HTTP over a Unix socket only its owner can open.

istiod serves its debug interface (``/debug/syncz``, config dumps) on a TCP port that any
caller reaching it may read; on one host that is every local user. Here the endpoint is
``<state>/control-plane/debug.sock``: a socket file of mode 0600 in a directory of mode
0700, both owned by the user running the control plane (root in the pod sandbox), so the
kernel refuses any other user's ``connect`` (EACCES). The server checks the caller's
credentials as well (``SO_PEERCRED``: the owner's uid or root), so a loosened mode still
lets no one else in. A file socket (not an abstract one, which has no permissions and
lives per network namespace) also reaches the control plane in the sandbox's node
namespace from the host's.

Readers go through :func:`trustmesh.runtime.debug_client.get`; a person can use
``curl --unix-socket <state>/control-plane/debug.sock http://control-plane/debug/syncz``.

A Unix socket path holds at most 107 bytes; a longer one (a deep state directory) is
reached through ``/proc/self/fd/<directory fd>/debug.sock``, which the kernel resolves
with the same permission checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DEBUG_DIR",
    "DEBUG_SOCKET",
    "SYNCZ",
    "DebugEndpointError",
    "DebugServer",
    "debug_socket",
    "prepare_private_directory",
    "short_address",
]

DEBUG_DIR = "control-plane"
DEBUG_SOCKET = "debug.sock"
SYNCZ = "/debug/syncz"  # configuration generation, reload errors, every proxy's sync
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the trailing NUL
MAX_REQUEST_HEAD = 8192  # a GET with a few headers; a longer head is dropped
REQUEST_TIMEOUT = 5.0  # a client that connects and says nothing is dropped

Route = Callable[[], Mapping[str, Any]]


class DebugEndpointError(RuntimeError):
    """The debug endpoint cannot be served safely (its directory is not the owner's own)."""


def debug_socket(state: Path) -> Path:
    """Where the control plane of the mesh in ``state`` serves its debug endpoint."""
    return state / DEBUG_DIR / DEBUG_SOCKET


def prepare_private_directory(directory: Path) -> None:
    """Make ``directory`` (not its parents) exist as a real directory of this process's
    user, mode 0700; refuse a symlink, a non-directory or another user's directory,
    whose owner could swap the socket file for their own."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise DebugEndpointError(f"{directory} is not a directory: remove it and start again")
    if info.st_uid != os.geteuid():
        raise DebugEndpointError(
            f"{directory} belongs to uid {info.st_uid}, not to the control plane's user "
            f"(uid {os.geteuid()}): remove it and start again"
        )
    os.chmod(directory, 0o700)


@contextlib.contextmanager
def short_address(path: Path) -> Iterator[str]:
    """An address for ``bind``/``connect`` naming ``path``: the path itself when it fits
    in ``sun_path``, else a ``/proc/self/fd`` alias through its directory (open meanwhile)."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        alias = f"/proc/self/fd/{fd}/{path.name}"
        if len(os.fsencode(alias)) > MAX_SOCKET_PATH:
            raise DebugEndpointError(f"the socket name {path.name!r} is too long")
        yield alias
    finally:
        os.close(fd)


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _response(status: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class DebugServer:
    """``GET <route>`` → that route's JSON, served on ``socket_path`` to its owner only.

    Example::

        server = DebugServer(debug_socket(state), {"/debug/syncz": plane_status})
        await server.start()
        ...
        await server.stop()
    """

    def __init__(self, socket_path: Path, routes: Mapping[str, Route]) -> None:
        self.socket_path = socket_path
        self._routes = dict(routes)
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._allowed = frozenset({os.geteuid(), 0})

    async def start(self) -> None:
        """Create the private directory, replace a stale socket file, listen."""
        if self._server is not None:
            raise RuntimeError("DebugServer already started")
        prepare_private_directory(self.socket_path.parent)
        with contextlib.suppress(FileNotFoundError):
            # Left by a control plane that died: only this user can write here.
            os.unlink(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with short_address(self.socket_path) as address:
                sock.bind(address)
            # Inside the 0700 directory nobody else can reach the file meanwhile; the
            # mode is set before listen(), so no connection is ever accepted before it.
            os.chmod(self.socket_path, 0o600)
            self._inode = os.stat(self.socket_path).st_ino
            sock.listen(16)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(
                self._handle, sock=sock, limit=MAX_REQUEST_HEAD
            )
        except BaseException:
            sock.close()
            raise

    async def stop(self) -> None:
        """Stop listening and remove the socket file (if it is still this server's)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(OSError):
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await self._reply(reader, writer))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the client went away or sent no request: nothing to answer
        finally:
            writer.close()

    async def _reply(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            # Read first even from a caller who is refused: closing on an unread request
            # would reset the connection, and the caller would not see why.
            head = await reader.readuntil(b"\r\n\r\n")
        if _peer_uid(writer) not in self._allowed:
            return _response("403 Forbidden", b"the control plane's owner only\n", "text/plain")
        method, _, rest = head.decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        route = self._routes.get(path)
        if method != "GET":
            return _response("405 Method Not Allowed", b"GET only\n", "text/plain")
        if route is None:
            return _response("404 Not Found", b"not found\n", "text/plain")
        body = json.dumps(route()).encode()
        return _response("200 OK", body, "application/json")
