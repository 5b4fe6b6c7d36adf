"""One mesh per address block: claimed before anything binds, so a second mesh fails first.

Every mesh gets the loopback block ``127.B.0.0/16`` of its ``--base``. Two meshes in one
block would bind the same pod addresses — Envoy binds listeners with ``SO_REUSEPORT``, so
the second one *succeeds* and the kernel splits connections between the two meshes (the
first one's clients see 503s). Two guards, both before the runtime starts a process:

* a claim: an exclusive ``flock`` on ``<runtime dir>/trustmesh-<uid>/blocks/127.B.lock``,
  held by the supervisor for the mesh's lifetime (released by the kernel when it exits,
  also on a crash); the file names the holder's state directory;
* a probe of every address the plan will bind (a bind without ``SO_REUSEPORT`` fails on a
  listening socket): it catches what holds the addresses without a claim — a mesh whose
  supervisor died while its Envoys live on, another user's mesh, any other program. A
  listener that belongs to a trustmesh mesh is named by its state directory (its process
  carries ``TRUSTMESH_MESH``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from trustmesh.runtime.plan import HTTP_PROXY_PORT, MeshPlan

__all__ = ["AddressConflict", "BlockClaim", "claim_block", "planned_addresses", "probe"]

MESH_ENV = "TRUSTMESH_MESH"


class AddressConflict(RuntimeError):
    """The mesh's addresses are claimed or in use; the message names by whom."""


@dataclass
class BlockClaim:
    """An address block held by this process until :meth:`release` (or its exit)."""

    block: str
    path: Path
    handle: IO[str]

    def release(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def _claims_dir() -> Path:
    root = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(root) / f"trustmesh-{os.getuid()}" / "blocks"


def block_of(base: str) -> str:
    """``127.B`` of a ``127.B.0.0`` base: the /16 every pod address of the mesh is in."""
    return ".".join(base.split(".")[:2])


def claim_block(base: str, state: Path, *, claims_dir: Path | None = None) -> BlockClaim:
    """Claim ``base``'s block for the mesh in ``state``; :class:`AddressConflict` naming
    the mesh that holds it."""
    folder = claims_dir or _claims_dir()
    block = block_of(base)
    path = folder / f"{block}.lock"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the mesh's life
    except OSError as exc:
        raise AddressConflict(f"cannot claim {block}.0.0/16 ({path}): {exc.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        holder = handle.read()
        handle.close()
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AddressConflict(f"cannot claim {block}.0.0/16 ({path}): {exc}") from None
        raise AddressConflict(_held_by(block, holder)) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"state": str(state), "pid": os.getpid()}) + "\n")
    handle.flush()
    return BlockClaim(block, path, handle)


def _held_by(block: str, holder: str) -> str:
    try:
        info = json.loads(holder)
        state, pid = info["state"], info["pid"]
    except (ValueError, KeyError, TypeError):
        return f"addresses {block}.0.0/16 are claimed by another trustmesh mesh"
    return (
        f"addresses {block}.0.0/16 are used by the mesh running from {state} (pid {pid}): "
        f"stop it (trustmesh down --state {state}) or start this one with another --base"
    )


def planned_addresses(plan: MeshPlan) -> list[tuple[str, int]]:
    """Every (address, port) the mesh's sidecars and apps will listen on."""
    out: list[tuple[str, int]] = []
    for pod in plan.pods:
        for port in pod.ports:
            out.append((pod.pod_ip, port))
            if pod.app_ip != pod.pod_ip:
                out.append((pod.app_ip, port))
        if pod.outbound_ip is not None:
            out.append((pod.outbound_ip, HTTP_PROXY_PORT))
    return list(dict.fromkeys(out))


def probe(addresses: Iterable[tuple[str, int]]) -> None:
    """:class:`AddressConflict` if something already listens on one of ``addresses``."""
    for address, port in addresses:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # SO_REUSEADDR: connections in TIME_WAIT are no conflict; a listener still is.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise AddressConflict(f"cannot use {address}:{port}: {exc.strerror}") from None
                owner = _listener_owner(address, port)
                raise AddressConflict(
                    f"{address}:{port} is already in use{owner}: stop it or start this mesh "
                    "with another --base"
                ) from None


def _listener_owner(address: str, port: int) -> str:
    """`` by the mesh running from STATE (pid N)`` / `` by pid N (cmd)`` / ``""``."""
    inode = _listening_inode(address, port)
    if inode is None:
        return ""
    for pid in _pids_holding(inode):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        marker = f"{MESH_ENV}=".encode()
        for entry in environ:
            if entry.startswith(marker):
                state = entry[len(marker) :].decode(errors="replace")
                return f" by the mesh running from {state} (pid {pid}, {Path(command).name})"
        return f" by pid {pid} ({Path(command).name})"
    return ""


def _listening_inode(address: str, port: int) -> int | None:
    wanted = f"{_hex_address(address)}:{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[1] == wanted and fields[3] == "0A":  # LISTEN
                return int(fields[9])
    return None


def _hex_address(address: str) -> str:
    return socket.inet_aton(address)[::-1].hex().upper()  # /proc/net/tcp: little endian


def _pids_holding(inode: int) -> Iterator[int]:
    target = f"socket:[{inode}]"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        yield int(entry.name)
                        break
