"""The control plane's configuration from a store: read everything at one revision, then
follow the store's watch in order.

A replica does not compile store objects some other way: it keeps a private directory
that mirrors the store (one JSON file per object), and every change goes through the very
path a file change takes — :meth:`ControlPlane.reload <trustmesh.xds.controlplane.
ControlPlane.reload>`: validate, compile, translate, push, or refuse the whole
configuration and keep the last good one.

Order and wholeness. Changes are applied in store order, a watch response at a time (etcd
never splits one revision's events over two responses, and one ``apply`` is one
transaction), so a reload never sees half of a commit. While a reload runs, the batches
that arrive are queued and applied together before the next one: a burst of applies costs
one compile, not one each.

A store that cannot be reached. The watch raises (etcd ends it when the member loses its
quorum: ``hasleader``); the source says so in :meth:`StoreConfigSource.status`
(``healthy: false`` and why), the control plane keeps serving the last good configuration
— nothing is published from a store it cannot read — and it retries with back-off. Back,
it lists the store again at its current revision, rewrites the mirror to match and
reloads once, then follows the watch from that revision.

In memory too. The mirror's files are also kept as the bytes written, in the order
``load_config`` reads a directory (:meth:`StoreConfigSource.sources`): the control plane
compiles those instead of reading and stat-ing thousands of files again on every change
(the same names and bytes, so the same diagnostics and the same compiled mesh).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from trustmesh.store.base import ResourceStore
from trustmesh.store.model import ChangeType, ResourceEvent, ResourceKey, StoredResource, StoreError

__all__ = ["Reload", "StoreConfigSource"]

log = logging.getLogger("trustmesh.store.config")

Reload = Callable[[], Awaitable[object]]
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
NOT_LOADED = "not loaded yet"


def mirror_path(directory: Path, key: ResourceKey) -> Path:
    """Where ``key``'s object lives in the mirror: ``NS/GROUP_KIND_NAME.json``."""
    return (
        directory
        / (key.namespace or "_cluster")
        / f"{key.group or 'core'}_{key.kind}_{key.name}.json"
    )


class StoreConfigSource:
    """Mirrors ``store`` into ``directory`` and reloads the control plane on each change.

    ``directory`` is the replica's own (created 0700, emptied at :meth:`load`); give it to
    the ``ControlPlane`` as its configuration path. Call :meth:`load` before the control
    plane starts, then run :meth:`follow` until stop.
    """

    def __init__(self, store: ResourceStore, directory: Path) -> None:
        self.store = store
        self.directory = directory
        self.revision = 0  # the store revision the mirror reflects
        self.applied_revision = 0  # … whose reload has finished (published or refused)
        self.healthy = False
        self.problem: str | None = NOT_LOADED
        self._since = dt.datetime.now(dt.UTC)
        self._applied = asyncio.Condition()
        self._files: dict[Path, bytes] = {}  # the mirror's content (worker thread writes)
        self._sources: tuple[tuple[str, bytes], ...] = ()  # … in reading order
        self._sources_revision = 0

    # -- status

    def status(self) -> dict[str, Any]:
        """What ``status`` shows: the store, the revision served, healthy or why not."""
        return {
            "store": self.store.describe(),
            "healthy": self.healthy,
            "revision": self.applied_revision,
            "problem": self.problem,
            "since": self._since.isoformat(timespec="seconds"),
        }

    def _set_health(self, healthy: bool, problem: str | None) -> None:
        if healthy != self.healthy:
            self._since = dt.datetime.now(dt.UTC)
            if not healthy:
                log.error(
                    "store %s: %s — serving the configuration of revision %d until it is back",
                    self.store.describe(),
                    problem,
                    self.applied_revision,
                )
            elif self.problem != NOT_LOADED:
                log.info(
                    "store %s reachable again at revision %d", self.store.describe(), self.revision
                )
        self.healthy, self.problem = healthy, problem

    def loaded_into_plane(self) -> None:
        """The control plane has loaded the mirror as :meth:`load` left it (it started)."""
        self.applied_revision = max(self.applied_revision, self.revision)

    async def wait_applied(self, revision: int) -> None:
        """Return once a reload of store revision ``revision`` (or later) finished."""
        async with self._applied:
            await self._applied.wait_for(lambda: self.applied_revision >= revision)

    def sources(self) -> tuple[tuple[tuple[str, bytes], ...], str]:
        """The mirror as ``load_config(preread=...)`` takes it — (file name, bytes) in
        the order ``read_sources`` reads the directory — and a stamp naming that content
        (the store revision it reflects)."""
        return self._sources, f"store revision {self._sources_revision}"

    # -- reading

    async def load(self) -> int:
        """Read every object at the store's current revision into the mirror (replacing
        what it held); that revision."""
        resources, revision = await self.store.list()
        await asyncio.to_thread(self._write_all, resources, revision)
        self.revision = revision
        self._set_health(True, None)
        return revision

    async def follow(
        self, reload: Reload, stop: asyncio.Event, *, reload_first: bool = True
    ) -> None:
        """Apply the store's changes in order and ``reload`` after each batch, until
        ``stop``; re-list after the store was unreachable. Call :meth:`load` first;
        ``reload_first=False`` when the control plane already loaded the mirror (it
        started after :meth:`load`)."""
        if reload_first:
            await self._reloaded(reload)
        else:
            self.loaded_into_plane()
        backoff = BACKOFF_FIRST
        while not stop.is_set():
            try:
                await self._follow_watch(reload, stop)
                return  # stopped
            except StoreError as exc:
                self._set_health(False, str(exc))
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)  # back-off, not a test wait
                backoff = min(backoff * 2, BACKOFF_MAX)
                if stop.is_set():
                    return
                try:
                    await self.load()
                except StoreError as exc:
                    self._set_health(False, str(exc))
                    continue
                backoff = BACKOFF_FIRST
                await self._reloaded(reload)
                break

    async def _follow_watch(self, reload: Reload, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[list[ResourceEvent] | StoreError] = asyncio.Queue()

        async def read() -> None:
            try:
                async for batch in self.store.watch_batches(self.revision):
                    queue.put_nowait(batch)
            except StoreError as exc:
                queue.put_nowait(exc)

        reader = asyncio.create_task(read())
        stopped = asyncio.create_task(stop.wait())
        try:
            while True:
                got = asyncio.create_task(queue.get())
                await asyncio.wait({got, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    return
                items = [got.result()]
                while not queue.empty():  # what arrived meanwhile: one reload for all
                    items.append(queue.get_nowait())
                batches = [i for i in items if not isinstance(i, StoreError)]
                if batches:
                    events = [event for batch in batches for event in batch]
                    revision = max(self.revision, events[-1].revision if events else 0)
                    await asyncio.to_thread(self._apply, events, revision)
                    self.revision = revision
                    self._set_health(True, None)
                    await self._reloaded(reload)
                failures = [i for i in items if isinstance(i, StoreError)]
                if failures:
                    raise failures[0]
        finally:
            stopped.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _reloaded(self, reload: Reload) -> None:
        revision = self.revision
        await reload()
        async with self._applied:
            self.applied_revision = max(self.applied_revision, revision)
            self._applied.notify_all()

    # -- the mirror (worker thread)

    def _write_all(self, resources: Iterable[StoredResource], revision: int) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        wanted = {mirror_path(self.directory, r.key): r for r in resources}
        for path in sorted(self.directory.rglob("*.json")):
            if path not in wanted:
                path.unlink()
        self._files = {}
        for path, resource in wanted.items():
            self._files[path] = _write(path, resource)
        self._publish_sources(revision)

    def _apply(self, events: Iterable[ResourceEvent], revision: int) -> None:
        for event in events:
            path = mirror_path(self.directory, event.key)
            if event.type is ChangeType.DELETE or event.resource is None:
                path.unlink(missing_ok=True)
                self._files.pop(path, None)
            else:
                self._files[path] = _write(path, event.resource)
        self._publish_sources(revision)

    def _publish_sources(self, revision: int) -> None:
        # One new tuple, assigned whole: a reload reading it meanwhile sees before or after.
        ordered = sorted(self._files.items(), key=lambda item: item[0].parts)
        self._sources = tuple((str(path), data) for path, data in ordered)
        self._sources_revision = revision


def _write(path: Path, resource: StoredResource) -> bytes:
    """The object as ``get -o json`` prints it, landing whole (rename); its bytes."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")  # not .json: never read half written
    data = json.dumps(resource.body(), sort_keys=True).encode("utf-8")
    partial.write_bytes(data)
    os.replace(partial, path)
    return data
