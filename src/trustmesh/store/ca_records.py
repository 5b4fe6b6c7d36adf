"""The CA's records in etcd, shared by every replica: burnt tokens, issued serials,
revocations.

Layout::

    /trustmesh/ca/tokens/<jti>        {"exp": ...}     created once, by one transaction
    /trustmesh/ca/issued/<serial hex> {"id", "not_after", "at"}
    /trustmesh/ca/revoked/<serial hex> {"at"}

A token is burnt by a transaction that puts its key only if the key's create_revision is
0 (it does not exist): etcd serializes transactions, so of any number of replicas racing
on one token exactly one sees ``succeeded``. Revocations are read once and then followed
with a watch; each replica's renewal check consults the watched set, so a revocation is
refused everywhere as soon as the watch delivers it (milliseconds), and a broken watch
makes :meth:`WatchedRevocations.current` raise: renewals are refused until it is back.

Signing keys are never written here (see README, "CA replicas and their keys").
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Callable

from trustmesh.store.etcd_client import EtcdClient
from trustmesh.store.model import StoreError

log = logging.getLogger("trustmesh.store.ca")

CA_ROOT = b"/trustmesh/ca/"
TOKENS = CA_ROOT + b"tokens/"
ISSUED = CA_ROOT + b"issued/"
REVOKED = CA_ROOT + b"revoked/"


TOKEN_RECORD_MARGIN = 600  # seconds a burnt token's record outlives the token


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _serial(raw: bytes, prefix: bytes) -> int:
    return int(raw[len(prefix) :].decode(), 16)


class EtcdCaRecords:
    """The :class:`~trustmesh.identity.tokens.TokenLedger` of a replica, plus revoking."""

    def __init__(self, client: EtcdClient, clock: Callable[[], dt.datetime] = _utc_now) -> None:
        self.client = client
        self.clock = clock
        self._leases: dict[int, int] = {}  # expiry bucket (epoch minute) → etcd lease

    async def consume_token(self, token_id: str, expires: dt.datetime) -> bool:
        key = TOKENS + token_id.encode()
        value = json.dumps({"exp": expires.isoformat()}).encode()
        lease = await self._lease_outliving(expires)
        succeeded, _ = await self.client.txn(
            [self.client.absent(key)], [self.client.put_op(key, value, lease)]
        )
        return succeeded

    async def _lease_outliving(self, expires: dt.datetime) -> int:
        """A lease that ends a while after ``expires``: a burnt token's record is kept as
        long as the token could be presented (then it is refused as expired anyway), plus
        a margin for replicas' clock skew. One lease per minute of expiry, shared."""
        bucket = int(expires.timestamp()) // 60 + 1
        lease = self._leases.get(bucket)
        if lease is None:
            ttl = bucket * 60 - int(self.clock().timestamp()) + TOKEN_RECORD_MARGIN
            lease = await self.client.grant_lease(max(ttl, TOKEN_RECORD_MARGIN))
            self._leases = {b: x for b, x in self._leases.items() if b >= bucket - 60}
            self._leases[bucket] = lease
        return lease

    async def record_issued(
        self, serial: int, identity: str, not_after: dt.datetime, at: dt.datetime
    ) -> None:
        value = {"id": identity, "not_after": not_after.isoformat(), "at": at.isoformat()}
        await self.client.put(ISSUED + f"{serial:x}".encode(), json.dumps(value).encode())

    async def issued_serials(self) -> set[int]:
        kvs, _ = await self.client.get_prefix(ISSUED)
        return {_serial(kv.key, ISSUED) for kv in kvs}

    async def revoke(self, serial: int, now: dt.datetime) -> int:
        """Record the revocation; returns the store revision every replica will see it at."""
        if serial <= 0:
            raise StoreError("a serial is a positive integer")
        value = json.dumps({"at": now.isoformat()}).encode()
        return await self.client.put(REVOKED + f"{serial:x}".encode(), value)


class WatchedRevocations:
    """The revoked serials, kept current by an etcd watch (a ``RevocationSource``).

    ``current()`` raises :class:`StoreError` before the first read and after the watch
    broke, until it is re-established: a CA replica never renews on stale knowledge.
    """

    def __init__(self, client: EtcdClient) -> None:
        self.client = client
        self._serials: set[int] = set()
        self._revision = 0
        self._healthy = False
        self._problem = "revocations not loaded yet"
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def current(self) -> frozenset[int]:
        if not self._healthy:
            raise StoreError(f"revocations unknown: {self._problem}")
        return frozenset(self._serials)

    @property
    def revision(self) -> int:
        """The store revision the set reflects."""
        return self._revision

    async def start(self) -> None:
        await self._load()
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._healthy = False
        self._problem = "stopped"

    async def wait_for_revision(self, revision: int) -> None:
        """Return once the watched set reflects store revision ``revision``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._revision >= revision)

    async def _load(self) -> None:
        kvs, revision = await self.client.get_prefix(REVOKED)
        self._serials = {_serial(kv.key, REVOKED) for kv in kvs}
        await self._advance(revision)
        self._healthy = True

    async def _advance(self, revision: int) -> None:
        async with self._changed:
            self._revision = max(self._revision, revision)
            self._changed.notify_all()

    async def _follow(self) -> None:
        backoff = 0.05
        while True:
            try:
                async for changes in self.client.watch_prefix(REVOKED, self._revision + 1):
                    for change in changes:
                        serial = _serial(change.kv.key, REVOKED)
                        if change.deleted:
                            self._serials.discard(serial)
                        else:
                            self._serials.add(serial)
                    await self._advance(changes[-1].revision)
                    backoff = 0.05
            except StoreError as exc:
                self._healthy = False
                self._problem = str(exc)
                log.error("revocation watch broke, renewals refused until it is back: %s", exc)
            await asyncio.sleep(backoff)  # reconnect back-off, not a wait for an event
            backoff = min(backoff * 2, 2.0)
            try:
                await self._load()
            except StoreError as exc:
                self._problem = str(exc)
