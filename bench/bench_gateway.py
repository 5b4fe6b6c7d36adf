"""Gateway benchmark: trustmesh's ingress gateway next to a hand-written Envoy gateway.

Two paths carry the same closed-loop HTTPS load (keep-alive HTTP/1.1 over TLS with SNI
``httpbin.example.com``, ``GET /get``), side by side in one run, to one backend:

1. ``handwritten``: a static Envoy terminating TLS with the task's certificate (a filter
   chain chosen by SNI), a route table with the VirtualService's two routes, and a
   cluster to httpbin over mesh mTLS (a certificate for the gateway's SPIFFE identity from
   the mesh's CA, httpbin pinned by its SPIFFE ID): the best case a user could write.
2. ``trustmesh``: the gateway pod ``istio-system/istio-ingressgateway`` configured by the
   real control plane (CA server, agent, SDS, ADS) from a Gateway (HTTPS ``SIMPLE``,
   ``credentialName`` → a ``kubernetes.io/tls`` Secret made with openssl) and a
   VirtualService with two routes to ``httpbin:8000``.

Both send to the same backend: httpbin's trustmesh sidecar (mesh-wide STRICT) in front of
an Envoy ``direct_response`` app, so the difference is the gateway alone. Every Envoy runs
``--concurrency 1``. The load generator is trustmesh's (bench/benchlib/loadgen.py, with
TLS): handshakes happen before the window; after a warm-up a fixed window is measured;
paths are interleaved round by round; medians and ratios are reported, with each process's
CPU per request (``gateway`` is the ratio that isolates the two gateways). The JSON also
summarizes, from each gateway's ``/config_dump``, what runs per request.

Wall-clock numbers on this shared 2-core machine move by ±10 % from run to run; so, when
valgrind is installed, a second phase runs one more of each gateway under
``valgrind --tool=callgrind`` (trustmesh's again fed over ADS by the same control plane, as
a second gateway pod address) and counts Envoy's instructions per request over
``--callgrind-requests`` requests on one keep-alive TLS connection (three batches, the
smallest reported: other load only adds instructions), which repeats to ±0.1 %.
``--price-features`` adds, in that phase, the hand-written gateway with each thing
trustmesh's gateway runs per request added alone (its access log, its edge settings —
XFCC, path normalization, trailing-dot stripping…, Istio's default retry policy on the
routes, its disabled policy slots), copied from trustmesh's ``/config_dump``, and with all
of them: what each costs.

Usage: python bench/bench_gateway.py [--rounds 10] [--duration 2] [--warmup 0.5]
       [--workers 2] [--connections 8] [--callgrind-requests 300] [--price-features]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.dataplane_measure import LoadPath, measure, summarize
from benchlib.dataplane_pairs import check_free, stacked_envoy
from benchlib.dataplane_topology import BODY
from benchlib.envoy_admin import config_dump, per_request_features, stats
from benchlib.envoy_pair import app_bootstrap, issue
from benchlib.gateway_features import FEATURES, trustmesh_parts, with_features
from benchlib.gateway_rig import (
    APP_ADDRESS,
    APP_PORT,
    GATEWAY,
    GATEWAY_CALLGRIND_ADDRESS,
    GATEWAY_POD_ADDRESS,
    GATEWAY_PORT,
    HAND_CALLGRIND_ADDRESS,
    HAND_GATEWAY_ADDRESS,
    HOST,
    HTTPBIN_POD_ADDRESS,
    REQUEST,
    EdgePki,
    Mesh,
    handwritten_gateway,
    handwritten_gateway_bootstrap,
    trustmesh_mesh,
)
from benchlib.loadgen import LoadGenerator, TlsClient, wait_serving
from benchlib.procstat import machine
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.identity.ca import CaConfig, CertificateAuthority

TARGET_THROUGHPUT_RATIO = 0.95
FEATURE_ADDRESS_PREFIX = "127.0.78."  # .10 on: the --price-features variants
CALLGRIND_BATCHES = 3


def log(message: str) -> None:
    print(f"[bench_gateway] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Setup:
    paths: list[LoadPath]
    envoys: dict[str, EnvoyProcess]
    mesh: Mesh
    ca: CertificateAuthority
    pki: EdgePki
    tls: TlsClient


async def setup_paths(stack: contextlib.AsyncExitStack, workdir: Path) -> Setup:
    ca = CertificateAuthority.init(workdir / "ca", CaConfig(), dt.datetime.now(dt.UTC))
    pki = EdgePki.make(workdir / "pki")
    app = await stacked_envoy(stack, app_bootstrap(APP_ADDRESS), workdir / "app")
    log("app up; starting the control plane, httpbin's sidecar and trustmesh's gateway")
    mesh = await trustmesh_mesh(stack, ca, pki, workdir / "trustmesh")
    log("trustmesh's gateway up; starting the hand-written gateway")
    hand = await handwritten_gateway(stack, ca, pki, workdir / "handwritten")
    tls = TlsClient(HOST, str(pki.ca_file))
    pids = {"backend": mesh.backend.pid, "app": app.pid}
    assert all(pid is not None for pid in (*pids.values(), hand.pid, mesh.gateway.pid))
    paths = [
        LoadPath(
            name,
            address,
            GATEWAY_PORT,
            REQUEST,
            {"gateway": gateway.pid, **pids},  # type: ignore[dict-item]
            tls=tls,
        )
        for name, address, gateway in (
            ("handwritten", HAND_GATEWAY_ADDRESS, hand),
            ("trustmesh", GATEWAY_POD_ADDRESS, mesh.gateway),
        )
    ]
    for path in paths:
        await wait_serving(path.host, path.port, path.request, BODY.encode(), timeout=20, tls=tls)
    envoys = {"handwritten": hand, "trustmesh": mesh.gateway, "backend": mesh.backend}
    return Setup(paths, envoys, mesh, ca, pki, tls)


def send_https(address: str, count: int, tls: TlsClient) -> None:
    """``count`` requests on one keep-alive TLS connection (SNI httpbin.example.com)."""
    raw = socket.create_connection((address, GATEWAY_PORT), timeout=120)
    sock = tls.context().wrap_socket(raw, server_hostname=tls.server_name)
    connection = http.client.HTTPConnection(HOST, GATEWAY_PORT, timeout=120)
    connection.sock = sock
    try:
        for _ in range(count):
            connection.request("GET", "/get", headers={"Host": HOST})
            response = connection.getresponse()
            if response.read() != BODY.encode() or response.status != 200:
                raise RuntimeError(f"status {response.status}")
    finally:
        connection.close()


async def warm(address: str, tls: TlsClient, timeout: float = 240) -> None:
    """Until the gateway under callgrind answers (Envoy starts slowly there)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.to_thread(send_https, address, 20, tls)
            return
        except (OSError, RuntimeError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)  # xDS and SDS arriving under valgrind: nothing to wait on


async def instructions(
    stack: contextlib.AsyncExitStack,
    setup: Setup,
    workdir: Path,
    requests: int,
    parts: dict[str, Any] | None,
) -> dict[str, Any]:
    """Each gateway under callgrind: Envoy's instructions per request. With ``parts``
    (trustmesh's gateway config, :func:`trustmesh_parts`), the hand-written gateway again
    with each trustmesh feature added alone, and with all of them."""
    from bench_inbound_cost import Callgrind  # the same runner as the inbound chain's pricing

    creds = issue(setup.ca, GATEWAY, dt.datetime.now(dt.UTC))
    hand = handwritten_gateway_bootstrap(HAND_CALLGRIND_ADDRESS, setup.pki, creds)
    variants = {
        "handwritten": (hand, HAND_CALLGRIND_ADDRESS),
        "trustmesh": (setup.mesh.callgrind_bootstrap, GATEWAY_CALLGRIND_ADDRESS),
    }
    if parts is not None:
        for i, names in enumerate([[name] for name in FEATURES] + [list(FEATURES)]):
            address = f"{FEATURE_ADDRESS_PREFIX}{10 + i}"
            base = handwritten_gateway_bootstrap(address, setup.pki, creds)
            label = "handwritten+" + ("all" if len(names) > 1 else names[0])
            variants[label] = (with_features(base, parts, names), address)
    out: dict[str, Any] = {}
    for name, (bootstrap, address) in variants.items():
        envoy = Callgrind(bootstrap, workdir / f"callgrind-{name}")
        stack.callback(envoy.stop)
        await warm(address, setup.tls)
        batches = []
        for _ in range(CALLGRIND_BATCHES):
            envoy.control("-z")
            await asyncio.to_thread(send_https, address, requests, setup.tls)
            envoy.control("-d")
            batches.append(envoy.last_dump_total() / requests)
            log(f"callgrind {name}: {batches[-1]:,.0f} instructions per request")
        envoy.stop()  # valgrind is heavy: one at a time
        out[name] = {
            "instructions_per_request": round(min(batches)),
            "batches": [round(b) for b in batches],
        }
    base = out["handwritten"]["instructions_per_request"]
    out["trustmesh_vs_handwritten"] = round(out["trustmesh"]["instructions_per_request"] / base, 4)
    if parts is not None:
        out["feature_costs"] = {
            name.removeprefix("handwritten+"): result["instructions_per_request"] - base
            for name, result in out.items()
            if name.startswith("handwritten+")
        }
    return out


def compare(rounds: list[dict[str, dict[str, Any]]], medians: dict[str, dict[str, Any]]) -> Any:
    ours, theirs = medians["trustmesh"], medians["handwritten"]
    per_round = [
        round(r["trustmesh"]["requests_per_s"] / r["handwritten"]["requests_per_s"], 3)
        for r in rounds
    ]
    throughput = ours["requests_per_s"] / theirs["requests_per_s"]
    return {
        "throughput_ratio": round(throughput, 3),
        "throughput_ratio_per_round": per_round,
        "throughput_ratio_median_of_rounds": round(statistics.median(per_round), 3),
        "p50_change": round(ours["p50_ms"] / theirs["p50_ms"] - 1, 3),
        "p99_change": round(ours["p99_ms"] / theirs["p99_ms"] - 1, 3),
        "gateway_cpu_ratio": round(
            ours["cpu_us_per_request"]["gateway"] / theirs["cpu_us_per_request"]["gateway"], 3
        ),
        # The control: the very same backend sidecar serves both paths, so its ratio is how
        # much the machine's load alone moved CPU per request between the paths' runs.
        "backend_cpu_ratio": round(
            ours["cpu_us_per_request"]["backend"] / theirs["cpu_us_per_request"]["backend"], 3
        ),
        "meets_target": throughput >= TARGET_THROUGHPUT_RATIO,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    check_free(
        [
            (APP_ADDRESS, APP_PORT),
            (HTTPBIN_POD_ADDRESS, APP_PORT),
            (GATEWAY_POD_ADDRESS, GATEWAY_PORT),
            (HAND_GATEWAY_ADDRESS, GATEWAY_PORT),
            (GATEWAY_CALLGRIND_ADDRESS, GATEWAY_PORT),
            (HAND_CALLGRIND_ADDRESS, GATEWAY_PORT),
            *((f"{FEATURE_ADDRESS_PREFIX}{10 + i}", GATEWAY_PORT) for i in range(6)),
        ]
    )
    callgrind = args.callgrind_requests > 0 and shutil.which("callgrind_control") is not None
    load = LoadGenerator(args.workers)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
            async with contextlib.AsyncExitStack() as stack:
                setup = await setup_paths(stack, Path(tmp))
                paths, envoys = setup.paths, setup.envoys
                setup_s = time.monotonic() - started
                log(f"both gateways serve ({setup_s:.1f}s); measuring")
                rounds: list[dict[str, dict[str, Any]]] = []
                for number in range(args.rounds):
                    rounds.append({})
                    # Alternate which path goes first, so neither always follows the other.
                    order = paths if number % 2 == 0 else paths[::-1]
                    for path in order:
                        got = await measure(path, load, args)
                        rounds[-1][path.name] = got
                        log(
                            f"round {number + 1} {path.name}: {got['requests_per_s']} req/s, "
                            f"p50 {got['p50_ms']} ms, errors {got['errors']}"
                        )
                config = {
                    name: per_request_features(await config_dump(envoys[name]))
                    for name in ("handwritten", "trustmesh")
                }
                counters = {
                    name: await stats(envoys[name], r"listener\..*ssl\.(handshake|versions)")
                    for name in ("handwritten", "trustmesh")
                }
                backend_tls = await stats(envoys["backend"], r"listener\..*ssl\.handshake")
                version = json.loads((await envoys["trustmesh"].admin_get("/server_info")).body)
                counted: dict[str, Any] = {"skipped": "valgrind not installed or not asked"}
                if callgrind:
                    parts = None
                    if args.price_features:
                        parts = trustmesh_parts(await config_dump(envoys["trustmesh"]))
                    counted = await instructions(
                        stack, setup, Path(tmp), args.callgrind_requests, parts
                    )
    finally:
        load.close()
    medians = summarize([{k: r[k] for k in ("handwritten", "trustmesh")} for r in rounds])
    return {
        "machine": machine(),
        "setup": {
            "envoy_version": version.get("version", "?").split("/")[1],
            "envoy_concurrency": 1,
            "load_generator": "python selectors + ssl, closed loop, keep-alive HTTPS/1.1",
            "workers": args.workers,
            "connections_per_worker": args.connections,
            "in_flight": args.workers * args.connections,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "request": REQUEST.decode(),
            "setup_s": round(setup_s, 1),
        },
        "target_throughput_ratio": TARGET_THROUGHPUT_RATIO,
        "median": medians,
        "trustmesh_vs_handwritten": compare(rounds, medians),
        "rounds": rounds,
        "callgrind": counted,
        "config": config,
        "counters": {"gateway_tls": counters, "backend_tls": backend_tls},
        "runtime_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--connections", type=int, default=8, help="per generator process")
    parser.add_argument("--max-requests", type=int, default=2_000_000, help="per worker and run")
    parser.add_argument(
        "--callgrind-requests",
        type=int,
        default=300,
        help="requests per callgrind batch (0: no callgrind phase)",
    )
    parser.add_argument(
        "--price-features",
        action="store_true",
        help="callgrind also the hand-written gateway with each trustmesh feature added",
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
