"""`trustmesh impact` on 1,000,000 synthetic records; prints one JSON document.

The mesh: 20 namespaces × 10 Deployments (one service account each), one ALLOW policy per
workload naming two callers' principals with GET/POST on `/api/*`. The change: every
fifth policy loses its POST. The records: 1,000,000 JSON lines in the `traffic export`
schema, 20,000 distinct requests (source, destination, method, path with ids) repeated at
different times, as a day of sidecar logs is. Each run is a fresh
`trustmesh impact --traffic FILE -f CURRENT --change NEW -o json` process, so the wall
time and the peak RSS (the kernel's rusage of that child) are what a user sees, imports
included. Target: ≤ 30 s.

Usage: python bench/bench_impact.py [--records 1000000] [--distinct 20000] [--runs 1]
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

import orjson

NAMESPACES, APPS = 20, 10
METHODS = ("GET", "POST")


def workloads() -> list[tuple[str, str]]:
    return [(f"ns{n}", f"app{a}") for n in range(NAMESPACES) for a in range(APPS)]


def config() -> str:
    docs = []
    for ns, app in workloads():
        docs.append(
            f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels:"
            " {istio-injection: enabled}}\n"
            if app == "app0"
            else ""
        )
        docs.append(
            "apiVersion: apps/v1\nkind: Deployment\n"
            f"metadata: {{name: {app}, namespace: {ns}}}\n"
            "spec:\n"
            f"  selector: {{matchLabels: {{app: {app}}}}}\n"
            "  template:\n"
            f"    metadata: {{labels: {{app: {app}}}}}\n"
            f"    spec:\n      serviceAccountName: {app}\n"
            "      containers: [{name: app, image: app, ports: [{containerPort: 8080}]}]\n"
        )
    return "---\n".join(d for d in docs if d)


def policy(ns: str, app: str, methods: tuple[str, ...]) -> str:
    callers = [f"cluster.local/ns/{ns}/sa/app{(int(app[3:]) + k) % APPS}" for k in (1, 2)]
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: allow-{app}, namespace: {ns}}}\n"
        "spec:\n"
        f"  selector: {{matchLabels: {{app: {app}}}}}\n"
        "  rules:\n"
        f"  - from: [{{source: {{principals: [{', '.join(callers)}]}}}}]\n"
        f"    to: [{{operation: {{methods: [{', '.join(methods)}], paths: ['/api/*']}}}}]\n"
    )


def policies(changed: bool) -> str:
    out = []
    for i, (ns, app) in enumerate(workloads()):
        methods = ("GET",) if changed and i % 5 == 0 else METHODS
        out.append(policy(ns, app, methods))
    return "---\n".join(out)


def write_records(path: Path, records: int, distinct: int) -> None:
    keys = []
    pairs = workloads()
    for k in range(distinct):
        ns, app = pairs[k % len(pairs)]
        caller = f"app{(int(app[3:]) + 1 + k % 3) % APPS}"
        keys.append(
            {
                "schema": "trustmesh.dev/traffic/v1",
                "mtls": True,
                "source_principal": f"cluster.local/ns/{ns}/sa/{caller}",
                "source_workload": f"{ns}/{caller}",
                "source_ip": f"10.{k % 200}.0.{1 + k % 250}",
                "destination": f"{ns}/{app}",
                "port": 8080,
                "protocol": "http",
                "method": METHODS[k % 2],
                "path": f"/api/items/{k}",
                "host": f"{app}.{ns}:8080",
                "response_code": 200,
                "request_principal": None,
                "verdict": "allow",
                "rule": None,
            }
        )
    with path.open("wb") as handle:
        for i in range(records):
            record = dict(keys[i % distinct])
            record["time"] = (
                f"2026-12-06T05:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}Z"
            )
            record["origin"] = f"pods/{record['destination'].replace('/', '_')}/envoy.log:{i}"
            handle.write(orjson.dumps(record) + b"\n")


def run(trustmesh: str, records: Path, current: Path, change: Path) -> dict[str, object]:
    started = time.perf_counter()
    before = os.wait4  # rusage of the child alone
    child = subprocess.Popen(
        [trustmesh, "impact", "--traffic", str(records), "-f", str(current),
         "--change", str(change), "-o", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stderr is not None
    out = child.stdout.read()
    err = child.stderr.read()
    _, status, usage = before(child.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"impact failed ({code}): {err.decode()}")
    report = json.loads(out)
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "exit_code": code,
        "flipped_requests": report["flipped_requests"],
        "flipped_records": report["flipped_records"],
        "distinct_requests": report["distinct_requests"],
        "records": report["records"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    trustmesh = shutil.which("trustmesh", path=str(Path(sys.executable).parent)) or "trustmesh"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        current, change = root / "current", root / "change"
        current.mkdir()
        change.mkdir()
        (current / "workloads.yaml").write_text(config())
        (current / "policies.yaml").write_text(policies(changed=False))
        (change / "policies.yaml").write_text(policies(changed=True))
        records = root / "traffic.jsonl"
        started = time.perf_counter()
        write_records(records, args.records, args.distinct)
        written = time.perf_counter() - started
        runs = [run(trustmesh, records, current, change) for _ in range(args.runs)]
        best = min(runs, key=lambda r: float(str(r["wall_s"])))
        result = {
            "benchmark": "impact",
            "records": args.records,
            "distinct_keys": args.distinct,
            "file_mb": round(records.stat().st_size / 1e6, 1),
            "generate_s": round(written, 1),
            "wall_s": best["wall_s"],
            "records_per_s": round(args.records / float(str(best["wall_s"]))),
            "peak_rss_mb": best["peak_rss_mb"],
            "flipped_requests": best["flipped_requests"],
            "flipped_records": best["flipped_records"],
            "target_s": 30,
            "runs": runs,
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
