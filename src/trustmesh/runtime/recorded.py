"""The mesh's processes by PID: is a recorded PID still ours, and stopping them.

Kept apart from the supervisor so that ``status``, ``request`` and ``down`` (which only
read the record) do not import what starting a mesh needs.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from trustmesh.runtime.addresses import MESH_ENV
from trustmesh.runtime.layout import Layout


def belongs_to(pid: int, layout: Layout) -> bool:
    """Is ``pid`` still a process this mesh started (not a reused PID)?"""
    marker = f"{MESH_ENV}={layout.root}".encode()
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    if marker in environ.split(b"\0"):
        return True
    # Envoy is started by a sidecar with the sidecar's environment, so it has the marker
    # too; its command line names its bootstrap under the state directory as a fallback.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(layout.root).encode() in cmdline


def stop_recorded(record: dict[str, Any], layout: Layout, *, only_envoys: bool = False) -> int:
    """SIGKILL every recorded process of this mesh that still runs; how many were."""
    pids: list[int] = []
    for pod in record.get("pods", {}).values():
        keys = ("envoy_pid",) if only_envoys else ("app_pid", "envoy_pid", "sidecar_pid")
        pids += [pod[k] for k in keys if isinstance(pod.get(k), int)]
    if not only_envoys:
        pid = record.get("control_plane", {}).get("pid")
        if isinstance(pid, int):
            pids.append(pid)
    killed = 0
    for pid in pids:
        if belongs_to(pid, layout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed
