"""Must-show 2 of issue 11: faults under paced traffic across hosts.

``trustmesh up examples/mesh --hosts 2 --replicas 2 -d`` (3 etcd members). For 60 s,
foo/sleep on host 2 sends ``GET http://httpbin.foo:8000/get`` through its sidecar to
foo/httpbin on host 1 (mTLS across hosts) at 55 requests/s, every answer recorded, while a
writer puts a key into etcd every 50 ms and records each write etcd acknowledged. Within
that minute:

1. the replica serving foo/httpbin's sidecar (from ``trustmesh status -o json``) and the
   etcd leader are SIGKILLed; ``trustmesh apply`` writes policy ``fault-1`` meanwhile;
   both are started again as themselves (same name, ports, data directory);
2. host 1 is cut off from every replica and etcd member for 10 s (nftables, both ways,
   packets dropped); ``trustmesh apply`` writes ``fault-2`` during the cut.

Pass: every request got its 200; both policies reach every proxy afterwards (each
sidecar's config_dump carries them, and a probe is refused / answered as they say);
every acknowledged write reads back. Host leases are 30 s (refreshed every 5 s, a failed
refresh again after 1 s): a host outlives 21 s without any replica, twice the cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.e2e.hosts_rig import recorded_pids
from tests.e2e.mesh import EXAMPLES, trustmesh, up_in_a_free_block
from tests.envoy.conftest import run
from trustmesh.cli.main import app
from trustmesh.runtime import faults
from trustmesh.runtime.client import http_request
from trustmesh.runtime.cluster import store_client, store_of
from trustmesh.runtime.layout import Layout, read_json
from trustmesh.runtime.plan import MeshPlan, PodPlan
from trustmesh.runtime.replica import read_replicas
from trustmesh.store.etcd_client import EtcdClient
from trustmesh.store.model import StoreError

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not any(Path(p, "nft").exists() for p in ("/usr/sbin", "/sbin")),
    reason="cutting a host off needs root and nft",
)

RATE = 55.0  # requests per second
DURATION = 60.0
REQUEST_TIMEOUT = 10.0
WRITE_INTERVAL = 0.05
CUT_SECONDS = 10.0
CONVERGE_TIMEOUT = 30.0
URL = "http://httpbin.foo:8000/get"
WRITES = b"/faults-test/writes/"


def policy(n: int) -> str:
    """A mesh-wide DENY of /fault-N (every proxy with an inbound port) and a connection
    pool for httpbin.bar (a cluster of every proxy: ``max_requests_per_connection``
    1000+N). Not a VirtualService: its routes sit inline in the HTTP proxy listener, whose
    in-place update drains that listener's connections (see the report)."""
    return f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: fault-{n}, namespace: istio-system}}
spec:
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/fault-{n}"]}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: faults, namespace: bar}}
spec:
  host: httpbin.bar.svc.cluster.local
  trafficPolicy:
    connectionPool: {{http: {{maxRequestsPerConnection: {1000 + n}}}}}
"""


def marker(n: int) -> str:
    """What every proxy's config_dump holds once it has policy ``n``."""
    return f'"max_requests_per_connection": {1000 + n}'


@dataclass
class Answer:
    index: int
    sent: float  # monotonic
    seconds: float
    status: int
    why: str = ""


@dataclass
class Record:
    answers: list[Answer] = field(default_factory=list)
    acked: dict[bytes, bytes] = field(default_factory=dict)
    unacked_writes: int = 0
    events: dict[str, float] = field(default_factory=dict)  # what → seconds into the run


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    started = up_in_a_free_block(
        EXAMPLES / "mesh", "--hosts", "2", "--replicas", "2", state=state, base="127.218.0.0"
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield state
    finally:
        pids = recorded_pids(state)  # restarted processes included (faults records them)
        stopped = trustmesh("down", state=state)
        assert stopped.returncode == 0, stopped.stderr
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in pids if _alive(pid)] == [], "down left processes running"


def _cli(*args: str) -> str:
    """``trustmesh ARGS…`` run in this process (the same command; a new Python would take
    seconds to start on a loaded machine, longer than the fault it must fall into)."""
    done = CliRunner().invoke(app, list(args))
    assert done.exit_code == 0, f"trustmesh {' '.join(args)}: {done.output}"
    return done.stdout


def _status(state: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(_cli("status", "-o", "json", "--state", str(state)))
    return value


def _apply(state: Path, text: str, name: str) -> None:
    path = state.parent / f"{name}.yaml"
    path.write_text(text)
    _cli("apply", "-f", str(path), "--state", str(state))


def _etcd_leader(state: Path, members: list[dict[str, Any]]) -> str:
    """The name of the member etcd says leads (its v3 JSON gateway, with the operator's
    client certificate)."""
    tls = store_of(state)[1]
    assert tls is not None, "the mesh's etcd must use TLS"
    context = tls.ssl_context()
    for member in members:
        request = urllib.request.Request(
            f"{member['client']}/v3/maintenance/status", data=b"{}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=2, context=context) as answer:
            status = json.loads(answer.read())
        if status["header"]["member_id"] == status["leader"]:
            return str(member["name"])
    raise AssertionError("no etcd member leads")


def _admin(admin: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{admin}/{path}", timeout=5) as answer:
        return str(answer.read().decode())


def _config_dump(admin: str) -> str:
    return _admin(admin, "config_dump")


async def _until(probe: Callable[[], Awaitable[bool]], what: str, timeout: float) -> float:
    """Seconds until ``probe`` holds (bounded): for changes inside other processes."""
    started = time.monotonic()
    while not await probe():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not after {timeout:.0f}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def _carry(admins: dict[str, str], marker: str) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        dumps = await asyncio.gather(*(asyncio.to_thread(_config_dump, a) for a in admins.values()))
        return all(marker in dump for dump in dumps)

    return probe


async def _load(plan: MeshPlan, record: Record, t0: float, count: int) -> None:
    """``count`` requests at RATE per second from foo/sleep, each answer recorded."""
    sleep = plan.pod("foo/sleep")
    assert sleep is not None

    async def one(index: int) -> None:
        sent = time.monotonic()
        try:
            result = await http_request(plan, sleep, URL, timeout=REQUEST_TIMEOUT)
            status, why = result.status, result.why
        except (OSError, TimeoutError) as exc:
            status, why = 0, repr(exc)
        record.answers.append(Answer(index, sent - t0, time.monotonic() - sent, status, why))

    tasks = []
    for index in range(count):
        delay = t0 + index / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)


async def _write(client: EtcdClient, record: Record, done: asyncio.Event) -> None:
    """A key every WRITE_INTERVAL; the ones etcd acknowledged recorded."""
    index = 0
    while not done.is_set():
        key, value = WRITES + b"%06d" % index, b"value-%d" % index
        index += 1
        try:
            await client.put(key, value)
        except StoreError:
            record.unacked_writes += 1
        else:
            record.acked[key] = value
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), WRITE_INTERVAL)


async def _scenario(state: Path) -> None:
    status = await asyncio.to_thread(_status, state)
    pods = status["pods"]
    assert pods["foo/httpbin"]["host"] == "host-1" and pods["foo/sleep"]["host"] == "host-2"
    admins = {ref: p["admin"] for ref, p in pods.items() if p.get("admin")}
    on_host_1 = {ref: a for ref, a in admins.items() if pods[ref]["host"] == "host-1"}
    assert len(admins) == 5 and len(on_host_1) == 3
    hosts = {h["name"]: h for h in read_json(state / "cluster.json")["hosts"]}
    plan = MeshPlan.from_json(read_json(Layout(Path(hosts["host-2"]["state"])).plan))
    client = store_client(state)

    async def served() -> bool:  # every sidecar's stream ACKed at one replica or another
        return sum(len(r["proxies"]) for r in (await read_replicas(client)).values()) == 5

    await _until(served, "every sidecar served", 20)
    status = await asyncio.to_thread(_status, state)
    httpbin_node = next(p for r in status["replicas"] for p in r["proxies"] if "~httpbin.foo~" in p)
    record = Record()
    writing_done = asyncio.Event()
    t0 = time.monotonic() + 0.5

    def mark(what: str) -> float:
        record.events[what] = round(time.monotonic() - t0, 2)
        return time.monotonic()

    load = asyncio.create_task(_load(plan, record, t0, int(RATE * DURATION)))
    writer = asyncio.create_task(_write(client, record, writing_done))
    try:
        await asyncio.sleep(3)
        # 1. The replica serving foo/httpbin's sidecar and the etcd leader, SIGKILLed.
        now = await asyncio.to_thread(_status, state)
        victim = next(r["name"] for r in now["replicas"] if httpbin_node in r["proxies"])
        survivor = next(r["name"] for r in now["replicas"] if r["name"] != victim)
        leader = await asyncio.to_thread(_etcd_leader, state, now["etcd"])
        killed_at = mark("kill")
        replica = await asyncio.to_thread(faults.kill_replica, state, victim)
        member = await asyncio.to_thread(faults.kill_etcd_member, state, leader)

        async def survivor_serves() -> bool:  # (the dead one's record lasts its TTL)
            with contextlib.suppress(StoreError):
                records = await read_replicas(client)
                return httpbin_node in records.get(survivor, {}).get("proxies", [])
            return False

        survivor_xds = next(r["address"] for r in now["replicas"] if r["name"] == survivor)

        async def envoy_streams_from_survivor() -> bool:
            clusters = await asyncio.to_thread(_admin, admins["foo/httpbin"], "clusters")
            return f"xds-grpc::{survivor_xds}::cx_active::1" in clusters

        envoy_failover = asyncio.create_task(
            _until(envoy_streams_from_survivor, "httpbin's Envoy reconnects", 20)
        )
        failover = asyncio.create_task(
            _until(survivor_serves, "the other replica serves httpbin", 20)
        )
        await asyncio.to_thread(_apply, state, policy(1), "fault-1")
        mark("fault-1 applied")
        converged = asyncio.create_task(  # still during the fault: one replica, two members
            _until(_carry(admins, marker(1)), "fault-1 at every proxy", CONVERGE_TIMEOUT)
        )
        record.events["envoy_reconnected_s"] = round(await envoy_failover, 2)
        record.events["registry_says_survivor_s"] = round(await failover, 2)
        await asyncio.sleep(max(0.0, killed_at + 8 - time.monotonic()))
        mark("restart")
        record.events["etcd_restart_s"] = round(
            await asyncio.to_thread(faults.restart_etcd_member, state, member), 2
        )
        record.events["replica_restart_s"] = round(
            await asyncio.to_thread(faults.restart_replica, state, replica), 2
        )
        record.events["fault-1_everywhere_after_apply_s"] = round(await converged, 2)
        assert await _carry(admins, marker(1))(), "fault-1 left a proxy after the restarts"

        # 2. Host 1 cut off from every replica and etcd member for 10 s.
        others = {r: a for r, a in admins.items() if r not in on_host_1}

        async def during_cut() -> float:
            """Apply fault-2; the cut is real: host 2's proxies get it, host 1's do not."""
            await asyncio.sleep(1)
            await asyncio.to_thread(_apply, state, policy(2), "fault-2")
            mark("fault-2 applied")
            await _until(_carry(others, marker(2)), "fault-2 on host 2", CUT_SECONDS)
            for ref, admin in on_host_1.items():
                dump = await asyncio.to_thread(_config_dump, admin)
                assert marker(2) not in dump, f"{ref} got fault-2 through the cut"
            return time.monotonic()

        with faults.cut(state, "host-1"):  # exactly CUT_SECONDS, whatever runs meanwhile
            cut_at = mark("cut")
            checks = asyncio.create_task(during_cut())
            await asyncio.sleep(cut_at + CUT_SECONDS - time.monotonic())
            ending = time.monotonic()
        mark("healed")
        assert await checks < ending, "fault-2 was not applied and checked during the cut"
        record.events["cut_host_converged_s"] = round(
            await _until(_carry(on_host_1, marker(2)), "fault-2 on host 1", CONVERGE_TIMEOUT), 2
        )
        await load
    finally:
        writing_done.set()
        await asyncio.gather(writer, return_exceptions=True)
        if not load.done():
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)

    try:
        # Every acknowledged write is there, with its value.
        kvs, _ = await client.get_prefix(WRITES)
        stored = {kv.key: kv.value for kv in kvs}
        lost = [k for k, v in record.acked.items() if stored.get(k) != v]
        # Both policies at every proxy, and enforced as written.
        assert await _carry(admins, marker(2))()
        assert await _carry(on_host_1, "policy[fault-1]")()
        sleep = plan.pod("foo/sleep")
        assert sleep is not None
        probes = {
            f"/fault-{n}": (await http_request(plan, sleep, f"http://httpbin.foo:8000/fault-{n}"))
            for n in (1, 2)
        }
    finally:
        await client.close()

    log = (state / "hosts" / "host-1.log").read_text(errors="replace")
    answers = sorted(record.answers, key=lambda a: a.index)
    failed = [a for a in answers if a.status != 200]
    span = answers[-1].sent - answers[0].sent
    latencies = sorted(a.seconds for a in answers)
    rate = (len(answers) - 1) / span
    summary = {
        "requests": len(answers),
        "rate_per_s": round(rate, 1),
        "failed": len(failed),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "writes_acked": len(record.acked),
        "writes_unacked": record.unacked_writes,
        "writes_lost": len(lost),
        "killed": {"replica": victim, "etcd": f"{leader} (the leader)"},
        "host_1_lease_refresh_failures": log.count("keeping host-1's lease"),
        **record.events,
    }
    print("\nfaults: " + json.dumps(summary))
    assert len(answers) == int(RATE * DURATION) and rate >= 50
    assert record.events["healed"] < DURATION - 5, "the faults must fall within the traffic"
    assert failed == [], [f"#{a.index} at {a.sent:.2f}s: {a.status} {a.why}" for a in failed[:20]]
    assert lost == [] and len(record.acked) > 500
    assert {p: r.status for p, r in probes.items()} == {"/fault-1": 403, "/fault-2": 403}


def test_faults_under_paced_traffic_lose_no_request_and_no_write(cluster: Path) -> None:
    run(_scenario(cluster), timeout=150)


def _connects(source: str, target: tuple[str, int]) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        sock.bind((source, 0))
        try:
            sock.connect(target)
        except OSError:  # TimeoutError included: the SYN was dropped
            return False
        return True


def test_cut_drops_only_the_host_to_control_plane_and_goes_away(tmp_path: Path) -> None:
    """The cut itself, against the real kernel: host 1's addresses cannot reach a replica
    or etcd port; host 1 still reaches a pod; other sources still reach the replica; the
    table is gone afterwards, also when the block fails."""
    listeners = [socket.create_server((ip, 0)) for ip in ("127.0.0.1", "127.0.0.1", "127.219.9.1")]
    replica, etcd, pod = (s.getsockname()[:2] for s in listeners)
    try:
        plan = MeshPlan(
            (PodPlan("foo", "a", "a", True, "127.219.0.1", "127.219.0.2", "127.219.0.3", (), ()),),
            "cluster.local",
        )
        (tmp_path / "h1").mkdir()
        (tmp_path / "h1" / "plan.json").write_text(json.dumps(plan.to_json()))
        address = f"{replica[0]}:{replica[1]}"
        (tmp_path / "cluster.json").write_text(
            json.dumps(
                {
                    "replicas": [{"name": "r1", "address": address, "state": str(tmp_path)}],
                    "etcd": [{"name": "m0", "client": f"http://{etcd[0]}:{etcd[1]}"}],
                    "hosts": [{"name": "host-1", "state": str(tmp_path / "h1")}],
                }
            )
        )
        assert faults.host_addresses(tmp_path, "host-1") == [
            "127.219.0.1",
            "127.219.0.2",
            "127.219.0.3",
        ]
        with faults.cut(tmp_path, "host-1"):
            assert not _connects("127.219.0.1", replica)
            assert not _connects("127.219.0.3", etcd)
            assert _connects("127.219.0.1", pod)
            assert _connects("127.0.0.1", replica)
        assert _connects("127.219.0.1", replica)
        with pytest.raises(RuntimeError), faults.cut(tmp_path, "host-1"):
            raise RuntimeError("the test failed inside the cut")
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
        assert "trustmesh_cut_host_1" not in tables.stdout
        assert _connects("127.219.0.1", etcd)
    finally:
        for listener in listeners:
            listener.close()
