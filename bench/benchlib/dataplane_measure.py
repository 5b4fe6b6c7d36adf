"""Measuring the data-plane benchmark's paths: one run of a path (the load generator's
numbers, and the CPU each process spent per request), medians over rounds, and one path
against another (ratios from the medians and round by round)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchlib.loadgen import Job, LoadGenerator, TlsClient
from benchlib.procstat import cpu_seconds, machine_busy_seconds

TARGETS = {"throughput_ratio_min": 0.95, "p50_increase_max": 0.10}


@dataclass(frozen=True, slots=True)
class LoadPath:
    """One measured path: where the load goes and which processes serve it."""

    name: str
    host: str
    port: int
    request: bytes
    roles: dict[str, int]  # role → Envoy PID, for CPU accounting
    netns: str | None = None  # the client pod's network namespace (sandboxed paths)
    tls: TlsClient | None = None  # HTTPS to the path's first hop (gateway paths)


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def measure(path: LoadPath, load: LoadGenerator, args: argparse.Namespace) -> dict[str, Any]:
    """One run of ``path``: the generator's numbers and CPU per request of each process."""
    start_at = time.monotonic() + 0.2
    job = Job(
        path.host,
        path.port,
        path.request,
        args.connections,
        start_at,
        args.warmup,
        args.duration,
        max_requests=args.max_requests,
        netns=path.netns,
        tls=path.tls,
    )
    running = asyncio.create_task(asyncio.to_thread(load.run, job))
    roles = {**path.roles, "generator": 0}

    def cpu() -> dict[str, float]:
        out = {role: cpu_seconds(pid) for role, pid in path.roles.items()}
        out["generator"] = sum(cpu_seconds(pid) for pid in load.pids)
        out["machine"] = machine_busy_seconds()
        return out

    # CPU is sampled in this process at the window's edges, while the workers measure.
    await sleep_until(start_at + args.warmup)
    before = cpu()
    await sleep_until(start_at + args.warmup + args.duration)
    after = cpu()
    result = await running
    per_request = {
        # CPU microseconds per request; the generator's too, since it shares the cores.
        role: round((after[role] - before[role]) / max(result.completed, 1) * 1e6, 1)
        for role in roles
    }
    busy = {role: (after[role] - before[role]) / args.duration for role in roles}
    # Cores busy with anything but this path's processes: another job on the machine
    # makes a run slower for reasons that have nothing to do with the path.
    others = (after["machine"] - before["machine"]) / args.duration - sum(busy.values())
    return {
        **result.as_json(),
        "cpu_us_per_request": per_request,
        "cpu_cores_busy": {role: round(value, 2) for role, value in busy.items()},
        "other_cores_busy": round(others, 2),
    }


def summarize(rounds: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per path, the median over rounds of each number."""
    out: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        out[name] = {
            key: round(statistics.median(run[key] for run in runs), 3)
            for key in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms")
        }
        out[name]["errors"] = sum(run["errors"] for run in runs)
        out[name]["cpu_us_per_request"] = {
            role: round(statistics.median(run["cpu_us_per_request"][role] for run in runs), 1)
            for role in runs[0]["cpu_us_per_request"]
        }
    return out


def compare(
    rounds: Sequence[dict[str, dict[str, Any]]],
    medians: dict[str, dict[str, Any]],
    path: str,
    baseline: str,
) -> dict[str, Any]:
    """``path`` against ``baseline``: from the medians, and round by round (paired runs)."""
    ours, theirs = medians[path], medians[baseline]

    def sidecars(cpu: dict[str, float]) -> float:
        return cpu["client"] + cpu["server"]

    throughput = ours["requests_per_s"] / theirs["requests_per_s"]
    per_round_throughput = [
        round(r[path]["requests_per_s"] / r[baseline]["requests_per_s"], 3) for r in rounds
    ]
    per_round_p50 = [round(r[path]["p50_ms"] / r[baseline]["p50_ms"] - 1, 3) for r in rounds]
    p50 = ours["p50_ms"] / theirs["p50_ms"] - 1
    return {
        "throughput_ratio": round(throughput, 3),
        "p50_change": round(p50, 3),
        "p99_change": round(ours["p99_ms"] / theirs["p99_ms"] - 1, 3),
        "sidecar_cpu_ratio": round(
            sidecars(ours["cpu_us_per_request"]) / sidecars(theirs["cpu_us_per_request"]), 3
        ),
        "throughput_ratio_per_round": per_round_throughput,
        "p50_change_per_round": per_round_p50,
        # Paired: each round's two runs met the same background load.
        "throughput_ratio_median_of_rounds": round(statistics.median(per_round_throughput), 3),
        "p50_change_median_of_rounds": round(statistics.median(per_round_p50), 3),
        "meets_targets": throughput >= TARGETS["throughput_ratio_min"]
        and p50 <= TARGETS["p50_increase_max"],
    }
