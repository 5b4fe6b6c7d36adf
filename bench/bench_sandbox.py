"""Sandbox benchmark: trustmesh's sidecar pair in pod network namespaces next to a
hand-written Envoy pair behind the very same capture rules, side by side in one run.

The pairs run in a two-pod mesh (foo/sleep → foo/httpbin, mesh-wide STRICT, an
AuthorizationPolicy ALLOWing sleep on httpbin) built by the sandbox library — one node
namespace with a bridge, a namespace per pod with its veth, pod IP and route, istio-init's
capture and kube-proxy's DNAT as the pod's nftables table (``capture.pod_ruleset``), every
object on the ledger — one such mesh per pair, so the pairs share nothing but the CPU
(the third is built by ``up`` itself, with the same rules):

1. ``handwritten``: the minimal pair a user would write for captured pods
   (bench/benchlib/sandbox_handwritten.py): client Envoy with one listener on 15001
   (``original_dst`` listener filter) → ``ORIGINAL_DST`` cluster over mTLS (static
   certificates from trustmesh's CA, inline; the server's SPIFFE ID pinned); server Envoy
   with one listener on 15006 (``original_dst``, client certificate required, RBAC ALLOW
   sleep) → ``ORIGINAL_DST`` cluster from 127.0.0.6 to the app.
2. ``trustmesh``: the sidecars trustmesh configures for those pods: ``xds.translate`` with
   ``CaptureMode.TRANSPARENT`` (Istio's virtualOutbound / virtualInbound / per-port
   listeners, the pod's ClusterIPs and endpoints from the netns plan) as a static bootstrap
   (``static_bootstrap``: what the control plane would serve over ADS, the ECDS filters
   inline), certificates over SDS from two real WorkloadAgents enrolled with the CA server.

3. ``trustmesh_up`` (``--no-up-path`` leaves it out): ``trustmesh up --isolation netns`` of
   the same pods (bench/benchlib/sandbox_up_pair.py) — the control plane over ADS (ECDS
   policy filters, RDS), agents behind the SDS peer gate, processes started by the
   supervisor; httpbin's app is the same Envoy, as the container's ``command``.

In each mesh the app is an Envoy answering a ``direct_response`` on 0.0.0.0:8000 in
httpbin's pod as the pod's app uid; sidecars run as uid 1337 through ``podexec`` (no
capabilities, no_new_privs), every Envoy with one worker thread. The load generator's
workers open their connections inside sleep's namespace as an app would (uid 0, so the
capture takes them) to httpbin's ClusterIP:8000 (``GET /get``, ``Host: httpbin.foo:8000``).
Paths are interleaved round by round in A B C, C B A order; medians and ratios as in
bench_dataplane.py, plus ``sidecar_cpu_ratio_app_normalized``: each run's sidecar CPU per
request divided by the app's in the same run. The app does identical work on every path,
so its CPU per request measures how much the rest of the machine slowed that run (cache
and core contention on a shared host); the normalized ratio is the sidecars' own cost.

After the run the sandboxes are torn down by their ledgers (``up``'s by ``trustmesh
down``) and the host is checked: no namespace of any of the meshes, the host's links and
nftables tables as before (``teardown.leftovers`` in the JSON).

Then ``up_down`` (bench/benchlib/sandbox_updown.py): ``trustmesh up -d --isolation netns``
of ``--pods`` (20) helloworld pods, each with a sidecar, timed until it returns and until
every pod answers through the mesh; ``trustmesh down``; the host checked for anything the
mesh left (namespaces, links, nftables tables, mounts, its run directory, processes).

Needs root, ``nft`` and network namespaces (the sandbox's own requirements).

Usage: python bench/bench_sandbox.py [--rounds 3] [--duration 5] [--warmup 1]
       [--workers 2] [--connections 8] [--state DIR] [--pods 20] [--isolation netns]
       [--skip-pair] [--skip-up-down]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib.dataplane_measure import TARGETS, LoadPath, compare, measure, summarize
from benchlib.dataplane_topology import APP_PORT, BODY, HTTPBIN, SLEEP
from benchlib.envoy_admin import per_request_features, stats
from benchlib.envoy_pair import app_bootstrap, issue
from benchlib.loadgen import LoadGenerator, wait_serving
from benchlib.mesh_rig import RunningAgent
from benchlib.procstat import machine
from benchlib.sandbox_handwritten import captured_client_bootstrap, captured_server_bootstrap
from benchlib.sandbox_pods import BuiltMesh, PodEnvoy, build_sandbox, write_config
from benchlib.sandbox_up_pair import UpPair, up_config
from benchlib.sandbox_updown import up_and_down
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.server import CaServer
from trustmesh.runtime.capture import PROXY_UID, TABLE
from trustmesh.runtime.netns import sandbox_support
from trustmesh.xds.controlplane import ProxyRegistration
from trustmesh.xds.translate import CaptureMode, static_bootstrap, translate

UP_TARGET_S = 10.0  # `up` of 20 pods ready
SERVICE = "foo/httpbin"
SERVICE_HOST = "httpbin.foo.svc.cluster.local"
# What an unmodified app sends to http://httpbin.foo:8000/get (origin form: no proxy).
REQUEST = b"GET /get HTTP/1.1\r\nHost: httpbin.foo:8000\r\n\r\n"


def log(message: str) -> None:
    print(f"[bench_sandbox] {message}", file=sys.stderr, flush=True)


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def host_snapshot(mesh_ids: list[str]) -> dict[str, Any]:
    """What a sandbox could leave on the host: its namespaces, the host's links and
    nftables tables, its runtime directories."""
    return {
        "netns": sorted(
            n for n in _run("ip", "netns", "list").split() if any(m in n for m in mesh_ids)
        ),
        "links": sorted(
            line.split(":")[1].strip() for line in _run("ip", "-o", "link").splitlines()
        ),
        "nft_tables": _run("nft", "list", "tables").split("\n"),
        "run_dirs": [m for m in mesh_ids if Path(f"/run/trustmesh/{m}").exists()],
    }


def app_normalized(rounds: list[dict[str, dict[str, Any]]], path: str, baseline: str) -> float:
    """Median over rounds of (sidecar CPU / app CPU per request) on ``path`` over the same
    on ``baseline``: the sidecars' cost with the run's contention divided out."""

    def relative(run: dict[str, Any]) -> float:
        cpu = run["cpu_us_per_request"]
        return float(cpu["client"] + cpu["server"]) / max(float(cpu["app"]), 1e-9)

    ratios = [relative(r[path]) / relative(r[baseline]) for r in rounds]
    return round(statistics.median(ratios), 3)


class Bench:
    """Both meshes, their processes and agents; :meth:`close` stops them all by PID and
    tears the sandboxes down."""

    def __init__(self, workdir: Path, state: Path, up_path: bool) -> None:
        self.workdir = workdir
        self.state = state
        self.meshes: dict[str, BuiltMesh] = {}
        self.envoys: dict[str, dict[str, Any]] = {}  # pair → role → PodEnvoy / UpEnvoy
        self.stack = contextlib.AsyncExitStack()
        self.up_path = up_path
        self.up: UpPair | None = None
        self.up_problem = ""

    async def pod_envoy(
        self, pair: str, role: str, ref: str, bootstrap: dict[str, Any], sidecar: bool
    ) -> PodEnvoy:
        built = self.meshes[pair]
        pod = built.plan.pod(ref)
        assert pod is not None and pod.uid is not None
        paths = built.sandbox.paths(pod)
        if sidecar:  # uid 1337 with the pod's own group, which alone opens proxy/
            uid, gid, workdir = PROXY_UID, paths.group, paths.proxy
        else:
            uid, gid, workdir = pod.uid, pod.gid or pod.uid, paths.app
        envoy = PodEnvoy(f"{pair} {role}", built.netns(ref), uid, gid, workdir)
        self.stack.push_async_callback(envoy.stop)  # before start: a failed start is stopped
        await envoy.start(bootstrap)
        self.envoys.setdefault(pair, {})[role] = envoy
        return envoy

    async def build(self, ca: CertificateAuthority) -> None:
        config = write_config(self.workdir / "config")
        for pair in ("handwritten", "trustmesh"):
            # pyroute2's synchronous API runs an event loop of its own: off this one.
            self.meshes[pair] = await asyncio.to_thread(build_sandbox, config, self.state / pair)
            log(f"{pair}: sandbox built in {self.meshes[pair].build_s:.2f}s")
            await self.pod_envoy(pair, "app", SERVICE, app_bootstrap("0.0.0.0"), sidecar=False)
        now = dt.datetime.now(dt.UTC)
        await self.pod_envoy(
            "handwritten",
            "server",
            SERVICE,
            captured_server_bootstrap(issue(ca, HTTPBIN, now)),
            True,
        )
        await self.pod_envoy(
            "handwritten",
            "client",
            "foo/sleep",
            captured_client_bootstrap(issue(ca, SLEEP, now)),
            True,
        )
        await self.trustmesh_sidecars(ca)
        if self.up_path:
            await self.start_up()

    async def start_up(self) -> None:
        """The third pair: ``trustmesh up --isolation netns`` of the same pods."""
        public = self.state / "up-files"  # the app's bootstrap, readable by its uid
        public.mkdir(parents=True, exist_ok=True)
        for folder in (self.state, public):
            folder.chmod(0o755)
        config = up_config(self.workdir / "up-config", public)
        up = await asyncio.to_thread(UpPair.start, config, self.state / "up")
        self.up = up

        async def stop() -> None:
            self.up_problem = await asyncio.to_thread(up.stop)

        self.stack.push_async_callback(stop)
        self.envoys["trustmesh_up"] = dict(up.envoys)
        log(f"trustmesh_up: up --isolation netns in {up.up_s:.1f}s")

    async def trustmesh_sidecars(self, ca: CertificateAuthority) -> None:
        """Agents (enrolled with a bootstrap token, SDS in the pod's proxy directory) and
        the translated captured-sidecar bootstraps."""
        built = self.meshes["trustmesh"]
        ca_server = CaServer(ca)
        self.stack.push_async_callback(ca_server.stop)
        await ca_server.start()
        httpbin = built.plan.pod(SERVICE)
        assert httpbin is not None
        cluster_ips = {SERVICE: built.plan.cluster_ips[SERVICE_HOST]}
        for role, identity, ref in (("server", HTTPBIN, SERVICE), ("client", SLEEP, "foo/sleep")):
            pod = built.plan.pod(ref)
            assert pod is not None
            sds_dir = built.sandbox.paths(pod).sds_dir  # 0700, uid 1337
            agent = await RunningAgent.start(
                identity, ca, (ca_server.port, ca_server.renewal_port), sds_dir, 10
            )
            self.stack.push_async_callback(agent.close)
            # The agent (here: this root process) owns the socket; its Envoy's uid may use it.
            os.chown(agent.sds.socket_path, PROXY_UID, PROXY_UID)
            resources = translate(
                built.mesh,
                ref,
                inbound_address=pod.pod_ip,
                capture=CaptureMode.TRANSPARENT,
                service_addresses=cluster_ips,
                workload_addresses={SERVICE: httpbin.pod_ip},
            )
            registration = ProxyRegistration.sidecar(ref, pod.pod_ip)
            bootstrap = static_bootstrap(
                resources, node_id=registration.node_id, sds_socket=agent.sds.socket_path
            )
            await self.pod_envoy("trustmesh", role, ref, bootstrap, sidecar=True)

    def capture_rules(self) -> dict[str, Any]:
        """Each pod's nftables table as the kernel holds it, per pair: the same rules."""
        plans = {pair: built.plan for pair, built in self.meshes.items()}
        if self.up is not None:
            plans["trustmesh_up"] = self.up.running.plan
        tables: dict[str, dict[str, str]] = {}
        for pair, plan in plans.items():
            tables[pair] = {
                pod.ref: _run(
                    "ip", "netns", "exec", str(pod.netns), "nft", "list", "table", "ip", TABLE
                )
                for pod in plan.pods
            }
        first, *others = tables.values()
        return {
            "identical_in_both_meshes": all(other == first for other in others),
            "rules_per_pod": {ref: text.count("\n") for ref, text in first.items()},
            "sleep": first["foo/sleep"].splitlines(),
        }

    def paths(self) -> list[LoadPath]:
        out = []
        if self.up is not None:
            out.append(self.up.path("trustmesh_up", REQUEST))
        for pair in ("handwritten", "trustmesh"):
            built, envoys = self.meshes[pair], self.envoys[pair]
            roles = {role: envoy.pid for role, envoy in envoys.items()}
            cluster_ip = built.plan.cluster_ips[SERVICE_HOST]
            out.append(
                LoadPath(pair, cluster_ip, APP_PORT, REQUEST, roles, built.netns("foo/sleep"))
            )
        return out

    async def evidence(self) -> dict[str, Any]:
        """Per-request configuration of each sidecar and the counters that show mTLS, RBAC
        and the original-destination listeners at work."""
        config: dict[str, Any] = {}
        counters: dict[str, Any] = {}
        for pair, envoys in self.envoys.items():
            config[pair] = {}
            counters[pair] = {}
            for role in ("client", "server"):
                envoy = envoys[role]
                dump = json.loads((await envoy.admin_get("/config_dump", timeout=10)).body)
                config[pair][role] = per_request_features(dump)
            counters[pair]["server_rbac"] = await stats(envoys["server"], r"rbac\.(allowed|denied)")  # type: ignore[arg-type]
            counters[pair]["server_tls"] = await stats(  # type: ignore[arg-type]
                envoys["server"], r"listener\..*ssl\.(handshake|versions)"
            )
            counters[pair]["client_upstream"] = await stats(  # type: ignore[arg-type]
                envoys["client"], r"cluster\..*upstream_cx_total"
            )
        return {"config": config, "counters": counters}

    async def close(self) -> dict[str, Any]:
        """Stop every process, tear both sandboxes down; what was left, checked."""
        await self.stack.aclose()
        problems = {
            pair: await asyncio.to_thread(built.sandbox.teardown)
            for pair, built in self.meshes.items()
        }
        if self.up is not None:
            problems["trustmesh_up"] = [self.up_problem] if self.up_problem else []
        return {"problems": problems}


async def run_pair(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    mesh_ids: list[str] = []
    before = host_snapshot([])
    load = LoadGenerator(args.workers)  # spawning overlaps with the setup below
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
            workdir = Path(tmp)
            ca = CertificateAuthority.init(workdir / "ca", CaConfig(), dt.datetime.now(dt.UTC))
            bench = Bench(workdir, args.state, args.up_path)
            try:
                await bench.build(ca)
                mesh_ids = [built.plan.mesh_id for built in bench.meshes.values()]
                if bench.up is not None:
                    mesh_ids.append(bench.up.mesh_id)
                paths = bench.paths()
                for path in paths:
                    await wait_serving(
                        path.host, path.port, path.request, BODY.encode(), netns=path.netns
                    )
                setup_s = time.monotonic() - started
                log(f"both pairs serve ({setup_s:.1f}s); measuring")
                rounds: list[dict[str, dict[str, Any]]] = []
                for number in range(args.rounds):
                    rounds.append({})
                    # A B, B A, …: drift in the machine's load hits both paths alike.
                    for path in paths if number % 2 == 0 else paths[::-1]:
                        got = await measure(path, load, args)
                        rounds[-1][path.name] = got
                        log(
                            f"round {number + 1} {path.name}: {got['requests_per_s']} req/s, "
                            f"p50 {got['p50_ms']} ms, errors {got['errors']}"
                        )
                proof = await bench.evidence()
                proof["capture_rules"] = bench.capture_rules()
                builds = {pair: round(b.build_s, 3) for pair, b in bench.meshes.items()}
                plans = {
                    pair: {
                        "mesh_id": b.plan.mesh_id,
                        "pods": {p.ref: {"netns": p.netns, "ip": p.pod_ip} for p in b.plan.pods},
                        "cluster_ips": dict(b.plan.cluster_ips),
                    }
                    for pair, b in bench.meshes.items()
                }
            finally:
                closed = await bench.close()
    finally:
        load.close()
    after = host_snapshot(mesh_ids)
    leftovers = {
        "netns": after["netns"],
        "run_dirs": after["run_dirs"],
        "new_links": sorted(set(after["links"]) - set(before["links"])),
        "new_nft_tables": sorted(set(after["nft_tables"]) - set(before["nft_tables"])),
    }
    medians = summarize(rounds)
    ratios = {"trustmesh_vs_handwritten": compare(rounds, medians, "trustmesh", "handwritten")}
    if "trustmesh_up" in medians:
        ratios["trustmesh_up_vs_handwritten"] = compare(
            rounds, medians, "trustmesh_up", "handwritten"
        )
    for name, ratio in ratios.items():
        ratio["sidecar_cpu_ratio_app_normalized"] = app_normalized(
            rounds, name.split("_vs_")[0], "handwritten"
        )
    return {
        "setup": {
            "isolation": "netns",
            "envoy_concurrency": 1,
            "load_generator": "python selectors, closed loop, keep-alive HTTP/1.1, "
            "connections opened inside sleep's pod namespace (captured)",
            "request": REQUEST.decode(),
            "workers": args.workers,
            "connections_per_worker": args.connections,
            "in_flight": args.workers * args.connections,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "body_bytes": len(BODY),
            "sandbox_build_s": builds,
            "setup_s": round(setup_s, 1),
            "meshes": plans,
        },
        "targets": TARGETS,
        "median": medians,
        "ratios": ratios,
        "rounds": rounds,
        **proof,
        "teardown": {
            **closed,
            "leftovers": leftovers,
            "clean": not any(leftovers.values()) and not any(closed["problems"].values()),
        },
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
        "--state",
        type=Path,
        default=Path("/var/tmp/trustmesh-bench-sandbox"),
        help="the sandboxes' ledgers (a run after a crash removes what they list first)",
    )
    parser.add_argument(
        "--up-path",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the pair `trustmesh up --isolation netns` runs",
    )
    parser.add_argument("--pods", type=int, default=20, help="pods started by `up`")
    parser.add_argument("--isolation", default="netns", help="`up --isolation` (up_down)")
    parser.add_argument("--skip-pair", action="store_true", help="no sidecar pair comparison")
    parser.add_argument("--skip-up-down", action="store_true", help="no up/down of --pods")
    args = parser.parse_args()
    problem = sandbox_support()
    if problem is not None:
        raise SystemExit(f"bench_sandbox needs the pod sandbox: {problem}")
    started = time.monotonic()
    result: dict[str, Any] = {"machine": machine()}
    if not args.skip_pair:
        result["pair"] = asyncio.run(run_pair(args))
    if not args.skip_up_down:
        log(f"up of {args.pods} pods ({args.isolation}), then down")
        with tempfile.TemporaryDirectory(prefix="bench-sandbox-up-") as tmp:
            updown = up_and_down(Path(tmp), args.pods, args.isolation)
        updown["targets"] = {"up_s_max": UP_TARGET_S, "down_leaves_nothing": True}
        updown["meets_targets"] = (
            updown.get("all_serving_s", float("inf")) <= UP_TARGET_S and updown["clean"]
        )
        result["up_down"] = updown
        log(
            f"up {updown.get('up_s')}s, all serving {updown.get('all_serving_s')}s, "
            f"down {updown.get('down_s')}s, clean {updown['clean']}"
        )
    result["runtime_s"] = round(time.monotonic() - started, 1)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
