"""``trustmesh up``: a whole mesh as local processes, started, watched and stopped by PID.

:class:`MeshRuntime` plans the pods (:mod:`trustmesh.runtime.plan`), then starts

1. the control plane process (CA + xDS, :mod:`trustmesh.runtime.control_plane`) and waits
   for its ready line;
2. one sidecar process per injected pod (agent + SDS + Envoy,
   :mod:`trustmesh.runtime.sidecar`), all at once, and waits until every Envoy is ready —
   which means it has its certificate and its first configuration over ADS;
3. every pod's app (its container command) with ``HOST``/``PORT`` set, and waits until
   each app with ports accepts connections on them.

Anything that does not become ready within its timeout stops the whole start with a
message naming the pod and the tail of its log. While it runs, a control plane that exits
is started again on the same ports (Envoys keep their configuration meanwhile and
reconnect). A pod's app that exits is handled as the kubelet handles a container
(:mod:`trustmesh.runtime.restarts`): the pod is not ready — its endpoints leave every
proxy's configuration (``not-ready.json``, read by the control plane) — and, as its
``restartPolicy`` says, the app is started again after the back-off; it is ready again
once it accepts connections on its ports. Restarts, the last exit and the last restart
are in ``mesh.json`` (and ``trustmesh status``). A sidecar that exits makes its pod not
ready and is reported. Stopping kills exactly the processes it started, by PID.

Every child gets ``TRUSTMESH_MESH=<state dir>`` in its environment: :func:`stop_recorded`
checks it before signalling a recorded PID, so a PID reused by an unrelated process after
a crash is never killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from trustmesh.agent.xds_bootstrap import control_plane_spiffe_id
from trustmesh.api.diagnostics import Diagnostic
from trustmesh.api.snapshot import ConfigSnapshot
from trustmesh.config import load_config
from trustmesh.identity.egress import SourceBoundProxy
from trustmesh.runtime import debug_client, netns
from trustmesh.runtime.addresses import (
    MESH_ENV,
    AddressConflict,
    BlockClaim,
    claim_block,
    planned_addresses,
    probe,
)
from trustmesh.runtime.commands import ImageCommand
from trustmesh.runtime.control_plane import node_id, service_addresses, write_not_ready
from trustmesh.runtime.gateway import PublishedPort, Publisher, published_ports
from trustmesh.runtime.layout import ARGS_FILE, Layout, PodPaths, read_json, write_json
from trustmesh.runtime.node_probe import Probe, keep_probing
from trustmesh.runtime.plan import DEFAULT_BASE, NODE_IP, Isolation, MeshPlan, PodPlan, plan_mesh
from trustmesh.runtime.recorded import belongs_to, stop_recorded
from trustmesh.runtime.registration import HostJoin, Joined, RegistryClient
from trustmesh.runtime.restarts import DEFAULT_BACKOFF, Backoff, Exit, should_restart
from trustmesh.runtime.sandbox import Sandbox
from trustmesh.runtime.sandbox import mesh_id as sandbox_mesh_id
from trustmesh.runtime.sandboxed import (
    accepts_in,
    app_argv,
    choose_isolation,
    control_plane_argv,
    install_proxy_file,
    sidecar_argv,
)
from trustmesh.runtime.sidecar import SidecarSpec
from trustmesh.store.model import WorkloadRecord
from trustmesh.xds.gateway import gateway_diagnostics

__all__ = ["MESH_ENV", "MeshRuntime", "StartError", "belongs_to", "stop_recorded"]

_log = logging.getLogger("trustmesh.runtime")
CONTROL_PLANE_TIMEOUT = 30.0
SIDECAR_TIMEOUT = 60.0
SYNC_TIMEOUT = 30.0  # every sidecar ACKs (or NACKs) its first configuration
APP_TIMEOUT = 30.0
STOP_GRACE = 5.0
# A host's lease (30 s) is refreshed every 5 s, a failed refresh (3 s per try) again
# after 1 s: the host outlives losing every replica for 30 - 5 - 4 = 21 s.
KEEP_ALIVE_EVERY = 5.0
KEEP_ALIVE_TIMEOUT = 3.0
KEEP_ALIVE_RETRY = 1.0
SANDBOX_ADMIN_PORT = 15000  # Envoy's admin in a pod: on the pod's own 127.0.0.1, as in Istio

Progress = Callable[[str], None]


class StartError(RuntimeError):
    """The mesh could not start; ``diagnostics`` holds configuration errors, if that is why."""

    def __init__(self, message: str, diagnostics: Sequence[Diagnostic] = ()) -> None:
        super().__init__(message)
        self.diagnostics = tuple(diagnostics)


@dataclass
class _Child:
    name: str
    process: asyncio.subprocess.Process
    log: IO[bytes]
    pump: asyncio.Task[None] | None = None


@dataclass
class MeshRuntime:
    """One mesh: ``config`` files/directories (+ ``mesh_config``) run from ``layout``."""

    config: Sequence[str]
    layout: Layout
    mesh_config: Sequence[str] = ()
    base: str = DEFAULT_BASE
    progress: Progress = field(default=lambda message: None)
    images: Sequence[ImageCommand] = ()  # --image IMAGE=COMMAND, tried in order
    backoff: Backoff = DEFAULT_BACKOFF
    clock: Callable[[], float] = time.monotonic  # how long an app ran (its back-off)
    # None: the pod sandbox when this host allows it, else process mode (said once)
    isolation: Isolation | None = None
    plan: MeshPlan | None = None
    sandbox: Sandbox | None = None  # netns isolation: the namespaces, rules and files
    publisher: Publisher | None = None  # netns isolation: gateway ports on this host
    control_plane: dict[str, Any] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    _children: dict[str, _Child] = field(default_factory=dict)
    _restarts: int = 0
    _config_paths: list[str] = field(default_factory=list)  # resolved, as recorded
    _mesh_config_paths: list[str] = field(default_factory=list)
    _claim: BlockClaim | None = None  # this mesh's address block, held until down()
    _not_ready: set[str] = field(default_factory=set)  # pods whose endpoints are out
    _restarting: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _app_started: dict[str, float] = field(default_factory=dict)  # by clock()
    _last_delay: dict[str, float] = field(default_factory=dict)  # back-off before the last start
    _wake: asyncio.Event | None = None  # supervise() watches a new child
    # `trustmesh node join`: this host's pods only, against the replicas (no control plane
    # of its own); set when it joined
    join: HostJoin | None = None
    joined: Joined | None = None
    _registry: RegistryClient | None = None
    _egress: SourceBoundProxy | None = None  # the registry client's source address
    # the lease is kept from the moment it is granted (a short TTL would end while the
    # host still starts its pods), until down()
    _keeping: asyncio.Task[None] | None = None
    _keep_stop: asyncio.Event = field(default_factory=asyncio.Event)
    _probing: list[asyncio.Task[None]] = field(default_factory=list)  # `--group` probes

    # -- start

    async def up(self) -> None:
        """Start everything; raises :class:`StartError` (with everything stopped again)."""
        started = time.monotonic()
        try:
            await self._up()
        except BaseException:
            await self.down()
            raise
        self.progress(f"mesh ready in {time.monotonic() - started:.1f}s")

    async def _up(self) -> None:
        config = self._config_paths = [str(Path(p).resolve()) for p in self.config]
        mesh_config = self._mesh_config_paths = [str(Path(p).resolve()) for p in self.mesh_config]
        state = self.layout.root.resolve()
        for folder in config:
            if state.is_relative_to(folder):
                # The control plane would read the mesh's own JSON state as configuration.
                raise StartError(
                    f"the state directory {state} is inside the configuration directory "
                    f"{folder}: use --state to put it elsewhere"
                )
        loaded = await asyncio.to_thread(load_config, config, mesh_config=mesh_config)
        if loaded.errors:
            raise StartError("the configuration has errors", loaded.errors)
        try:
            isolation, note = choose_isolation(self.isolation)
        except ValueError as exc:
            raise StartError(str(exc)) from None
        if note is not None:
            self.progress(note)
        identity = sandbox_mesh_id(state) if isolation is Isolation.NETNS else ""
        plan, problems = plan_mesh(
            loaded.snapshot,
            base=self.base,
            images=self.images,
            isolation=isolation,
            mesh_id=identity,
        )
        if plan is None:
            raise StartError("the workloads cannot run locally", problems)
        if self.join is not None:
            plan = self._host_pods(plan, loaded.snapshot)
        if not plan.pods:
            raise StartError("no Deployment, StatefulSet, DaemonSet or Pod to run")
        for problem in loaded.diagnostics:
            if problem.code.startswith("virtual-service-"):  # what sidecars leave out
                self.progress(f"warning: {problem}")
        gateway_problems = [
            problem
            for pod in plan.pods
            if pod.gateway and loaded.mesh is not None
            for problem in gateway_diagnostics(loaded.mesh, pod.ref)
        ]
        if gateway_problems:
            raise StartError("a gateway cannot be configured as written", gateway_problems)
        published: list[PublishedPort] = []
        if plan.sandboxed and loaded.mesh is not None:
            published = published_ports(plan, loaded.mesh, self.base)
        if not plan.sandboxed or published:
            try:  # before anything binds: a second mesh in the block would break the first
                if self.join is None:  # a host's block is claimed by `up --hosts`
                    self._claim = claim_block(self.base, self.layout.root)
                pods = [] if plan.sandboxed else planned_addresses(plan)
                probe(pods + [(p.host, p.port) for p in published])
            except AddressConflict as exc:
                raise StartError(str(exc)) from None
        self.layout.create()
        if plan.sandboxed:
            await self._build_sandbox(plan)
        self.plan = plan
        write_json(self.layout.plan, plan.to_json())
        self.pods = {pod.ref: {**pod.to_json(), "status": "starting"} for pod in plan.pods}
        self._record("starting")
        if self.join is not None:
            await self._join_replicas(self.join)
        else:
            await self._start_control_plane()
        sidecars = [pod for pod in plan.pods if pod.sidecar]
        self.progress(f"starting {len(sidecars)} sidecars (agent + Envoy)")
        await asyncio.gather(*(self._start_sidecar(i, pod) for i, pod in enumerate(sidecars)))
        # A joined host has no control plane of its own to ask for ACKs: a sidecar is
        # ready once its Envoy has its first listeners from a replica.
        if sidecars and self.join is None:
            await self._wait_configured(sidecars)
        if published:
            await self._publish(published)
        apps = [pod for pod in plan.pods if not pod.gateway]  # a gateway is only its proxy
        self.progress(f"starting {len(apps)} apps")
        await asyncio.gather(*(self._start_app(pod) for pod in apps))
        for pod in plan.pods:
            self.pods[pod.ref] |= {"status": "running", "ready": True, "restarts": 0}
        if self.join is not None and self.join.probes:
            self._start_probes(self.join.probes, plan)
        self._record("ready")

    def _start_probes(self, probes: Sequence[tuple[str, str]], plan: MeshPlan) -> None:
        """A WorkloadGroup's probe of its workload's app, each transition reported to a
        replica (the entry's Healthy condition)."""
        registry, joined = self._registry, self.joined
        assert registry is not None and joined is not None
        apps = {pod.ref: pod.app_ip for pod in plan.pods}
        for ref, text in probes:

            async def report(healthy: bool, why: str, ref: str = ref) -> None:
                await registry.health(joined, ref, healthy, why)
                self.progress(f"{ref}: probe {'passes' if healthy else 'fails'} {why}".rstrip())

            probing = keep_probing(Probe.from_json(text), apps[ref], report, self._keep_stop)
            self._probing.append(asyncio.create_task(probing))

    async def _build_sandbox(self, plan: MeshPlan) -> None:
        """The mesh's namespaces, links, rules and files — after removing whatever an
        earlier start from this state directory left (its processes, then its ledger)."""
        with contextlib.suppress(OSError, ValueError):
            stop_recorded(read_json(self.layout.mesh), self.layout)
        # A host of `up --hosts` runs in its node namespace, which its cluster made.
        adopt = self.join is not None and netns.current_is(plan.node_netns)
        sandbox = Sandbox(plan, self.layout.root, adopt_node=adopt)
        left = await asyncio.to_thread(sandbox.teardown)
        if left:
            raise StartError(
                "an earlier mesh from this state directory left objects that cannot be "
                "removed:\n  " + "\n  ".join(left)
            )
        self.sandbox = sandbox
        self.progress(f"building the pod sandbox ({len(plan.pods)} network namespaces)")
        try:
            await asyncio.to_thread(sandbox.build)
        except (OSError, RuntimeError) as exc:
            raise StartError(f"the pod sandbox cannot be built: {exc}") from None

    def _host_pods(self, plan: MeshPlan, snapshot: ConfigSnapshot) -> MeshPlan:
        """The plan of the whole mesh (every pod keeps its address) cut to this host's."""
        assert self.join is not None
        wanted = self.join.pods or {
            w.ref
            for w in snapshot.workloads
            if w.kind in ("Deployment", "StatefulSet", "DaemonSet", "Pod")
            and _node_name(w.resource.spec) == self.join.node
        }
        unknown = sorted(set(self.join.pods) - {p.ref for p in plan.pods})
        if unknown:
            raise StartError(f"no such pod in the configuration: {', '.join(unknown)}")
        return dataclasses.replace(plan, pods=tuple(p for p in plan.pods if p.ref in wanted))

    async def _join_replicas(self, join: HostJoin) -> None:
        """Register this host's pods with its node token (one replica answers), then
        write the trust bundle and each sidecar's bootstrap token it got back."""
        assert self.plan is not None
        services: tuple[tuple[str, str], ...] = ()
        if self.plan.sandboxed:  # the ClusterIPs this host's Service rules use
            services = tuple(sorted(service_addresses(self.plan).items()))
        groups = dict(join.groups)  # `--group`: a WorkloadGroup's workload registers with it
        records = [
            WorkloadRecord(
                pod.namespace,
                pod.name,
                join.node,
                pod.pod_ip,
                pod.service_account,
                kind="WorkloadEntry" if pod.ref in groups else "Pod",
                app_address=pod.app_ip,
                outbound_address=pod.outbound_ip or "",
                capture="transparent" if self.plan.sandboxed else "",
                service_addresses=services,
                group=groups.get(pod.ref, ""),
            )
            for pod in self.plan.pods
            if pod.sidecar and not pod.gateway
        ]
        self.progress(f"joining as {join.node} at {','.join(join.control_plane)}")
        # From the host's own address, as its agents and Envoys: the host is one set of
        # addresses to the control plane. In process mode that is its first pod's IP
        # (bound through a proxy); a sandboxed host has its own namespace and uplink.
        options: list[tuple[str, Any]] = []
        if not self.plan.sandboxed:
            self._egress = SourceBoundProxy(self.plan.pods[0].pod_ip, join.control_plane)
            await self._egress.start()
            options = self._egress.channel_options()
        self._registry = RegistryClient(join.control_plane, join.roots_pem, options=options)
        try:
            joined = await self._registry.join(join.token, records, join.ttl)
        except grpc.aio.AioRpcError as exc:
            raise StartError(f"the control plane refused the join: {exc.details()}") from None
        if not joined.replicas:
            raise StartError("the control plane lists no live replica")
        self.joined = joined
        self._keeping = asyncio.create_task(self.keep_joined(self._keep_stop))
        self.layout.roots.write_bytes(join.roots_pem)
        for pod in self.plan.pods:
            token = joined.tokens.get(pod.ref)
            if token is not None:
                path = self.layout.token(pod.key)
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
                    out.write(token)
        first = joined.replicas[0]
        self.control_plane = {
            "node": joined.node,
            "lease": joined.lease,
            "replicas": [dict(r) for r in joined.replicas],
            "spiffe_id": first["spiffe_id"],
        }

    async def keep_joined(self, stop: asyncio.Event) -> None:
        """Refresh this host's lease every 5 s (a third of a shorter TTL) until ``stop``,
        a failed refresh after 1 s; a lease that ended (the control plane lost this host)
        is reported: a new node token joins."""
        if self.joined is None or self._registry is None:
            return
        joined, registry = self.joined, self._registry
        every = min(joined.ttl / 3, KEEP_ALIVE_EVERY)
        wait = every
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                return
            try:
                await registry.keep_alive(joined, timeout=KEEP_ALIVE_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                _log.error("keeping %s's lease: %s", joined.node, exc.details())
                if exc.code() is grpc.StatusCode.NOT_FOUND:
                    self.progress(f"{joined.node}'s lease ended: join again with a new token")
                    return
                # No replica reached (a cut link, replicas restarting): try again soon,
                # not a third of the TTL later — the lease must outlive the outage.
                wait = KEEP_ALIVE_RETRY
            else:
                wait = every

    async def _start_control_plane(self) -> None:
        # A restart keeps the ports the proxies and agents already use.
        assert self.plan is not None
        args = {
            "config": self._config_paths,
            "mesh_config": self._mesh_config_paths,
            "ports": self.control_plane.get("ports", {}),
            "listen": NODE_IP if self.plan.sandboxed else "127.0.0.1",
        }
        write_json(self.layout.root / ARGS_FILE, args)
        self.progress("starting the control plane (CA + xDS)")
        argv = [sys.executable, "-m", "trustmesh.runtime.control_plane", str(self.layout.root)]
        if self.plan.sandboxed:
            argv = control_plane_argv(self.plan, self.layout.root)
        child = await self._spawn(
            "control-plane", argv, self.layout.logs / "control-plane.log", ready_line=True
        )
        info = await self._ready_line(child, CONTROL_PLANE_TIMEOUT)
        self.control_plane = info

    async def _start_sidecar(self, index: int, pod: PodPlan) -> None:
        assert self.plan is not None
        paths = self.plan.paths(pod)
        if paths is not None:
            await self._start_sandboxed_sidecar(pod, paths)
            return
        if self.joined is not None:
            xds, ca_address, renewal_address = self._replica_addresses()
        else:
            ports = self.control_plane["ports"]
            xds = [("127.0.0.1", int(ports["xds"]))]
            ca_address = f"127.0.0.1:{ports['ca']}"
            renewal_address = f"127.0.0.1:{ports['ca_renewal']}"
        spec = SidecarSpec(
            namespace=pod.namespace,
            service_account=pod.service_account,
            trust_domain=self.plan.trust_domain,
            node_id=node_id(pod),
            cluster=f"{pod.name}.{pod.namespace}",
            ca_address=ca_address,
            ca_renewal_address=renewal_address,
            roots_file=str(self.layout.roots),
            token_file=str(self.layout.token(pod.key)),
            sds_socket=str(self.layout.sds_socket(index)),
            xds_address=xds[0][0],
            xds_port=xds[0][1],
            more_xds=xds[1:],
            control_plane_id=self.control_plane.get("spiffe_id")
            or control_plane_spiffe_id(self.plan.trust_domain),
            workdir=str(self.layout.pod_dir(pod.key)),
            source_address=pod.pod_ip,
            agent_source_address=pod.pod_ip if self.joined is not None else None,
        )
        write_json(self.layout.sidecar_spec(pod.key), spec.to_json())
        child = await self._spawn(
            f"sidecar {pod.ref}",
            [
                sys.executable,
                "-m",
                "trustmesh.runtime.sidecar",
                str(self.layout.sidecar_spec(pod.key)),
            ],
            self.layout.agent_log(pod.key),
            ready_line=True,
        )
        info = await self._ready_line(child, SIDECAR_TIMEOUT, self.layout.envoy_log(pod.key))
        self._sidecar_ready(pod, child, info)

    def _sidecar_ready(self, pod: PodPlan, child: _Child, info: dict[str, Any]) -> None:
        self.pods[pod.ref] |= {
            "sidecar_pid": child.process.pid,
            "envoy_pid": info["envoy_pid"],
            "admin": info["admin"],
        }
        self.progress(f"  {pod.ref}: sidecar ready (Envoy pid {info['envoy_pid']})")

    def _replica_addresses(self) -> tuple[list[tuple[str, int]], str, str]:
        """A joined host's replicas: xDS (host, port) each, the CA and renewal address
        lists — at ``join.replica_host`` when set (the replicas sit behind a relay)."""
        assert self.joined is not None and self.join is not None
        via = self.join.replica_host

        def at(address: str) -> tuple[str, int]:
            host, port = _host_port(address)
            return (via or host, port)

        def joined(key: str) -> str:
            return ",".join(f"{h}:{p}" for h, p in (at(r[key]) for r in replicas))

        replicas = self.joined.replicas
        xds = [at(r["address"]) for r in replicas]
        ca, renewal = joined("ca"), joined("ca_renewal")
        return xds, ca, renewal

    async def _start_sandboxed_sidecar(self, pod: PodPlan, paths: PodPaths) -> None:
        """Agent + Envoy in the pod's namespace as uid 1337 (see runtime.sandboxed)."""
        assert self.plan is not None
        if self.joined is not None:  # a host of the mesh: the replicas, not a local plane
            xds, ca_address, renewal_address = self._replica_addresses()
        else:
            ports = self.control_plane["ports"]
            xds = [(NODE_IP, int(ports["xds"]))]
            ca_address = f"{NODE_IP}:{ports['ca']}"
            renewal_address = f"{NODE_IP}:{ports['ca_renewal']}"
        token = install_proxy_file(self.layout.token(pod.key), paths, "token")
        roots = install_proxy_file(self.layout.roots, paths, "ca-roots.pem")
        spec = SidecarSpec(
            namespace=pod.namespace,
            service_account=pod.service_account,
            trust_domain=self.plan.trust_domain,
            node_id=node_id(pod),
            cluster=f"{pod.name}.{pod.namespace}",
            ca_address=ca_address,
            ca_renewal_address=renewal_address,
            roots_file=str(roots),
            token_file=str(token),
            sds_socket=str(paths.sds_socket),
            xds_port=xds[0][1],
            more_xds=xds[1:],
            control_plane_id=self.control_plane.get("spiffe_id")
            or control_plane_spiffe_id(self.plan.trust_domain),
            workdir=str(paths.proxy),
            source_address=None,  # the pod's own address: the only one it has
            xds_address=xds[0][0],
            admin_port=SANDBOX_ADMIN_PORT,
            peer_check=True,
            private_dir=str(paths.proxy),
        )
        spec_file = self.layout.sidecar_spec(pod.key)
        write_json(spec_file, spec.to_json())
        spec_file = install_proxy_file(spec_file, paths, "sidecar.json")
        argv, env = sidecar_argv(pod, paths, spec_file)
        child = await self._spawn(
            f"sidecar {pod.ref}",
            argv,
            self.layout.agent_log(pod.key),
            env=env,
            ready_line=True,
            clean_env=True,  # its own environment only, as the app's
        )
        envoy_log = self.layout.envoy_log_of(pod.key, paths)
        info = await self._ready_line(child, SIDECAR_TIMEOUT, envoy_log)
        self._sidecar_ready(pod, child, info)

    async def _wait_configured(self, sidecars: list[PodPlan]) -> None:
        """Until every sidecar ACKed its configuration; a NACK (Envoy refused what the
        control plane sent, and runs without it) stops the start naming the pods and
        Envoy's own error detail."""
        deadline = time.monotonic() + SYNC_TIMEOUT
        while True:
            status = await asyncio.to_thread(debug_client.get, self.layout.root)
            proxies = {p["workload"]: p for p in (status or {}).get("proxies", {}).values()}
            rejected: dict[str, list[str]] = {}
            for ref, proxy in sorted(proxies.items()):
                if proxy.get("nack"):
                    rejected.setdefault(str(proxy["nack"]), []).append(ref)
            if rejected:
                lines = [
                    f"  {', '.join(refs)}: {_nack_text(detail)}"
                    for detail, refs in rejected.items()
                ]
                count = sum(map(len, rejected.values()))
                raise StartError(
                    f"{count} sidecar(s) rejected their configuration (Envoy NACK); Envoy "
                    "said:\n" + "\n".join(lines)
                )
            waiting = [pod.ref for pod in sidecars if not proxies.get(pod.ref, {}).get("synced")]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise StartError(
                    f"not configured after {SYNC_TIMEOUT:.0f}s (no ACK from their Envoy): "
                    + ", ".join(waiting)
                    + _tail(self.layout.logs / "control-plane.log")
                )
            await asyncio.sleep(0.05)  # polling the control plane's debug endpoint

    async def _publish(self, published: list[PublishedPort]) -> None:
        """The sandboxed gateways' Service ports on this host (a LoadBalancer's role)."""
        assert self.plan is not None
        self.publisher = Publisher(self.plan.node_netns, published)
        try:
            await self.publisher.start()
        except OSError as exc:
            raise StartError(f"cannot publish the gateway ports: {exc}") from None
        for item in published:
            self.pods[item.pod].setdefault("published", []).append(item.describe())
            self.progress(f"  {item.pod}: published {item.describe()}")

    async def _start_app(self, pod: PodPlan) -> None:
        child = await self._spawn_app(pod)
        problem = await self._wait_ready(pod, child, APP_TIMEOUT)
        if problem is not None:
            raise StartError(problem + _tail(self.layout.app_log(pod.key)))
        self.progress(f"  {pod.ref}: app running (pid {child.process.pid})")

    async def _spawn_app(self, pod: PodPlan) -> _Child:
        assert self.plan is not None
        paths = self.plan.paths(pod)
        if paths is not None:
            argv, env = app_argv(pod, paths)
            child = await self._spawn(
                f"app {pod.ref}", argv, self.layout.app_log(pod.key), env=env, clean_env=True
            )
            self.pods[pod.ref]["app_pid"] = child.process.pid
            self._app_started[pod.ref] = self.clock()
            return child
        argv = list(pod.command)
        if argv[0] == "trustmesh":  # this installation's, whatever PATH says
            argv = [sys.executable, "-m", "trustmesh", *argv[1:]]
        child = await self._spawn(
            f"app {pod.ref}", argv, self.layout.app_log(pod.key), env=dict(pod.env)
        )
        self.pods[pod.ref]["app_pid"] = child.process.pid
        self._app_started[pod.ref] = self.clock()
        return child

    async def _wait_ready(self, pod: PodPlan, child: _Child, timeout: float | None) -> str | None:
        """None once the app accepts connections on every port; else why it does not:
        it exited, or ``timeout`` seconds passed (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for port in pod.ports:
            while not await self._app_accepts(pod, port):
                if child.process.returncode is not None:
                    return f"{pod.ref}: the app exited with status {child.process.returncode}"
                if deadline is not None and time.monotonic() > deadline:
                    return (
                        f"{pod.ref}: the app does not accept connections on "
                        f"{pod.app_ip}:{port} after {timeout:.0f}s"
                    )
                await asyncio.sleep(0.05)  # a readiness probe: nothing to wait on but the port
        return None

    async def _app_accepts(self, pod: PodPlan, port: int) -> bool:
        if pod.netns is not None:  # from inside the pod (not captured), at its pod IP
            return await accepts_in(pod.netns, pod.pod_ip, port)
        return await _accepts(pod.app_ip, port)

    # -- processes

    async def _spawn(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        ready_line: bool = False,
        clean_env: bool = False,
    ) -> _Child:
        log = log_path.open("ab")
        inherited = {} if clean_env else dict(os.environ)
        environment = {**inherited, **(env or {}), MESH_ENV: str(self.layout.root)}
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if ready_line else log,
                stderr=log,
                env=environment,
                start_new_session=True,  # a Ctrl-C in the terminal reaches only the supervisor
            )
        except OSError as exc:
            log.close()
            raise StartError(f"{name}: cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        child = _Child(name, process, log)
        self._children[name] = child
        return child

    async def _ready_line(
        self, child: _Child, timeout: float, extra_log: Path | None = None
    ) -> dict[str, Any]:
        """The child's JSON ready line; then its further output goes to its log."""
        assert child.process.stdout is not None
        try:
            line = await asyncio.wait_for(child.process.stdout.readline(), timeout)
        except TimeoutError:
            raise StartError(
                f"{child.name} is not ready after {timeout:.0f}s" + _tail(Path(child.log.name))
            ) from None
        try:
            info: dict[str, Any] = json.loads(line) if line else {"ready": False}
        except ValueError:
            info = {"ready": False, "error": line.decode(errors="replace")}
        if not info.get("ready"):
            why = info.get("error") or f"exited with status {await child.process.wait()}"
            logs = _tail(Path(child.log.name)) + (_tail(extra_log) if extra_log else "")
            raise StartError(f"{child.name} failed to start: {why}{logs}")
        child.pump = asyncio.create_task(_pump(child.process.stdout, child.log))
        return info

    async def supervise(self, stop: asyncio.Event) -> None:
        """Until ``stop``: restart the control plane if it exits; note pods that exit."""
        wake = self._wake = asyncio.Event()
        while not stop.is_set():
            waits = {
                asyncio.ensure_future(c.process.wait()): name
                for name, c in self._children.items()
                if c.process.returncode is None
            }
            stopped = asyncio.ensure_future(stop.wait())
            woken = asyncio.ensure_future(wake.wait())
            done, _ = await asyncio.wait(
                {*waits, stopped, woken}, return_when=asyncio.FIRST_COMPLETED
            )
            for future in waits:
                future.cancel()
            stopped.cancel()
            woken.cancel()
            wake.clear()  # a restarted app is in _children: the next round watches it
            if stop.is_set():
                return
            for future in done:
                name = waits.get(future)
                if name is None:
                    continue
                await self._exited(name)

    async def _exited(self, name: str) -> None:
        child = self._children.pop(name)
        child.log.close()
        _log.warning("%s exited with status %s", name, child.process.returncode)
        if name == "control-plane":
            self._restarts += 1
            self.progress(f"control plane exited ({child.process.returncode}); restarting")
            try:
                await self._start_control_plane()
            except StartError as exc:
                self.progress(f"control plane restart failed: {exc}")
            self._record("ready")
            return
        kind, _, ref = name.partition(" ")
        if ref not in self.pods or child.process.returncode is None:
            return
        if kind == "app":
            self._app_exited(ref, child.process.returncode)
        else:
            self.pods[ref]["status"] = f"{kind} exited ({child.process.returncode})"
            self._set_ready(ref, ready=False)
        self._record(self._running_state())

    # -- pods that exit

    def _app_exited(self, ref: str, returncode: int) -> None:
        """Take the pod out of the mesh and, as its restart policy says, schedule its app."""
        assert self.plan is not None
        pod = self.plan.pod(ref)
        assert pod is not None
        ended = Exit.of(returncode, _now())
        record = self.pods[ref]
        record["last_exit"] = ended.to_json()
        self._set_ready(ref, ready=False)
        if not should_restart(pod.restart_policy, ended.exit_code):
            record["status"] = "completed" if ended.exit_code == 0 else "failed"
            record.pop("next_restart", None)
            self.progress(
                f"{ref}: the app ended ({ended.describe()}); restartPolicy "
                f"{pod.restart_policy}: not restarted"
            )
            return
        ran_for = self.clock() - self._app_started.get(ref, self.clock())
        delay = self.backoff.next_delay(self._last_delay.get(ref), ran_for)
        self._last_delay[ref] = delay
        record["status"] = "back-off"
        record["next_restart"] = (ended.at + dt.timedelta(seconds=delay)).isoformat(
            timespec="seconds"
        )
        self.progress(f"{ref}: the app exited ({ended.describe()}); restarting in {delay:g}s")
        self._restarting[ref] = asyncio.create_task(self._restart_app(pod, delay))

    async def _restart_app(self, pod: PodPlan, delay: float) -> None:
        record = self.pods[pod.ref]
        try:
            await asyncio.sleep(delay)  # the back-off itself: waiting is the point
            try:
                child = await self._spawn_app(pod)
            except StartError as exc:  # the command cannot run at all: back off again
                record["start_error"] = str(exc)
                self._app_exited(pod.ref, 127)
                self._record(self._running_state())
                return
            record.pop("next_restart", None)
            record.pop("start_error", None)
            record["restarts"] = int(record.get("restarts", 0)) + 1
            record["last_restart"] = _now().isoformat(timespec="seconds")
            record["status"] = "running"
            self._record(self._running_state())
            if self._wake is not None:
                self._wake.set()
            if await self._wait_ready(pod, child, None) is None:
                self._set_ready(pod.ref, ready=True)
                self._record(self._running_state())
                self.progress(f"{pod.ref}: the app runs again and accepts connections")
        finally:
            if self._restarting.get(pod.ref) is asyncio.current_task():
                del self._restarting[pod.ref]

    def _set_ready(self, ref: str, *, ready: bool) -> None:
        """The pod's endpoints in (ready) or out of the mesh; the control plane follows
        ``not-ready.json``."""
        before = set(self._not_ready)
        if ready:
            self._not_ready.discard(ref)
        else:
            self._not_ready.add(ref)
        self.pods[ref]["ready"] = ready
        if self._not_ready != before:
            write_not_ready(self.layout, self._not_ready)

    def _running_state(self) -> str:
        return "degraded" if self._not_ready else "ready"

    # -- stop

    async def down(self) -> None:
        """Stop apps, then sidecars, then the control plane (each: TERM, then KILL)."""
        self._record("stopping")
        if self._keeping is not None:
            self._keep_stop.set()  # also ends the probes of WorkloadGroups' workloads
            await asyncio.gather(self._keeping, *self._probing, return_exceptions=True)
            self._keeping = None
        if self.publisher is not None:
            await self.publisher.stop()
            self.publisher = None
        restarting = list(self._restarting.values())
        for task in restarting:
            task.cancel()
        await asyncio.gather(*restarting, return_exceptions=True)
        order = ("app ", "sidecar ", "control-plane")
        for prefix in order:
            group = [c for name, c in self._children.items() if name.startswith(prefix)]
            await asyncio.gather(*(_terminate(c.process) for c in group))
        for child in self._children.values():
            if child.pump is not None:
                child.pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await child.pump
            child.log.close()
        self._children.clear()
        # An Envoy whose sidecar was killed hard would outlive it: stop it by its PID.
        stop_recorded({"pods": self.pods}, self.layout, only_envoys=True)
        for pod in self.pods.values():
            pod["status"] = "stopped"
        if self.sandbox is not None:  # after every process: then by the ledger
            left = await asyncio.to_thread(self.sandbox.teardown)
            for problem in left:
                self.progress(f"could not remove {problem}")
            self.sandbox = None
        self._record("stopped")
        if self._registry is not None:
            await self._registry.close()
            self._registry = None
        if self._egress is not None:
            await self._egress.stop()
            self._egress = None
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    # -- state file

    def _record(self, state: str) -> None:
        if not self.layout.root.exists():
            return
        record = {
            "state": state,
            "supervisor_pid": os.getpid(),
            "config": list(self._config_paths),
            "mesh_config": list(self._mesh_config_paths),
            "base": self.base,
            "isolation": None if self.plan is None else self.plan.isolation.value,
            "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "control_plane": {
                **self.control_plane,
                "pid": self._pid("control-plane"),
                "restarts": self._restarts,
            },
            "pods": self.pods,
        }
        write_json(self.layout.mesh, record)

    def _pid(self, name: str) -> int | None:
        child = self._children.get(name)
        return child.process.pid if child is not None else None


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _node_name(spec: Any) -> str:
    """``spec.nodeName`` of a Pod, ``spec.template.spec.nodeName`` of a controller."""
    pod = getattr(spec, "spec", None) or getattr(getattr(spec, "template", None), "spec", None)
    return str(getattr(pod, "node_name", "") or "")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _nack_text(nack: str) -> str:
    """``type.googleapis.com/envoy.config.cluster.v3.Cluster: detail`` → ``Cluster: detail``."""
    type_url, _, detail = nack.partition(": ")
    return f"{type_url.rsplit('.', 1)[-1]}: {detail}" if detail else nack


async def _pump(stream: asyncio.StreamReader, log: IO[bytes]) -> None:
    with contextlib.suppress(ValueError, OSError):  # the log was closed at shutdown
        while line := await stream.readline():
            log.write(line)
            log.flush()


async def _terminate(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_bytes()[-16_384:].decode(errors="replace")
    except OSError:
        return ""
    shown = "\n    ".join(text.splitlines()[-lines:])
    return f"\n  last lines of {path}:\n    {shown}" if shown else ""
