"""CA issuance through the network API; prints one JSON document.

The CA server runs in its own process (as in production); one client process runs 8
concurrent clients, each with its own TLS channel, issuing certificates back to back.
Both ways of authenticating are measured side by side: renewal (mTLS with the current
certificate, the steady state) and enrollment (bootstrap token; reusable tokens here so
that the benchmark measures the CA, not token minting), next to a baseline RPC that does
no cryptography at all (the ceiling gRPC sets). Bounded by count and time.

Usage: python bench/bench_ca.py [--requests N] [--clients 8] [--key-type ec-p256]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.client import CaClient, ClientCertificate
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId


def _serve(
    directory: str,
    ready: multiprocessing.synchronize.Event,
    ports: dict[str, int],
    stop: multiprocessing.synchronize.Event,
) -> None:
    import logging

    logging.getLogger("trustmesh").setLevel(logging.ERROR)

    async def main() -> None:
        server = CaServer(CertificateAuthority.load(Path(directory)))
        await server.start()
        ports["enroll"], ports["renew"] = server.port, server.renewal_port
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await server.stop()

    asyncio.run(main())


async def _client_loop(
    make_client: object,
    csrs: list[bytes],
    token: str | None,
    deadline: float,
    quota: int,
    latencies: list[float],
    baseline: bool = False,
) -> None:
    client: CaClient = make_client()  # type: ignore[operator]
    try:
        for i in range(quota):
            if time.perf_counter() > deadline:
                break
            start = time.perf_counter()
            if baseline:
                await client.trust_bundle()
            else:
                await client.create_certificate(csrs[i % len(csrs)], token=token)
            latencies.append(time.perf_counter() - start)
    finally:
        await client.close()


async def _run_mode(
    mode: str,
    ports: dict[str, int],
    ca: CertificateAuthority,
    clients: int,
    requests: int,
    seconds: float,
) -> dict[str, object]:
    now = dt.datetime.now(dt.UTC)
    roots = ca.bundle_pem(now)
    identity = SpiffeId(ca.config.trust_domain, "bench", "client")
    keys = [pki.generate_key(ca.config.key_type) for _ in range(16)]
    csrs = [pki.build_csr(k, [identity.uri]) for k in keys]
    token = ca.token("bench", "client", now, dt.timedelta(hours=1), single_use=False)
    certs = []
    for key in keys[:clients]:
        enroller = CaClient(f"127.0.0.1:{ports['enroll']}", roots)
        chain = await enroller.create_certificate(pki.build_csr(key, [identity.uri]), token=token)
        await enroller.close()
        certs.append(ClientCertificate(pki.key_to_pem(key), "".join(chain).encode()))

    def factory(index: int) -> object:
        if mode == "renewal":
            return lambda: CaClient(f"127.0.0.1:{ports['renew']}", roots, client_cert=certs[index])
        return lambda: CaClient(f"127.0.0.1:{ports['enroll']}", roots)

    # warm-up: one request per client (TLS handshakes)
    await asyncio.gather(
        *(
            _client_loop(
                factory(i),
                csrs,
                token if mode == "enrollment" else None,
                time.perf_counter() + 5,
                1,
                [],
                baseline=mode == "baseline_no_crypto",
            )
            for i in range(clients)
        )
    )
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    await asyncio.gather(
        *(
            _client_loop(
                factory(i),
                csrs,
                token if mode == "enrollment" else None,
                deadline,
                requests // clients,
                latencies,
                baseline=mode == "baseline_no_crypto",
            )
            for i in range(clients)
        )
    )
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "issued": len(ordered),
        "seconds": round(elapsed, 3),
        "certs_per_s": round(len(ordered) / elapsed),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="cap per mode")
    parser.add_argument("--key-type", default="ec-p256", choices=[k.value for k in pki.KeyType])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ca"
        CertificateAuthority.init(
            directory, CaConfig(key_type=pki.KeyType(args.key_type)), dt.datetime.now(dt.UTC)
        )
        ctx = multiprocessing.get_context("spawn")
        manager = ctx.Manager()
        ports = manager.dict()
        ready, stop = ctx.Event(), ctx.Event()
        server = ctx.Process(target=_serve, args=(str(directory), ready, ports, stop))
        server.start()
        try:
            if not ready.wait(30):
                raise SystemExit("CA server did not start")
            local_ports = dict(ports)
            results = {
                mode: asyncio.run(
                    _run_mode(
                        mode,
                        local_ports,
                        CertificateAuthority.load(directory),
                        args.clients,
                        args.requests,
                        args.seconds,
                    )
                )
                # baseline_no_crypto: the same clients calling GetTrustBundle, a handler
                # that does no cryptography: the ceiling gRPC itself sets on this machine.
                for mode in ("renewal", "enrollment", "baseline_no_crypto")
            }
        finally:
            stop.set()
            server.join(10)
            if server.is_alive():
                server.kill()
            manager.shutdown()
    json.dump({"key_type": args.key_type, "clients": args.clients, **results}, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
