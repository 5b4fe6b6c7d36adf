"""``up --hosts`` in netns mode: ``down`` after a half-failed start leaves nothing, and a
host whose lease ended comes back with a new node token (issue 11).

Both need root (namespaces, links, nftables); CI runs as root."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.mesh import EXAMPLES, START_TIMEOUT, trustmesh
from trustmesh.runtime.cluster import store_client
from trustmesh.runtime.sandbox import mesh_id
from trustmesh.store.etcd_store import WorkloadRegistry

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None,
    reason="network namespaces and nftables need root and the nft command",
)

BROKEN = """\
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: legacy}
spec:
  nodeName: host-2
  containers:
  - name: broken
    command: ["false"]
    ports: [{containerPort: 8080}]
"""
LEASE_TTL = 5
WAIT = 30.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _pids(state: Path) -> list[int]:
    """Every PID the cluster and its hosts recorded: etcd, replicas, relay, hosts, pods."""
    record = json.loads((state / "cluster.json").read_text())
    pids = [x["pid"] for part in ("etcd", "replicas", "hosts") for x in record[part]]
    relay = record.get("network", {}).get("relay", {}).get("pid")
    pids += [relay] if relay else []
    for host in record["hosts"]:
        mesh = Path(host["state"]) / "mesh.json"
        if mesh.exists():
            pods = json.loads(mesh.read_text())["pods"].values()
            pids += [p[k] for p in pods for k in ("app_pid", "envoy_pid", "sidecar_pid") if k in p]
    return pids


def _prefixes(state: Path) -> list[str]:
    """Every namespace of the mesh starts with one of these (the LAN's, each host's)."""
    homes = [state, *(state / "hosts" / f"host-{i}" for i in (1, 2))]
    return [f"tm-{mesh_id(home)}-" for home in homes]


# What this mesh names its links and tables (other meshes on this machine make their own,
# in this namespace too: only ours must not appear here).
OUR_LINK = re.compile(r"(uplink|lan|br0|eth0|h\d+|v\d+|s\d+)")
OUR_TABLES = {"trustmesh", "trustmesh_cut"}


def _root_links() -> set[str]:
    shown = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    names = {line.split(":")[1].strip().partition("@")[0] for line in shown.stdout.splitlines()}
    return {name for name in names if OUR_LINK.fullmatch(name)}


def _root_tables() -> set[str]:
    shown = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    return {line.split()[-1] for line in shown.stdout.splitlines()} & OUR_TABLES


def _assert_nothing_left(state: Path, links: set[str], tables: set[str]) -> None:
    pids = _pids(state)
    deadline = time.monotonic() + 5  # a killed process is gone once its parent reaped it
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in pids if _alive(p)] == [], "processes left running"
    prefixes = tuple(_prefixes(state))
    assert [n.name for n in Path("/run/netns").glob("tm-*") if n.name.startswith(prefixes)] == []
    assert not (state / "network.jsonl").exists()  # emptied: every entry removed
    assert list(state.glob("hosts/*/ledger.jsonl")) == []
    assert [p for p in Path("/run/trustmesh").glob("*") if f"tm-{p.name}-" in prefixes] == []
    assert _root_links() <= links  # nothing was (or stayed) in this namespace
    assert _root_tables() <= tables


def test_down_after_a_half_failed_start_leaves_nothing(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(EXAMPLES / "mesh" / "workloads.yaml", config)
    (config / "broken.yaml").write_text(BROKEN)
    state = tmp_path / "state"
    links, tables = _root_links(), _root_tables()
    started = trustmesh(
        "up", "--isolation", "netns", str(config), "-d", "--hosts", "2", "--replicas", "1",
        state=state, timeout=START_TIMEOUT,
    )  # fmt: skip
    try:
        assert started.returncode == 1, started.stdout + started.stderr
        assert "host-2 did not start" in started.stderr
        assert "legacy/broken: the app exited with status 1" in started.stderr
        # Half way: etcd, the replica, the relay, the LAN and host 1 with its pods ran.
        record = json.loads((state / "cluster.json").read_text())
        assert record["state"] == "stopped" and record["network"]["relay"]["pid"] > 0
        host_1 = json.loads((state / "hosts" / "host-1" / "mesh.json").read_text())
        assert {p["app_pid"] > 0 for p in host_1["pods"].values()} == {True}
        _assert_nothing_left(state, links, tables)
    finally:
        trustmesh("down", state=state)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    links, tables = _root_links(), _root_tables()
    started = trustmesh(
        "up", "--isolation", "netns", str(EXAMPLES / "mesh"), "-d", "--hosts", "2",
        "--replicas", "1", "--lease-ttl", str(LEASE_TTL), state=state, timeout=START_TIMEOUT,
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield state
    finally:
        stopped = trustmesh("down", state=state)
        assert stopped.returncode == 0, stopped.stderr
        _assert_nothing_left(state, links, tables)


def _registered(state: Path, host: str) -> list[str]:
    async def read() -> list[str]:
        client = store_client(state)
        try:
            records, _ = await WorkloadRegistry(client).workloads(host)
            return sorted(r.ref for r in records)
        finally:
            await client.close()

    return asyncio.run(read())


def _get(state: Path) -> str:
    """foo/sleep (host 2) → httpbin.foo (host 1): the HTTP status, or what failed."""
    sent = trustmesh("request", "--from", "foo/sleep", "http://httpbin.foo:8000/get", state=state)
    return sent.stdout.split()[1] if sent.stdout.startswith("HTTP ") else sent.stdout[:80]


def _until(predicate: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.2)  # another process's state: nothing to wait on


def test_a_host_rejoins_after_its_lease_ended(cluster: Path, tmp_path: Path) -> None:
    # Ready hosts; host-1's endpoints reach host-2's proxies through the store, bounded.
    _until(lambda: _get(cluster) == "200", "no traffic from host-2 to host-1")
    host_1 = json.loads((cluster / "cluster.json").read_text())["hosts"][0]
    assert host_1["name"] == "host-1" and "foo/httpbin" in host_1["pods"]
    assert "foo/httpbin" in _registered(cluster, "host-1")

    os.kill(host_1["pid"], signal.SIGKILL)  # its pods run on; its keep-alives stop
    _until(lambda: _registered(cluster, "host-1") == [], "host-1's lease did not end")
    _until(lambda: _get(cluster) == "503", "the proxies kept host-1's endpoints")

    # The token it joined with is burnt: a join with it is refused, the host stays down.
    used = cluster / "hosts" / "host-1.token"
    refused = trustmesh("node", "rejoin", "host-1", "--token", str(used), state=cluster)
    assert refused.returncode == 1 and "token-reused" in refused.stderr, refused.stderr
    assert _registered(cluster, "host-1") == []

    token = tmp_path / "host-1.token"
    minted = trustmesh(
        "ca", "token", "--node", "host-1", "--dir", str(cluster / "ca"), state=cluster
    )
    assert minted.returncode == 0, minted.stderr
    token.write_text(minted.stdout)
    rejoined = trustmesh(
        "node", "rejoin", "host-1", "--token", str(token), state=cluster, timeout=START_TIMEOUT
    )
    assert rejoined.returncode == 0, rejoined.stderr
    assert "foo/httpbin" in _registered(cluster, "host-1")
    _until(lambda: _get(cluster) == "200", "no traffic to host-1 after it joined again")
    status = json.loads(trustmesh("status", "-o", "json", state=cluster).stdout)
    assert {h["name"]: h["alive"] for h in status["hosts"]} == {"host-1": True, "host-2": True}
