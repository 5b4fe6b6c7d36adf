"""Data-plane benchmark: trustmesh's sidecar pair next to a hand-written Envoy pair.

Three paths carry the same closed-loop HTTP/1.1 load, side by side in one run:

1. ``direct``: load generator → the app (plaintext).
2. ``handwritten``: load generator → a minimal client Envoy (HTTP listener, a cluster
   with an UpstreamTlsContext presenting a client certificate and pinning the server's
   SPIFFE ID) → a minimal server Envoy (DownstreamTlsContext requiring a client
   certificate, an RBAC filter allowing the client's principal, router) → the app. The
   certificates come from trustmesh's CA, inline in the bootstraps: the best case a user
   could write by hand.
3. ``trustmesh``: the same traffic through two sidecars configured by the real control
   plane — CertificateAuthority + CaServer, two WorkloadAgents (bootstrap-token
   enrollment, SDS), ControlPlane over examples/mesh/workloads.yaml + mesh-wide STRICT +
   an AuthorizationPolicy ALLOWing foo/sleep on foo/httpbin, Envoys from
   ``ads_bootstrap``. Requests go to sleep's outbound HTTP proxy (:15001) in absolute
   form, ``GET http://httpbin.foo:8000/get``, as ``HTTP_PROXY`` clients send them.

A fourth path, ``handwritten_accesslog`` (``--no-access-log-variant`` leaves it out), is
the hand-written pair plus the very ``access_log`` entries trustmesh's sidecars run (copied
from their config dumps: one JSON line per request to stdout on each side): what those
logs alone cost.

The app is a third Envoy answering a ``direct_response`` (so it is never the
bottleneck), shared by all paths. Every Envoy runs with ``--concurrency 1``.

The load generator is Python (wrk is not assumed): worker processes, each with keep-alive
connections on non-blocking sockets (``selectors``), one request in flight per
connection, a prebuilt request, responses framed by Content-Length. After a warm-up, a
fixed window is measured: requests/s, latency percentiles, errors, and the CPU time each
process spent per request (from ``/proc/<pid>/stat``), which isolates the Envoys' cost
from the generator's on a machine with few cores; ``other_cores_busy`` is the CPU the
rest of the machine used meanwhile (well above 0: another job skewed that run). Paths are
interleaved round by round so that drift hits all of them alike; medians over rounds are
reported with the ratios trustmesh / handwritten, from the medians and round by round.
The JSON also summarizes, from each proxy's admin ``/config_dump``, what runs per request
(HTTP filters, access logs, path normalization, XFCC), and the server counters that show
mTLS and RBAC at work.

The code is in bench/benchlib/: ``loadgen`` (the generator and its statistics),
``envoy_pair`` (the hand-written configs), ``dataplane_pairs`` (both pairs started),
``dataplane_measure`` (runs, medians, ratios), ``envoy_admin`` (config dumps, counters).

Usage: python bench/bench_dataplane.py [--rounds 3] [--duration 5] [--warmup 1]
       [--workers 2] [--connections 8] [--no-access-log-variant]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib.dataplane_measure import TARGETS, LoadPath, compare, measure, summarize
from benchlib.dataplane_pairs import (
    Pair,
    check_free,
    handwritten_pair,
    stacked_envoy,
    trustmesh_pair,
)
from benchlib.dataplane_topology import (
    APP_ADDRESS,
    APP_PORT,
    BODY,
    HAND_CLIENT_ADDRESS,
    HAND_LOG_CLIENT_ADDRESS,
    HAND_LOG_SERVER_ADDRESS,
    HAND_SERVER_ADDRESS,
    HTTPBIN_POD_ADDRESS,
    REQUEST,
    SLEEP_OUTBOUND_ADDRESS,
)
from benchlib.envoy_admin import access_logs_of, config_dump, per_request_features, stats
from benchlib.envoy_pair import app_bootstrap
from benchlib.loadgen import LoadGenerator, wait_serving
from benchlib.procstat import machine
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.xds.outbound_listeners import OUTBOUND_HTTP_PORT


def log(message: str) -> None:
    print(f"[bench_dataplane] {message}", file=sys.stderr, flush=True)


async def setup_paths(
    stack: contextlib.AsyncExitStack, workdir: Path, args: argparse.Namespace
) -> tuple[list[LoadPath], dict[str, Pair]]:
    """Start the app, both pairs (and the access-log variant); the paths to measure."""
    ca = CertificateAuthority.init(workdir / "ca", CaConfig(), dt.datetime.now(dt.UTC))
    app = await stacked_envoy(stack, app_bootstrap(APP_ADDRESS), workdir / "app")
    log("app Envoy up; starting the trustmesh control plane, agents and sidecars")
    pairs = {"trustmesh": await trustmesh_pair(stack, ca, workdir / "trustmesh")}
    log("trustmesh sidecars up; starting the hand-written pair")
    pairs["handwritten"] = await handwritten_pair(
        stack, ca, workdir / "handwritten", (HAND_CLIENT_ADDRESS, HAND_SERVER_ADDRESS)
    )
    if args.access_log_variant:
        # The hand-written pair plus the very access_log entries trustmesh's sidecars run
        # (from their config dumps): what the access logs alone cost.
        tm = pairs["trustmesh"]
        logs = (
            access_logs_of(await config_dump(tm.client), "outbound_http"),
            access_logs_of(await config_dump(tm.server), "virtualInbound"),
        )
        pairs["handwritten_accesslog"] = await handwritten_pair(
            stack,
            ca,
            workdir / "handwritten_accesslog",
            (HAND_LOG_CLIENT_ADDRESS, HAND_LOG_SERVER_ADDRESS),
            logs,
        )
    assert app.pid is not None
    paths = [LoadPath("direct", APP_ADDRESS, APP_PORT, REQUEST, {"app": app.pid})]
    for name in ("handwritten", "trustmesh", "handwritten_accesslog"):
        if name in pairs:
            pair = pairs[name]
            assert pair.client.pid is not None and pair.server.pid is not None
            roles = {"client": pair.client.pid, "server": pair.server.pid, "app": app.pid}
            paths.append(LoadPath(name, pair.client_address, OUTBOUND_HTTP_PORT, REQUEST, roles))
    for path in paths:
        await wait_serving(path.host, path.port, path.request, BODY.encode())
    return paths, pairs


async def evidence(pairs: dict[str, Pair]) -> dict[str, Any]:
    """Per-request configuration of each proxy and the counters that prove mTLS + RBAC."""
    config: dict[str, Any] = {}
    counters: dict[str, Any] = {}
    for name, pair in pairs.items():
        config[name] = {
            "client": per_request_features(await config_dump(pair.client)),
            "server": per_request_features(await config_dump(pair.server)),
        }
        counters[name] = {
            "server_rbac": await stats(pair.server, r"rbac\.(allowed|denied)"),
            "server_tls": await stats(
                pair.server, r"listener\..*ssl\.(versions|ciphers|handshake)"
            ),
        }
    return {"config": config, "counters": counters}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    ports = [(APP_ADDRESS, APP_PORT), (HAND_CLIENT_ADDRESS, OUTBOUND_HTTP_PORT)]
    ports += [(HAND_SERVER_ADDRESS, APP_PORT), (HTTPBIN_POD_ADDRESS, APP_PORT)]
    # sleep's outbound listeners: the HTTP proxy, TCP services, TLS egress.
    ports += [(SLEEP_OUTBOUND_ADDRESS, p) for p in (OUTBOUND_HTTP_PORT, 9000, 9001, 9002, 443)]
    if args.access_log_variant:
        ports += [
            (HAND_LOG_CLIENT_ADDRESS, OUTBOUND_HTTP_PORT),
            (HAND_LOG_SERVER_ADDRESS, APP_PORT),
        ]
    check_free(ports)
    load = LoadGenerator(args.workers)  # spawning overlaps with the setup below
    try:
        with tempfile.TemporaryDirectory(prefix="bench-dataplane-") as tmp:
            async with contextlib.AsyncExitStack() as stack:
                paths, pairs = await setup_paths(stack, Path(tmp), args)
                setup_s = time.monotonic() - started
                log(f"all paths serve ({setup_s:.1f}s); measuring {[p.name for p in paths]}")
                rounds: list[dict[str, dict[str, Any]]] = []
                for number in range(args.rounds):
                    rounds.append({})
                    for path in paths:
                        rounds[-1][path.name] = await measure(path, load, args)
                        got = rounds[-1][path.name]
                        log(
                            f"round {number + 1} {path.name}: {got['requests_per_s']} req/s, "
                            f"p50 {got['p50_ms']} ms, errors {got['errors']}"
                        )
                proof = await evidence(pairs)
                version = json.loads(
                    (await pairs["trustmesh"].client.admin_get("/server_info")).body
                )
    finally:
        load.close()
    medians = summarize(rounds)
    comparisons = {"trustmesh_vs_handwritten": compare(rounds, medians, "trustmesh", "handwritten")}
    if args.access_log_variant:
        comparisons["handwritten_accesslog_vs_handwritten"] = compare(
            rounds, medians, "handwritten_accesslog", "handwritten"
        )
        comparisons["trustmesh_vs_handwritten_accesslog"] = compare(
            rounds, medians, "trustmesh", "handwritten_accesslog"
        )
    return {
        "machine": machine(),
        "setup": {
            "envoy_version": version.get("version", "?").split("/")[1],
            "envoy_concurrency": 1,  # every Envoy: app, both clients, both servers
            "load_generator": "python selectors, closed loop, keep-alive HTTP/1.1",
            "wrk_installed": shutil.which("wrk") is not None,
            "workers": args.workers,
            "connections_per_worker": args.connections,
            "in_flight": args.workers * args.connections,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "body_bytes": len(BODY),
            "request": REQUEST.decode(),
            "setup_s": round(setup_s, 1),
        },
        "targets": TARGETS,
        "median": medians,
        "ratios": comparisons,
        "rounds": rounds,
        **proof,
        "runtime_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--connections", type=int, default=8, help="per generator process")
    parser.add_argument("--max-requests", type=int, default=2_000_000, help="per worker and run")
    parser.add_argument(
        "--access-log-variant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the hand-written pair running trustmesh's access logs",
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
