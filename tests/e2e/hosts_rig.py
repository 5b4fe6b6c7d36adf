"""The multi-host mesh of issue 11 (``up examples/mesh --hosts 2 --replicas 2 -d``),
started once per test session: ``test_hosts.py`` and ``test_attacks_hosts.py`` share it
(``hosts_cluster``, registered in ``conftest.py``).

As root with ``nft`` each host is a network namespace on a LAN namespace (netns mode);
otherwise the hosts run in process mode in a free loopback block."""

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

NETNS = os.geteuid() == 0 and shutil.which("nft") is not None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def hosts_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    state = tmp_path_factory.mktemp("hosts") / "state"
    started = up_hosts(EXAMPLES / "mesh", "--hosts", "2", "--replicas", "2", state=state)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield state
    finally:
        pids = recorded_pids(state)
        names = namespaces(state)
        stopped = trustmesh("down", state=state)
        assert stopped.returncode == 0, stopped.stderr
        deadline = time.monotonic() + 5  # a killed process is gone once its parent reaped it
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in pids if alive(pid)] == [], "down left processes running"
        left = [n for n in names if Path("/run/netns", n).exists()]
        assert left == [], "down left network namespaces"


def namespaces(state: Path) -> list[str]:
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


def recorded_pids(state: Path) -> list[int]:
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
