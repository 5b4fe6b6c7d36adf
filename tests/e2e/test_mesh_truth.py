"""`trustmesh up` tells the truth: a NACKed proxy or a second mesh in the same address
block fails the start (reason first, naming the pods or the other mesh), and `status`
after `down` shows no process as running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.mesh import LiveMesh, trustmesh

pytestmark = pytest.mark.envoy

# One injected client and a Service whose DestinationRule points the client's cluster at
# a CA file the sidecar does not have: istiod accepts that, Envoy refuses the cluster.
NACKED = """
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
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  selector: {app: api}
  ports: [{name: http, port: 8080}]
"""
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


def test_up_fails_reason_first_when_a_proxy_nacks_and_status_shows_it_stopped(
    tmp_path: Path,
) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(NACKED + MISSING_CA)
    state = tmp_path / "state"
    result = trustmesh(
        "up",
        "--isolation",
        "process",
        str(config),
        "-d",
        "--base",
        "127.55.0.0",
        state=state,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "error: 1 sidecar(s) rejected their configuration (Envoy NACK); Envoy said:"
    assert lines[1] == (
        "  shop/sleep: Cluster: Error adding/updating cluster(s) "
        "outbound|8080||api.shop.svc.cluster.local: Invalid path: /etc/trustmesh-missing/ca.pem"
    )
    assert lines[-1].startswith("(the whole output of this start is in ")  # after the reason
    assert "mesh ready" not in result.stderr and "Traceback" not in result.stderr
    record = json.loads((state / "mesh.json").read_text())
    assert record["state"] == "stopped"
    envoy_pid = record["pods"]["shop/sleep"]["envoy_pid"]
    status = trustmesh("status", state=state)
    assert status.returncode == 0 and status.stdout.startswith("mesh stopped")
    assert str(envoy_pid) not in status.stdout
    assert status.stdout.splitlines()[-1].split()[-1] == "stopped"

    # Fixed, it starts; after `down`, no PID of it is listed as running.
    config.write_text(NACKED)
    started = trustmesh(
        "up",
        "--isolation",
        "process",
        str(config),
        "-d",
        "--base",
        "127.55.0.0",
        state=state,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    running = json.loads(trustmesh("status", "-o", "json", state=state).stdout)
    pids = running["running"]["shop/sleep"]
    assert all(isinstance(pid, int) for pid in pids.values()), pids
    assert trustmesh("down", state=state).returncode == 0
    after = trustmesh("status", state=state)
    assert after.stdout.startswith("mesh stopped")
    for pid in pids.values():
        assert str(pid) not in after.stdout
    stopped = json.loads(trustmesh("status", "-o", "json", state=state).stdout)
    assert stopped["running"]["shop/sleep"] == {"app": None, "sidecar": None, "envoy": None}


def test_a_second_mesh_in_the_same_address_block_is_refused(mesh: LiveMesh, tmp_path: Path) -> None:
    mesh.apply(None)
    base = mesh.running.record["base"]
    second = trustmesh(
        "up",
        "--isolation",
        "process",
        str(mesh.config_dir),
        "-d",
        "--base",
        base,
        state=tmp_path / "second",
        timeout=120,
    )
    assert second.returncode == 1
    assert second.stderr.startswith(
        f"error: addresses {base.rsplit('.', 2)[0]}.0.0/16 are used by the mesh running from "
        f"{mesh.state}"
    ), second.stderr
    record = json.loads((tmp_path / "second" / "mesh.json").read_text())
    assert record["pods"] == {}  # nothing of it was started
    # and the first mesh is untouched
    answer = trustmesh(
        "request", "--from", "foo/sleep", "http://httpbin.foo:8000/ip", state=mesh.state
    )
    assert answer.stdout.startswith("HTTP 200"), answer.stdout + answer.stderr
