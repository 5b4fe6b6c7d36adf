"""A policy change on a fleet of real sidecars and the control plane's memory; prints JSON.

One JSON document on stdout; progress on stderr.

Setup: one namespace ``fleet`` with N workloads ``app-<i>`` (Deployment, ServiceAccount,
Service on port 8000), mesh-wide STRICT mTLS and an AuthorizationPolicy allowing every
path. The control plane (ControlPlane + the CA's CaServer, as istiod holds both) runs in a
child process of its own (``--serve-control-plane``), so its memory is its own. This
process runs, per workload, a WorkloadAgent that enrolls with a bootstrap token, its
SdsServer, and a real Envoy (concurrency 1) started from ``ads_bootstrap`` alone: every
Envoy gets its whole configuration from the control plane over ADS with mTLS.

Measured:

1. Enforcement of one change on every sidecar. The policy file is replaced atomically (a
   DENY of GET for the whole namespace) at t0, and for each sidecar:

   - *probe*: one keep-alive mTLS connection per sidecar (opened before t0, presenting a
     mesh workload certificate); from t0 on a task per connection sends GETs on it until
     one is answered 403 by RBAC. Its time is when that 403 arrived: an upper bound, whose
     slack (``probe_resolution``) is the time from the last request that still got through
     being sent to that 403 arriving. Until then the sidecar answers 503 (no app runs).
     Probing 100 connections back to back saturates 2 cores and slows the control plane
     several fold, so until any probe has seen a 403 (something clients see themselves)
     they ask ``--probe-idle-rate`` times a second all together, then back to back.
   - *published* / *acked*: the control plane's view, timestamped in the child: when this
     proxy's new snapshot was set in the cache, and when its Envoy ACKed the new filter
     configs (ECDS, which carries the policy). The clock is CLOCK_MONOTONIC, shared by
     processes. Publishing is one synchronous pass over every proxy on the event loop, so
     no push starts before the last snapshot is set: published → acked includes the rest.

   Three variants, each with p50 / p99 / max over the sidecars: the file watcher with the
   probes running (end to end), ``reload()`` called right after the write (the watcher's
   poll and debounce left out), and ``reload()`` with no probes (what the probes' own CPU
   use costs). The watcher polls every 20 ms and waits 20 ms for the files to settle by
   default: 4 stat calls per poll cost nothing measurable, and the writes here are atomic
   (the settle wait is kept short, not skipped, so the path measured is the one that runs
   in production); the library's defaults, 0.2 s + 0.05 s, would add up to 250 ms alone.
   The watcher variant's write lands at a random phase of a poll.
2. The control plane's reload itself: file write → reload start (poll + debounce), load +
   compile + translate for every proxy (until the first snapshot is published), publish,
   and the cyclic garbage collector's share; and who used the CPU meanwhile (the control
   plane, this process, the Envoys, the rest of a possibly shared machine). ``--profile``:
   one more rebuild of every proxy's snapshot under cProfile, in the child, at the end.
3. The control plane's VmRSS / VmHWM (/proc/<pid>/status): started with no proxies,
   with N registered, once N Envoys connected and ACKed their config, and after the
   changes. ``--grow-to M`` then adds workloads up to M and repeats one change there
   (150 took 4 minutes on 2 cores: raise ``--time-limit``; 150 Envoys hold ~12 GiB).

Usage: python bench/bench_fleet.py [--proxies 100] [--grow-to 0] [--interval 0.02]
       [--debounce 0.02] [--probe-idle-rate 400] [--probe-gap 0] [--profile] [--time-limit 240]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime as dt
import gc
import json
import logging
import os
import platform
import pstats
import random
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.agent.sds import SdsServer, SecretStore, WorkloadSecret
from trustmesh.agent.workload import AgentConfig, WorkloadAgent
from trustmesh.agent.xds_bootstrap import ads_bootstrap
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.xds.cache import TYPE_CLUSTER, TYPE_ECDS, TYPE_LISTENER, SnapshotCache
from trustmesh.xds.controlplane import ControlPlane, ProxyRegistration

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "fleet"
APP_PORT = 8000
STRICT = (ROOT / "examples/scenarios/12-mesh-strict/config.yaml").read_text()
ALLOW_ALL = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: fleet-policy, namespace: {NAMESPACE}}}
spec:
  action: ALLOW
  rules:
  - to: [{{operation: {{paths: ["/*"]}}}}]
"""
DENY_GET = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: fleet-policy, namespace: {NAMESPACE}}}
spec:
  action: DENY
  rules:
  - to: [{{operation: {{methods: ["GET"]}}}}]
"""
SYNCED_TYPES = (TYPE_LISTENER, TYPE_CLUSTER, TYPE_ECDS)
Json = dict[str, Any]

_started = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the fleet's config


def pod_ip(index: int) -> str:
    """Each pod its own loopback address (Linux routes all of 127/8 to lo)."""
    return f"127.0.{100 + index // 200}.{index % 200 + 1}"


def app_ip(index: int) -> str:
    # Not the pod IP: the inbound cluster would send requests back into the sidecar.
    return f"127.0.{150 + index // 200}.{index % 200 + 1}"


def registration(index: int) -> ProxyRegistration:
    return ProxyRegistration.sidecar(
        f"{NAMESPACE}/app-{index}", pod_ip(index), app_address=app_ip(index)
    )


def workload_docs(lo: int, hi: int) -> str:
    """ServiceAccount, Deployment and Service ``app-<i>`` for ``lo <= i < hi``."""
    docs = []
    for i in range(lo, hi):
        docs.append(
            f"apiVersion: v1\nkind: ServiceAccount\n"
            f"metadata: {{name: app-{i}, namespace: {NAMESPACE}}}\n---\n"
            f"apiVersion: apps/v1\nkind: Deployment\n"
            f"metadata: {{name: app-{i}, namespace: {NAMESPACE}}}\n"
            f"spec:\n  selector:\n    matchLabels: {{app: app-{i}}}\n"
            f"  template:\n    metadata:\n      labels: {{app: app-{i}}}\n"
            f"    spec:\n      serviceAccountName: app-{i}\n"
            f"      containers:\n      - name: app\n"
            f"        ports: [{{containerPort: {APP_PORT}}}]\n"
            f"---\napiVersion: v1\nkind: Service\n"
            f"metadata: {{name: app-{i}, namespace: {NAMESPACE}}}\n"
            f"spec:\n  selector: {{app: app-{i}}}\n"
            f"  ports: [{{name: http, port: {APP_PORT}, targetPort: {APP_PORT}}}]\n---\n"
        )
    return "".join(docs)


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")  # not .yaml: the control plane never reads it
    partial.write_text(text)
    os.replace(partial, path)


@dataclass(frozen=True)
class FleetConfig:
    """The directory the control plane reads; every write lands whole (os.replace)."""

    path: Path

    @classmethod
    def create(cls, path: Path, count: int) -> FleetConfig:
        path.mkdir(parents=True)
        namespaces = (
            f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n"
            "  labels: {istio-injection: enabled}\n---\n"
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: istio-system\n"
        )
        (path / "namespaces.yaml").write_text(namespaces)
        (path / "mtls.yaml").write_text(STRICT)
        config = cls(path)
        config.add_workloads(0, count)
        config.write_policy(ALLOW_ALL)
        return config

    def add_workloads(self, lo: int, hi: int) -> None:
        write_atomically(self.path / f"workloads-{lo:04d}.yaml", workload_docs(lo, hi))

    def write_policy(self, text: str) -> None:
        write_atomically(self.path / "policy.yaml", text)


# ---------------------------------------------------------------------------- child: control plane


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
            self.reloads.append(
                {
                    "start": start,
                    "end": time.monotonic(),
                    "gc_s": self.gc_seconds - gc_before,
                    "gc_total_s": self.gc_seconds,
                    "problems": len(problems),
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


async def profile_rebuild(plane: ControlPlane, ca: CertificateAuthority, config_dir: str) -> Json:
    """Every registered proxy's snapshot built again under cProfile, in this process (the
    live control plane's heap, interpreter and encoding memo).

    A fresh ControlPlane that has loaded the config builds a snapshot synchronously in
    register(): the same translate + snapshot + checks a reload runs per proxy in its
    worker thread, which cProfile (it follows one thread) would not see. The garbage
    collector is off meanwhile: a collection walks the whole heap and its pause would be
    charged to whichever function happened to allocate; the reloads report its share.
    """
    # CPU time, not wall time: the machine may be shared (and the other threads are idle).
    fresh = ControlPlane([config_dir], ca=ca)
    started = time.process_time()
    await fresh.reload()  # no proxies registered: load + validate + compile only
    load_compile = time.process_time() - started
    profiler = cProfile.Profile()
    gc.disable()
    try:
        started = time.process_time()
        profiler.enable()
        for _, registered in sorted(plane.registrations.items()):
            fresh.register(registered)
        profiler.disable()
        elapsed = time.process_time() - started
    finally:
        gc.enable()
    stats = pstats.Stats(profiler, stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(15)
    stats.sort_stats("cumulative").print_stats(15)
    return {
        "proxies": len(plane.registrations),
        "load_compile_cpu_s": round(load_compile, 3),
        # cProfile's own overhead included: compare the entries, not this total
        "translate_all_profiled_no_gc_cpu_s": round(elapsed, 3),
        "top_tottime": _top(stats, 2),
        "top_cumtime": _top(stats, 3),
    }


def _top(stats: pstats.Stats, column: int, count: int = 12) -> list[str]:
    """The ``count`` biggest entries by column 2 (own time) or 3 (cumulative)."""
    # pstats keeps (file, line, name) → (primitive calls, calls, tottime, cumtime, callers).
    entries = stats.stats  # type: ignore[attr-defined]
    rows = sorted(entries.items(), key=lambda item: item[1][column], reverse=True)[:count]
    out = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in rows:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        out.append(f"{name} ({where}) calls={calls} tot={tottime:.3f}s cum={cumtime:.3f}s")
    return out


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


# ---------------------------------------------------------------------------- parent: its handle


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (the peak resident size so far), in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(value.split()[0]) / 1024, 1)  # the kernel reports kB
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used (all its threads), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:  # it has exited
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time every core spent not idle, from /proc/stat (all processes)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


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


class ControlPlaneProcess:
    """The child running the control plane: commands over its stdin/stdout, stopped by PID."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.info: Json = {}
        self._lock = asyncio.Lock()  # one command at a time: answers come back in order

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, config: FleetConfig, ca_dir: Path, interval: float, debounce: float
    ) -> AsyncIterator[ControlPlaneProcess]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve-control-plane",
            f"--config-dir={config.path}",
            f"--ca-dir={ca_dir}",
            f"--interval={interval}",
            f"--debounce={debounce}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 22,  # an events answer for a few hundred proxies is one long line
        )
        child = cls(process)
        try:
            child.info = await child._read(timeout=60)
            yield child
        finally:
            await child.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory(self) -> dict[str, float]:
        return memory_mib(self.pid)

    async def call(self, command: str, timeout: float = 120, **args: Any) -> Json:
        assert self.process.stdin is not None
        async with self._lock:
            self.process.stdin.write(json.dumps({"cmd": command, **args}).encode() + b"\n")
            await self.process.stdin.drain()
            answer = await self._read(timeout)
        if "error" in answer:
            raise RuntimeError(f"control plane: {command}: {answer['error']}")
        return answer

    async def reload(self) -> None:
        """ControlPlane.reload(), called at once; raises if any proxy was left behind."""
        problems = (await self.call("reload"))["problems"]
        if problems:
            raise RuntimeError(f"control plane: reload: {problems}")

    async def _read(self, timeout: float) -> Json:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"control plane exited (status {await self.process.wait()})")
        answer: Json = json.loads(line)
        return answer

    async def wait_synced(self, count: int, reloads: int = 0, timeout: float = 90) -> Json:
        """Until ``count`` proxies are registered and have ACKed their current config, after
        at least ``reloads`` applied reloads."""
        deadline = time.monotonic() + timeout
        while True:
            state = await self.call("status")
            if state["rejected_reloads"] or state["nacks"]:
                raise RuntimeError(f"control plane refused or was refused: {state}")
            done = state["registered"] == state["synced"] == count
            if done and state["reloads"] >= reloads:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"not synced within {timeout}s: {state}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; by PID, this process's own child only."""
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


# ---------------------------------------------------------------------------- parent: sidecars


@dataclass
class Sidecar:
    """One workload's agent (enrolled), its SDS server and, once started, its Envoy."""

    index: int
    workdir: Path
    agent: WorkloadAgent
    sds: SdsServer
    stop: asyncio.Event
    task: asyncio.Task[None]
    envoy: EnvoyProcess | None = None

    @property
    def secret(self) -> WorkloadSecret:
        current = self.agent.store.current()
        assert current is not None
        return current[1]


@dataclass
class Fleet:
    """Agents, SDS servers and Envoys hosted by this process; closed by PID."""

    workdir: Path
    ca: CertificateAuthority
    plane: Json  # what the control plane process reported: ports and SPIFFE ID
    sidecars: list[Sidecar] = field(default_factory=list)
    envoys: list[EnvoyProcess] = field(default_factory=list)  # every one started

    async def add(self, lo: int, hi: int, batch: int) -> Json:
        """Sidecars ``lo..hi-1``: agents enrolled, then Envoys started ``batch`` at a time
        (each ready once it has its first listeners and clusters)."""
        started = time.monotonic()
        new: list[Sidecar] = []
        for first in range(lo, hi, 25):  # enrollments: a few dozen TLS handshakes at a time
            batch_of = range(first, min(first + 25, hi))
            results = await asyncio.gather(
                *(self._agent(i) for i in batch_of), return_exceptions=True
            )
            started_ok = [r for r in results if isinstance(r, Sidecar)]
            new += started_ok
            self.sidecars += started_ok  # kept even if others failed: close() stops them
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        agents = time.monotonic() - started
        for first in range(0, len(new), batch):
            group = new[first : first + batch]
            await asyncio.gather(*(self._envoy(sidecar) for sidecar in group))
            log(f"envoys ready: {lo + first + len(group)}/{hi}")
        return {
            "agents_s": round(agents, 2),
            "envoys_s": round(time.monotonic() - started - agents, 2),
        }

    async def _agent(self, index: int) -> Sidecar:
        identity = SpiffeId(self.ca.config.trust_domain, NAMESPACE, f"app-{index}")
        workdir = self.workdir / f"app-{index}"
        workdir.mkdir()
        now = dt.datetime.now(dt.UTC)
        config = AgentConfig(
            identity=identity,
            ca_address=f"127.0.0.1:{self.plane['enroll_port']}",
            ca_renewal_address=f"127.0.0.1:{self.plane['renew_port']}",
            ca_roots_pem=self.ca.bundle_pem(now),
            token=self.ca.token(NAMESPACE, f"app-{index}", now),
            bundle_refresh_seconds=3600,
        )
        agent = WorkloadAgent(config, SecretStore())
        sds = SdsServer(agent.store, str(workdir / "sds.sock"))
        await sds.start()
        stop = asyncio.Event()
        sidecar = Sidecar(index, workdir, agent, sds, stop, asyncio.create_task(agent.run(stop)))
        try:
            await asyncio.wait_for(agent.ready.wait(), 30)
        except BaseException:
            await self._close_agent(sidecar)
            raise
        return sidecar

    async def _envoy(self, sidecar: Sidecar) -> None:
        bootstrap = ads_bootstrap(
            node_id=registration(sidecar.index).node_id,
            cluster=f"app-{sidecar.index}.{NAMESPACE}",
            sds_socket=sidecar.sds.socket_path,
            xds_address="127.0.0.1",
            xds_port=self.plane["xds_port"],
            control_plane_id=self.plane["spiffe_id"],
        )
        sidecar.envoy = EnvoyProcess(bootstrap, workdir=sidecar.workdir, concurrency=1)
        self.envoys.append(sidecar.envoy)  # before start: close() stops it whatever happens
        await sidecar.envoy.start(timeout=60)

    def envoy_memory_mib(self) -> float:
        """VmRSS of every running Envoy, summed."""
        pids = [e.pid for e in self.envoys if e.pid is not None and e.returncode is None]
        return round(sum(memory_mib(pid).get("VmRSS", 0.0) for pid in pids), 1)

    @staticmethod
    async def _close_agent(sidecar: Sidecar) -> None:
        sidecar.stop.set()
        await asyncio.gather(sidecar.task, return_exceptions=True)
        await sidecar.sds.stop()

    async def close(self) -> None:
        """Every Envoy stopped by its PID (SIGTERM, then SIGKILL), then agents and SDS."""
        await asyncio.gather(*(e.stop() for e in self.envoys), return_exceptions=True)
        await asyncio.gather(*(self._close_agent(s) for s in self.sidecars), return_exceptions=True)


def mesh_client_tls(secret: WorkloadSecret, workdir: Path) -> ssl.SSLContext:
    """A Python TLS client presenting ``secret``, a mesh workload identity."""
    pem = workdir / "probe-client.pem"  # ssl loads a key pair only from a file
    pem.touch(mode=0o600)
    pem.write_bytes(secret.cert_chain_pem + secret.private_key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # mesh certificates carry a SPIFFE URI, no DNS name
    context.load_verify_locations(cadata=secret.trust_bundle_pem.decode())
    context.load_cert_chain(pem)
    return context


# ---------------------------------------------------------------------------- parent: probes


@dataclass(frozen=True)
class Pacing:
    """How fast the probes ask, from ``go`` (the change is made) on.

    100 connections probed back to back saturate 2 cores (Python TLS client + Envoys) and
    slow the control plane they measure several fold. So the probes ask every
    ``idle_gap`` (all together: ``--probe-idle-rate`` requests per second) until any of
    them sees a 403 — a signal clients observe themselves — and from then on every
    ``gap`` (0: back to back), when the change is arriving.
    """

    idle_gap: float
    gap: float
    go: asyncio.Event = field(default_factory=asyncio.Event)
    anyone_denied: asyncio.Event = field(default_factory=asyncio.Event)

    async def pause(self, idle: float | None = None) -> None:
        """Until the next GET: ``idle`` (default ``idle_gap``) or less while nobody has
        seen a 403, ``gap`` after."""
        if not self.anyone_denied.is_set():
            with contextlib.suppress(TimeoutError):
                wait = self.idle_gap if idle is None else idle
                await asyncio.wait_for(self.anyone_denied.wait(), wait)
        elif self.gap:
            await asyncio.sleep(self.gap)


@dataclass(frozen=True)
class Denied:
    """When a probe saw its sidecar enforce the change."""

    received: float  # the first 403 arrived
    last_allowed_sent: float  # the last request that still got through was sent
    requests: int


class Probe:
    """One keep-alive mTLS connection to a sidecar's inbound listener, reused for every
    request: the change must reach connections that are already open."""

    def __init__(self, index: int, tls: ssl.SSLContext) -> None:
        self.index, self.tls = index, tls
        self.reconnects = 0
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._request = f"GET /get HTTP/1.1\r\nHost: app-{index}.{NAMESPACE}:{APP_PORT}\r\n\r\n"

    async def get(self) -> int:
        """One GET; the status. A connection the sidecar closes is opened again (counted)."""
        if self._stream is None:
            self._stream = await asyncio.open_connection(pod_ip(self.index), APP_PORT, ssl=self.tls)
        reader, writer = self._stream
        try:
            writer.write(self._request.encode())
            async with asyncio.timeout(10):
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                status_line, *lines = head.strip().split("\r\n")
                headers = {k.strip(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
                await reader.readexactly(int(headers.get("content-length", "0")))
        except (OSError, asyncio.IncompleteReadError):
            self.close()
            self.reconnects += 1
            raise
        if headers.get("connection") == "close":
            self.close()
            self.reconnects += 1
        return int(status_line.split()[1])

    async def until_denied(self, pacing: Pacing, timeout: float) -> Denied:
        """From ``pacing.go`` on, GET until one is answered 403 (see :class:`Pacing`)."""
        await pacing.go.wait()
        deadline, requests, last_allowed = time.monotonic() + timeout, 0, time.monotonic()
        # Spread over the idle gap: 100 probes firing in step would queue behind each other.
        await pacing.pause(random.uniform(0, pacing.idle_gap))
        while True:
            sent = time.monotonic()
            try:
                code = await self.get()
            except (OSError, asyncio.IncompleteReadError):
                code = 0  # counted in reconnects: that sidecar was not probed on an open one
            requests += 1
            if code == 403:
                pacing.anyone_denied.set()
                return Denied(time.monotonic(), last_allowed, requests)
            last_allowed = sent
            if sent > deadline:
                raise TimeoutError(f"app-{self.index}: no 403 within {timeout}s (last {code})")
            await pacing.pause()

    async def expect_allowed(self, timeout: float = 5) -> None:
        """The state before a change: anything but 403 (503: no app runs behind it)."""
        deadline = time.monotonic() + timeout
        while (code := await self.get()) == 403:
            if time.monotonic() > deadline:
                raise TimeoutError(f"app-{self.index}: still 403 after {timeout}s")
            await asyncio.sleep(0.05)
        if code != 503:
            log(f"app-{self.index}: expected 503 before the change, got {code}")

    def close(self) -> None:
        if self._stream is not None:
            self._stream[1].transport.abort()  # no TLS close_notify wait
            self._stream = None


# ---------------------------------------------------------------------------- parent: rounds


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


# ---------------------------------------------------------------------------- parent: the run


async def measure(args: argparse.Namespace, workdir: Path) -> Json:
    count = args.proxies
    config = FleetConfig.create(workdir / "config", count)
    ca = CertificateAuthority.init(workdir / "ca", CaConfig(), dt.datetime.now(dt.UTC))
    result: Json = {
        "machine": {
            "python": sys.version.split()[0],
            "cpu": platform.machine(),
            "cores": os.cpu_count(),
            # The machine may be shared: other load slows everything measured here.
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "proxies": count,
        "settings": {
            "watch_interval_s": args.interval,
            "watch_debounce_s": args.debounce,
            "probe_idle_rate_per_s": args.probe_idle_rate,
            "probe_gap_s": args.probe_gap,
            "envoy_start_batch": args.batch,
        },
    }
    memory: Json = {}
    log("starting the control plane process")
    async with ControlPlaneProcess.running(
        config, workdir / "ca", args.interval, args.debounce
    ) as plane:
        fleet = Fleet(workdir, ca, plane.info)
        rig = Rig(plane, fleet, config, args)
        try:
            memory["no_proxies"] = plane.memory()
            result["startup"] = await start_fleet(rig, 0, count, memory)
            result[f"policy_change_{count}"] = await change_rounds(rig)
            memory[f"after_changes_{count}"] = plane.memory()
            if args.grow_to > count:
                result["growth"] = await grow(rig, count, args.grow_to, memory)
            result["control_plane_memory_mib"] = memory
            if args.profile:
                log("profiling a rebuild of every proxy's snapshot in the control plane")
                result["profile"] = await plane.call("profile", timeout=180)
        finally:
            for probe in rig.probes:
                probe.close()
            log(f"stopping {len(fleet.envoys)} envoys and {len(fleet.sidecars)} agents")
            await fleet.close()
    return result


async def start_fleet(rig: Rig, lo: int, hi: int, memory: Json) -> Json:
    """Register ``lo..hi-1`` with the control plane, start their sidecars, open probes."""
    log(f"registering proxies {lo}..{hi - 1} (one snapshot each)")
    started = time.monotonic()
    await rig.plane.call("register", lo=lo, hi=hi, timeout=300)
    timings: Json = {"register_s": round(time.monotonic() - started, 2)}
    memory[f"registered_{hi}"] = rig.plane.memory()
    log(f"starting {hi - lo} agents and envoys")
    timings |= await rig.fleet.add(lo, hi, rig.args.batch)
    started = time.monotonic()
    await rig.plane.wait_synced(hi)
    timings["synced_after_s"] = round(time.monotonic() - started, 2)
    memory[f"connected_{hi}"] = rig.plane.memory()
    memory[f"envoys_rss_total_{hi}"] = rig.fleet.envoy_memory_mib()
    await open_probes(rig, lo, hi)
    return timings


async def change_rounds(rig: Rig) -> Json:
    rounds: Json = {}
    log("change 1: file watcher, probes on")
    rounds["watch_with_probes"] = await rig.deny_get(via_watch=True, probing=True)
    await rig.allow_all()
    log("change 2: reload() right after the write, probes on")
    rounds["reload_with_probes"] = await rig.deny_get(via_watch=False, probing=True)
    await rig.allow_all()
    log("change 3: reload() right after the write, no probes (control plane's view only)")
    rounds["reload_acks_only"] = await rig.deny_get(via_watch=False, probing=False)
    return rounds


async def grow(rig: Rig, lo: int, hi: int, memory: Json) -> Json:
    """More workloads (every proxy gets their clusters), their sidecars, one more change."""
    log(f"growing the mesh to {hi} workloads")
    await rig.watch(False)
    started = time.monotonic()

    def add_workloads() -> None:
        rig.config.add_workloads(lo, hi)
        rig.config.write_policy(ALLOW_ALL)

    await rig.apply(add_workloads)
    growth: Json = {"proxies": hi, "reload_new_workloads_s": round(time.monotonic() - started, 2)}
    growth["startup"] = await start_fleet(rig, lo, hi, memory)
    log(f"change at {hi}: reload() right after the write, probes on")
    growth["reload_with_probes"] = await rig.deny_get(via_watch=False, probing=True)
    memory[f"after_changes_{hi}"] = rig.plane.memory()
    return growth


async def run(args: argparse.Namespace) -> Json:
    # SIGTERM like Ctrl-C (which asyncio.run already turns into a cancellation): the
    # finally blocks stop every Envoy and the control plane before this process exits.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="fleet-", dir=args.workdir))  # short: socket paths
    started = time.monotonic()
    try:
        async with asyncio.timeout(args.time_limit):
            result = await measure(args, workdir)
        result["runtime_s"] = round(time.monotonic() - started, 1)
        return result
    finally:
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxies", type=int, default=100)
    parser.add_argument("--grow-to", type=int, default=0, help="then grow the mesh to this many")
    parser.add_argument("--interval", type=float, default=0.02, help="watcher poll, seconds")
    parser.add_argument("--debounce", type=float, default=0.02, help="watcher settle, seconds")
    parser.add_argument(
        "--probe-idle-rate", type=float, default=400, help="all probes' GETs/s until a 403"
    )
    parser.add_argument("--probe-gap", type=float, default=0.0, help="probe pause after it")
    parser.add_argument("--batch", type=int, default=10, help="Envoys started at once")
    parser.add_argument("--profile", action="store_true", help="cProfile one full rebuild")
    parser.add_argument("--time-limit", type=float, default=240, help="bound on the whole run")
    parser.add_argument("--workdir", default="/tmp", help="parent of the scratch directory")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    # The child process's entry point: the control plane, in a process of its own.
    parser.add_argument("--serve-control-plane", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config-dir", help=argparse.SUPPRESS)
    parser.add_argument("--ca-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_control_plane:
        serve_control_plane(args)
        return
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        result = asyncio.run(run(args))
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise SystemExit("interrupted; everything it started is stopped") from None
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
