"""Reading the control plane's debug endpoint (:mod:`trustmesh.runtime.debug_endpoint`).

Every reader — the supervisor's readiness wait, ``trustmesh status``, ``test --live``,
tests — calls :func:`get`, so the endpoint's address and protocol live in one place.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from trustmesh.runtime.debug_endpoint import (
    SYNCZ,
    DebugEndpointError,
    debug_socket,
    short_address,
)

__all__ = ["SYNCZ", "get", "socket_of"]

MAX_RESPONSE = 64 * 1024 * 1024  # a syncz of thousands of proxies is a few MB


def socket_of(state_or_socket: Path) -> Path:
    """The debug socket of a mesh's state directory; any other path is the socket itself."""
    return debug_socket(state_or_socket) if state_or_socket.is_dir() else state_or_socket


def get(
    state_or_socket: Path | str, path: str = SYNCZ, timeout: float = 2.0
) -> dict[str, Any] | None:
    """``GET path`` on the control plane's debug endpoint: its JSON object, or None while
    the control plane does not answer (not started yet, restarting, stopped) — or when
    this user may not open its socket (it answers its owner only)."""
    try:
        return _get(socket_of(Path(state_or_socket)), path, timeout)
    except (OSError, ValueError, DebugEndpointError):
        return None


def _get(socket_path: Path, path: str, timeout: float) -> dict[str, Any] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        with short_address(socket_path) as address:
            sock.connect(address)
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: control-plane\r\n\r\n".encode("ascii"))
        chunks: list[bytes] = []
        size = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_RESPONSE:
                raise ValueError("the debug endpoint's answer is too long")
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ")
    if len(status) < 2 or status[1] != b"200":
        return None
    value = json.loads(body)
    return value if isinstance(value, dict) else None
