"""The leader API in one process over a real etcd: of three campaigning at once exactly one
leads; on_change tells each; a leader whose lease ends (revoked here, as etcd does after a
SIGKILL's TTL) stops being leader and another takes over on the delete event."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.envoy.conftest import eventually, run
from trustmesh.store.etcd_server import EtcdCluster
from trustmesh.store.leader import LeaderElection, LeaseKeeper


def test_exactly_one_leader_and_a_lost_lease_hands_over(tmp_path: Path, etcd: EtcdCluster) -> None:
    key = b"/trustmesh/test-leader"

    async def scenario() -> None:
        client = etcd.client()
        changes: dict[str, list[bool]] = {n: [] for n in "xyz"}
        keepers = {n: LeaseKeeper(client, 2) for n in "xyz"}
        elections = {
            n: LeaderElection(client, keepers[n], n, changes[n].append, key=key) for n in "xyz"
        }
        stop = asyncio.Event()
        for keeper in keepers.values():
            await keeper.grant()
        tasks = [asyncio.create_task(e.run(stop)) for e in elections.values()]
        tasks += [asyncio.create_task(k.run(stop)) for k in keepers.values()]
        try:

            async def one_leader() -> bool:
                return sum(e.is_leader() for e in elections.values()) == 1

            await eventually(one_leader, what="one leader", timeout=5)
            leader = next(n for n, e in elections.items() if e.is_leader())
            assert changes[leader] == [True]
            assert all(changes[n] == [] for n in "xyz" if n != leader)
            kv = await client.get(key)
            assert kv is not None and kv.value == leader.encode()
            assert all(e.holder == leader for e in elections.values())

            await client.revoke_lease(keepers[leader].lease_id)  # its keys go at once

            async def other_leads() -> bool:
                now = [n for n, e in elections.items() if e.is_leader()]
                return len(now) == 1 and now[0] != leader

            await eventually(other_leads, what="another leader", timeout=5)
            assert changes[leader] == [True, False]
            with pytest.raises(ValueError, match="at least 2"):
                LeaseKeeper(client, 1)
            stop.set()
            await asyncio.gather(*tasks)
            assert not any(e.is_leader() for e in elections.values())
            assert await client.get(key) is None  # stopped: every lease revoked
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await client.close()

    run(scenario(), timeout=60)
