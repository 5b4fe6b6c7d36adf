"""``trustmesh up`` of many pods and ``trustmesh down`` after it, as a user runs them.

The mesh: ``pods`` Deployments of Istio's helloworld image (the built-in stand-in: no
command), one Service each, in a namespace labelled for injection, mesh-wide STRICT — so
every pod has a sidecar, an agent and a certificate. Measured: the wall time of
``trustmesh up -d`` (it returns once every sidecar has its configuration and every app
was started) and until every app answers through the mesh (one request from the first
pod to each Service); then ``trustmesh down``, after which the host is checked for
anything left: the mesh's namespaces, links, nftables tables, runtime directories, mounts
naming the mesh, and any of the mesh's processes still alive.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib.loadgen import probe
from trustmesh.runtime.client import http_request
from trustmesh.runtime.running import RunningMesh
from trustmesh.runtime.sandbox import mesh_id

PORT = 5000
STRICT = """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""


def pods_config(directory: Path, pods: int) -> Path:
    """``pods`` helloworld Deployments + Services in namespace ``hello``."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = [
        "apiVersion: v1\nkind: Namespace\n"
        "metadata: {name: hello, labels: {istio-injection: enabled}}\n",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n",
        STRICT,
    ]
    for n in range(pods):
        docs.append(
            f"""apiVersion: apps/v1
kind: Deployment
metadata: {{name: hello-{n}, namespace: hello}}
spec:
  selector: {{matchLabels: {{app: hello-{n}}}}}
  template:
    metadata: {{labels: {{app: hello-{n}, version: v1}}}}
    spec:
      containers:
      - name: helloworld
        image: docker.io/istio/examples-helloworld-v1:1.0
        ports: [{{containerPort: {PORT}}}]
"""
        )
        docs.append(
            f"""apiVersion: v1
kind: Service
metadata: {{name: hello-{n}, namespace: hello}}
spec:
  selector: {{app: hello-{n}}}
  ports: [{{name: http, port: {PORT}}}]
"""
        )
    (directory / "hello.yaml").write_text("---\n".join(docs))
    return directory


def _trustmesh(state: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", *args, "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def host_state(mesh: str) -> dict[str, Any]:
    """What a mesh could leave on the host, as seen from the host."""
    mounts = [line.split(" ")[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return {
        "netns": sorted(n for n in _run("ip", "netns", "list").split() if mesh in n),
        "links": sorted(
            line.split(":")[1].strip() for line in _run("ip", "-o", "link").splitlines()
        ),
        "nft_tables": sorted(_run("nft", "list", "tables").splitlines()),
        "mounts": sorted(p for p in mounts if mesh in p),
        "run_dir": Path(f"/run/trustmesh/{mesh}").exists(),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mesh_pids(state: Path) -> list[int]:
    """Every PID ``status -o json`` lists: the supervisor and each pod's processes."""
    done = _trustmesh(state, "status", "-o", "json", timeout=60)
    if done.returncode != 0:
        return []
    record = json.loads(done.stdout)
    pids = [record.get("supervisor_pid")]
    for processes in record.get("running", {}).values():
        for entry in processes if isinstance(processes, list) else processes.values():
            pids.append(entry.get("pid") if isinstance(entry, dict) else entry)
    return sorted({p for p in pids if isinstance(p, int)})


async def _ask_every_pod(state: Path, pods: int) -> list[str]:
    """From hello-0, ``GET /hello`` on every Service at once; the failures. In the sandbox
    the connection is made inside hello-0's namespace to the Service's ClusterIP (the
    capture takes it to hello-0's sidecar, as the app's would be); in process mode through
    hello-0's sidecar proxy, as ``trustmesh request`` does."""
    running = RunningMesh.open(state)
    plan = running.plan
    source = running.pod("hello/hello-0")

    async def ask(n: int) -> str | None:
        url = f"http://hello-{n}:{PORT}/hello"
        if plan.sandboxed:
            assert source.netns is not None
            address = plan.cluster_ips[f"hello-{n}.hello.svc.cluster.local"]
            request = f"GET /hello HTTP/1.1\r\nHost: hello-{n}:{PORT}\r\n\r\n".encode()
            try:
                status_line, body = await asyncio.to_thread(
                    probe, address, PORT, request, source.netns
                )
            except OSError as exc:
                return f"hello-{n}: {exc!r}"
            status = int(status_line.split()[1])
        else:
            answer = await http_request(plan, source, url, timeout=20)
            status, body = answer.status, answer.body
        if status == 200 and b"Hello version: v1" in body:
            return None
        return f"hello-{n}: {status} {body[:200]!r}"

    found = await asyncio.gather(*(ask(n) for n in range(pods)))
    return [f for f in found if f is not None]


# The supervisor's progress lines that open each phase of `up`.
PHASES = {
    "sandbox": "building the pod sandbox",
    "control_plane": "starting the control plane",
    "sidecars": "sidecars (agent + Envoy)",
    "sidecars_configured": "starting",  # the "starting N apps" line follows the wait
    "ready": "mesh ready in",
}


def _timed_up(
    state: Path, config: Path, flags: list[str]
) -> tuple[subprocess.CompletedProcess[str], dict[str, float]]:
    """``up -d``, noting when each phase's progress line reached the supervisor's log
    (seconds from the start; polled every 20 ms, so to ±20 ms)."""
    argv = [sys.executable, "-m", "trustmesh", "up", str(config), "-d", *flags]
    started = time.monotonic()
    process = subprocess.Popen(
        [*argv, "--state", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = state / "logs" / "supervisor.log"
    seen: dict[str, float] = {}
    while True:
        finished = process.poll() is not None
        try:
            lines = log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        for name, marker in PHASES.items():
            if name in seen:
                continue
            if name == "sidecars_configured":
                hit = any(line.startswith("starting") and line.endswith(" apps") for line in lines)
            else:
                hit = any(marker in line for line in lines)
            if hit:
                seen[name] = round(time.monotonic() - started, 2)
        if finished:
            break
        time.sleep(0.02)  # another process's progress: its log is all there is to watch
    out, err = process.communicate()
    done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done, seen


def up_and_down(workdir: Path, pods: int, isolation: str | None) -> dict[str, Any]:
    """Start ``pods`` pods, wait until each answers, stop, check what is left."""
    config = pods_config(workdir / "config", pods)
    state = workdir / "state"
    mesh = mesh_id(state)
    before = host_state(mesh)
    flags = ["--isolation", isolation] if isolation else []
    started = time.monotonic()
    up, phases = _timed_up(state, config, flags)
    up_s = time.monotonic() - started
    result: dict[str, Any] = {"pods": pods, "isolation": isolation or "default"}
    pids: list[int] = []
    try:
        if up.returncode != 0:
            result["up_error"] = (up.stderr or up.stdout)[-3000:]
            return result
        failures = asyncio.run(_ask_every_pod(state, pods))
        serving_s = time.monotonic() - started
        during = host_state(mesh)
        pids = _mesh_pids(state)
        result |= {
            "up_s": round(up_s, 2),
            "up_phases_s": phases,
            "all_serving_s": round(serving_s, 2),
            "requests_failed": failures,
            "namespaces_while_up": len(during["netns"]),
            "processes_while_up": len(pids),
        }
    finally:
        stopped = time.monotonic()
        down = _trustmesh(state, "down")
        result["down_s"] = round(time.monotonic() - stopped, 2)
        if down.returncode != 0:
            result["down_error"] = (down.stderr or down.stdout)[-3000:]
    # `down` returns once the pods are stopped; the supervisor may take a moment to exit.
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = host_state(mesh)
    leftovers = {
        "netns": after["netns"],
        "new_links": sorted(set(after["links"]) - set(before["links"])),
        "new_nft_tables": sorted(set(after["nft_tables"]) - set(before["nft_tables"])),
        "mounts": after["mounts"],
        "run_dir": after["run_dir"],
        "processes_alive_5s_after_down": [p for p in pids if _alive(p)],
    }
    result["leftovers"] = leftovers
    result["clean"] = not any(leftovers.values())
    return result
