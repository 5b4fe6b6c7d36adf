"""Must-show 1 of issue 11: ``trustmesh up examples/mesh --hosts 2 --replicas 2 -d``.

A 3-member etcd, two control-plane replicas, two hosts. Policy applied to the store is
enforced at the destination for requests that cross hosts (sleep pods on host 2, httpbin
on host 1, mTLS end to end) exactly as ``trustmesh authz check`` decides offline; status
lists both hosts and both replicas with the proxies each serves; down stops every PID.

As root (CI) each host is a network namespace on a LAN namespace, its pods sandboxed
under it: the requests cross the LAN, and down leaves no namespace of the mesh behind.
Otherwise the hosts run in process mode."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.hosts_rig import NETNS, alive, namespaces, recorded_pids
from tests.e2e.mesh import EXAMPLES, trustmesh
from tests.xds.controlplane_rig import STRICT
from trustmesh.runtime import hostnet
from trustmesh.runtime.cluster import host_namespace
from trustmesh.runtime.hostnet import CONTROL_IP
from trustmesh.runtime.sandboxed import in_netns

ONLY_FOO_SLEEP = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-foo-sleep, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]
"""
CASES = ("foo/sleep", "bar/sleep", "legacy/sleep")  # allow, deny (RBAC), reset (STRICT)
ENFORCE_TIMEOUT = 30.0


@pytest.fixture
def cluster(hosts_cluster: Path) -> Path:
    return hosts_cluster


def _status(state: Path) -> dict[str, object]:
    shown = trustmesh("status", "-o", "json", state=state)
    assert shown.returncode == 0, shown.stderr
    value: dict[str, object] = json.loads(shown.stdout)
    return value


def _live(state: Path, source: str) -> str:
    """What the request got: the HTTP status, or "reset" (curl's 56)."""
    sent = trustmesh("request", "--from", source, "http://httpbin.foo:8000/get", state=state)
    if sent.returncode == 56:
        return "reset"
    assert sent.stdout.startswith("HTTP "), sent.stdout + sent.stderr
    return sent.stdout.split()[1]


def test_cross_host_requests_are_enforced_as_offline_and_status_lists_all(
    cluster: Path, tmp_path: Path
) -> None:
    status = _status(cluster)
    hosts = {h["name"]: h for h in status["hosts"]}  # type: ignore[attr-defined]
    replicas = {r["name"]: r for r in status["replicas"]}  # type: ignore[attr-defined]
    pods = status["pods"]
    assert set(hosts) == {"host-1", "host-2"} and set(replicas) == {"r1", "r2"}
    assert len(status["etcd"]) == 3  # type: ignore[arg-type]
    assert all(h["alive"] and h["state"] == "ready" for h in hosts.values())
    if NETNS:  # each host a namespace on the LAN; its pods' namespaces under it
        assert status["isolation"] == "netns"
        assert {h["address"] for h in hosts.values()} == {"10.87.0.11", "10.87.0.12"}
        relayed = status["network"]["relay"]["ports"]  # type: ignore[index]
        assert len(relayed) == 2 * 3  # each replica's xDS, CA, renewal: never etcd's
        etcd_ports = {int(m["client"].rpartition(":")[2]) for m in status["etcd"]}  # type: ignore[attr-defined]
        assert etcd_ports.isdisjoint(relayed) and len(etcd_ports) == 3
        for name, host in hosts.items():
            assert host_namespace(cluster, name) == host["netns"]
            for port in relayed:  # every replica, from inside each host
                in_netns(host["netns"], (CONTROL_IP, port), 5).close()
        assert host_namespace(cluster, "host-9") is None
        # One rule in host-2's namespace cuts it off (what a fault injector uses); host-1
        # still reaches the control plane; reconnected, host-2 does again.
        hostnet.cut_off(cluster, hosts["host-2"]["netns"])
        try:
            with pytest.raises(TimeoutError):
                in_netns(hosts["host-2"]["netns"], (CONTROL_IP, relayed[0]), 1)
            in_netns(hosts["host-1"]["netns"], (CONTROL_IP, relayed[0]), 5).close()
        finally:
            hostnet.reconnect(hosts["host-2"]["netns"])
        in_netns(hosts["host-2"]["netns"], (CONTROL_IP, relayed[0]), 5).close()
        assert len(namespaces(cluster)) == 1 + 2 + 7  # LAN, hosts, 7 sandboxed pods
    else:
        assert status["isolation"] == "process"
    # The requests below cross hosts: every sleep on host 2, httpbin on host 1.
    assert pods["foo/httpbin"]["host"] == "host-1"  # type: ignore[index]
    assert {pods[s]["host"] for s in CASES} == {"host-2"}  # type: ignore[index]
    # Every sidecar is served by one replica or the other.
    served = [p for r in replicas.values() for p in r["proxies"]]
    assert len(served) == len(set(served)) == 5 and any("sleep.foo" in p for p in served)
    assert len(recorded_pids(cluster)) > 12  # 3 etcd, 2 replicas, 2 hosts, apps, Envoys

    policy = tmp_path / "policy.yaml"
    policy.write_text(STRICT + "\n---\n" + ONLY_FOO_SLEEP)
    applied = trustmesh("apply", "-f", str(policy), "--state", str(cluster), state=cluster)
    assert applied.returncode == 0, applied.stderr
    expected: dict[str, str] = {}
    for source in CASES:
        offline = trustmesh(
            "authz", "check", "-f", str(EXAMPLES / "mesh"), "-f", str(policy), "--from", source,
            "--to", "foo/httpbin", "--port", "8000", "--path", "/get", "-o", "json", state=cluster,
        )  # fmt: skip
        verdict = json.loads(offline.stdout)
        expected[source] = "reset" if verdict["verdict"] == "reset" else str(verdict["status"])
    assert expected == {"foo/sleep": "200", "bar/sleep": "403", "legacy/sleep": "reset"}
    # The store's change reaches both replicas and every proxy: bounded, in another process.
    deadline = time.monotonic() + ENFORCE_TIMEOUT
    got = {source: _live(cluster, source) for source in CASES}
    while got != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        got = {source: _live(cluster, source) for source in CASES}
    assert got == expected


def _recorded(state: Path, part: str) -> dict[str, dict[str, Any]]:
    """``cluster.json``'s entries of ``part`` (replicas, hosts) by name."""
    record = json.loads((state / "cluster.json").read_text())
    return {entry["name"]: entry for entry in record[part]}


def test_replica_restart_comes_back_on_its_ports_and_serves(cluster: Path) -> None:
    before = _recorded(cluster, "replicas")
    missing = trustmesh("replica", "restart", "r9", state=cluster)
    assert missing.returncode == 1 and "'r9'" in missing.stderr, missing.stderr
    done = trustmesh("replica", "restart", "r1", state=cluster, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "r1 restarted" in done.stdout
    after = _recorded(cluster, "replicas")
    assert after["r1"]["pid"] != before["r1"]["pid"] and alive(after["r1"]["pid"])
    for key in ("address", "ca", "ca_renewal"):  # where every host and sidecar finds it
        assert after["r1"][key] == before["r1"][key]
    if NETNS:  # the relay still forwards its ports from every host
        port = int(after["r1"]["ca"].rpartition(":")[2])
        for host in _recorded(cluster, "hosts").values():
            in_netns(host["netns"], (CONTROL_IP, port), 5).close()
    # Traffic across hosts flows (foo/sleep is allowed with or without the policy above).
    assert _live(cluster, "foo/sleep") == "200"
