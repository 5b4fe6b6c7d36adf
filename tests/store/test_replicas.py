"""`trustmesh control-plane --store etcd://…` as real processes: each replica registers a
leased `/trustmesh/replicas/NAME`, exactly one holds `/trustmesh/leader`, and when the
leader is SIGKILLed the other takes over within the lease TTL (and the dead one's
registration is gone); SIGTERM revokes the lease at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.envoy.conftest import eventually, http_get, run
from tests.store.replica_rig import apply_text, replicas, start_replica
from tests.xds.controlplane_rig import EXAMPLES, STRICT, Probe
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.runtime import debug_client
from trustmesh.runtime.replica import read_replicas, registration_of
from trustmesh.store.etcd_server import EtcdCluster
from trustmesh.store.etcd_store import EtcdResourceStore, WorkloadRegistry
from trustmesh.store.leader import LEADER_KEY
from trustmesh.store.model import WorkloadRecord

TTL = 2  # seconds: --lease-ttl of both replicas
HTTPBIN = WorkloadRecord("foo", "httpbin", "host-1", "127.0.0.20", "httpbin")
SLEEP = WorkloadRecord("foo", "sleep", "host-2", "127.0.0.21", "sleep")


async def fill_store(etcd: EtcdCluster, workdir: Path) -> None:
    """The example mesh's workloads, STRICT mTLS, and httpbin on host-1 in the registry."""
    client = etcd.client()
    try:
        store = EtcdResourceStore(client)
        workloads = (EXAMPLES / "mesh" / "workloads.yaml").read_text()
        await apply_text(store, workloads + "\n---\n" + STRICT, workdir)
        registry = WorkloadRegistry(client)
        await registry.register(HTTPBIN, await registry.host_lease(3600))
    finally:
        await client.close()


def test_replicas_register_elect_one_leader_and_fail_over_within_the_ttl(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    CertificateAuthority.init(tmp_path / "ca", CaConfig(), dt.datetime.now(dt.UTC))
    run(fill_store(etcd, tmp_path))
    with replicas(etcd, tmp_path, ["a", "b"], tmp_path / "ca", "--lease-ttl", str(TTL)) as (
        a,
        b,
    ):

        async def scenario() -> None:
            client = etcd.client()
            try:
                # Both registered: addresses, start time, store health, their proxies.
                records = await read_replicas(client)
                assert set(records) == {"a", "b"}
                for name, replica in (("a", a), ("b", b)):
                    record = records[name]
                    assert record["pid"] == replica.pid
                    assert record["address"] == replica.info["address"]
                    assert record["store"]["healthy"] is True and record["started"]
                    assert record["config"]["errors"] == [] and record["proxies"] == []

                # As `up`'s control plane: syncz on the owner-only socket (plus the store's
                # health), Prometheus text on the metrics port.
                syncz = await asyncio.to_thread(debug_client.get, tmp_path / "replica-a")
                assert syncz is not None and syncz["store"]["healthy"] is True
                assert list(syncz["proxies"]) == [registration_of(HTTPBIN).node_id]
                host, _, port = records["a"]["metrics"].rpartition(":")
                scraped = await http_get(host, int(port), "/metrics")
                assert scraped.status == 200 and b"trustmesh_config_reloads_total" in scraped.body

                # Names are unique while the holder lives.
                with pytest.raises(AssertionError, match="registered already"):
                    await asyncio.to_thread(
                        start_replica, etcd, tmp_path / "dup", "a", tmp_path / "ca"
                    )
                assert (await read_replicas(client))["a"]["pid"] == a.pid

                # The registry drives what every replica serves: a host's workload joins,
                # and leaves with the host's lease.
                assert records["a"]["registered"] == [registration_of(HTTPBIN).node_id]
                registry = WorkloadRegistry(client)
                host_2 = await registry.host_lease(60)
                await registry.register(SLEEP, host_2)
                both = sorted(registration_of(r).node_id for r in (HTTPBIN, SLEEP))

                def registered(expected: list[str]) -> Probe:
                    async def probe() -> bool:
                        found = [r["registered"] for r in (await read_replicas(client)).values()]
                        return found == [expected, expected]

                    return probe

                await eventually(registered(both), what="sleep registered on both", timeout=10)
                await client.revoke_lease(host_2)  # host-2 is gone
                only = [registration_of(HTTPBIN).node_id]
                await eventually(registered(only), what="sleep forgotten by both", timeout=10)

                # Exactly one leader, and the records agree with the leader key.
                async def one_leader() -> bool:
                    kv = await client.get(LEADER_KEY)
                    flags = {n: r["leader"] for n, r in (await read_replicas(client)).items()}
                    return kv is not None and flags == {
                        "a": kv.value == b"a",
                        "b": kv.value == b"b",
                    }

                await eventually(one_leader, what="exactly one leader", timeout=10)
                kv = await client.get(LEADER_KEY)
                assert kv is not None
                leader, follower = (a, b) if kv.value == b"a" else (b, a)

                # SIGKILL the leader: nobody revokes its lease; etcd ends it after the TTL.
                leader.kill()
                killed = time.monotonic()

                async def taken_over() -> bool:
                    now = await client.get(LEADER_KEY)
                    return now is not None and now.value == follower.name.encode()

                await eventually(taken_over, what="the follower takes over", timeout=TTL + 5)
                took = time.monotonic() - killed
                # The lease had at most TTL left at the kill; etcd checks expiry every
                # ~0.5 s; the follower campaigns on the delete event (milliseconds).
                assert took <= TTL + 1.0, f"takeover after {took:.2f}s, TTL {TTL}s"
                print(f"\nleader SIGKILLed -> other replica leader after {took * 1000:.0f} ms")

                async def dead_gone() -> bool:
                    return set(await read_replicas(client)) == {follower.name}

                await eventually(dead_gone, what="the dead replica's record ends", timeout=5)

                async def follower_says_leader() -> bool:
                    return (await read_replicas(client))[follower.name]["leader"] is True

                await eventually(follower_says_leader, what="its record says leader", timeout=5)

                # SIGTERM: a clean stop revokes the lease, its keys go at once.
                assert await asyncio.to_thread(follower.terminate) == 0
                assert await read_replicas(client) == {}
                assert await client.get(LEADER_KEY) is None
            finally:
                await client.close()

        run(scenario(), timeout=60)


def test_control_plane_refuses_a_store_it_cannot_use(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "trustmesh", "control-plane", "--listen", "127.0.0.1:0"]
    done = subprocess.run(
        [*command, "--name", "a", "--store", "file:x", "--state", str(tmp_path / "s"),
         "--ca", str(tmp_path / "ca")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "a replica needs https://HOST:PORT" in done.stdout, done.stdout
    assert "Traceback" not in done.stderr
    done = subprocess.run(
        [*command, "--name", "a/b", "--store", "etcd://127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "--name" in done.stderr
