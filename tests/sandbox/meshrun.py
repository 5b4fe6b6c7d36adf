"""A real ``trustmesh up --isolation netns`` for sandbox tests, and commands run in its pods.

:func:`sandboxed_mesh` starts the mesh through the CLI (detached), yields a
:class:`SandboxedMesh` and — also when the test fails — stops it with ``down``, removes
whatever its ledger still lists, and checks that nothing of it is left on the host: no
namespace, no runtime directory, no process carrying its marker, no link or nftables
table in the host's own namespace that was not there before.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.sandbox.hoststate import host_state
from trustmesh.runtime.addresses import MESH_ENV
from trustmesh.runtime.interpreter import SandboxPython, sandbox_python
from trustmesh.runtime.layout import Layout, PodPaths, read_json
from trustmesh.runtime.plan import MeshPlan, PodPlan
from trustmesh.runtime.podexec import podexec_argv
from trustmesh.runtime.running import RunningMesh
from trustmesh.runtime.sandbox import Sandbox, mesh_id

_PYTHON = sandbox_python()
PYTHON = _PYTHON if not isinstance(_PYTHON, str) else SandboxPython(sys.executable)
START_TIMEOUT = 180


def trustmesh(*args: str, state: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRUSTMESH_STATE": str(state)}
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def marked_processes(state: Path) -> list[int]:
    """PIDs of processes that carry the mesh's marker (started by its supervisor)."""
    marker = f"{MESH_ENV}={state}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


@dataclass
class SandboxedMesh:
    state: Path

    @property
    def running(self) -> RunningMesh:
        return RunningMesh.open(self.state)

    @property
    def plan(self) -> MeshPlan:
        return self.running.plan

    def pod(self, ref: str) -> PodPlan:
        return self.running.pod(ref)

    def paths(self, ref: str) -> PodPaths:
        paths = self.plan.paths(self.pod(ref))
        assert paths is not None
        return paths

    def record(self, ref: str) -> dict[str, Any]:
        return self.running.pod_record(ref)

    def run(
        self,
        ref: str | None,
        *command: str,
        uid: int | None = None,
        gid: int | None = None,
        netns: str | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        """``command`` in pod ``ref``'s namespace with its names, as its app's uid (or
        ``uid``/``gid``), through podexec — what a process of that pod can do."""
        if ref is None:
            assert netns is not None
            argv = podexec_argv(sys.executable, netns, list(command), uid=uid, gid=gid)
        else:
            pod = self.pod(ref)
            paths = self.paths(ref)
            assert pod.netns is not None
            user = pod.uid if uid is None else uid
            group = (pod.gid if uid is None else uid) if gid is None else gid
            argv = podexec_argv(
                sys.executable,
                netns or pod.netns,
                list(command),
                uid=user or None,  # 0: stay root (a pod's root user, for contrast)
                gid=group if user else None,
                hosts=str(paths.hosts),
                resolv=str(paths.resolv),
            )
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", **PYTHON.env}
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )

    def python(self, ref: str | None, script: str, *args: str, **options: Any) -> dict[str, Any]:
        """Run ``script`` (a file next to this one) in the pod; its one JSON line."""
        path = str(Path(__file__).with_name(script))
        done = self.run(ref, PYTHON.executable, path, *args, **options)
        assert done.returncode == 0, done.stderr
        answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return answer

    def request(self, source: str, url: str) -> subprocess.CompletedProcess[str]:
        return trustmesh("request", "--from", source, url, state=self.state, timeout=60)

    def http(self, ref: str, url: str) -> tuple[int, str]:
        """Status and body of a GET sent from inside ``ref`` as its app (0 and the error
        when there is no HTTP answer)."""
        done = self.request(ref, url)
        if done.returncode != 0:
            return 0, done.stderr
        status_line, _, rest = done.stdout.partition("\n")
        return int(status_line.split()[1]), rest.partition("\n\n")[2]


@contextlib.contextmanager
def sandboxed_mesh(
    state: Path,
    config: Sequence[Path],
    mesh_config: Sequence[Path] = (),
    extra: Sequence[str] = (),
) -> Iterator[SandboxedMesh]:
    identity = mesh_id(state)
    before = host_state(identity)
    args = ["up", "--isolation", "netns", "-d", *extra, *map(str, config)]
    for path in mesh_config:
        args += ["--mesh-config", str(path)]
    try:
        started = trustmesh(*args, state=state, timeout=START_TIMEOUT)
        assert started.returncode == 0, f"up failed:\n{started.stderr}\n{started.stdout}"
        yield SandboxedMesh(state)
    finally:
        stopped = trustmesh("down", state=state)
        left = marked_processes(state)
        with contextlib.suppress(OSError, ValueError, KeyError):
            plan = MeshPlan.from_json(read_json(Layout(state).plan))
            problems = Sandbox(plan, state).teardown()
            assert problems == [], problems
        after = host_state(identity)
        assert stopped.returncode == 0, stopped.stderr
        assert left == [], f"processes left running: {left}"
        assert leftovers(before, after) == {}, f"left on the host: {leftovers(before, after)}"


def leftovers(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What a mesh left: its namespaces, mounts, runtime directory, and links or tables
    of the host's namespace with the names the sandbox uses (other programs on a shared
    host may add theirs meanwhile)."""
    found: dict[str, Any] = {}
    for key in ("netns", "mounts", "run_dir"):
        if after[key] != before[key]:
            found[key] = after[key]

    def ours(link: str) -> bool:
        name = link.split("@")[0]
        return name in ("br0", "eth0") or (name[:1] in "vs" and name[1:].isdigit())

    new_links = [link for link in set(after["links"]) - set(before["links"]) if ours(link)]
    if new_links:
        found["links"] = sorted(new_links)
    if "trustmesh" in after["nft"] and "trustmesh" not in before["nft"]:
        found["nft"] = after["nft"]
    return found
