"""The control plane's debug endpoint answers its owner only, over a Unix socket.

Another local user is refused by the kernel (the socket is 0600 in a 0700 directory) and,
were the modes loosened, by the server itself (SO_PEERCRED). The refusals are observed
from a real child process running as another uid (CI runs as root).
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.unit.localaccess import NOBODY, as_other_user, requires_root
from trustmesh.runtime import debug_client
from trustmesh.runtime.debug_endpoint import (
    SYNCZ,
    DebugEndpointError,
    DebugServer,
    debug_socket,
)

SYNC = {"generation": 3, "proxies": {"sidecar~10.88.0.2~a.foo~foo.svc.cluster.local": {}}}


@asynccontextmanager
async def serving(state: Path) -> AsyncIterator[DebugServer]:
    server = DebugServer(debug_socket(state), {SYNCZ: lambda: SYNC})
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def get(target: Path, path: str = SYNCZ) -> Any:
    return asyncio.to_thread(debug_client.get, target, path)


def test_the_owner_reads_syncz_through_the_state_directory_or_the_socket(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server:
            assert await get(tmp_path) == SYNC
            assert await get(server.socket_path) == SYNC
            assert await get(tmp_path, "/debug/config_dump") is None  # 404
        assert not server.socket_path.exists()  # removed when it stops
        assert await get(tmp_path) is None  # nothing answers: None, no exception

    asyncio.run(scenario())


def test_socket_is_0600_in_a_0700_directory_of_its_owner(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server:
            sock, folder = server.socket_path.lstat(), server.socket_path.parent.lstat()
            assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
            assert stat.S_ISDIR(folder.st_mode) and stat.S_IMODE(folder.st_mode) == 0o700
            assert sock.st_uid == folder.st_uid == os.geteuid()
            assert server.socket_path == tmp_path / "control-plane" / "debug.sock"

    asyncio.run(scenario())


def test_a_loosened_directory_is_made_private_again_and_a_stale_socket_replaced(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "control-plane"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o777)
    stale = socket.socket(socket.AF_UNIX)  # a control plane that died left its file
    stale.bind(str(folder / "debug.sock"))
    stale.close()

    async def scenario() -> None:
        async with serving(tmp_path):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            assert await get(tmp_path) == SYNC

    asyncio.run(scenario())


def test_a_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (state / "control-plane").symlink_to(elsewhere)

    async def scenario() -> None:
        with pytest.raises(DebugEndpointError, match="is not a directory"):
            await DebugServer(debug_socket(state), {}).start()

    asyncio.run(scenario())
    assert list(elsewhere.iterdir()) == []


@requires_root
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "control-plane"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)  # its owner could swap the socket for their own

    async def scenario() -> None:
        with pytest.raises(DebugEndpointError, match=f"belongs to uid {NOBODY}"):
            await DebugServer(debug_socket(tmp_path), {}).start()

    asyncio.run(scenario())


def test_a_state_directory_deeper_than_a_socket_path_allows(tmp_path: Path) -> None:
    state = tmp_path / ("deep-" * 20)
    state.mkdir()
    assert len(str(debug_socket(state))) > 107

    async def scenario() -> None:
        async with serving(state) as server:
            assert server.socket_path.exists()
            assert await get(state) == SYNC

    asyncio.run(scenario())


def _connect(address: str) -> str:
    """What a connect + GET as this process's user observes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(address)
        except PermissionError:
            return "EACCES"
        except OSError as exc:
            return f"errno {exc.errno}"
        sock.sendall(b"GET /debug/syncz HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer.split(b"\r\n", 1)[0].decode()


@contextmanager
def probes(socket_path: Path) -> Iterator[list[Callable[[], str]]]:
    """Connect by path, through the directory (its own mode decides, not its parents'),
    and to the socket inode itself (the socket's mode decides): three separate layers."""
    folder_fd = os.open(socket_path.parent, os.O_PATH | os.O_DIRECTORY)
    socket_fd = os.open(socket_path, os.O_PATH)
    try:
        yield [
            lambda: _connect(str(socket_path)),
            lambda: _connect(f"/proc/self/fd/{folder_fd}/{socket_path.name}"),
            lambda: _connect(f"/proc/self/fd/{socket_fd}"),
        ]
    finally:
        os.close(folder_fd)
        os.close(socket_fd)


@requires_root
def test_another_uid_cannot_connect(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server:
            with probes(server.socket_path) as three:
                seen = await asyncio.to_thread(as_other_user, lambda: [p() for p in three])
            assert seen == ["EACCES", "EACCES", "EACCES"]
            assert await get(tmp_path) == SYNC  # while its owner still reads it

    asyncio.run(scenario())


@requires_root
def test_with_its_modes_loosened_the_server_still_answers_its_owner_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as server:
            os.chmod(server.socket_path.parent, 0o711)
            os.chmod(server.socket_path, 0o666)
            with probes(server.socket_path) as (_, via_folder, via_socket):
                seen = await asyncio.to_thread(as_other_user, lambda: [via_folder(), via_socket()])
            assert seen == ["HTTP/1.1 403 Forbidden"] * 2

    asyncio.run(scenario())
