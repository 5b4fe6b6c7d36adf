"""Pods that behave like pods, through ``trustmesh up`` (process mode, real Envoy
sidecars, real mTLS). Bookinfo as published, with Istio's HTTP authorization task, is
tests/sandbox/test_bookinfo_sandbox.py (each isolation mode).

* An app that exits is restarted after its back-off, its endpoint is out of the mesh until
  it accepts connections again (a Service's other pod takes every request meanwhile), and
  ``status`` shows the restart and the exit; a Pod with ``restartPolicy: Never`` stays
  down. The app exits, and comes back, when the test says so through FIFOs: events, not
  sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.mesh import trustmesh, up_in_a_free_block
from tests.envoy.conftest import eventually
from trustmesh.runtime.client import http_request
from trustmesh.runtime.running import RunningMesh


@contextlib.contextmanager
def running_mesh(config: Path, state: Path, base: str, *extra: str) -> Iterator[RunningMesh]:
    """``trustmesh up -d`` at ``base`` (or one of the next blocks while another checkout's
    test session holds it), stopped by ``down`` afterwards even when the test fails."""
    try:
        started = up_in_a_free_block(config, *extra, state=state, base=base)
        assert started.returncode == 0, started.stderr
        yield RunningMesh.open(state)
    finally:
        trustmesh("down", state=state)


def _get(running: RunningMesh, source: str, url: str) -> tuple[int, str]:
    pod = running.pod(source)
    answer = asyncio.run(http_request(running.plan, pod, url, timeout=15))
    assert not answer.reset, answer.why
    return answer.status, answer.body.decode(errors="replace")


# ---------------------------------------------------------------------------- restarts


# A real app: answers "web-a" on any path. Its first start exits with status 3 when the
# test writes to EXIT_FIFO; its second start waits for a line on HOLD_FIFO before it
# listens (an app that is running but not ready).
CRASHY = """
import http.server, os, sys, threading
starts = os.environ["STARTS_FILE"]
count = int(open(starts).read()) + 1 if os.path.exists(starts) else 1
open(starts, "w").write(str(count))
if count == 1:
    def exit_on_signal():
        with open(os.environ["EXIT_FIFO"]) as fifo:
            fifo.readline()
        os._exit(3)
    threading.Thread(target=exit_on_signal, daemon=True).start()
else:
    with open(os.environ["HOLD_FIFO"]) as fifo:
        fifo.readline()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "6")
        self.end_headers()
        self.wfile.write(b"web-a\\n")
    def log_message(self, *args):
        pass
http.server.HTTPServer((os.environ["HOST"], int(os.environ["PORT"])), Handler).serve_forever()
"""

ONCE = "import os; open(os.environ['DONE_FIFO']).readline()"  # then exits 0


def _restart_config(root: Path) -> Path:
    config = root / "config"
    config.mkdir()
    for fifo in ("exit", "hold", "done"):
        os.mkfifo(root / fifo)
    (root / "crashy.py").write_text(CRASHY)
    python = sys.executable
    web_a_env = {
        "STARTS_FILE": str(root / "starts"),
        "EXIT_FIFO": str(root / "exit"),
        "HOLD_FIFO": str(root / "hold"),
    }
    env_yaml = ", ".join(f"{{name: {k}, value: {json.dumps(v)}}}" for k, v in web_a_env.items())
    (config / "mesh.yaml").write_text(
        f"""apiVersion: v1
kind: Namespace
metadata: {{name: demo, labels: {{istio-injection: enabled}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 8000}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-a, namespace: demo}}
spec:
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: web
        command: [{json.dumps(python)}, {json.dumps(str(root / "crashy.py"))}]
        env: [{env_yaml}]
        ports: [{{containerPort: 8000}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-b, namespace: demo}}
spec:
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: web
        command: [trustmesh, sample, httpbin]
        ports: [{{containerPort: 8000}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: client, namespace: demo}}
spec:
  template:
    metadata: {{labels: {{app: client}}}}
    spec:
      containers:
      - name: client
        command: [trustmesh, sample, sleep]
---
apiVersion: v1
kind: Pod
metadata: {{name: once, namespace: demo}}
spec:
  restartPolicy: Never
  containers:
  - name: once
    command: [{json.dumps(python)}, -c, {json.dumps(ONCE)}]
    env: [{{name: DONE_FIFO, value: {json.dumps(str(root / "done"))}}}]
"""
    )
    return config


def _signal(fifo: Path, timeout: float = 30) -> None:
    """Write a line to ``fifo`` once the app has it open (an open without a reader fails
    at once with O_NONBLOCK: retried until the app opened its end)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert time.monotonic() < deadline, f"nobody reads {fifo}"
            time.sleep(0.02)  # the app opens its end on its own schedule: no event to hook
    try:
        os.write(fd, b"go\n")
    finally:
        os.close(fd)


def _answers(running: RunningMesh, count: int) -> list[str]:
    return [_get(running, "demo/client", "http://web:8000/")[1].strip() for _ in range(count)]


def test_an_app_that_exits_is_out_of_the_mesh_until_it_accepts_again_then_restarted(
    tmp_path: Path,
) -> None:
    config = _restart_config(tmp_path)
    with running_mesh(config, tmp_path / "state", "127.80.0.0", "--restart-backoff", "0.2") as mesh:
        assert {"web-a", "trustmesh httpbin sample"} <= set(_answers(mesh, 6))

        async def record(ref: str) -> dict[str, object]:
            return RunningMesh.open(mesh.layout.root).pod_record(ref)

        async def out_of_mesh() -> bool:
            sync = mesh.syncz() or {}
            proxies = sync.get("proxies", {}).values()
            web_a = await record("demo/web-a")
            restarted = web_a.get("restarts") == 1 and web_a.get("ready") is False
            removed = sync.get("not_ready") == ["demo/web-a"] and all(p["synced"] for p in proxies)
            return restarted and removed

        async def back_in_mesh() -> bool:
            sync = mesh.syncz() or {}
            proxies = sync.get("proxies", {}).values()
            ready = (await record("demo/web-a")).get("ready") is True
            return ready and sync.get("not_ready") == [] and all(p["synced"] for p in proxies)

        _signal(tmp_path / "exit")  # the app exits with status 3
        asyncio.run(eventually(out_of_mesh, what="web-a restarted, not ready", timeout=30))
        # Restarted but not listening: its endpoint is gone, web-b answers every request.
        assert set(_answers(mesh, 10)) == {"trustmesh httpbin sample"}
        status = json.loads(trustmesh("status", "-o", "json", state=mesh.layout.root).stdout)
        web_a = status["pods"]["demo/web-a"]
        assert web_a["last_exit"]["exit_code"] == 3 and web_a["last_exit"]["reason"] == "Error"
        assert web_a["last_restart"] and web_a["restarts"] == 1
        assert status["running"]["demo/web-a"]["app"] is not None  # the new process
        table = trustmesh("status", state=mesh.layout.root).stdout
        assert "demo/web-a: exited (code 3) at" in table and "not ready" in table

        _signal(tmp_path / "hold")  # now it listens
        asyncio.run(eventually(back_in_mesh, what="web-a ready again", timeout=30))
        assert "web-a" in set(_answers(mesh, 6))
        assert (tmp_path / "starts").read_text() == "2"

        # restartPolicy Never: a Pod whose app ended is not started again.
        _signal(tmp_path / "done")

        async def completed() -> bool:
            return (await record("demo/once")).get("status") == "completed"

        asyncio.run(eventually(completed, what="the Never pod completed", timeout=30))
        once = RunningMesh.open(mesh.layout.root)
        assert once.pod_record("demo/once")["last_exit"]["exit_code"] == 0
        assert once.pod_record("demo/once").get("restarts") == 0
        assert once.pod_processes("demo/once")["app"] is None
