"""The mesh commands as a user runs them: status, request, logs, proxy-config, and an
``up`` that fails with a message naming the pod."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.e2e.mesh import SCENARIOS, LiveMesh, trustmesh

pytestmark = pytest.mark.envoy


def test_status_shows_every_pod_synced(mesh: LiveMesh) -> None:
    mesh.apply(None)
    result = trustmesh("status", state=mesh.state)
    assert result.returncode == 0, result.stderr
    assert "mesh ready" in result.stdout
    for pod in ("foo/httpbin", "bar/sleep", "legacy/httpbin", "foo/tcp-echo"):
        assert pod in result.stdout
    assert result.stdout.count("SYNCED") == 5  # foo (3) and bar (2) have sidecars
    as_json = json.loads(trustmesh("status", "-o", "json", state=mesh.state).stdout)
    assert as_json["supervisor_alive"] is True
    assert all(p["synced"] for p in as_json["sync"]["proxies"].values())


def test_request_through_the_sidecar_carries_the_workload_identity(mesh: LiveMesh) -> None:
    mesh.apply(None)
    result = trustmesh(
        "request",
        "--from",
        "foo/sleep",
        "http://httpbin.foo:8000/headers",
        "-H",
        "x-demo: 1",
        state=mesh.state,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP 200")
    body = json.loads(result.stdout.split("\n\n", 1)[1])
    xfcc = body["headers"]["X-Forwarded-Client-Cert"]
    # Set by httpbin's sidecar from the mTLS peer certificate: foo/sleep's identity.
    assert "URI=spiffe://cluster.local/ns/foo/sa/sleep" in xfcc
    assert body["headers"]["X-Demo"] == "1"


def test_request_reports_a_reset_like_curl(mesh: LiveMesh) -> None:
    mesh.apply(SCENARIOS / "12-mesh-strict")
    result = trustmesh(
        "request", "--from", "legacy/sleep", "http://httpbin.foo:8000/ip", state=mesh.state
    )
    assert result.returncode == 56, result.stdout + result.stderr
    assert "reset" in result.stderr
    tcp = trustmesh(
        "request",
        "--from",
        "foo/sleep",
        "--tcp",
        "tcp-echo.foo:9001",
        "-d",
        "ping",
        state=mesh.state,
    )
    assert tcp.returncode == 0 and tcp.stdout.strip() == "ping"
    mesh.apply(None)


def test_logs_and_proxy_config(mesh: LiveMesh) -> None:
    mesh.apply(SCENARIOS / "02-deny-get")
    denied = trustmesh(
        "request", "--from", "foo/sleep", "http://httpbin.foo:8000/get", state=mesh.state
    )
    assert denied.stdout.startswith("HTTP 403")
    rbac = json.loads(trustmesh("proxy-config", "foo/httpbin", "rbac", state=mesh.state).stdout)
    policies = json.dumps(rbac)
    assert "ns[foo]-policy[deny-method-get]-rule[0]" in policies
    listeners = trustmesh("proxy-config", "foo/sleep", "listeners", state=mesh.state)
    assert "outbound_http" in listeners.stdout
    app_log = trustmesh("logs", "foo/httpbin", state=mesh.state)
    httpbin = mesh.running.pod("foo/httpbin")
    assert f"listening on {httpbin.app_ip}:8000" in app_log.stdout
    # The denied request's access-log line names the policy that denied it (after a
    # flush: the sidecars flush every 100 ms, the request above came back first).
    proxy_log = _eventually_contains(mesh, "rbac_access_denied_matched_policy")
    assert "deny-method-get" in proxy_log
    legacy = trustmesh("logs", "legacy/httpbin", "--proxy", state=mesh.state)
    assert legacy.returncode == 1 and "has no sidecar" in legacy.stderr
    mesh.apply(None)


def _eventually_contains(mesh: LiveMesh, text: str) -> str:
    for _ in range(50):
        log = trustmesh("logs", "foo/httpbin", "--proxy", "--tail", "20", state=mesh.state).stdout
        if text in log:
            return log
    raise AssertionError(f"{text!r} never appeared in foo/httpbin's proxy log")


def test_up_fails_with_the_pod_and_its_log_when_an_app_dies(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: broken, namespace: default}
spec:
  template:
    spec:
      containers:
      - name: broken
        command: [python3, -c, "import sys; print('cannot start: no config'); sys.exit(3)"]
        ports: [{containerPort: 8000}]
"""
    )
    result = trustmesh(
        "up",
        "--isolation",
        "process",
        str(config),
        "--base",
        "127.50.0.0",
        state=tmp_path / "state",
        timeout=120,
    )
    assert result.returncode == 1
    assert "default/broken: the app exited with status 3" in result.stderr
    assert "cannot start: no config" in result.stderr  # the tail of its log
    assert "Traceback" not in result.stderr
    record = json.loads((tmp_path / "state" / "mesh.json").read_text())
    assert record["state"] == "stopped"  # and everything it started is stopped again


def test_live_tests_refuse_to_run_against_a_configuration_the_mesh_refused(
    mesh: LiveMesh,
) -> None:
    mesh.apply(None)
    bad = mesh.config_dir / "bad.yaml"
    bad.write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: foo}\nspec:\n  action: MAYBE\n"
    )
    try:
        test_file = SCENARIOS / "02-deny-get" / "test.yaml"
        files = ["-f", str(SCENARIOS / "02-deny-get" / "config.yaml")]
        result = trustmesh("test", *files, str(test_file), "--live", state=mesh.state)
        assert result.returncode == 1
        assert "refused the configuration" in result.stderr
        assert "bad.yaml:5 spec.action" in result.stderr
        # The proxies kept the last good configuration: no policy, GET allowed.
        get = trustmesh(
            "request", "--from", "foo/sleep", "http://httpbin.foo:8000/get", state=mesh.state
        )
        assert get.stdout.startswith("HTTP 200")
    finally:
        bad.unlink()
    mesh.apply(None)


def test_without_access_logging_only_refused_requests_are_logged(mesh: LiveMesh) -> None:
    """meshConfig.accessLogFile unset (Istio's default): the sidecar still logs every
    refused request with the policy that refused it, and nothing else."""
    mesh.apply(SCENARIOS / "02-deny-get", log_every_request=False)
    # The log settings live in the listener's filter chains: connections an old filter
    # chain still holds keep its settings until it has drained (1 s; Envoy updates the
    # chains in place). Wait for that, by Envoy's stats.
    for _ in range(200):
        dump = mesh.running.envoy_get("foo/httpbin", "/config_dump?resource=dynamic_listeners")
        active = b"warming_state" not in dump and b"trustmesh.access_log.min_status" in dump
        stats = mesh.running.envoy_get("foo/httpbin", "/stats?filter=draining").decode()
        counts = [line.rpartition(": ")[2] for line in stats.splitlines() if ": " in line]
        if active and counts and all(count == "0" for count in counts):
            break
        time.sleep(0.05)  # polling Envoy's admin: no event to wait on
    else:
        raise AssertionError(f"foo/httpbin's old filter chains never drained:\n{stats}")
    log = mesh.running.layout.envoy_log(mesh.running.pod("foo/httpbin").key)
    before = log.stat().st_size
    for method, request_id in (("POST", "allowed-0001"), ("GET", "denied-0001")):
        trustmesh(
            "request",
            "--from",
            "foo/sleep",
            "-X",
            method,
            "-H",
            f"x-request-id: {request_id}",
            f"http://httpbin.foo:8000/{method.lower()}",
            state=mesh.state,
        )
    for _ in range(100):
        written = log.read_bytes()[before:].decode()
        if "denied-0001" in written:
            break
        time.sleep(0.05)  # the sidecar flushes its access log every 100 ms
    assert "denied-0001" in written and "deny-method-get" in written
    assert "allowed-0001" not in written
    mesh.apply(None)


def test_a_kept_ca_of_another_trust_domain_is_refused(tmp_path: Path) -> None:
    """A state directory reused after trustDomain changed would issue certificates in the
    old domain: the second up stops and says what to do."""
    config = tmp_path / "mesh.yaml"
    config.write_text(
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: idle, namespace: default}
spec:
  template:
    spec:
      containers:
      - name: idle
        command: [trustmesh, sample, sleep]
"""
    )
    state = tmp_path / "state"
    first = trustmesh(
        "up",
        "--isolation",
        "process",
        str(config),
        "--base",
        "127.51.0.0",
        "-d",
        state=state,
        timeout=120,
    )
    assert first.returncode == 0, first.stderr
    assert trustmesh("down", state=state).returncode == 0
    other = tmp_path / "other-td.yaml"
    other.write_text("trustDomain: other-td\n")
    second = trustmesh(
        "up",
        "--isolation",
        "process",
        str(config),
        "--mesh-config",
        str(other),
        "--base",
        "127.51.0.0",
        "-d",
        state=state,
        timeout=120,
    )
    assert second.returncode == 1
    assert "holds a CA for trust domain 'cluster.local'" in second.stderr
    assert "the mesh config says 'other-td'" in second.stderr
