"""A running local mesh seen from outside: its state files, its processes, its sync status.

What ``trustmesh status / logs / down / proxy-config / request / test --live`` use: they
run as separate processes and find the mesh through its state directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmesh.runtime import debug_client
from trustmesh.runtime.debug_endpoint import SYNCZ
from trustmesh.runtime.layout import ARGS_FILE, Layout, read_json, write_json
from trustmesh.runtime.plan import MeshPlan, PodPlan
from trustmesh.runtime.recorded import belongs_to, stop_recorded

__all__ = ["NotRunning", "RunningMesh"]


class NotRunning(RuntimeError):
    """No mesh runs from that state directory (or it cannot be read)."""


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass(frozen=True)
class RunningMesh:
    layout: Layout
    record: dict[str, Any]
    plan: MeshPlan

    @classmethod
    def open(cls, state: Path) -> RunningMesh:
        layout = Layout(state)
        try:
            record = read_json(layout.mesh)
            plan = MeshPlan.from_json(read_json(layout.plan))
        except FileNotFoundError:
            raise NotRunning(f"no mesh was started from {state} (trustmesh up DIR)") from None
        except (OSError, ValueError, KeyError) as exc:
            raise NotRunning(f"cannot read the mesh state in {state}: {exc}") from None
        return cls(layout, record, plan)

    @property
    def state(self) -> str:
        return str(self.record.get("state", "unknown"))

    @property
    def supervisor_alive(self) -> bool:
        return self.state not in ("stopped",) and _alive(self.record.get("supervisor_pid"))

    def pod(self, ref: str) -> PodPlan:
        pod = self.plan.pod(ref)
        if pod is None:
            known = ", ".join(p.ref for p in self.plan.pods)
            raise LookupError(f"no pod {ref!r} in this mesh (pods: {known})")
        return pod

    def pod_record(self, ref: str) -> dict[str, Any]:
        return dict(self.record.get("pods", {}).get(ref, {}))

    def runs(self, pid: object) -> bool:
        """Is ``pid`` a process of this mesh that still runs? A recorded PID outlives its
        process (a stopped mesh, a crash) and may since belong to another program: the
        process must carry this mesh's marker."""
        return isinstance(pid, int) and _alive(pid) and belongs_to(pid, self.layout)

    def pod_processes(self, ref: str) -> dict[str, int | None]:
        """``app`` / ``sidecar`` / ``envoy`` → the PID if that process runs now, else None."""
        record = self.pod_record(ref)
        return {
            kind: pid if self.runs(pid := record.get(f"{kind}_pid")) else None
            for kind in ("app", "sidecar", "envoy")
        }

    def admin(self, ref: str) -> str:
        pod = self.pod(ref)
        if not pod.sidecar:
            raise LookupError(f"{ref} has no sidecar (its namespace is not injected)")
        admin = self.pod_record(ref).get("admin")
        if not admin:
            raise LookupError(f"{ref}: its sidecar has not reported an admin address")
        return str(admin)

    def envoy_get(self, ref: str, path: str, timeout: float = 5.0) -> bytes:
        url = f"http://{self.admin(ref)}{path}"
        pod = self.pod(ref)
        if pod.netns is None:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                body: bytes = r.read()
                return body
        # In the sandbox the admin port is on the pod's own loopback: ask from inside.
        from trustmesh.runtime.netns import entered

        with entered(pod.netns), urllib.request.urlopen(url, timeout=timeout) as r:
            inside: bytes = r.read()
            return inside

    def syncz(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The control plane's /debug/syncz, None if it does not answer."""
        return debug_client.get(self.layout.root, SYNCZ, timeout)

    async def wait_synced(self, *, after_generation: int = -1, timeout: float = 15.0) -> int:
        """Wait until the control plane applied a generation > ``after_generation`` — by
        default, the configuration files as they are now — and every proxy ACKed it;
        that generation. ``ValueError`` if the control plane refused the files."""
        args = read_json(self.layout.root / ARGS_FILE)
        from trustmesh.xds.controlplane import fingerprint_digest  # the compiler: only here

        files_now = fingerprint_digest([*args["config"], *args["mesh_config"]])
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            last = await asyncio.to_thread(self.syncz)
            read_now = last is not None and last.get("files") == files_now
            if last is not None and read_now and last["errors"]:
                raise ValueError(
                    "the control plane refused the configuration as it is now (proxies "
                    "keep the last good one):\n  " + "\n  ".join(last["errors"][:20])
                )
            newer = last is not None and last["generation"] > after_generation
            applied = newer if after_generation >= 0 else read_now
            if last is not None and applied and all(p["synced"] for p in last["proxies"].values()):
                return int(last["generation"])
            await asyncio.sleep(0.05)  # polling another process's debug endpoint
        stale = [] if last is None else [n for n, p in last["proxies"].items() if not p["synced"]]
        errors = [] if last is None else last.get("errors", [])
        raise TimeoutError(
            f"the mesh did not sync within {timeout:.0f}s"
            + (f"; not synced: {', '.join(stale)}" if stale else "")
            + (f"; errors: {'; '.join(errors[:5])}" if errors else "")
            + ("; the control plane does not answer" if last is None else "")
        )

    def stop(self, timeout: float = 30.0) -> int:
        """Stop the mesh: SIGTERM to the supervisor (which stops what it started), or, if
        it is gone, SIGKILL to every recorded process that is still this mesh's."""
        pid = self.record.get("supervisor_pid")
        if self.supervisor_alive and isinstance(pid, int):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)  # waiting for another process to exit: no event to wait on
            if not _alive(pid):
                killed = 1 + stop_recorded(read_json(self.layout.mesh), self.layout)
                self.remove_sandbox()
                return killed
        killed = stop_recorded(self.record, self.layout)
        self.remove_sandbox()  # after its processes: what the ledger lists, nothing else
        # The supervisor is gone (it crashed or was killed): record the stop in its place.
        record = dict(self.record, state="stopped")
        record["pods"] = {
            ref: dict(pod, status="stopped") for ref, pod in self.record.get("pods", {}).items()
        }
        write_json(self.layout.mesh, record)
        return killed

    def remove_sandbox(self) -> None:
        """A sandboxed mesh whose supervisor could not tear it down (it crashed): remove
        what its ledger lists. Nothing to do when the supervisor did (an empty ledger)."""
        if not self.plan.sandboxed:
            return
        from trustmesh.runtime.sandbox import Sandbox  # pyroute2: sandboxed meshes only

        problems = Sandbox(self.plan, self.layout.root).teardown()
        if problems:
            raise OSError("could not remove: " + "; ".join(problems))
