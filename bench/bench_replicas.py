"""`trustmesh apply` through etcd → enforced at a sidecar of another replica; prints JSON.

Setup (the must-show 4 test's rig, tests/store/replica_rig.py): one etcd member, control-
plane replicas A and B as processes (`trustmesh control-plane --store etcd://…`), the
example mesh's workloads and STRICT mTLS in the store, httpbin registered on host-1, its
app and a real Envoy (concurrency 1) whose xDS comes from B; sleep's certificate from A's CA.

Each round applies one AuthorizationPolicy alternately denying GET and denying PUT (the
same object, `configured`), exactly as `trustmesh apply` does after validating its input
(read each object, one etcd transaction), and then sends GETs back to back on one
keep-alive mTLS connection to the sidecar until the answer flips (403, then 200 again).

Measured, side by side over the rounds (p50 / p99 / max, ms):

- ``commit``: the apply itself (reads + transaction) — what the writer waits for;
- ``apply_to_enforced``: from the start of the apply to the first answer showing the new
  policy: etcd watch → B writes its mirror → validate + compile + translate → ADS push
  (ECDS) → Envoy ACK → the next request. An upper bound, by the probe's resolution
  (``probe_gap`` = the time one request takes);
- ``after_commit``: the same minus ``commit``: the replica's and Envoy's share.

Usage: python bench/bench_replicas.py [--applies 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the rig is the must-show test's: one setup, not two

from tests.store.replica_rig import sidecar_on_replica_b  # noqa: E402
from tests.xds.controlplane_rig import DENY_GET  # noqa: E402
from tests.xds.controlplane_traffic import Connection  # noqa: E402

from benchlib.progress import log  # noqa: E402
from trustmesh.config import load_config  # noqa: E402
from trustmesh.store.apply import apply_resources  # noqa: E402
from trustmesh.store.etcd_server import EtcdCluster  # noqa: E402

TARGET_P99_MS = 200.0
ALLOW_GET = DENY_GET.replace('methods: ["GET"]', 'methods: ["PUT"]')


def summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    p99 = statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else ms[0]
    return {
        "p50": round(statistics.median(ms), 1),
        "p99": round(p99, 1),
        "max": round(ms[-1], 1),
    }


def resources_of(text: str, workdir: Path, name: str) -> Any:
    path = workdir / f"{name}.yaml"
    path.write_text(text)
    loaded = load_config([str(path)], compile_policy=False)
    assert not loaded.errors, loaded.errors
    return loaded.snapshot.resources


async def measure(applies: int, workdir: Path) -> dict[str, Any]:
    etcd = EtcdCluster(workdir / "etcd", size=1)
    etcd.start()
    try:
        log(f"etcd {'.'.join(map(str, etcd.version))} at {etcd.url}; starting replicas A and B")
        async with sidecar_on_replica_b(etcd, workdir) as rig:
            log(f"httpbin's Envoy ready on replica B (xDS port {rig.b.xds_port})")
            rounds = {
                200: resources_of(ALLOW_GET, workdir, "allow-get"),
                403: resources_of(DENY_GET, workdir, "deny-get"),
            }
            connection = await Connection.open(rig.inbound, rig.sleep_tls)
            commits: list[float] = []
            enforced: list[float] = []
            gaps: list[float] = []
            try:
                for i in range(applies + 1):  # round 0 creates the object: not counted
                    status = 403 if i % 2 == 0 else 200
                    started = time.perf_counter()
                    await apply_resources(rig.store, rounds[status])
                    committed = time.perf_counter()
                    while True:
                        sent = time.perf_counter()
                        got, _ = await connection.request()
                        if got == status:
                            break
                        if time.perf_counter() - started > 10:
                            raise AssertionError(f"round {i}: still {got}, wanted {status}")
                    done = time.perf_counter()
                    if i == 0:
                        continue
                    commits.append(committed - started)
                    enforced.append(done - started)
                    gaps.append(done - sent)
                    if i % 10 == 0:
                        log(f"{i}/{applies}: last {enforced[-1] * 1000:.0f} ms")
            finally:
                connection.close()
    finally:
        etcd.stop()
    result = {
        "benchmark": "replicas: trustmesh apply via etcd -> enforced at a sidecar of replica B",
        "applies": applies,
        "replicas": 2,
        "etcd": ".".join(map(str, etcd.version)),
        "cpus": os.cpu_count(),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),  # a shared machine says so
        "commit_ms": summary(commits),
        "apply_to_enforced_ms": summary(enforced),
        "after_commit_ms": summary([e - c for e, c in zip(enforced, commits, strict=True)]),
        "probe_gap_ms": summary(gaps),
        "target_p99_ms": TARGET_P99_MS,
    }
    result["target_met"] = result["apply_to_enforced_ms"]["p99"] <= TARGET_P99_MS
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--applies", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as workdir:
        result = asyncio.run(measure(args.applies, Path(workdir)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
