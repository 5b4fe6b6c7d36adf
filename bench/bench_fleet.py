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

The code is in bench/benchlib/: ``fleet_config`` (the mesh's files),
``fleet_control_server`` / ``fleet_control`` (the child process and the parent's handle),
``fleet_sidecars`` (agents + Envoys), ``fleet_probes``, ``fleet_rounds`` (the changes).

Usage: python bench/bench_fleet.py [--proxies 100] [--grow-to 0] [--interval 0.02]
       [--debounce 0.02] [--probe-idle-rate 400] [--probe-gap 0] [--profile] [--time-limit 240]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchlib.fleet_config import ALLOW_ALL, FleetConfig, Json
from benchlib.fleet_control import ControlPlaneProcess
from benchlib.fleet_control_server import serve_control_plane
from benchlib.fleet_rounds import Rig, open_probes
from benchlib.fleet_sidecars import Fleet
from benchlib.procstat import machine
from benchlib.progress import log
from trustmesh.identity.ca import CaConfig, CertificateAuthority


async def measure(args: argparse.Namespace, workdir: Path) -> Json:
    count = args.proxies
    config = FleetConfig.create(workdir / "config", count)
    ca = CertificateAuthority.init(workdir / "ca", CaConfig(), dt.datetime.now(dt.UTC))
    result: Json = {
        "machine": {
            **machine(),
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
        Path(__file__), config, workdir / "ca", args.interval, args.debounce
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
