"""Istio's samples unchanged, and pods that behave like pods, through ``trustmesh up``
(process mode, real Envoy sidecars, real mTLS).

* bookinfo as published (images, no commands) runs on the built-in stand-ins: reviews
  answers productpage, the product page shows reviews and each version's stars, and a
  DENY on ratings turns the stars into Istio's "Ratings service is currently unavailable"
  — the offline verdict agreeing for that hop.
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
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.mesh import START_TIMEOUT, trustmesh
from tests.envoy.conftest import eventually
from tests.unit.meshutil import ROOT
from trustmesh.runtime.client import http_request
from trustmesh.runtime.running import RunningMesh

BOOKINFO = ROOT / "examples" / "bookinfo"
SERVED_BY = re.compile(r"Reviews served by: (\S+?)<")
STARS = re.compile(r'<div class="stars text-(\w+)-500"[^>]*>(.*?)</div>')
UNAVAILABLE = "Ratings service is currently unavailable"
DENY_RATINGS = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-ratings
  namespace: default
spec:
  selector:
    matchLabels: {app: ratings}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-reviews"]
"""


@contextlib.contextmanager
def running_mesh(config: Path, state: Path, base: str, *extra: str) -> Iterator[RunningMesh]:
    """``trustmesh up -d`` at ``base`` (or one of the next blocks while another checkout's
    test session holds it), stopped by ``down`` afterwards even when the test fails."""
    first = int(base.split(".")[1])
    started = None
    try:
        for block in range(first, first + 10):
            started = trustmesh(
                "up", "--isolation", "process", str(config), "-d",
                "--base", f"127.{block}.0.0", *extra,
                state=state, timeout=START_TIMEOUT,
            )  # fmt: skip
            taken = ("are used by the mesh running from", "is already in use by")
            if started.returncode == 0 or not any(why in started.stderr for why in taken):
                break
        assert started is not None and started.returncode == 0, started and started.stderr
        yield RunningMesh.open(state)
    finally:
        trustmesh("down", state=state)


def _get(running: RunningMesh, source: str, url: str) -> tuple[int, str]:
    pod = running.pod(source)
    answer = asyncio.run(http_request(running.plan, pod, url, timeout=15))
    assert not answer.reset, answer.why
    return answer.status, answer.body.decode(errors="replace")


def _pages_by_version(running: RunningMesh, wanted: int = 3) -> dict[str, str]:
    """Product pages until each reviews version served one (round robin: a few requests)."""
    pages: dict[str, str] = {}
    for _ in range(12 * wanted):
        status, page = _get(running, "default/details-v1", "http://productpage:9080/productpage")
        assert status == 200, page
        served = SERVED_BY.search(page)
        assert served is not None, page
        pages.setdefault(served.group(1), page)
        if len(pages) == wanted:
            break
    return pages


@pytest.fixture(scope="module")
def bookinfo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningMesh, Path]]:
    root = tmp_path_factory.mktemp("bookinfo")
    config = root / "config"
    shutil.copytree(BOOKINFO, config)
    with running_mesh(config, root / "state", "127.70.0.0") as running:
        yield running, config


def test_bookinfo_as_published_shows_reviews_and_each_versions_stars(
    bookinfo: tuple[RunningMesh, Path],
) -> None:
    running, _ = bookinfo
    answer = trustmesh(
        "request", "--from", "default/productpage-v1", "http://reviews:9080/reviews/0",
        state=running.layout.root,
    )  # fmt: skip
    assert answer.returncode == 0 and answer.stdout.startswith("HTTP 200"), answer.stderr
    body = json.loads(answer.stdout.split("\n\n", 1)[1])
    assert body["reviews"][0]["reviewer"] == "Reviewer1"
    assert body["podname"] in ("reviews-v1", "reviews-v2", "reviews-v3")

    pages = _pages_by_version(running)
    assert set(pages) == {"reviews-v1", "reviews-v2", "reviews-v3"}
    for version, page in pages.items():
        assert "The Comedy of Errors" in page and "Book Details" in page, version
        assert "An extremely entertaining play by Shakespeare." in page
        assert "Error fetching" not in page and UNAVAILABLE not in page
    assert STARS.findall(pages["reviews-v1"]) == []  # v1 does not call ratings
    for version, color in (("reviews-v2", "black"), ("reviews-v3", "red")):
        stars = STARS.findall(pages[version])
        assert [(c, body.count('glyphicon-star"')) for c, body in stars] == [(color, 5), (color, 4)]


def test_a_deny_on_ratings_shows_istios_ratings_unavailable_text(
    bookinfo: tuple[RunningMesh, Path],
) -> None:
    running, config = bookinfo
    offline = ["authz", "check", "-f", str(config), "--from", "default/reviews-v2"]
    offline += ["--to", "default/ratings", "--port", "9080", "--path", "/ratings/0"]
    assert trustmesh(*offline, state=running.layout.root).returncode == 0  # allowed
    policy = config / "deny-ratings.yaml"
    policy.write_text(DENY_RATINGS)
    try:
        asyncio.run(running.wait_synced(timeout=30))
        verdict = trustmesh(*offline, state=running.layout.root)
        assert verdict.returncode == 3 and "deny-ratings" in verdict.stdout, verdict.stdout
        pages = _pages_by_version(running)
        for version in ("reviews-v2", "reviews-v3"):
            page = pages[version]
            assert page.count(UNAVAILABLE) == 2, page
            assert "glyphicon-star" not in page and "Book Reviews" in page
        assert UNAVAILABLE not in pages["reviews-v1"]  # it never asks ratings
    finally:
        policy.unlink()
        asyncio.run(running.wait_synced(timeout=30))


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
