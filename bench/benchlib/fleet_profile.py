"""One rebuild of every registered proxy's snapshot under cProfile, inside the fleet
benchmark's control-plane process, and the top entries of that profile."""

from __future__ import annotations

import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path

from benchlib.fleet_config import Json
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.xds.controlplane import ControlPlane


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
