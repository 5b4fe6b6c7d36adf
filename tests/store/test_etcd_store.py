"""Istio resources and the workload registry in a real etcd: compare-and-swap, all-or-
nothing commits, watches in order, leases that take a dead host's workloads with them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from trustmesh.store.etcd_client import EtcdClient
from trustmesh.store.etcd_server import EtcdCluster
from trustmesh.store.etcd_store import EtcdResourceStore, WorkloadRegistry
from trustmesh.store.model import (
    ChangeType,
    Conflict,
    ResourceDelete,
    ResourceKey,
    ResourceWrite,
    WorkloadRecord,
)

T = TypeVar("T")


def run(etcd: EtcdCluster, scenario: Callable[[EtcdClient], Awaitable[T]]) -> T:
    async def main() -> T:
        client = etcd.client()
        try:
            return await asyncio.wait_for(scenario(client), timeout=20)
        finally:
            await client.close()

    return asyncio.run(main())


def policy(name: str, namespace: str, action: str = "DENY") -> tuple[ResourceKey, str]:
    key = ResourceKey("security.istio.io", "AuthorizationPolicy", namespace, name)
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"action": action},
    }
    return key, json.dumps(body, sort_keys=True)


def test_stale_resource_version_is_a_conflict_and_nothing_is_lost(etcd: EtcdCluster) -> None:
    async def scenario(client: EtcdClient) -> None:
        store = EtcdResourceStore(client)
        key, deny = policy("cas", "ns-cas")
        await store.commit([ResourceWrite(key, deny, 0)])
        first = await store.get(key)
        assert first is not None and first.resource_version > 0
        # Two writers read the same version; both try to write.
        _, allow = policy("cas", "ns-cas", "ALLOW")
        _, audit = policy("cas", "ns-cas", "AUDIT")
        await store.commit([ResourceWrite(key, allow, first.resource_version)])
        with pytest.raises(Conflict) as lost:
            await store.commit([ResourceWrite(key, audit, first.resource_version)])
        assert lost.value.expected == first.resource_version
        assert "authorizationpolicy.security.istio.io/cas" in str(lost.value)
        now = await store.get(key)
        assert now is not None and json.loads(now.manifest)["spec"]["action"] == "ALLOW"
        # Creating what exists is a conflict too (expected version 0 = absent).
        with pytest.raises(Conflict):
            await store.commit([ResourceWrite(key, deny, 0)])

    run(etcd, scenario)


def test_a_commit_is_all_or_nothing(etcd: EtcdCluster) -> None:
    async def scenario(client: EtcdClient) -> None:
        store = EtcdResourceStore(client)
        taken, body = policy("taken", "ns-atomic")
        await store.commit([ResourceWrite(taken, body, 0)])
        fresh, fresh_body = policy("fresh", "ns-atomic")
        with pytest.raises(Conflict) as caught:
            await store.commit([ResourceWrite(fresh, fresh_body, 0), ResourceWrite(taken, body, 0)])
        assert caught.value.key == taken
        assert await store.get(fresh) is None  # the other write did not happen
        listed, _ = await store.list(namespace="ns-atomic")
        assert [r.key.name for r in listed] == ["taken"]

    run(etcd, scenario)


def test_concurrent_read_modify_write_loses_no_update(etcd: EtcdCluster) -> None:
    """Fifty writers each add their label with CAS + retry: all fifty labels survive."""

    async def scenario(client: EtcdClient) -> None:
        store = EtcdResourceStore(client)
        key, body = policy("counter", "ns-race")
        await store.commit([ResourceWrite(key, body, 0)])
        conflicts = 0

        async def add_label(i: int) -> None:
            nonlocal conflicts
            while True:
                current = await store.get(key)
                assert current is not None
                value = json.loads(current.manifest)
                value["metadata"].setdefault("labels", {})[f"w{i}"] = "1"
                try:
                    await store.commit(
                        [ResourceWrite(key, json.dumps(value), current.resource_version)]
                    )
                    return
                except Conflict:
                    conflicts += 1

        await asyncio.gather(*(add_label(i) for i in range(50)))
        final = await store.get(key)
        assert final is not None
        assert len(json.loads(final.manifest)["metadata"]["labels"]) == 50
        assert conflicts > 0  # they did race

    run(etcd, scenario)


def test_a_watcher_sees_applies_and_deletes_in_order(etcd: EtcdCluster) -> None:
    async def scenario(client: EtcdClient) -> None:
        store = EtcdResourceStore(client)
        _, start = await store.list()
        events = store.watch(start)
        a, a_body = policy("a", "ns-watch")
        b, b_body = policy("b", "ns-watch")
        r1 = await store.commit([ResourceWrite(a, a_body, 0)])
        r2 = await store.commit([ResourceWrite(b, b_body, 0)])
        r3 = await store.commit([], [ResourceDelete(a, r1)])
        _, allow = policy("b", "ns-watch", "ALLOW")
        r4 = await store.commit([ResourceWrite(b, allow, r2)])
        seen = [await anext(events) for _ in range(4)]
        await events.aclose()
        assert [(e.type, e.key.name, e.revision) for e in seen] == [
            (ChangeType.PUT, "a", r1),
            (ChangeType.PUT, "b", r2),
            (ChangeType.DELETE, "a", r3),
            (ChangeType.PUT, "b", r4),
        ]
        last = seen[-1].resource
        assert last is not None and json.loads(last.manifest)["spec"]["action"] == "ALLOW"
        assert last.resource_version == r4

    run(etcd, scenario)


def test_a_dead_hosts_workloads_leave_when_its_lease_expires(etcd: EtcdCluster) -> None:
    async def scenario(client: EtcdClient) -> float:
        registry = WorkloadRegistry(client)
        alive, dead = await registry.host_lease(30), await registry.host_lease(1)
        web = WorkloadRecord("shop", "web-1", "host-a", "10.0.1.5", "web", (("app", "web"),))
        db = WorkloadRecord("shop", "db-1", "host-b", "10.0.2.7", "db", kind="Pod")
        await registry.register(web, alive)
        await registry.register(db, dead)
        listed, revision = await registry.workloads()
        assert sorted(listed, key=lambda w: w.name) == [db, web]
        loop = asyncio.get_running_loop()
        started = loop.time()
        # host-b stops keeping its lease alive: etcd expires it and deletes its records.
        async for removed, name in registry.changes(revision):
            assert (removed, name) == (True, "host-b/shop/db-1")
            break
        waited = loop.time() - started
        assert [w.name for w in (await registry.workloads())[0]] == ["web-1"]
        assert await client.keep_alive_once(alive) > 0
        await client.revoke_lease(alive)
        return waited

    waited = run(etcd, scenario)
    assert waited < 5  # TTL 1 s (etcd rounds up to its minimum, ~1.5x election timeout)
