"""CA issuance through the network API; prints one JSON document.

The CA server runs in its own process (as in production) with ``--workers`` processes
sharing its two ports (``CaServer(workers=N)``, SO_REUSEPORT). ``--client-processes``
processes each hold ``clients / client-processes`` TLS channels and issue certificates
back to back. Three modes, measured in the same run against the same server processes
over the same channels, rounds alternating (renewal, enrollment, baseline, renewal, …):

- renewal: mTLS with the current certificate (the steady state);
- enrollment: bootstrap token on the enrollment port (reusable, so that the benchmark
  measures the CA, not token minting);
- baseline_no_crypto: GetTrustBundle over the renewal channels (the same mTLS
  connections as renewal), a handler that does no cryptography: the ceiling gRPC and the
  topology set on this machine.

Every issued serial must be in ``issued.jsonl`` (durable before the answer) at the end.

Usage: python bench/bench_ca.py [--requests N] [--clients 8] [--workers 1,2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.client import CaClient, ClientCertificate
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId

MODES = ("renewal", "enrollment", "baseline_no_crypto")


def _serve(directory: str, workers: int, pipe: Connection) -> None:
    import logging

    logging.getLogger("trustmesh").setLevel(logging.ERROR)

    async def main() -> None:
        server = CaServer(CertificateAuthority.load(Path(directory)), workers=workers)
        await server.start()
        pipe.send((server.port, server.renewal_port, [os.getpid(), *server.worker_pids]))
        await asyncio.to_thread(pipe.recv)
        await server.stop()

    asyncio.run(main())


def _client_process(
    directory: str, ports: tuple[int, int], channels: int, pipe: Connection
) -> None:
    """Holds ``channels`` renewal and enrollment channels; runs what the parent asks."""

    async def main() -> None:
        ca = CertificateAuthority.load(Path(directory))
        now = dt.datetime.now(dt.UTC)
        roots = ca.bundle_pem(now)
        identity = SpiffeId(ca.config.trust_domain, "bench", "client")
        keys = [pki.generate_key(ca.config.key_type) for _ in range(16)]
        csrs = [pki.build_csr(k, [identity.uri]) for k in keys]
        token = ca.token("bench", "client", now, dt.timedelta(hours=1), single_use=False)
        enrollers = [CaClient(f"127.0.0.1:{ports[0]}", roots) for _ in range(channels)]
        renewers = []
        for i in range(channels):
            chain = await enrollers[i].create_certificate(csrs[i], token=token)
            cert = ClientCertificate(pki.key_to_pem(keys[i]), "".join(chain).encode())
            renewers.append(CaClient(f"127.0.0.1:{ports[1]}", roots, client_cert=cert))

        async def loop(i: int, mode: str, quota: int, deadline: float, out: list[float]) -> None:
            for n in range(quota):
                if time.perf_counter() > deadline:
                    break
                start = time.perf_counter()
                if mode == "baseline_no_crypto":
                    await renewers[i].trust_bundle()
                elif mode == "renewal":
                    await renewers[i].create_certificate(csrs[n % len(csrs)])
                else:
                    await enrollers[i].create_certificate(csrs[n % len(csrs)], token=token)
                out.append(time.perf_counter() - start)

        for mode in MODES:  # warm-up: handshakes and first calls on every channel
            await asyncio.gather(
                *(loop(i, mode, 2, time.perf_counter() + 10, []) for i in range(channels))
            )
        pipe.send("ready")
        while True:
            order = await asyncio.to_thread(pipe.recv)
            if order is None:
                break
            mode, quota, seconds, start_at = order
            await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
            latencies: list[float] = []
            started = time.perf_counter()
            deadline = started + seconds
            await asyncio.gather(
                *(loop(i, mode, quota, deadline, latencies) for i in range(channels))
            )
            pipe.send((started, time.perf_counter(), latencies))
        for client in (*enrollers, *renewers):
            await client.close()

    asyncio.run(main())


def _summary(runs: list[tuple[float, float, list[float]]]) -> dict[str, Any]:
    """One round of one mode over all client processes."""
    latencies = sorted(x for _, _, lat in runs for x in lat)
    elapsed = max(end for _, end, _ in runs) - min(start for start, _, _ in runs)
    return {
        "issued": len(latencies),
        "seconds": round(elapsed, 3),
        "per_s": len(latencies) / elapsed,
        "latencies": latencies,
    }


def _topology(args: argparse.Namespace, directory: Path, workers: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(str(directory), workers, theirs))
    server.start()
    clients: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    lines_before = _lines(directory / "issued.jsonl")
    try:
        if not ours.poll(60):
            raise SystemExit("CA server did not start")
        *ports, server_pids = ours.recv()
        per_process = args.clients // args.client_processes
        for _ in range(args.client_processes):
            mine, peer = ctx.Pipe()
            process = ctx.Process(
                target=_client_process, args=(str(directory), ports, per_process, peer)
            )
            process.start()
            clients.append((process, mine))
        client_pids = [process.pid for process, _ in clients if process.pid is not None]
        for _, pipe in clients:
            if not pipe.poll(120) or pipe.recv() != "ready":
                raise SystemExit("a client process did not start")
        rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        quota = args.requests // args.rounds // args.clients
        for _ in range(args.rounds):
            for mode in MODES:  # alternating: no mode gets a quieter machine than another
                start_at = time.perf_counter() + 0.2
                for _, pipe in clients:
                    pipe.send((mode, quota, args.seconds, start_at))
                cpu = _cpu_seconds(server_pids), _cpu_seconds(client_pids)
                summary = _summary([pipe.recv() for _, pipe in clients])
                summary["server_cpu"] = _cpu_seconds(server_pids) - cpu[0]
                summary["client_cpu"] = _cpu_seconds(client_pids) - cpu[1]
                rounds[mode].append(summary)
    finally:
        for client, pipe in clients:
            pipe.send(None)
            client.join(30)
            if client.is_alive():
                client.kill()
        ours.send("stop")
        server.join(30)
        if server.is_alive():
            server.kill()
    result: dict[str, Any] = {}
    issued = 0
    for mode, runs in rounds.items():
        latencies = sorted(x for run in runs for x in run["latencies"])
        if mode != "baseline_no_crypto":
            issued += len(latencies)
        result[mode] = {
            "requests": len(latencies),
            "per_s_rounds": [round(run["per_s"]) for run in runs],
            "per_s": round(statistics.median(run["per_s"] for run in runs)),
            "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000, 2),
            # CPU time per request, all server (client) processes together: what the
            # machine's other load cannot distort
            "server_cpu_us": round(sum(r["server_cpu"] for r in runs) / len(latencies) * 1e6),
            "client_cpu_us": round(sum(r["client_cpu"] for r in runs) / len(latencies) * 1e6),
        }
    base = result["baseline_no_crypto"]
    for mode in ("renewal", "enrollment"):
        # each round against the baseline round next to it (the machine's other load
        # changes between rounds), then the median; and the same by CPU per request
        ratios = [
            run["per_s"] / baseline["per_s"]
            for run, baseline in zip(rounds[mode], rounds["baseline_no_crypto"], strict=True)
        ]
        result[mode]["ratio_to_baseline"] = round(statistics.median(ratios), 2)
        result[mode]["cpu_ratio_to_baseline"] = round(
            (base["server_cpu_us"] + base["client_cpu_us"])
            / (result[mode]["server_cpu_us"] + result[mode]["client_cpu_us"]),
            2,
        )
    recorded = _lines(directory / "issued.jsonl") - lines_before
    warmup = args.clients * (1 + 2 * 2)  # first certificates and the two warm-up calls
    result["issued_jsonl_lines"] = recorded
    result["issued_jsonl_complete"] = recorded == issued + warmup
    return result


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12000, help="per mode, over all rounds")
    parser.add_argument("--clients", type=int, default=8, help="TLS channels in all")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--workers", default="1,2", help="CA server processes, one run each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="cap per mode and round")
    parser.add_argument("--key-type", default="ec-p256", choices=[k.value for k in pki.KeyType])
    args = parser.parse_args()
    results: dict[str, Any] = {
        "key_type": args.key_type,
        "clients": args.clients,
        "client_processes": args.client_processes,
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ca"
        CertificateAuthority.init(
            directory, CaConfig(key_type=pki.KeyType(args.key_type)), dt.datetime.now(dt.UTC)
        )
        for workers in (int(w) for w in args.workers.split(",")):
            results[f"workers_{workers}"] = _topology(args, directory, workers)
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
