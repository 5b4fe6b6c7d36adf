"""The local mesh's control plane as a process: CA + xDS + a debug endpoint, like istiod.

``python -m trustmesh.runtime.control_plane <state>`` — started (and restarted if it dies)
by the runtime supervisor. It reads ``<state>/control-plane-args.json`` (configuration
paths, ports: 0 picks one) and ``<state>/plan.json``; creates the CA in ``<state>/ca`` on
first start (trust domain from the mesh config), writes the trust bundle and one
single-use bootstrap token per sidecar pod, serves the CA (enrollment and renewal ports)
and ADS over mTLS for every sidecar of the plan, and watches the configuration files.
When it serves it writes ``<state>/control-plane.json`` and prints it as one JSON line.

The debug endpoint — HTTP on the Unix socket ``<state>/control-plane/debug.sock``, mode
0600, its owner only, never TCP (:mod:`trustmesh.runtime.debug_endpoint`) — answers
``GET /debug/syncz``: the configuration generation, the errors of the last reload, the
pods whose endpoints are out of the mesh and, per proxy, SYNCED or not and its last NACK —
what ``trustmesh status`` and ``trustmesh test --live`` wait on.

Metrics: Prometheus text on ``GET /metrics`` over plain HTTP (as istiod's :15014), on the
address the CA and xDS listen on — loopback in process mode, the node namespace's bridge
address in the sandbox — at ``ports.metrics`` (0 picks one; a restart keeps it). Its
families (:mod:`trustmesh.metrics`) carry counts, type names, reason codes, pod names and
SPIFFE identities only: no pod address, no node id, no file path or error text, which
stay on the owner-only debug socket. Each sidecar's RBAC / ext_authz counters are read
from its Envoy admin per scrape (bounded; a dead sidecar shows ``trustmesh_sidecar_up 0``).

Readiness: the supervisor writes ``<state>/not-ready.json`` (``{"not_ready": [pod refs]}``)
when a pod's app exits and again once it accepts connections after its restart; the
control plane watches that file and takes those pods' endpoints out of every proxy's
configuration meanwhile, as Kubernetes does with a pod that is not Ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.server import CaServer
from trustmesh.identity.store import CaStore, StoreError
from trustmesh.metrics.controlplane import ControlPlaneMetrics
from trustmesh.metrics.server import MetricsServer
from trustmesh.metrics.sidecars import SidecarCounts, SidecarTarget, scrape
from trustmesh.policy.routing import sidecar_mesh_routes
from trustmesh.runtime.debug_endpoint import (
    SYNCZ,
    DebugEndpointError,
    DebugServer,
    debug_socket,
)
from trustmesh.runtime.layout import ARGS_FILE, Layout, read_json, write_json
from trustmesh.runtime.plan import MeshPlan, PodPlan
from trustmesh.runtime.process import run_until_signalled
from trustmesh.xds.controlplane import ConfigRejected, ControlPlane, ProxyRegistration
from trustmesh.xds.translate import CaptureMode

__all__ = [
    "ARGS_FILE",
    "main",
    "node_id",
    "read_not_ready",
    "serve",
    "service_addresses",
    "sidecar_targets",
    "write_not_ready",
]

# A poll costs one stat per configuration file: every 20 ms is free for a local mesh's
# handful of files and keeps file write → reload start at ~20-40 ms.
WATCH_INTERVAL = 0.02
WATCH_DEBOUNCE = 0.02  # editors and `cp` write in steps: wait until the files settle
TOKEN_TTL = dt.timedelta(minutes=30)


def node_id(pod: PodPlan) -> str:
    """The sidecar's Envoy node id (Istio's ``sidecar~IP~name.ns~ns.svc.cluster.local``,
    ``router~…`` for a gateway)."""
    return _registration(None, pod).node_id


def _registration(plan: MeshPlan | None, pod: PodPlan) -> ProxyRegistration:
    if pod.gateway:
        return ProxyRegistration.router(pod.ref, pod.pod_ip)
    if plan is None:
        return ProxyRegistration.sidecar(pod.ref, pod.pod_ip)
    if plan.sandboxed:  # its traffic is captured: Istio's virtualInbound/Outbound layout
        return ProxyRegistration.sidecar(
            pod.ref,
            pod.pod_ip,
            app_address=pod.app_ip,
            capture=CaptureMode.TRANSPARENT,
            service_addresses=service_addresses(plan),
        )
    return ProxyRegistration.sidecar(
        pod.ref, pod.pod_ip, app_address=pod.app_ip, outbound_address=pod.outbound_ip
    )


def service_addresses(plan: MeshPlan) -> dict[str, str]:
    """Service ``namespace/name`` → its ClusterIP (``name.ns.svc.cluster.local`` keys)."""
    out = {}
    for host, address in plan.cluster_ips.items():
        name, namespace = host.split(".")[:2]
        out[f"{namespace}/{name}"] = address
    return out


def _open_ca(ca_dir: Path, trust_domain: str, now: dt.datetime) -> CertificateAuthority:
    """The CA in ``ca_dir``, created (for ``trust_domain``) on first start."""
    if CaStore(ca_dir).exists():  # a restart: same roots, tokens already burnt stay so
        return CertificateAuthority.load(ca_dir)
    return CertificateAuthority.init(ca_dir, CaConfig(trust_domain=trust_domain), now)


def _write_tokens(
    layout: Layout, ca: CertificateAuthority, plan: MeshPlan, now: dt.datetime
) -> None:
    for pod in plan.pods:
        if not pod.sidecar:
            continue
        layout.pod_dir(pod.key).mkdir(mode=0o700, parents=True, exist_ok=True)
        token = ca.token(pod.namespace, pod.service_account, now, ttl=TOKEN_TTL)
        path = layout.token(pod.key)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token)


def _routing_warnings(plane: ControlPlane) -> list[str]:
    """What the proxies' routes leave out: VirtualService parts sidecars do not honour
    (read once per compiled mesh)."""
    mesh = plane.mesh
    return [] if mesh is None else [str(d) for d in sidecar_mesh_routes(mesh).diagnostics]


def _syncz(plane: ControlPlane) -> dict[str, Any]:
    rebuild = plane.last_rebuild
    return {
        "generation": plane.reloads,
        "files": plane.loaded_digest,
        "rejected": plane.rejected_reloads,
        "errors": [str(d) for d in plane.last_errors],
        "warnings": _routing_warnings(plane),
        "not_ready": sorted(plane.not_ready),
        # how the last build served its proxies (reused / patched / translated) and took
        "rebuild": dataclasses.asdict(rebuild) if rebuild is not None else None,
        "proxies": plane.sync_status(),
    }


def sidecar_targets(layout: Layout, plan: MeshPlan) -> list[SidecarTarget]:
    """Every sidecar pod's Envoy admin, as the supervisor recorded it in ``mesh.json``
    (None until reported), reached from inside the pod's namespace in the sandbox."""
    try:
        records = read_json(layout.mesh).get("pods", {})
    except (OSError, ValueError, AttributeError):
        records = {}
    targets = []
    for pod in plan.pods:
        if not pod.sidecar:
            continue
        record = records.get(pod.ref) if isinstance(records, dict) else None
        admin = record.get("admin") if isinstance(record, dict) else None
        targets.append(
            SidecarTarget(
                pod.namespace, pod.name, admin if isinstance(admin, str) else None, pod.netns
            )
        )
    return targets


def _read_sidecars(layout: Layout, plan: MeshPlan) -> list[SidecarCounts]:
    return scrape(sidecar_targets(layout, plan))


def read_not_ready(layout: Layout) -> list[str]:
    """The pods the supervisor says are not ready (none when it has not said)."""
    try:
        refs = read_json(layout.not_ready).get("not_ready", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [ref for ref in refs if isinstance(ref, str)] if isinstance(refs, list) else []


def write_not_ready(layout: Layout, refs: Iterable[str]) -> None:
    write_json(layout.not_ready, {"not_ready": sorted(refs)})


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


async def _watch_not_ready(
    plane: ControlPlane, layout: Layout, stop: asyncio.Event, seen: tuple[int, int, int] | None
) -> None:
    """Apply ``not-ready.json`` whenever it differs from ``seen`` (one stat per interval)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), WATCH_INTERVAL)
        now = _stamp(layout.not_ready)
        if now != seen:
            seen = now
            await plane.set_not_ready(read_not_ready(layout))


async def serve(layout: Layout, stop: asyncio.Event) -> int:
    """Serve until ``stop``; 1 if the configuration is refused at start."""
    args = read_json(layout.root / ARGS_FILE)
    plan = MeshPlan.from_json(read_json(layout.plan))
    ports: dict[str, int] = args["ports"]
    # Where the CA and xDS listen: loopback, or in a sandbox the bridge address of the
    # node namespace (the pods' gateway; nothing outside the mesh's namespaces sees it)
    listen = str(args.get("listen", "127.0.0.1"))
    now = dt.datetime.now(dt.UTC)
    try:
        ca = _open_ca(layout.ca, plan.trust_domain, now)
    except StoreError as exc:  # keys others can read or replace: not this mesh's CA
        print(json.dumps({"ready": False, "error": f"the mesh CA is refused: {exc}"}), flush=True)
        return 1
    if ca.config.trust_domain != plan.trust_domain:
        # Kept from an earlier `up` of this state directory: its workload certificates
        # would carry the old trust domain, and every principal would be wrong.
        why = (
            f"{layout.ca} holds a CA for trust domain {ca.config.trust_domain!r}, the mesh "
            f"config says {plan.trust_domain!r}: use another --state or remove {layout.ca}"
        )
        print(json.dumps({"ready": False, "error": why}), flush=True)
        return 1
    layout.roots.write_bytes(ca.bundle_pem(now))
    _write_tokens(layout, ca, plan, now)
    metrics = ControlPlaneMetrics(ca=ca)
    ca_server = CaServer(
        ca,
        address=f"{listen}:{ports.get('ca', 0)}",
        renewal_address=f"{listen}:{ports.get('ca_renewal', 0)}",
        observer=metrics,
    )
    not_ready_seen = _stamp(layout.not_ready)  # before reading: a later write is seen
    plane = ControlPlane(
        args["config"],
        ca=ca,
        address=f"{listen}:{ports.get('xds', 0)}",
        mesh_config=args["mesh_config"],
        debounce=WATCH_DEBOUNCE,
        workload_addresses={pod.ref: pod.pod_ip for pod in plan.pods},
        not_ready=read_not_ready(layout),
        observer=metrics,
    )
    for pod in plan.pods:
        if pod.sidecar:
            plane.register(_registration(plan, pod))
    await ca_server.start()
    tasks: list[asyncio.Task[None]] = []
    debug = DebugServer(debug_socket(layout.root), {SYNCZ: lambda: _syncz(plane)})
    metrics_server = MetricsServer(
        listen,
        int(ports.get("metrics", 0)),
        plane_text=metrics.render,
        sidecars=lambda: _read_sidecars(layout, plan),
    )
    try:
        try:
            xds_port = await plane.start()
        except ConfigRejected as exc:
            print(json.dumps({"ready": False, "error": str(exc)}), flush=True)
            return 1
        try:
            await debug.start()
        except (OSError, DebugEndpointError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            why = f"cannot serve the debug endpoint at {debug.socket_path}: {detail}"
            print(json.dumps({"ready": False, "error": why}), flush=True)
            return 1
        try:
            metrics_port = await metrics_server.start()
        except OSError as exc:
            why = f"cannot serve metrics on {listen}:{ports.get('metrics', 0)}: {exc.strerror}"
            print(json.dumps({"ready": False, "error": why}), flush=True)
            return 1
        tasks.append(asyncio.create_task(ca_server.run_rotation(stop)))
        tasks.append(asyncio.create_task(plane.watch(stop, WATCH_INTERVAL)))
        tasks.append(asyncio.create_task(_watch_not_ready(plane, layout, stop, not_ready_seen)))
        info = {
            "ready": True,
            "pid": os.getpid(),
            "ports": {
                "xds": xds_port,
                "ca": ca_server.port,
                "ca_renewal": ca_server.renewal_port,
                "metrics": metrics_port,
            },
            "metrics": f"{listen}:{metrics_port}",
            "debug_socket": str(debug.socket_path),
            "spiffe_id": plane.spiffe_id,
            "trust_domain": ca.config.trust_domain,
        }
        write_json(layout.control_plane, info)
        print(json.dumps(info), flush=True)
        await stop.wait()
        return 0
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await metrics_server.stop()
        await debug.stop()
        await plane.stop()
        await ca_server.stop()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m trustmesh.runtime.control_plane STATE_DIR", file=sys.stderr)
        return 2
    layout = Layout(Path(args[0]))
    return run_until_signalled(lambda stop: serve(layout, stop))


if __name__ == "__main__":
    sys.exit(main())
