"""The store interface the CLI and (next) the control plane replicas program against."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from trustmesh.store.model import (
    EventBatch,
    ResourceDelete,
    ResourceEvent,
    ResourceKey,
    ResourceWrite,
    StoredResource,
)


class ResourceStore(Protocol):
    """Istio resources by kind/namespace/name, written compare-and-swap, all or nothing."""

    def describe(self) -> str: ...

    async def get(self, key: ResourceKey) -> StoredResource | None: ...

    async def list(
        self, kind: str | None = None, namespace: str | None = None
    ) -> tuple[list[StoredResource], int]:
        """Objects (sorted by key) and the store revision they were read at."""
        ...

    async def commit(
        self, writes: Sequence[ResourceWrite], deletes: Sequence[ResourceDelete] = ()
    ) -> int:
        """Apply every write and delete or none; raises :class:`Conflict` naming the first
        object whose version is not the expected one. Returns the new store revision."""
        ...

    def watch(self, from_revision: int) -> AsyncIterator[ResourceEvent]:
        """Every change after ``from_revision``, in store order, until cancelled."""
        ...

    def watch_batches(self, from_revision: int) -> AsyncIterator[EventBatch]:
        """:meth:`watch` in whole commits: every event of one revision in one list."""
        ...

    async def close(self) -> None: ...
