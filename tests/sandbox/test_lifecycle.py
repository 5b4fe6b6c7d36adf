"""A sandboxed mesh's life: ``up`` truthful about NACKs, ``status``, ``down`` after a crash
of the supervisor, and ``up`` over a crashed mesh's state — nothing left on the host."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.sandbox.conftest import requires_root
from tests.sandbox.hoststate import host_state
from tests.sandbox.meshrun import leftovers, marked_processes, sandboxed_mesh, trustmesh
from trustmesh.runtime import netns
from trustmesh.runtime.ledger import Ledger
from trustmesh.runtime.sandbox import mesh_id

pytestmark = requires_root

SMALL = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio-injection: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep, namespace: shop}
spec:
  template:
    metadata: {labels: {app: sleep}}
    spec:
      containers:
      - {name: sleep, command: [trustmesh, sample, sleep]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: shop}
spec:
  template:
    metadata: {labels: {app: api}}
    spec:
      containers:
      - name: api
        command: [trustmesh, sample, httpbin]
        ports: [{containerPort: 8000}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  selector: {app: api}
  ports: [{name: http, port: 8080, targetPort: 8000}]
"""
# istiod accepts a DestinationRule naming a CA file the sidecar does not have; Envoy
# refuses the cluster (NACK).
MISSING_CA = """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-ca, namespace: shop}
spec:
  host: api.shop.svc.cluster.local
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: /etc/trustmesh-missing/ca.pem}
"""


def _supervisor(state: Path) -> int:
    pid = json.loads((state / "mesh.json").read_text())["supervisor_pid"]
    assert isinstance(pid, int)
    return pid


def test_a_nack_fails_the_start_naming_the_pod_and_leaves_nothing(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(SMALL + MISSING_CA)
    state = tmp_path / "state"
    before = host_state(mesh_id(state))
    result = trustmesh("up", "--isolation", "netns", str(config), "-d", state=state, timeout=180)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "error: 2 sidecar(s) rejected their configuration (Envoy NACK); Envoy said:"
    assert lines[1].startswith("  shop/api, shop/sleep: Cluster: Error adding/updating cluster")
    assert "Invalid path: /etc/trustmesh-missing/ca.pem" in lines[1]
    assert marked_processes(state) == []
    assert leftovers(before, host_state(mesh_id(state))) == {}
    assert not (state / "ledger.jsonl").exists()


def test_status_request_and_down_after_the_supervisor_crashed(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(SMALL)
    state = tmp_path / "state"
    with sandboxed_mesh(state, [config], extra=["--restart-backoff", "0.2"]) as mesh:
        status = trustmesh("status", "-o", "json", state=state)
        record = json.loads(status.stdout)
        assert record["isolation"] == "netns" and record["state"] == "ready"
        table = trustmesh("status", state=state).stdout
        assert table.startswith("mesh ready; pods sandboxed (netns)"), table
        assert "SYNCED" in table and "10.88." in table, table
        processes = record["running"]["shop/api"]
        assert all(isinstance(processes[k], int) for k in ("app", "sidecar", "envoy"))
        answer = mesh.request("shop/sleep", "http://api:8080/get")
        assert answer.returncode == 0 and answer.stdout.startswith("HTTP 200"), answer.stdout
        # a sidecar's Envoy log is in its pod's proxy directory: `logs --proxy` finds it
        # (sidecars log every answer >= 400)
        teapot = mesh.request("shop/sleep", "http://api:8080/status/418")
        assert teapot.stdout.startswith("HTTP 418"), teapot.stdout
        deadline = time.monotonic() + 10
        while True:  # Envoy flushes its access log every 100 ms: poll the file it writes
            proxy_log = trustmesh("logs", "shop/api", "--proxy", state=state)
            assert proxy_log.returncode == 0, proxy_log.stderr
            if '"path":"/status/418"' in proxy_log.stdout or time.monotonic() > deadline:
                break
        assert '"path":"/status/418"' in proxy_log.stdout, proxy_log.stdout[-2000:]
        # a pod without a sidecar reaches the Service by name too (kube-proxy's DNAT)
        plain = mesh.request("shop/api", "http://api.shop.svc.cluster.local:8080/get")
        assert plain.stdout.startswith("HTTP 200"), plain.stdout
        # an app that exits is restarted in its sandbox, as its user, and serves again
        first_app = mesh.record("shop/api")["app_pid"]
        os.kill(first_app, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the supervisor's restart, seen from outside
            record = mesh.record("shop/api")
            if record.get("restarts") == 1 and record.get("ready"):
                break
            time.sleep(0.05)  # another process's state file: no event to wait on
        assert record["restarts"] == 1 and record["ready"], record
        again = mesh.request("shop/sleep", "http://api:8080/get")
        assert again.stdout.startswith("HTTP 200"), again.stdout
        uid_line = Path(f"/proc/{record['app_pid']}/status").read_text().split("Uid:")[1]
        assert uid_line.split()[0] == str(mesh.pod("shop/api").uid)
        # the supervisor dies without cleaning up: its pods and namespaces stay ...
        os.kill(_supervisor(state), signal.SIGKILL)
        assert marked_processes(state)
        assert (state / "ledger.jsonl").exists()
        # ... until `down`, which stops them by PID and removes what the ledger lists
        stopped = trustmesh("down", state=state)
        assert stopped.returncode == 0, stopped.stderr
        assert marked_processes(state) == []
        assert not (state / "ledger.jsonl").exists()
        assert not any(mesh_id(state) in name for name in host_state(mesh_id(state))["netns"])
        # a teardown that failed half-way leaves its ledger: `down` again finishes it
        leftover = f"tm-{mesh_id(state)}-99"
        netns.create_netns(Ledger(state / "ledger.jsonl"), leftover)
        again = trustmesh("down", state=state)
        assert again.returncode == 0 and "already stopped" in again.stderr, again.stderr
        assert leftover not in host_state(mesh_id(state))["netns"]  # type: ignore[operator]
        assert not (state / "ledger.jsonl").exists()


def test_up_over_a_crashed_mesh_removes_what_it_left_first(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(SMALL)
    state = tmp_path / "state"
    with sandboxed_mesh(state, [config]):
        first = _supervisor(state)
        old = set(marked_processes(state))
        os.kill(first, signal.SIGKILL)
        again = trustmesh("up", "--isolation", "netns", str(config), "-d", state=state, timeout=180)
        assert again.returncode == 0, again.stderr
        assert _supervisor(state) != first
        # the crashed mesh's processes are gone, the new one's run in fresh namespaces
        assert not old & set(marked_processes(state))
        netns = host_state(mesh_id(state))["netns"]
        assert len(netns) == 3  # type: ignore[arg-type]
