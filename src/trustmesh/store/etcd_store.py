"""Istio resources and the workload registry in etcd v3.

Key layout (one prefix per cluster, so several meshes can share an etcd)::

    /trustmesh/resources/<group|core>/<Kind>/<namespace>/<name>   manifest (JSON)
    /trustmesh/workloads/<host>/<namespace>/<name>                WorkloadRecord, host's lease
    /trustmesh/ca/...                                             see ca_records.py

A resource's ``resourceVersion`` is its key's ``mod_revision``; every ``commit`` is one
etcd transaction whose compares are the expected versions, so either all of an apply is
written or nothing is, and a writer holding a stale version gets :class:`Conflict`.

Owner references, as Kubernetes' garbage collector for the one owner trustmesh writes:
deleting a WorkloadGroup deletes, in the same transaction, the WorkloadEntries it
auto-registered (an ownerReference to it) and their registry records.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

from trustmesh.api.workloadgroup import owned_by
from trustmesh.store.etcd_client import EtcdClient, KeyValue
from trustmesh.store.model import (
    ChangeType,
    Conflict,
    EventBatch,
    ResourceDelete,
    ResourceEvent,
    ResourceKey,
    ResourceWrite,
    StoredResource,
    StoreError,
    WorkloadRecord,
)

ROOT = b"/trustmesh/"
RESOURCES = ROOT + b"resources/"
WORKLOADS = ROOT + b"workloads/"


def resource_key_bytes(key: ResourceKey) -> bytes:
    return RESOURCES + key.path().encode()


# outside the class whose ``list`` method shadows the builtin
_Deletes = list[ResourceDelete]
_Keys = list[bytes]


def workload_key(record: WorkloadRecord) -> bytes:
    """The registry key of a record: ``/trustmesh/workloads/<host>/<namespace>/<name>``."""
    return WORKLOADS + f"{record.host}/{record.namespace}/{record.name}".encode()


def parse_resource_key(raw: bytes) -> ResourceKey:
    parts = raw[len(RESOURCES) :].decode().split("/")
    if len(parts) != 4:
        raise StoreError(f"unexpected key in the store: {raw.decode(errors='replace')}")
    group, kind, namespace, name = parts
    return ResourceKey("" if group == "core" else group, kind, namespace, name)


def _stored(kv: KeyValue) -> StoredResource:
    return StoredResource(parse_resource_key(kv.key), kv.value.decode(), kv.mod_revision)


class EtcdResourceStore:
    def __init__(self, client: EtcdClient) -> None:
        self.client = client

    def describe(self) -> str:
        return self.client.describe()

    async def close(self) -> None:
        await self.client.close()

    async def get(self, key: ResourceKey) -> StoredResource | None:
        kv = await self.client.get(resource_key_bytes(key))
        return None if kv is None else _stored(kv)

    async def list(
        self, kind: str | None = None, namespace: str | None = None
    ) -> tuple[list[StoredResource], int]:
        kvs, revision = await self.client.get_prefix(RESOURCES)
        found = [_stored(kv) for kv in kvs]
        found = [
            r
            for r in found
            if (kind is None or r.key.kind == kind)
            and (namespace is None or r.key.namespace == namespace)
        ]
        return sorted(found, key=lambda r: r.key), revision

    async def commit(
        self, writes: Sequence[ResourceWrite], deletes: Sequence[ResourceDelete] = ()
    ) -> int:
        owned, records = await self._owned_by_deleted_groups(deletes)
        changes: list[ResourceWrite | ResourceDelete] = [*writes, *deletes, *owned]
        compares = [
            self.client.mod_revision_is(resource_key_bytes(w.key), w.expected_version)
            for w in changes
        ]
        ops = [self.client.put_op(resource_key_bytes(w.key), w.manifest.encode()) for w in writes]
        ops += [self.client.delete_op(resource_key_bytes(d.key)) for d in [*deletes, *owned]]
        ops += [self.client.delete_op(key) for key in records]
        # On failure read every key back, to name the one that moved.
        reads = [self.client.get_op(resource_key_bytes(w.key)) for w in changes]
        succeeded, response = await self.client.txn(compares, ops, reads)
        if succeeded:
            return int(response.header.revision)
        for change, result in zip(changes, response.responses, strict=True):
            kvs = result.response_range.kvs
            found = kvs[0].mod_revision if kvs else 0
            if found != change.expected_version:
                raise Conflict(change.key, change.expected_version, found)
        raise StoreError("transaction failed without a changed object")  # pragma: no cover

    async def _owned_by_deleted_groups(
        self, deletes: Sequence[ResourceDelete]
    ) -> tuple[_Deletes, _Keys]:
        """The WorkloadEntries the deleted WorkloadGroups own, and their registry keys."""
        groups = {
            (d.key.namespace, d.key.name)
            for d in deletes
            if d.key.group == "networking.istio.io" and d.key.kind == "WorkloadGroup"
        }
        if not groups:
            return [], []
        entries: _Deletes = []
        names: set[tuple[str, str]] = set()
        deleted = {d.key for d in deletes}
        for namespace in sorted({ns for ns, _ in groups}):
            prefix = RESOURCES + f"networking.istio.io/WorkloadEntry/{namespace}/".encode()
            kvs, _ = await self.client.get_prefix(prefix)
            for kv in kvs:
                stored = _stored(kv)
                if stored.key not in deleted and any(
                    ns == namespace and owned_by(stored.manifest, name) for ns, name in groups
                ):
                    entries.append(ResourceDelete(stored.key, stored.resource_version))
                    names.add((namespace, stored.key.name))
        records: _Keys = []
        if names:
            kvs, _ = await self.client.get_prefix(WORKLOADS)
            for kv in kvs:
                value = json.loads(kv.value)
                if (value.get("namespace"), value.get("name")) in names and value.get("group"):
                    records.append(kv.key)
        return entries, records

    async def watch(self, from_revision: int) -> AsyncIterator[ResourceEvent]:
        async for batch in self.watch_batches(from_revision):
            for event in batch:
                yield event

    async def watch_batches(self, from_revision: int) -> AsyncIterator[EventBatch]:
        """:meth:`watch`, one list per etcd watch response: etcd never splits the events
        of one revision (one commit) over two responses, so a batch is whole commits."""
        async for changes in self.client.watch_prefix(RESOURCES, from_revision + 1):
            batch: EventBatch = []
            for change in changes:
                key = parse_resource_key(change.kv.key)
                if change.deleted:
                    batch.append(ResourceEvent(ChangeType.DELETE, key, change.revision, None))
                else:
                    stored = _stored(change.kv)
                    batch.append(ResourceEvent(ChangeType.PUT, key, change.revision, stored))
            yield batch


class WorkloadRegistry:
    """Which pod or WorkloadEntry runs on which host, under that host's lease.

    A host grants itself a lease (:meth:`host_lease`) and keeps it alive; its records
    are attached to it, so when the host dies (no keep-alive for the TTL) etcd deletes
    them and watchers see its endpoints leave.
    """

    def __init__(self, client: EtcdClient) -> None:
        self.client = client

    async def host_lease(self, ttl_seconds: int) -> int:
        return await self.client.grant_lease(ttl_seconds)

    async def register(self, record: WorkloadRecord, lease_id: int) -> int:
        return await self.client.put(workload_key(record), record.to_json().encode(), lease_id)

    async def workloads(self, host: str | None = None) -> tuple[list[WorkloadRecord], int]:
        prefix = WORKLOADS + (f"{host}/".encode() if host else b"")
        kvs, revision = await self.client.get_prefix(prefix)
        return [WorkloadRecord.from_json(kv.value) for kv in kvs], revision

    async def changes(self, from_revision: int) -> AsyncIterator[tuple[bool, str]]:
        """(removed?, host/namespace/name) for each registry change after ``from_revision``."""
        async for changes in self.client.watch_prefix(WORKLOADS, from_revision + 1):
            for change in changes:
                yield change.deleted, change.kv.key[len(WORKLOADS) :].decode()
