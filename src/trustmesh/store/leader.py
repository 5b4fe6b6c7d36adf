"""Leases that end when their holder dies, and a leader elected over one.

:class:`LeaseKeeper` holds one etcd lease for a process (a replica): keys put under it —
its registration, the leader key — are deleted by etcd when keep-alives stop for the TTL,
so a SIGKILLed replica disappears without anybody cleaning up after it.

:class:`LeaderElection` is for what only one replica may do (root rotation, and the like):

* campaign: one transaction ``if create_revision(/trustmesh/leader) == 0 then put(key,
  NAME, lease) else get(key)``; etcd serializes transactions, so of replicas campaigning
  at once exactly one creates the key;
* the others watch the key; when it is deleted (the leader stopped, or its lease expired
  after a SIGKILL: at most the TTL) they campaign again, and one wins;
* :meth:`LeaderElection.is_leader` is true only while this replica created the key under
  its current lease *and* the lease is known alive: the last keep-alive answer's TTL,
  counted from when it was sent, has not run out. A replica cut off from etcd stops
  calling itself leader before etcd can hand the key to another (fail safe: briefly no
  leader rather than two).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from trustmesh.store.etcd_client import EtcdClient
from trustmesh.store.model import StoreError

__all__ = ["LEADER_KEY", "LeaderElection", "LeaseKeeper"]

log = logging.getLogger("trustmesh.store.leader")

LEADER_KEY = b"/trustmesh/leader"
RETRY = 0.2  # seconds between attempts while etcd cannot be reached


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


class LeaseKeeper:
    """One etcd lease, kept alive every TTL/3; re-granted if etcd says it is gone.

    ``on_lease`` callbacks run (in the loop) with the new lease id after a re-grant: put
    again what lived under the old one. ``on_lost`` callbacks run when the lease is no
    longer known alive (keep-alives failing past its TTL, or it expired).
    """

    def __init__(self, client: EtcdClient, ttl_seconds: int) -> None:
        if ttl_seconds < 2:
            raise ValueError(f"a lease TTL is at least 2 seconds, got {ttl_seconds}")
        self.client = client
        self.ttl = ttl_seconds
        self.lease_id = 0
        self._valid_until = 0.0  # time.monotonic() bound of the lease being alive
        self.on_lease: list[Callable[[int], object]] = []
        self.on_lost: list[Callable[[], None]] = []

    def alive(self) -> bool:
        return self.lease_id != 0 and time.monotonic() < self._valid_until

    async def grant(self) -> int:
        sent = time.monotonic()
        self.lease_id = await self.client.grant_lease(self.ttl)
        self._valid_until = sent + self.ttl
        return self.lease_id

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the lease alive until ``stop`` (then revoke it: its keys go at once)."""
        try:
            while not await _stopped_within(stop, self.ttl / 3):
                await self._refresh()
        finally:
            with contextlib.suppress(StoreError):
                if self.lease_id:
                    await self.client.revoke_lease(self.lease_id)
            self.lease_id = 0

    async def _refresh(self) -> None:
        was_alive = self.alive()
        sent = time.monotonic()
        try:
            left = await self.client.keep_alive_once(self.lease_id)
            if left <= 0:
                log.error("lease %x expired: granting a new one", self.lease_id)
                self._lost()
                await self.grant()
                for callback in self.on_lease:
                    result = callback(self.lease_id)
                    if asyncio.iscoroutine(result):
                        await result
                return
            self._valid_until = sent + left
        except StoreError as exc:
            log.error("lease %x keep-alive failed: %s", self.lease_id, exc)
            if was_alive and not self.alive():
                self._lost()

    def _lost(self) -> None:
        for callback in self.on_lost:
            callback()


class LeaderElection:
    """Leadership of ``name`` over ``key``, held under ``keeper``'s lease."""

    def __init__(
        self,
        client: EtcdClient,
        keeper: LeaseKeeper,
        name: str,
        on_change: Callable[[bool], None] | None = None,
        key: bytes = LEADER_KEY,
    ) -> None:
        self.client = client
        self.keeper = keeper
        self.name = name
        self.key = key
        self.on_change = on_change
        self.holder: str | None = None  # who holds the key, as last seen
        self._leader = False
        keeper.on_lost.append(lambda: self._set(False))

    def is_leader(self) -> bool:
        return self._leader and self.keeper.alive()

    def _set(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        log.info("%s: %s", self.name, "leader now" if leader else "no longer leader")
        if self.on_change is not None:
            self.on_change(leader)

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign, and again whenever the key is vacated, until ``stop``."""
        try:
            while not stop.is_set():
                try:
                    revision = await self._campaign()
                    await self._until_vacant(revision, stop)
                except StoreError as exc:
                    log.error("%s: leader election: %s", self.name, exc)
                    self._set(False)
                    await _stopped_within(stop, RETRY)
        finally:
            self._set(False)

    async def _campaign(self) -> int:
        lease = self.keeper.lease_id
        succeeded, response = await self.client.txn(
            [self.client.absent(self.key)],
            [self.client.put_op(self.key, self.name.encode(), lease)],
            [self.client.get_op(self.key)],
        )
        if succeeded:
            self.holder = self.name
            self._set(self.keeper.alive())
        else:
            kvs = response.responses[0].response_range.kvs
            self.holder = kvs[0].value.decode() if kvs else None
            # Ours from before (a watch that broke): still ours under this very lease.
            self._set(bool(kvs) and kvs[0].lease == lease and self.holder == self.name)
        return int(response.header.revision)

    async def _until_vacant(self, revision: int, stop: asyncio.Event) -> None:
        async def vacated() -> None:
            async for changes in self.client.watch_prefix(self.key, revision + 1):
                for change in changes:
                    if change.kv.key == self.key and change.deleted:
                        return
                    if change.kv.key == self.key:
                        self.holder = change.kv.value.decode()

        watcher = asyncio.create_task(vacated())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({watcher, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if watcher.done():
                watcher.result()  # raises StoreError if the watch broke
                self.holder = None
                self._set(False)
        finally:
            stopped.cancel()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreError):
                await watcher
