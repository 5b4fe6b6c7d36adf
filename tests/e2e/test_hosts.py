"""Must-show 1 of issue 11: ``trustmesh up examples/mesh --hosts 2 --replicas 2 -d``.

A 3-member etcd, two control-plane replicas, two hosts. Policy applied to the store is
enforced at the destination for requests that cross hosts (sleep pods on host 2, httpbin
on host 1, mTLS end to end) exactly as ``trustmesh authz check`` decides offline; status
lists both hosts and both replicas with the proxies each serves; down stops every PID.

As root (CI) each host is a network namespace on a LAN namespace, its pods sandboxed
under it: the requests cross the LAN, and down leaves no namespace of the mesh behind.
Otherwise the hosts run in process mode."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.mesh import EXAMPLES, START_TIMEOUT, trustmesh, up_in_a_free_block
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
NETNS = os.geteuid() == 0 and shutil.which("nft") is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    state = tmp_path_factory.mktemp("hosts") / "state"
    started = up_hosts(EXAMPLES / "mesh", "--hosts", "2", "--replicas", "2", state=state)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield state
    finally:
        pids = _recorded_pids(state)
        namespaces = _namespaces(state)
        stopped = trustmesh("down", state=state)
        assert stopped.returncode == 0, stopped.stderr
        deadline = time.monotonic() + 5  # a killed process is gone once its parent reaped it
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in pids if _alive(pid)] == [], "down left processes running"
        left = [n for n in namespaces if Path("/run/netns", n).exists()]
        assert left == [], "down left network namespaces"


def _namespaces(state: Path) -> list[str]:
    """The LAN's, the hosts' and their pods' namespaces (netns mode), by their ledgers."""
    names = []
    for ledger in [state / "network.jsonl", *state.glob("hosts/*/ledger.jsonl")]:
        with contextlib.suppress(OSError):
            for line in ledger.read_text().splitlines():
                entry = json.loads(line)
                if entry["kind"] == "netns":
                    names.append(entry["name"])
    return names


def up_hosts(config: Path, *extra: str, state: Path) -> subprocess.CompletedProcess[str]:
    """``up -d --hosts …``: netns mode as root (the hosts' namespaces are named by the
    state directory, nothing else to collide with), else process mode in a free block."""
    if NETNS:
        command = ("up", "--isolation", "netns", str(config), "--detach", *extra)
        return trustmesh(*command, state=state, timeout=START_TIMEOUT)
    return up_in_a_free_block(config, *extra, state=state, base="127.214.0.0")


def _recorded_pids(state: Path) -> list[int]:
    """etcd members, replicas, hosts, and every host's apps and Envoys."""
    try:
        record = json.loads((state / "cluster.json").read_text())
    except OSError:
        return []
    pids = [x["pid"] for part in ("etcd", "replicas", "hosts") for x in record[part]]
    for host in record["hosts"]:
        with contextlib.suppress(OSError):
            mesh = json.loads((Path(host["state"]) / "mesh.json").read_text())
            pids += [
                p[k] for p in mesh["pods"].values() for k in ("app_pid", "envoy_pid") if k in p
            ]
    return pids


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
        assert len(relayed) == 3 + 2 * 3  # etcd members; each replica's xDS, CA, renewal
        for name, host in hosts.items():
            assert host_namespace(cluster, name) == host["netns"]
            for port in relayed:  # etcd and every replica, from inside each host
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
        assert len(_namespaces(cluster)) == 1 + 2 + 7  # LAN, hosts, 7 sandboxed pods
    else:
        assert status["isolation"] == "process"
    # The requests below cross hosts: every sleep on host 2, httpbin on host 1.
    assert pods["foo/httpbin"]["host"] == "host-1"  # type: ignore[index]
    assert {pods[s]["host"] for s in CASES} == {"host-2"}  # type: ignore[index]
    # Every sidecar is served by one replica or the other.
    served = [p for r in replicas.values() for p in r["proxies"]]
    assert len(served) == len(set(served)) == 5 and any("sleep.foo" in p for p in served)
    assert len(_recorded_pids(cluster)) > 12  # 3 etcd, 2 replicas, 2 hosts, apps, Envoys

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
