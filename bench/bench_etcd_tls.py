"""etcd write latency with TLS and client certificates vs plaintext; prints JSON.

Two 3-member etcd clusters on loopback, started side by side in one run (the same
binary, flags and machine load): ``tls`` as ``trustmesh up --hosts`` runs it (TLS for
clients and peers, ``--client-cert-auth``, the operator's certificate) and ``plain``
(no TLS, no authentication: what ``up --hosts`` ran before issue 11's fix). For each,
one client (one gRPC channel over the three members, as the replicas use) and:

- ``put``: sequential single-key puts (each one raft round across the three members);
- ``txn``: sequential compare-and-put transactions (what ``apply`` and the CA's token
  burn commit);
- ``connect``: a new client's first read (channel + TLS handshake with a certificate).

p50 / p99 / max in ms. Rounds alternate between the clusters so drift in the machine's
load hits both alike.

Usage: python bench/bench_etcd_tls.py [--writes 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from trustmesh.store.etcd_client import EtcdClient
from trustmesh.store.etcd_server import EtcdCluster


def summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    p99 = statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else ms[0]
    return {
        "p50": round(statistics.median(ms), 2),
        "p99": round(p99, 2),
        "max": round(ms[-1], 2),
        "n": len(ms),
    }


async def measure(clusters: dict[str, EtcdCluster], writes: int) -> dict[str, object]:
    clients = {name: c.client() for name, c in clusters.items()}
    times: dict[str, dict[str, list[float]]] = {
        name: {"put": [], "txn": [], "connect": []} for name in clusters
    }
    try:
        for client in clients.values():  # warm: connected, a leader elected
            await client.put(b"/bench/warm", b"x")
        for i in range(writes):
            for name, client in clients.items():
                started = time.perf_counter()
                await client.put(b"/bench/put", str(i).encode())
                times[name]["put"].append(time.perf_counter() - started)
                key = f"/bench/txn/{i}".encode()
                started = time.perf_counter()
                ok, _ = await client.txn([client.absent(key)], [client.put_op(key, b"v")])
                times[name]["txn"].append(time.perf_counter() - started)
                assert ok
        for _ in range(20):
            for name, cluster in clusters.items():
                started = time.perf_counter()
                fresh: EtcdClient = cluster.client()
                await fresh.get(b"/bench/put")
                times[name]["connect"].append(time.perf_counter() - started)
                await fresh.close()
    finally:
        for client in clients.values():
            await client.close()
    out: dict[str, object] = {
        name: {kind: summary(values) for kind, values in kinds.items()}
        for name, kinds in times.items()
    }
    out["tls_over_plain_p50"] = {
        kind: round(
            statistics.median(times["tls"][kind]) / statistics.median(times["plain"][kind]), 2
        )
        for kind in ("put", "txn", "connect")
    }
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--writes", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-etcd-tls-") as tmp:
        clusters = {
            "tls": EtcdCluster(Path(tmp) / "tls", size=3, tls=True),
            "plain": EtcdCluster(Path(tmp) / "plain", size=3, tls=False),
        }
        started: dict[str, float] = {}
        try:
            for name, cluster in clusters.items():
                begin = time.perf_counter()
                cluster.start()
                started[name] = round(time.perf_counter() - begin, 2)
            result = asyncio.run(measure(clusters, args.writes))
        finally:
            for cluster in clusters.values():
                cluster.stop()
    version = ".".join(map(str, clusters["tls"].version))
    print(json.dumps({"etcd": version, "members": 3, "start_s": started, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
