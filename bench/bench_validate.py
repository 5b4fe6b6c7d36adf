"""`trustmesh validate` on one large file; prints one JSON document.

The input is generated deterministically: 30,000 AuthorizationPolicies (≈ 10 MB) in block
style as `kubectl get -o yaml` writes them, spread over 300 namespaces, with selectors,
principals, paths, methods and `when` conditions. Each run is a fresh
`trustmesh validate -f FILE -o json` process, so the wall time and the peak RSS (from the
kernel's rusage of that child) are what a user sees, imports included. Target: ≤ 3 s and
≤ 300 MB.

Usage: python bench/bench_validate.py [--policies 30000] [--runs 3]
           [--compare OTHER_TRUSTMESH]   # e.g. a main checkout's .venv/bin/trustmesh
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_METHODS = ("GET", "POST", "PUT", "DELETE")


def policy(i: int) -> str:
    """One AuthorizationPolicy, about 340 bytes, varied by ``i``; every other one has a
    ``when`` condition."""
    ns = f"team{i % 300}"
    app = f"svc{i % 97}"
    peer = f"svc{(i * 7) % 97}"
    action = "DENY" if i % 5 == 0 else "ALLOW"
    return (
        "apiVersion: security.istio.io/v1\n"
        "kind: AuthorizationPolicy\n"
        "metadata:\n"
        f"  name: policy-{i}\n"
        f"  namespace: {ns}\n"
        "spec:\n"
        f"  selector: {{matchLabels: {{app: {app}}}}}\n"
        f"  action: {action}\n"
        "  rules:\n"
        "  - from:\n"
        "    - source:\n"
        f"        principals: [cluster.local/ns/{ns}/sa/{peer}]\n"
        "    to:\n"
        "    - operation:\n"
        f"        methods: [{_METHODS[i % 4]}]\n"
        f'        paths: ["/api/{app}/*"]\n'
    ) + ('    when: [{key: "request.headers[x-tenant]", values: [t1]}]\n' if i % 2 else "")


def generate(count: int) -> str:
    return "---\n".join(policy(i) for i in range(count))


def measure(command: list[str], path: Path) -> dict[str, Any]:
    """Run ``command validate -f path -o json`` once: seconds, peak RSS, exit status."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [*command, "validate", "-f", str(path), "-o", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    valid = json.loads(output)["valid"] if output.strip().startswith(b"{") else None
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "exit_code": process.returncode,
        "valid": valid,
    }


def best_of(command: list[str], path: Path, runs: int, documents: int) -> dict[str, object]:
    results = [measure(command, path) for _ in range(runs)]
    best = min(results, key=lambda r: r["seconds"])
    return {
        "seconds": best["seconds"],
        "cpu_seconds": best["cpu_seconds"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "documents_per_second": round(documents / best["seconds"]),
        "valid": best["valid"],
        "runs": [r["seconds"] for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compare", help="another trustmesh executable to measure too")
    args = parser.parse_args()
    here = shutil.which("trustmesh", path=str(Path(sys.executable).parent))
    command = [here] if here else [sys.executable, "-m", "trustmesh"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policies.yaml"
        path.write_text(generate(args.policies))
        report: dict[str, object] = {
            "benchmark": "validate",
            "documents": args.policies,
            "bytes": path.stat().st_size,
            "trustmesh": best_of(command, path, args.runs, args.policies),
        }
        if args.compare:
            report["compare"] = {
                "command": args.compare,
                **best_of([args.compare], path, args.runs, args.policies),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
