"""The fleet benchmark's child process (``--serve-control-plane``): CaServer + ControlPlane
driven by JSON lines on stdin, each answered by one JSON line on stdout, with a recorder
that timestamps (CLOCK_MONOTONIC) reloads, published snapshots and ACKs."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from benchlib.fleet_config import Json, registration
from benchlib.fleet_profile import profile_rebuild
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.identity.server import CaServer
from trustmesh.xds.cache import TYPE_CLUSTER, TYPE_ECDS, TYPE_LISTENER, SnapshotCache
from trustmesh.xds.controlplane import ControlPlane

SYNCED_TYPES = (TYPE_LISTENER, TYPE_CLUSTER, TYPE_ECDS)


class Ack(NamedTuple):
    version: str
    at: float  # when the ADS server took the ACK
    gc_total: float  # Recorder.gc_seconds then


class Recorder:
    """Timestamps what the control plane does, by wrapping three of its calls.

    The wrappers are instance attributes that shadow the methods, so the watcher, the
    publish step and the ADS server (which reports ACKs to the cache) all go through them.
    Times are ``time.monotonic()``: CLOCK_MONOTONIC, the same clock in every process.
    """

    def __init__(self, plane: ControlPlane) -> None:
        self.reloads: list[Json] = []
        self.published: dict[str, float] = {}  # node → when its snapshot last changed
        self.acked: dict[str, dict[str, Ack]] = {}  # node → type → its newest version's ACK
        self.gc_seconds = 0.0  # in collections of the cyclic garbage collector, in total
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)
        self._wrap_cache(plane.cache)
        self._wrap_reload(plane)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_seconds += time.perf_counter() - self._gc_start

    def _wrap_cache(self, cache: SnapshotCache) -> None:
        set_snapshot, record_ack = cache.set, cache.record_ack

        def timed_set(node_id: str, snapshot: Any) -> None:
            changed = cache.get(node_id) != snapshot
            set_snapshot(node_id, snapshot)
            if changed:
                self.published[node_id] = time.monotonic()

        def timed_ack(node_id: str, type_url: str, version: str) -> None:
            record_ack(node_id, type_url, version)
            seen = self.acked.setdefault(node_id, {})
            previous = seen.get(type_url)
            if previous is None or previous.version != version:  # a repeated ACK is no news
                seen[type_url] = Ack(version, time.monotonic(), self.gc_seconds)

        cache.set = timed_set  # type: ignore[method-assign]
        cache.record_ack = timed_ack  # type: ignore[method-assign]

    def _wrap_reload(self, plane: ControlPlane) -> None:
        reload = plane.reload

        async def timed_reload() -> list[Any]:
            start, gc_before = time.monotonic(), self.gc_seconds
            problems = await reload()
            stats = plane.last_rebuild
            self.reloads.append(
                {
                    "start": start,
                    "end": time.monotonic(),
                    "gc_s": self.gc_seconds - gc_before,
                    "gc_total_s": self.gc_seconds,
                    "problems": len(problems),
                    # the build's own account (worker thread): proxies reused / patched /
                    # translated whole, and its wall time
                    "rebuild": dataclasses.asdict(stats) if stats is not None else None,
                }
            )
            return problems

        plane.reload = timed_reload  # type: ignore[method-assign]

    def events(self, plane: ControlPlane, since: float) -> Json:
        """Reloads started since ``since``; per node, when its current snapshot was
        published and when its Envoy ACKed that snapshot's filter configs (ECDS)."""
        nodes = {}
        for node_id in plane.registrations:
            snapshot = plane.cache.get(node_id)
            acks = self.acked.get(node_id, {})
            ecds = acks.get(TYPE_ECDS)
            if snapshot is None or ecds is None or ecds.at < since:
                ecds = None
            elif ecds.version != snapshot.version_of(TYPE_ECDS):
                ecds = None  # it ACKed something, but not the current policy
            published = self.published.get(node_id, 0.0)
            nodes[node_id] = {
                "published": published if published >= since else None,
                "acked": ecds.at if ecds else None,
                "acked_gc_total_s": ecds.gc_total if ecds else None,
                "types": sorted(t.rsplit(".", 1)[-1] for t, a in acks.items() if a.at >= since),
            }
        return {"reloads": [r for r in self.reloads if r["start"] >= since], "nodes": nodes}


def _synced(cache: SnapshotCache, node_id: str) -> bool:
    """Has this proxy ACKed its current listeners, clusters and filter configs?"""
    snapshot = cache.get(node_id)
    if snapshot is None:
        return False
    acked = cache.acked(node_id)
    return all(
        acked.get(t) == snapshot.version_of(t)
        for t in SYNCED_TYPES
        if t != TYPE_ECDS or snapshot.get(TYPE_ECDS)
    )


def status(plane: ControlPlane) -> Json:
    server = plane.server
    return {
        "registered": len(plane.registrations),
        "synced": sum(_synced(plane.cache, n) for n in plane.registrations),
        "reloads": plane.reloads,
        "rejected_reloads": plane.rejected_reloads,
        "errors": [str(d) for d in plane.last_errors[:3]],
        "nacks": len(plane.cache.nacks),
        "pushes": server.pushes if server is not None else 0,
    }


class Watcher:
    """plane.watch() as a task that can be switched off (for the reload() variants)."""

    def __init__(self, plane: ControlPlane, interval: float) -> None:
        self._plane, self._interval = plane, interval
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._plane.watch(self._stop, self._interval))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stop.set()
            await task


def _reply(message: Json) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class ControlPlaneServer:
    """The child process: CaServer + ControlPlane, driven by JSON lines on stdin.

    Each command is answered by one JSON line on stdout, in order; stderr is for logs.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.config_dir = str(args.config_dir)
        self.ca = CertificateAuthority.load(Path(args.ca_dir))
        self.ca_server = CaServer(self.ca)
        self.plane = ControlPlane(
            [self.config_dir], ca=self.ca, address="127.0.0.1:0", debounce=args.debounce
        )
        self.recorder = Recorder(self.plane)
        self.watcher = Watcher(self.plane, args.interval)

    async def run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await self.ca_server.start()
        try:
            await self.plane.start()
            self.watcher.start()
            _reply(
                {
                    "pid": os.getpid(),
                    "enroll_port": self.ca_server.port,
                    "renew_port": self.ca_server.renewal_port,
                    "xds_port": self.plane.port,
                    "spiffe_id": self.plane.spiffe_id,
                }
            )
            commands = asyncio.create_task(self._commands(stop))
            await stop.wait()
            commands.cancel()
            await asyncio.gather(commands, return_exceptions=True)
        finally:
            await self.watcher.stop()
            await self.plane.stop()
            await self.ca_server.stop()

    async def _commands(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 22)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            request = json.loads(line)
            try:
                _reply(await self._handle(request))
            except Exception as exc:  # reported to the parent, which fails loudly
                logging.exception("command %s failed", request)
                _reply({"error": repr(exc)})
        stop.set()  # stdin closed: the parent is gone

    async def _handle(self, request: Json) -> Json:
        command = request["cmd"]
        if command == "status":
            return status(self.plane)
        if command == "register":
            for index in range(request["lo"], request["hi"]):
                self.plane.register(registration(index))
            return status(self.plane)
        if command == "reload":
            problems = await self.plane.reload()
            return {"problems": [str(p) for p in problems[:3]]}
        if command == "watch":
            if request["on"]:
                self.watcher.start()
            else:
                await self.watcher.stop()
            return {}
        if command == "events":
            return self.recorder.events(self.plane, request["since"])
        if command == "profile":
            return await profile_rebuild(self.plane, self.ca, self.config_dir)
        raise ValueError(f"unknown command {command!r}")


def serve_control_plane(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="control plane: %(levelname)s %(message)s"
    )
    asyncio.run(ControlPlaneServer(args).run())
