"""What each part of trustmesh's inbound HTTP chain costs Envoy, in instructions per request.

Wall-clock and CPU-time benchmarks on this shared 2-core machine move ±10 % between runs;
instruction counts under callgrind repeat to ±0.1 %. So this benchmark runs the server
side of the sandbox pair (bench_sandbox.py: foo/sleep → foo/httpbin, mesh STRICT, an ALLOW
for sleep) under ``valgrind --tool=callgrind`` once per variant, each behind its own
hand-written client Envoy and the same app (an Envoy ``direct_response``):

* ``handwritten``: the minimal server a user would write — mTLS listener requiring a
  client certificate, one RBAC filter allowing sleep, router;
* ``trustmesh``: the same listener with the HTTP connection manager trustmesh translates
  for httpbin's captured port (``translate(…, CaptureMode.TRANSPARENT)``, ECDS slots and
  the RDS route put inline as ``static_bootstrap`` does: what the control plane serves);
* ``trustmesh_without_*``: that manager with one feature taken out, to price it —
  ``xfcc`` (x-forwarded-client-cert from the verified peer), ``path_normalization``,
  ``access_log`` (the refused-requests log filter), ``disabled_slots`` (the policy slots
  no route switches on, gone altogether).

Every variant gets 50 warm-up requests, then three batches: callgrind's counters zeroed,
``--requests`` more sent on one keep-alive connection through the variant's client, the
dump's total divided by that count. Other load on the machine only ever adds instructions
(more event-loop turns and timer work per request), so the smallest batch is reported.
Startup, TLS handshakes and xDS are outside the window.

Needs valgrind (``callgrind_control``). Prints JSON.

Usage: python bench/bench_inbound_cost.py [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib.dataplane_pairs import stacked_envoy
from benchlib.dataplane_topology import HTTPBIN, SLEEP
from benchlib.envoy_pair import (
    app_bootstrap,
    handwritten_client_bootstrap,
    handwritten_server_bootstrap,
    issue,
)
from benchlib.procstat import machine
from benchlib.sandbox_pods import write_config
from trustmesh.agent.envoy import get_envoy_path
from trustmesh.config import load_config
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.xds.outbound_listeners import OUTBOUND_HTTP_PORT
from trustmesh.xds.translate import CaptureMode, static_bootstrap, translate

Json = dict[str, Any]
APP = "127.0.64.3"
BATCHES = 3
REQUEST_PATH = "http://httpbin.foo:8000/get"


def log(message: str) -> None:
    print(f"[bench_inbound_cost] {message}", file=sys.stderr, flush=True)


def trustmesh_manager(config_dir: Path) -> Json:
    """httpbin's inbound HTTP manager for port 8000 (the mTLS chain), as Envoy gets it."""
    loaded = load_config([str(config_dir)])
    assert loaded.mesh is not None, loaded.errors
    resources = translate(
        loaded.mesh,
        "foo/httpbin",
        inbound_address="10.88.0.3",
        capture=CaptureMode.TRANSPARENT,
        service_addresses={"foo/httpbin": "10.96.0.10"},
        workload_addresses={"foo/httpbin": "10.88.0.3"},
    )
    bootstrap = static_bootstrap(resources, node_id="bench", sds_socket="/unused")
    (inbound,) = [
        x for x in bootstrap["static_resources"]["listeners"] if x["name"] == "virtualInbound"
    ]
    (chain,) = [c for c in inbound["filter_chains"] if c["name"] == "inbound|8000|mtls"]
    manager: Json = chain["filters"][0]
    return manager


def _without(change: Callable[[Json], None]) -> Callable[[Json], Json]:
    def variant(manager: Json) -> Json:
        out = copy.deepcopy(manager)
        change(out["typed_config"])
        return out

    return variant


def _drop(*keys: str) -> Callable[[Json], None]:
    def change(config: Json) -> None:
        for key in keys:
            config.pop(key, None)

    return change


def _drop_disabled(config: Json) -> None:
    """Drop the slots no route switches on (the ones in use stay)."""
    host = config["route_config"]["virtual_hosts"][0]
    enabled = set(host.get("typed_per_filter_config", {}))
    config["http_filters"] = [
        f for f in config["http_filters"] if not f.get("disabled") or f["name"] in enabled
    ]


VARIANTS: dict[str, Callable[[Json], Json] | None] = {
    "handwritten": None,
    "trustmesh": _without(lambda config: None),
    "trustmesh_without_xfcc": _without(
        _drop("forward_client_cert_details", "set_current_client_cert_details")
    ),
    "trustmesh_without_path_normalization": _without(
        _drop("normalize_path", "path_with_escaped_slashes_action")
    ),
    "trustmesh_without_access_log": _without(_drop("access_log")),
    "trustmesh_without_disabled_slots": _without(_drop_disabled),
}


def server_bootstrap(manager: Json | None, address: str, creds: Any) -> Json:
    """The hand-written server, or its listener carrying ``manager`` routed to the app."""
    bootstrap = handwritten_server_bootstrap(address, APP, creds)
    if manager is not None:
        manager = copy.deepcopy(manager)
        config = manager["typed_config"]
        host = config["route_config"]["virtual_hosts"][0]
        route = {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "0s"}}
        config["route_config"] = {"virtual_hosts": [{**host, "routes": [route]}]}
        bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"] = [manager]
    return bootstrap


def send(client: str, count: int) -> None:
    connection = http.client.HTTPConnection(client, OUTBOUND_HTTP_PORT, timeout=60)
    try:
        for _ in range(count):
            connection.request("GET", REQUEST_PATH, headers={"Host": "httpbin.foo:8000"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"status {response.status}")
    finally:
        connection.close()


class Callgrind:
    """One Envoy under callgrind, stopped by its PID."""

    def __init__(self, bootstrap: Json, workdir: Path) -> None:
        workdir.mkdir(parents=True)
        config = workdir / "envoy.json"
        config.write_text(json.dumps(bootstrap))
        self.out = workdir / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}"]
        command += [str(get_envoy_path()), "-c", str(config), "--concurrency", "1"]
        command += ["--disable-hot-restart", "--log-level", "warning"]
        with (workdir / "envoy.log").open("w") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)

    def control(self, flag: str) -> None:
        subprocess.run(
            ["callgrind_control", flag, str(self.process.pid)], check=True, capture_output=True
        )

    def last_dump_total(self) -> int:
        dumps = sorted(self.out.parent.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
        for line in dumps[-1].read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1])
        raise RuntimeError(f"no summary in {dumps[-1]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def warm(client: str, timeout: float = 180) -> None:
    """Until the variant answers (Envoy starts slowly under callgrind)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.to_thread(send, client, 50)
            return
        except (OSError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)  # another process starting: nothing to wait on


async def run(requests: int, workdir: Path) -> Json:
    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.init(workdir / "ca", CaConfig(), now)
    manager = trustmesh_manager(write_config(workdir / "config"))
    results: Json = {}
    async with contextlib.AsyncExitStack() as stack:
        await stacked_envoy(stack, app_bootstrap(APP), workdir / "app")
        for i, (name, variant) in enumerate(VARIANTS.items()):
            server_at, client_at = f"127.0.64.{20 + i}", f"127.0.64.{60 + i}"
            bootstrap = server_bootstrap(
                None if variant is None else variant(manager), server_at, issue(ca, HTTPBIN, now)
            )
            server = Callgrind(bootstrap, workdir / name)
            stack.callback(server.stop)
            client = handwritten_client_bootstrap(client_at, server_at, issue(ca, SLEEP, now))
            await stacked_envoy(stack, client, workdir / f"{name}-client")
            await warm(client_at)
            batches = []
            for _ in range(BATCHES):
                server.control("-z")
                started = time.monotonic()
                await asyncio.to_thread(send, client_at, requests)
                elapsed = time.monotonic() - started
                server.control("-d")
                batches.append(server.last_dump_total() / requests)
                log(f"{name}: {batches[-1]:,.0f} instructions per request ({elapsed:.1f} s)")
            # Other load only adds instructions (more event-loop turns per request): the
            # smallest batch is the chain's own cost.
            results[name] = {
                "instructions_per_request": round(min(batches)),
                "batches": [round(b) for b in batches],
            }
    base = results["trustmesh"]["instructions_per_request"]
    hand = results["handwritten"]["instructions_per_request"]
    for name, result in results.items():
        result["vs_handwritten"] = round(result["instructions_per_request"] / hand, 4)
        if name.startswith("trustmesh_without_"):
            result["feature_costs"] = base - result["instructions_per_request"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("bench_inbound_cost needs valgrind (callgrind_control) on PATH")
    with tempfile.TemporaryDirectory(prefix="tm-inbound-cost-") as tmp:
        started = time.monotonic()
        variants = asyncio.run(run(args.requests, Path(tmp)))
    out = {
        "machine": machine(),
        "requests_per_variant": args.requests,
        "variants": variants,
        "runtime_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
