"""xDS at scale: thousands of simulated ADS clients across two replicas; prints JSON.

The fleet (say it): one namespace ``scale`` (sidecar injection on, mesh-wide STRICT mTLS)
with ``--services`` Services, each selecting ``--pods`` Pods of one app (the pods of one
Deployment: same labels, same ServiceAccount, port 8000 HTTP) — 50 × 100 = 5,000 proxies
by default, so many share configuration (the outbound clusters, the policy) and each has
its own inbound listener (its pod address). One namespace-wide AuthorizationPolicy
(ALLOW). Everything is in etcd (one member, the real server): the manifests as
``trustmesh apply`` writes them, the pods in the workload registry (host ``host-1``).
Two replicas (``trustmesh control-plane --store etcd://…``, real processes) each serve
any proxy.

The clients (:mod:`benchlib.ads_client`, ``--client-procs`` processes): per pod one ADS
stream over its own mTLS connection presenting the pod's workload certificate (issued by
the mesh CA for its ServiceAccount); half connect to each replica. Each subscribes as
Envoy does (CDS + LDS wildcards, then EDS/RDS/ECDS/SDS by the names they carry) and ACKs.

Measured:

1. per round (``--changes``), a policy change through the store exactly as ``trustmesh
   apply`` writes it (the AuthorizationPolicy edited, the slot stays ALLOW: every proxy
   gets a new ECDS config) at t0; per client the time it ACKed an extension-config
   version other than the one it held before: p50 / p99 / max over all clients, and per
   replica; the commit itself; each replica's own account (``/debug/syncz``'s
   ``rebuild``: proxies reused / patched / translated whole, build seconds) and its CPU
   seconds in the round. Target p99 ≤ 1 s.
2. per replica, VmRSS when ready (every proxy registered, its snapshot built, nothing
   connected) and with its clients connected and synced: (connected − ready) / clients
   (target ≤ 100 kB per connected proxy), and connected / proxies registered.

Bounded: setup steps have timeouts, the whole run ``--time-limit`` seconds; every process
started here is stopped by PID.

Usage: python bench/bench_ads_scale.py [--services 50] [--pods 100] [--client-procs 4]
       [--changes 3] [--time-limit 900]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the replicas' rig is the must-show tests'

import tests.store.replica_rig as replica_rig  # noqa: E402

from benchlib.procstat import (  # noqa: E402
    cpu_seconds,
    machine,
    machine_busy_seconds,
    memory_mib,
)
from benchlib.progress import log  # noqa: E402
from trustmesh.config import load_config  # noqa: E402
from trustmesh.identity import pki  # noqa: E402
from trustmesh.identity.ca import CaConfig, CertificateAuthority  # noqa: E402
from trustmesh.identity.spiffe import SpiffeId  # noqa: E402
from trustmesh.runtime import debug_client  # noqa: E402
from trustmesh.runtime.replica import registration_of  # noqa: E402
from trustmesh.store.apply import apply_resources  # noqa: E402
from trustmesh.store.etcd_client import EtcdClient  # noqa: E402
from trustmesh.store.etcd_server import EtcdCluster  # noqa: E402
from trustmesh.store.etcd_store import WORKLOADS, EtcdResourceStore  # noqa: E402
from trustmesh.store.model import WorkloadRecord  # noqa: E402

Json = dict[str, Any]
NAMESPACE = "scale"
PORT = 8000
TARGET_P99_S = 1.0
TARGET_KB_PER_PROXY = 100.0
APPLY_CHUNK = 100  # resources per etcd transaction (etcd allows 128 operations)
STRICT = (ROOT / "examples/scenarios/12-mesh-strict/config.yaml").read_text()
POLICIES = [  # namespace-wide ALLOW, edited: only the allow slot's ECDS config changes
    '  - to: [{operation: {paths: ["/*"]}}]\n',
    '  - to: [{operation: {methods: ["GET", "POST"]}}]\n',
    '  - to: [{operation: {paths: ["/api/*", "/health"]}}]\n',
]


def policy(index: int) -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: scale-policy, namespace: {NAMESPACE}}}\n"
        f"spec:\n  action: ALLOW\n  rules:\n{POLICIES[index % len(POLICIES)]}"
    )


def manifests(services: int, pods: int) -> str:
    docs = [
        f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n"
        "  labels: {istio-injection: enabled}\n",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: istio-system\n",
        STRICT,
        policy(0),
    ]
    for s in range(services):
        docs.append(
            f"apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: svc-{s}, "
            f"namespace: {NAMESPACE}}}\n"
        )
        docs.append(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: {NAMESPACE}}}\n"
            f"spec:\n  selector: {{app: svc-{s}}}\n"
            f"  ports: [{{name: http, port: {PORT}, targetPort: {PORT}}}]\n"
        )
        for p in range(pods):
            docs.append(
                f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: svc-{s}-{p}\n"
                f"  namespace: {NAMESPACE}\n  labels: {{app: svc-{s}}}\n"
                f"spec:\n  serviceAccountName: svc-{s}\n"
                f"  containers:\n  - name: app\n    ports: [{{containerPort: {PORT}}}]\n"
                "  - {name: istio-proxy, image: istio/proxyv2}\n"  # running, injected
            )
    return "---\n".join(docs)


def pod_address(index: int) -> str:
    return f"10.{1 + index // 62500}.{index // 250 % 250}.{index % 250 + 1}"


def percentiles(seconds: list[float]) -> Json:
    if not seconds:
        return {"n": 0}
    ms = sorted(s * 1000 for s in seconds)
    p99 = statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else ms[0]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(ms[-1], 1),
    }


async def load_store(store: EtcdResourceStore, text: str, workdir: Path, name: str) -> None:
    path = workdir / f"{name}.yaml"
    path.write_text(text)
    loaded = load_config([str(path)], compile_policy=False)
    assert not loaded.errors, loaded.errors[:5]
    resources = list(loaded.snapshot.resources)
    for first in range(0, len(resources), APPLY_CHUNK):
        await apply_resources(store, resources[first : first + APPLY_CHUNK])


async def register_pods(client: EtcdClient, services: int, pods: int) -> list[WorkloadRecord]:
    lease = await client.grant_lease(3600)
    records = [
        WorkloadRecord(
            NAMESPACE,
            f"svc-{s}-{p}",
            "host-1",
            pod_address(s * pods + p),
            f"svc-{s}",
            labels=(("app", f"svc-{s}"),),
            kind="Pod",
        )
        for s in range(services)
        for p in range(pods)
    ]
    for first in range(0, len(records), APPLY_CHUNK):
        ops = [
            client.put_op(
                WORKLOADS + f"{r.host}/{r.namespace}/{r.name}".encode(),
                r.to_json().encode(),
                lease,
            )
            for r in records[first : first + APPLY_CHUNK]
        ]
        await client.txn([], ops)
    return records


def issue_certificates(ca: CertificateAuthority, services: int, directory: Path) -> Path:
    """One key and certificate per ServiceAccount (the pods of a Deployment share it)."""
    directory.mkdir(mode=0o700)
    now = dt.datetime.now(dt.UTC)
    for s in range(services):
        identity = SpiffeId("cluster.local", NAMESPACE, f"svc-{s}")
        key = pki.generate_key()
        issued = ca.issue(pki.build_csr(key, [identity.uri]), identity, now)
        (directory / f"svc-{s}.key").write_bytes(pki.key_to_pem(key))
        chain = issued.chain_pem[:-1] or issued.chain_pem  # the root is the server's to hold
        (directory / f"svc-{s}.pem").write_bytes("".join(chain).encode())
    roots = directory / "roots.pem"
    roots.write_bytes(ca.bundle_pem(now))
    return roots


class ClientProcess:
    """One process of simulated clients, driven over its stdin/stdout (JSON lines)."""

    def __init__(self, process: asyncio.subprocess.Process, count: int) -> None:
        self.process = process
        self.count = count

    @classmethod
    async def start(cls, job: Json) -> ClientProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "bench") + os.pathsep + str(ROOT)}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchlib.ads_client",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=64 * 1024 * 1024,
            start_new_session=True,
        )
        self = cls(process, len(job["clients"]))
        self.send(job)
        return self

    def send(self, message: Json) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(message) + "\n").encode())

    async def event(self, wanted: str, timeout: float) -> Json:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    raise RuntimeError(f"client process {self.process.pid} ended")
                event: Json = json.loads(line)
                if event["event"] == "error":
                    raise RuntimeError(f"client process {self.process.pid}: {event}")
                if event["event"] == "connected" and event["count"] % 250 == 0:
                    log(f"client process {self.process.pid}: {event['count']} synced")
                if event["event"] == wanted:
                    return event

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            await self.process.wait()


def rebuild_of(state: Path) -> Json | None:
    syncz = debug_client.get(state, timeout=30)
    return None if syncz is None else syncz.get("rebuild")


async def measure(args: argparse.Namespace, workdir: Path) -> Json:
    total = args.services * args.pods
    etcd = EtcdCluster(workdir / "etcd", size=1)
    etcd.start()
    processes: list[ClientProcess] = []
    client = etcd.client()
    try:
        now = dt.datetime.now(dt.UTC)
        ca = CertificateAuthority.init(workdir / "ca", CaConfig(), now)
        store = EtcdResourceStore(client)
        started = time.monotonic()
        await load_store(store, manifests(args.services, args.pods), workdir, "mesh")
        records = await register_pods(client, args.services, args.pods)
        log(f"{total} pods in the store and registry ({time.monotonic() - started:.1f}s)")
        roots = issue_certificates(ca, args.services, workdir / "certs")
        replica_rig.START_TIMEOUT = args.start_timeout
        started = time.monotonic()
        with replica_rig.replicas(etcd, workdir, ["a", "b"], workdir / "ca") as (a, b):
            log(f"replicas a and b ready ({time.monotonic() - started:.1f}s)")
            replicas = {"a": a, "b": b}
            ready = {n: memory_mib(r.pid) for n, r in replicas.items()}
            nodes = [registration_of(r).node_id for r in records]
            assignment = {node: ("a", "b")[i % 2] for i, node in enumerate(nodes)}
            targets = {n: f"127.0.0.1:{r.xds_port}" for n, r in replicas.items()}
            jobs: list[list[list[str]]] = [[] for _ in range(args.client_procs)]
            for i, (node, record) in enumerate(zip(nodes, records, strict=True)):
                jobs[i % args.client_procs].append(
                    [node, record.service_account, targets[assignment[node]]]
                )
            started = time.monotonic()
            for job in jobs:
                processes.append(
                    await ClientProcess.start(
                        {"clients": job, "certs": str(workdir / "certs"), "roots": str(roots)}
                    )
                )
            await asyncio.gather(*(p.event("synced", args.connect_timeout) for p in processes))
            connect_s = time.monotonic() - started
            log(f"{total} clients connected and synced ({connect_s:.1f}s)")
            connected = {n: memory_mib(r.pid) for n, r in replicas.items()}
            per_replica = {n: sum(1 for v in assignment.values() if v == n) for n in replicas}
            memory = {
                n: {
                    "ready_mib": ready[n]["VmRSS"],
                    "connected_mib": connected[n]["VmRSS"],
                    "connected_clients": per_replica[n],
                    "registered_proxies": total,
                    "kb_per_connected_proxy": round(
                        (connected[n]["VmRSS"] - ready[n]["VmRSS"]) * 1024 / per_replica[n], 1
                    ),
                    "kb_per_registered_proxy_total_rss": round(
                        connected[n]["VmRSS"] * 1024 / total, 1
                    ),
                }
                for n in replicas
            }
            rounds = []
            for round_index in range(1, args.changes + 1):
                for p in processes:
                    p.send({"command": "mark"})
                await asyncio.gather(*(p.event("marked", 60) for p in processes))
                cpu_before = {n: cpu_seconds(r.pid) for n, r in replicas.items()}
                clients_cpu_before = sum(cpu_seconds(p.process.pid) for p in processes)
                busy_before = machine_busy_seconds()
                t0 = time.monotonic()
                await load_store(store, policy(round_index), workdir, f"policy-{round_index}")
                committed = time.monotonic()
                for p in processes:
                    p.send({"command": "wait", "since": t0, "timeout": args.round_timeout})
                reports = await asyncio.gather(
                    *(p.event("report", args.round_timeout + 60) for p in processes)
                )
                # Where the machine's CPU went while the change spread: on 2 cores, the
                # replicas' and the clients' seconds bound how soon the last ACK can be.
                clients_cpu = (
                    sum(cpu_seconds(p.process.pid) for p in processes) - clients_cpu_before
                )
                busy = machine_busy_seconds() - busy_before
                acks: dict[str, Any] = {}
                errors: dict[str, str] = {}
                for report in reports:
                    acks.update(report["acks"])
                    errors.update(report["errors"])
                reached = {n: a[0] - t0 for n, a in acks.items() if a is not None}
                rebuild = {
                    n: await asyncio.to_thread(rebuild_of, workdir / f"replica-{n}")
                    for n in replicas
                }
                rounds.append(
                    {
                        "round": round_index,
                        "commit_ms": round((committed - t0) * 1000, 1),
                        "change_to_acked": percentiles(list(reached.values())),
                        "per_replica": {
                            n: percentiles(
                                [s for node, s in reached.items() if assignment[node] == n]
                            )
                            for n in replicas
                        },
                        "not_reached": total - len(reached),
                        "stream_errors": len(errors),
                        "replica_rebuild": rebuild,
                        "replica_cpu_s": {
                            n: round(cpu_seconds(r.pid) - cpu_before[n], 2)
                            for n, r in replicas.items()
                        },
                        "clients_cpu_s": round(clients_cpu, 2),
                        "machine_busy_cpu_s": round(busy, 2),
                        "loadavg_1m": round(os.getloadavg()[0], 1),
                    }
                )
                log(f"round {round_index}: {rounds[-1]['change_to_acked']}")
    finally:
        for p in processes:
            await p.stop()
        await client.close()
        etcd.stop()
    p99s = [r["change_to_acked"].get("p99_ms", float("inf")) for r in rounds]
    return {
        "benchmark": "xDS scale: a policy change reaching simulated ADS clients via 2 replicas",
        "machine": machine(),
        "fleet": {
            "namespace": NAMESPACE,
            "services": args.services,
            "pods_per_service": args.pods,
            "proxies": total,
            "replicas": 2,
            "client_processes": args.client_procs,
            "etcd": ".".join(map(str, etcd.version)),
        },
        "connect_and_sync_s": round(connect_s, 1),
        "memory": memory,
        "rounds": rounds,
        "target_p99_ms": TARGET_P99_S * 1000,
        "target_kb_per_connected_proxy": TARGET_KB_PER_PROXY,
        "p99_target_met": all(p <= TARGET_P99_S * 1000 for p in p99s)
        and all(r["not_reached"] == 0 for r in rounds),
        "memory_target_met": all(
            m["kb_per_connected_proxy"] <= TARGET_KB_PER_PROXY for m in memory.values()
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--changes", type=int, default=3)
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--connect-timeout", type=float, default=1800)
    parser.add_argument("--round-timeout", type=float, default=30)
    parser.add_argument("--time-limit", type=float, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ads-scale-") as workdir:
        result = asyncio.run(asyncio.wait_for(measure(args, Path(workdir)), args.time_limit))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
