"""How long the command line takes to start, per command; prints one JSON document.

A mesh runs ``trustmesh`` many times (``up`` -d, ``status``, ``request``, ``down``, every
replica and host of ``up --hosts``), and a user waits for each. Each command below runs
``--runs`` times in a fresh interpreter (``python -m trustmesh``); the median wall time and
the median CPU time (user + system of the child) are reported. ``--src DIR`` (repeatable)
runs the same commands from other checkouts' ``src`` in the same run, alternating, so
revisions compare side by side (e.g. ``--src /tmp/before/src --src src``).

Usage: python bench/bench_cli_start.py [--runs 7] [--src DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(scratch: Path) -> dict[str, list[str]]:
    missing = str(scratch / "no-mesh")
    mesh = str(ROOT / "examples" / "mesh")
    check = ["--from", "foo/sleep", "--to", "foo/httpbin", "--port", "8000"]
    return {
        "version": ["version"],
        "down (no mesh)": ["down", "--state", missing],
        "status (no mesh)": ["status", "--state", missing],
        "validate examples/mesh": ["validate", "-f", mesh],
        "authz check": ["authz", "check", "-f", mesh, *check],
    }


def _once(args: list[str], src: str | None) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "trustmesh", *args],
        capture_output=True,
        check=False,
        timeout=120,
        env={**os.environ, "NO_COLOR": "1", **({"PYTHONPATH": src} if src else {})},
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--src", action="append", default=[], help="a checkout's src dir")
    args = parser.parse_args()
    sources: list[str | None] = list(args.src) or [None]
    results: dict[str, dict[str, dict[str, float]]] = {str(s or "installed"): {} for s in sources}
    with tempfile.TemporaryDirectory() as scratch:
        for name, argv in _commands(Path(scratch)).items():
            runs: dict[str | None, list[tuple[float, float, int]]] = {s: [] for s in sources}
            for _ in range(args.runs):  # alternating, so the machine's drift hits all alike
                for src in sources:
                    runs[src].append(_once(argv, src))
            for src, samples in runs.items():
                results[str(src or "installed")][name] = {
                    "wall_ms": round(statistics.median(w for w, _, _ in samples) * 1000, 1),
                    "cpu_ms": round(statistics.median(c for _, c, _ in samples) * 1000, 1),
                    # the answer each run gave (0 ok; 1 no mesh for down/status; 3 denied)
                    "exit_code": max(code for _, _, code in samples),
                }
    print(json.dumps({"runs": args.runs, "commands": results}, indent=2))


if __name__ == "__main__":
    main()
