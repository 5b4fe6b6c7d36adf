"""A small typed asyncio client for etcd v3 over gRPC.

The messages and stubs are aetcd's, generated from etcd's own ``rpc.proto`` and
``kv.proto`` (aetcd 1.0.0 pins ``grpcio<2`` and ``protobuf<8``, the versions the project
already uses). The client itself is ours, for two things aetcd's does not do: one
channel over several members (``etcd://H1:P1,H2:P2``: gRPC fails over between the
addresses) and watches that report a broken stream instead of ending quietly — the CA
fails closed on that.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aetcd import rpc  # generated from etcd's protos

from trustmesh.store.model import StoreError

__all__ = ["EtcdClient", "KeyValue", "WatchedChange", "prefix_end"]

REQUEST_TIMEOUT = 5.0
# A member that vanished without a reset (a host gone, a cut link) must not leave a watch
# silent and "healthy": ping an open stream every 10 s, give up 5 s after an unanswered
# ping (etcd accepts pings every 5 s or slower; none without a call, its default).
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
]


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchedChange:
    deleted: bool
    kv: KeyValue
    revision: int  # the store revision of this change


def prefix_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _kv(raw: Any) -> KeyValue:
    return KeyValue(
        bytes(raw.key), bytes(raw.value), raw.create_revision, raw.mod_revision, raw.lease
    )


def _target(endpoints: Sequence[tuple[str, int]]) -> str:
    if len(endpoints) == 1:
        host, port = endpoints[0]
        return f"{host}:{port}"
    try:
        for host, _ in endpoints:
            ipaddress.IPv4Address(host)
    except ValueError:
        raise StoreError("several etcd members must be given as IPv4 addresses") from None
    return "ipv4:" + ",".join(f"{h}:{p}" for h, p in endpoints)


class EtcdClient:
    """KV, transactions, watches and leases against one etcd cluster."""

    def __init__(self, endpoints: Sequence[tuple[str, int]]) -> None:
        if not endpoints:
            raise StoreError("no etcd endpoint given")
        self.endpoints = tuple(endpoints)
        self._channel = grpc.aio.insecure_channel(_target(self.endpoints), options=KEEPALIVE)
        self._kv = rpc.KVStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)
        self._lease = rpc.LeaseStub(self._channel)

    def describe(self) -> str:
        return "etcd://" + ",".join(f"{h}:{p}" for h, p in self.endpoints)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, *, read: bool = False) -> Any:
        """One call; a read is tried again while etcd answers UNAVAILABLE (a member that
        just lost its leader: "etcdserver: leader changed", a member killed under the
        stream), within the same deadline — as etcd's own clientv3 retries reads. Writes
        are not: one may have been applied although its answer was lost."""
        deadline = time.monotonic() + REQUEST_TIMEOUT
        pause = 0.05
        while True:
            try:
                left = max(0.01, deadline - time.monotonic())
                return await method(request, timeout=left, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                retry = read and exc.code() is grpc.StatusCode.UNAVAILABLE
                if not retry or time.monotonic() + pause >= deadline:
                    raise StoreError(
                        f"{self.describe()}: {exc.code().name}: {exc.details()}"
                    ) from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    # --- KV ---------------------------------------------------------------------------------

    async def get(self, key: bytes) -> KeyValue | None:
        response = await self._call(self._kv.Range, rpc.RangeRequest(key=key), read=True)
        return _kv(response.kvs[0]) if response.kvs else None

    async def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` (sorted) and the store revision they were read at."""
        response = await self._call(
            self._kv.Range, rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix)), read=True
        )
        return [_kv(kv) for kv in response.kvs], response.header.revision

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        response = await self._call(self._kv.Put, rpc.PutRequest(key=key, value=value, lease=lease))
        return int(response.header.revision)

    async def txn(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()
    ) -> tuple[bool, Any]:
        """One etcd transaction: (succeeded, response)."""
        request = rpc.TxnRequest(
            compare=list(compare), success=list(success), failure=list(failure)
        )
        response = await self._call(self._kv.Txn, request)
        return bool(response.succeeded), response

    # --- builders for transactions --------------------------------------------------------

    @staticmethod
    def mod_revision_is(key: bytes, revision: int) -> Any:
        """Compare: the key's mod_revision equals ``revision`` (0: the key is absent)."""
        return rpc.Compare(
            key=key,
            result=rpc.Compare.CompareResult.EQUAL,
            target=rpc.Compare.CompareTarget.MOD,
            mod_revision=revision,
        )

    @staticmethod
    def absent(key: bytes) -> Any:
        return rpc.Compare(
            key=key,
            result=rpc.Compare.CompareResult.EQUAL,
            target=rpc.Compare.CompareTarget.CREATE,
            create_revision=0,
        )

    @staticmethod
    def put_op(key: bytes, value: bytes, lease: int = 0) -> Any:
        return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))

    @staticmethod
    def delete_op(key: bytes) -> Any:
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))

    @staticmethod
    def get_op(key: bytes) -> Any:
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))

    # --- watches ------------------------------------------------------------------------------

    async def watch_prefix(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[list[WatchedChange]]:
        """Changes under ``prefix`` from ``start_revision`` on, one list per etcd response.

        Raises :class:`StoreError` when the stream breaks or etcd cancels the watch
        (compacted past ``start_revision``): callers must not take silence for "no change".
        """
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=prefix, range_end=prefix_end(prefix), start_revision=start_revision
            )
        )

        async def requests() -> AsyncIterator[Any]:
            yield create

        # "hasleader": etcd ends the watch when this member loses its leader (partitioned
        # from the quorum) instead of keeping a silent stream open: silence would look
        # like "nothing was revoked".
        call = self._watch.Watch(requests(), wait_for_ready=True, metadata=(("hasleader", "true"),))
        try:
            async for response in call:
                if response.canceled:
                    reason = response.cancel_reason or "compacted"
                    raise StoreError(f"{self.describe()}: watch cancelled: {reason}")
                changes = [
                    WatchedChange(
                        event.type == rpc.Event.EventType.DELETE,
                        _kv(event.kv),
                        int(event.kv.mod_revision),
                    )
                    for event in response.events
                ]
                if changes:
                    yield changes
        except grpc.aio.AioRpcError as exc:
            raise StoreError(f"{self.describe()}: watch broke: {exc.code().name}") from None
        finally:
            call.cancel()
        raise StoreError(f"{self.describe()}: watch ended")

    # --- leases -------------------------------------------------------------------------------

    async def grant_lease(self, ttl_seconds: int) -> int:
        response = await self._call(self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl_seconds))
        return int(response.ID)

    async def revoke_lease(self, lease_id: int) -> None:
        await self._call(self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease_id))

    async def keep_alive_once(self, lease_id: int) -> int:
        """Refresh the lease once; returns the TTL left (0: the lease is gone)."""

        async def requests() -> AsyncIterator[Any]:
            yield rpc.LeaseKeepAliveRequest(ID=lease_id)

        call = self._lease.LeaseKeepAlive(requests(), timeout=REQUEST_TIMEOUT)
        try:
            async for response in call:
                return int(response.TTL)
        except grpc.aio.AioRpcError as exc:
            raise StoreError(f"{self.describe()}: lease keep-alive: {exc.code().name}") from None
        return 0
