"""The fleet benchmark's measured changes: the rig they act on (control plane, config,
sidecars, probes), one change made and followed until every sidecar enforces it, and its
summary: percentiles over the sidecars and who used the CPU meanwhile."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from benchlib.fleet_config import ALLOW_ALL, DENY_GET, FleetConfig, Json
from benchlib.fleet_control import ControlPlaneProcess
from benchlib.fleet_probes import Denied, Pacing, Probe
from benchlib.fleet_sidecars import Fleet, mesh_client_tls
from benchlib.procstat import cpu_seconds, machine_busy_seconds
from trustmesh.agent.envoy import EnvoyProcess


@dataclass(frozen=True)
class CpuSample:
    wall: float
    control_plane: float
    this_process: float  # the probes' client side, the agents and SDS servers
    envoys: float
    machine: float

    @classmethod
    def take(cls, plane_pid: int, envoys: Sequence[EnvoyProcess]) -> CpuSample:
        pids = [e.pid for e in envoys if e.pid is not None and e.returncode is None]
        return cls(
            time.monotonic(),
            cpu_seconds(plane_pid),
            cpu_seconds(os.getpid()),
            sum(cpu_seconds(pid) for pid in pids),
            machine_busy_seconds(),
        )

    def until(self, later: CpuSample) -> Json:
        """Who ran while the change propagated (2 cores: at most 2 CPU-s per second)."""
        mine = later.control_plane + later.this_process + later.envoys
        mine -= self.control_plane + self.this_process + self.envoys
        return {
            "wall_s": round(later.wall - self.wall, 2),
            "control_plane_s": round(later.control_plane - self.control_plane, 2),
            "probes_and_agents_s": round(later.this_process - self.this_process, 2),
            "envoys_s": round(later.envoys - self.envoys, 2),
            # Other processes on a shared machine: they slow everything measured here.
            "rest_of_machine_s": round(max(0.0, later.machine - self.machine - mine), 2),
        }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def percentiles(seconds: Sequence[float]) -> Json:
    """p50 / p99 (nearest rank) / max in ms over one sample per sidecar."""
    ordered = sorted(seconds)
    if not ordered:
        return {"n": 0}
    p99 = ordered[max(0, -(-len(ordered) * 99 // 100) - 1)]
    middle = len(ordered) // 2
    p50 = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"n": len(ordered), "p50_ms": _ms(p50), "p99_ms": _ms(p99), "max_ms": _ms(ordered[-1])}


@dataclass
class Rig:
    """What the rounds act on: the control plane, its config and a probe per sidecar."""

    plane: ControlPlaneProcess
    fleet: Fleet
    config: FleetConfig
    args: argparse.Namespace
    probes: list[Probe] = field(default_factory=list)
    watching: bool = True  # the child starts its watcher
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    @property
    def count(self) -> int:
        return len(self.probes)

    async def watch(self, on: bool) -> None:
        if on != self.watching:
            await self.plane.call("watch", on=on)
            self.watching = on

    async def apply(self, change: Callable[[], None]) -> None:
        """Make a change and wait until every proxy ACKed the config it leads to."""
        before = await self.plane.call("status")
        change()
        if not self.watching:
            await self.plane.reload()
        await self.plane.wait_synced(self.count, reloads=before["reloads"] + 1)

    async def allow_all(self) -> None:
        await self.apply(lambda: self.config.write_policy(ALLOW_ALL))
        await gather_in_batches(p.expect_allowed() for p in self.probes)

    async def deny_get(self, *, via_watch: bool, probing: bool) -> Json:
        """The measured change: DENY GET namespace-wide, replacing the policy file at t0."""
        await self.watch(via_watch)
        before = await self.plane.call("status")
        cpu_before = CpuSample.take(self.plane.pid, self.fleet.envoys)
        probes = self.probes if probing else []
        pacing = Pacing(len(probes) / self.args.probe_idle_rate, self.args.probe_gap)
        tasks = [asyncio.create_task(p.until_denied(pacing, 60)) for p in probes]
        try:
            if via_watch:
                # Anywhere in the watcher's poll cycle, as a real edit lands.
                await asyncio.sleep(self.rng.uniform(0, self.args.interval))
            t0 = time.monotonic()
            self.config.write_policy(DENY_GET)
            pacing.go.set()
            if not via_watch:
                await self.plane.reload()
            after = await self.plane.wait_synced(self.count, reloads=before["reloads"] + 1)
            denied = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        cpu = cpu_before.until(CpuSample.take(self.plane.pid, self.fleet.envoys))
        events = await self.plane.call("events", since=t0)
        summary = summarize(t0, events, denied, after["pushes"] - before["pushes"])
        summary["cpu_until_synced"] = cpu
        if probing:
            summary["probe_reconnects"] = sum(p.reconnects for p in probes)
        return summary


async def gather_in_batches(work: Iterable[Awaitable[None]], size: int = 25) -> None:
    """A few dozen at a time: 2 cores serve 100 TLS handshakes at once slowly."""
    pending = list(work)
    for first in range(0, len(pending), size):
        await asyncio.gather(*pending[first : first + size])


def summarize(t0: float, events: Json, denied: Sequence[Denied], pushes: int) -> Json:
    """One change, as the control plane saw it and (with probes) as clients saw it."""
    reload = events["reloads"][0]
    nodes = list(events["nodes"].values())
    published = [n["published"] for n in nodes if n["published"] is not None]
    acked = [n["acked"] for n in nodes if n["acked"] is not None]
    gc_at_acks = [n["acked_gc_total_s"] for n in nodes if n["acked"] is not None]
    types: dict[str, int] = {}
    for node in nodes:
        for type_name in node["types"]:
            types[type_name] = types.get(type_name, 0) + 1
    summary: Json = {
        "write_to_reload_start_ms": _ms(reload["start"] - t0),
        # load + validate + compile + translate every proxy (in a worker thread), until
        # the first new snapshot is published
        "reload_build_ms": _ms(min(published) - reload["start"]) if published else None,
        "reload_publish_ms": _ms(max(published) - min(published)) if published else None,
        "reload_total_ms": _ms(reload["end"] - reload["start"]),
        "reload_gc_ms": _ms(reload["gc_s"]),
        "rebuild": reload.get("rebuild"),
        # From the reload's end until the last proxy ACKed (the pushes, the ACKs).
        "gc_ms_after_reload": _ms(max(gc_at_acks) - reload["gc_total_s"]) if gc_at_acks else None,
        "reloads": len(events["reloads"]),
        "write_to_published": percentiles([p - t0 for p in published]),
        "write_to_acked": percentiles([a - t0 for a in acked]),
        "published_to_acked": percentiles(
            [n["acked"] - n["published"] for n in nodes if n["acked"] and n["published"]]
        ),
        "xds_responses": pushes,
        "types_acked": types,
    }
    if denied:
        summary["write_to_probe_403"] = percentiles([d.received - t0 for d in denied])
        # How far the 403 can lag the enforcement it reports: at most this long.
        summary["probe_resolution"] = percentiles(
            [d.received - max(d.last_allowed_sent, t0) for d in denied]
        )
        summary["probe_requests"] = sum(d.requests for d in denied)
    return summary


async def open_probes(rig: Rig, lo: int, hi: int) -> None:
    # Any mesh identity will do: ALLOW /* and the namespace-wide DENY name no principal.
    tls = mesh_client_tls(rig.fleet.sidecars[0].secret, rig.fleet.workdir)
    probes = [Probe(i, tls) for i in range(lo, hi)]
    await gather_in_batches(p.expect_allowed() for p in probes)
    rig.probes += probes
