"""One control-plane replica over etcd: ``trustmesh control-plane --store etcd://…``.

What :func:`trustmesh.runtime.control_plane.serve` is for one local mesh, a replica is for
a store shared by several: the same CA server and ``ControlPlane`` (xDS over mTLS), with

* its configuration from the store (:class:`~trustmesh.store.config_source.
  StoreConfigSource`): read at one revision, then followed by watch; every change is
  validated, compiled and pushed exactly as a file change is, and a store it cannot reach
  leaves it serving the last good configuration (``store.healthy: false`` in its record
  and status file);
* its proxies from the workload registry (``/trustmesh/workloads/…``): every sidecar
  registered there may connect to any replica (authenticated by its certificate, as today);
* its CA's records in etcd (tokens burnt in one transaction, serials, watched
  revocations): a store it cannot reach refuses enrollment — fail closed for new
  identities. The signing keys stay in ``--ca DIR`` (see README, "CA replicas and their keys");
* a leased registration ``/trustmesh/replicas/NAME`` (addresses, start time, which proxies
  it serves, store health), gone when it dies;
* a leader election (``/trustmesh/leader``): only the leader acts on root rotation.

It prints one JSON line when it serves (and writes it to ``STATE/replica.json``), as the
local control plane does.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import logging
import os
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmesh.identity.server import CaServer
from trustmesh.identity.store import StoreError
from trustmesh.metrics.controlplane import ControlPlaneMetrics
from trustmesh.metrics.server import MetricsServer
from trustmesh.runtime.control_plane import _open_ca, _syncz
from trustmesh.runtime.debug_endpoint import SYNCZ, DebugEndpointError, DebugServer, debug_socket
from trustmesh.runtime.layout import write_json
from trustmesh.runtime.registration import NodeRegistrar
from trustmesh.store.ca_records import EtcdCaRecords, WatchedRevocations
from trustmesh.store.config_source import StoreConfigSource
from trustmesh.store.etcd_client import EtcdClient, EtcdTls, connect
from trustmesh.store.etcd_store import ROOT, EtcdResourceStore, WorkloadRegistry
from trustmesh.store.leader import LeaderElection, LeaseKeeper
from trustmesh.store.model import WorkloadHealth, WorkloadRecord
from trustmesh.xds.controlplane import ConfigRejected, ControlPlane, ProxyRegistration
from trustmesh.xds.translate import CaptureMode

__all__ = ["REPLICAS", "ReplicaOptions", "read_replicas", "registration_of", "serve_replica"]

log = logging.getLogger("trustmesh.replica")

REPLICAS = ROOT + b"replicas/"
RECORD_INTERVAL = 0.5  # how often the registration is rewritten when what it says changed
ROTATION_INTERVAL = 60.0
STOP_GRACE = 3.0


@dataclass(frozen=True, slots=True)
class ReplicaOptions:
    store: str  # https://H:P[,H:P...] (with etcd_tls) or etcd://H:P[,H:P...]
    listen: str  # HOST:PORT of xDS (0: a free port); the CA listens on HOST too
    name: str
    ca_dir: Path
    state_dir: Path
    trust_domain: str = "cluster.local"  # for a CA created on first start
    mesh_config: tuple[str, ...] = ()
    lease_ttl: int = 5
    ca_port: int = 0
    ca_renewal_port: int = 0
    metrics_port: int = 0
    etcd_tls: EtcdTls | None = None  # the replica's etcd client certificate


def registration_of(record: WorkloadRecord) -> ProxyRegistration:
    """The sidecar a registry record describes, under Istio's node id."""
    if record.capture == "transparent":  # a sandboxed pod: Istio's capture layout
        return ProxyRegistration.sidecar(
            record.ref,
            record.address,
            app_address=record.app_address or record.address,
            capture=CaptureMode.TRANSPARENT,
            service_addresses=dict(record.service_addresses),
        )
    return ProxyRegistration.sidecar(
        record.ref,
        record.address,
        app_address=record.app_address or "127.0.0.1",
        outbound_address=record.outbound_address or None,
    )


def unhealthy(records: Sequence[WorkloadRecord]) -> list[str]:
    """The workloads whose probe says unhealthy: no ready endpoint (Istio's Healthy=False)."""
    return [r.ref for r in records if r.health is WorkloadHealth.UNHEALTHY]


async def read_replicas(client: EtcdClient) -> dict[str, dict[str, Any]]:
    """The live replicas' registrations, by name."""
    kvs, _ = await client.get_prefix(REPLICAS)
    return {kv.key[len(REPLICAS) :].decode(): json.loads(kv.value) for kv in kvs}


async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Run ``work`` until it ends (its exception raised) or ``stop`` is set (cancelled)."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
    finally:
        stopped.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _fail(why: str) -> int:
    print(json.dumps({"ready": False, "error": why}), flush=True)
    return 1


class _Replica:
    """The running parts, and what its registration says."""

    def __init__(
        self,
        options: ReplicaOptions,
        client: EtcdClient,
        plane: ControlPlane,
        ca: CaServer,
        source: StoreConfigSource,
    ) -> None:
        self.options = options
        self.client = client
        self.plane = plane
        self.ca_server = ca
        self.source = source
        self.keeper = LeaseKeeper(client, options.lease_ttl)
        self.election = LeaderElection(client, self.keeper, options.name)
        self.started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.metrics_port = 0
        self.registry_revision = 0
        self.records: list[WorkloadRecord] = []
        self.addresses: dict[str, str] = {}
        self._written: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        host = self.options.listen.rpartition(":")[0]
        serves = self.plane.synced_proxies()  # as sync_status()'s synced, open streams only
        return {
            "name": self.options.name,
            "pid": os.getpid(),
            "address": f"{host}:{self.plane.port}",
            "ca": f"{host}:{self.ca_server.port}",
            "ca_renewal": f"{host}:{self.ca_server.renewal_port}",
            "metrics": f"{host}:{self.metrics_port}",
            "spiffe_id": self.plane.spiffe_id,
            "started": self.started,
            "leader": self.election.is_leader(),
            "proxies": serves,
            "registered": sorted(self.plane.registrations),
            "store": self.source.status(),
            "config": {
                "generation": self.plane.reloads,
                "rejected": self.plane.rejected_reloads,
                "errors": [str(d) for d in self.plane.last_errors[:20]],
            },
        }

    async def write_record(self, force: bool = False) -> None:
        record = self.record()
        if record == self._written and not force:
            return
        write_json(self.options.state_dir / "status.json", record)
        if self.keeper.lease_id:
            key = REPLICAS + self.options.name.encode()
            await self.client.put(key, json.dumps(record).encode(), lease=self.keeper.lease_id)
        self._written = record

    async def claim(self, retried: bool = False) -> str | None:
        """Write the first registration only if the name is free (or held by this
        replica's dead predecessor on the same address); else who holds it."""
        key = REPLICAS + self.options.name.encode()
        record = self.record()
        value = json.dumps(record).encode()
        put = self.client.put_op(key, value, self.keeper.lease_id)
        claimed, response = await self.client.txn(
            [self.client.absent(key)], [put], [self.client.get_op(key)]
        )
        if claimed:
            write_json(self.options.state_dir / "status.json", record)
            self._written = record
            return None
        kvs = response.responses[0].response_range.kvs
        other = json.loads(kvs[0].value) if kvs else {}
        if kvs and other.get("address") == record["address"] and not retried:
            # Its xDS address is the one this process just bound: the replica registered
            # there is dead (SIGKILLed, restarted as itself on the same ports). Take its
            # name over now instead of refusing until its lease runs out.
            log.warning("%s: taking over from dead pid %s", self.options.name, other.get("pid"))
            with contextlib.suppress(StoreError):
                await self.client.revoke_lease(int(kvs[0].lease))
            return await self.claim(retried=True)
        return (
            f"a replica named {self.options.name!r} is registered already (pid "
            f"{other.get('pid')}, {other.get('address')}); names are unique — a dead one's "
            f"registration ends within its lease TTL"
        )

    async def keep_record(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RECORD_INTERVAL)
            try:
                await self.write_record()
            except StoreError as exc:
                log.error("cannot update %s's registration: %s", self.options.name, exc)
                write_json(self.options.state_dir / "status.json", self.record())

    async def follow_registry(self, stop: asyncio.Event) -> None:
        """Register the sidecars the registry gains; forget those it loses."""
        registry = WorkloadRegistry(self.client)

        async def follow() -> None:
            async for _ in registry.changes(self.registry_revision):
                records, self.registry_revision = await registry.workloads()
                addresses = {r.ref: r.address for r in records}
                moved = addresses != self.addresses
                self.records, self.addresses = list(records), addresses
                if moved:  # every proxy's endpoints of those workloads change
                    self.plane.set_workload_addresses(addresses)
                    await self.reload()
                else:
                    self.sync_registrations(records)
                await self.plane.set_not_ready(unhealthy(records))  # the probes' reports

        while not stop.is_set():
            try:
                await _until_stopped(follow(), stop)
            except StoreError as exc:
                log.error("workload registry watch: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)  # reconnect back-off

    async def reload(self) -> None:
        """The control plane's reload, then the registry's proxies registered again: one
        the configuration did not know yet may be servable now."""
        await self.plane.reload()
        self.sync_registrations(self.records)

    def sync_registrations(self, records: Sequence[WorkloadRecord]) -> None:
        wanted: dict[str, ProxyRegistration] = {}
        for record in records:
            try:
                registration = registration_of(record)
            except ValueError as exc:
                log.error("registry record %s/%s refused: %s", record.host, record.ref, exc)
                continue
            wanted[registration.node_id] = registration
        for node_id in set(self.plane.registrations) - set(wanted):
            self.plane.unregister(node_id)
        for registration in wanted.values():
            try:
                self.plane.register(registration)
            except (LookupError, ValueError) as exc:
                log.error("cannot serve %s: %s", registration.node_id, exc)

    async def rotate_when_leader(self, stop: asyncio.Event) -> None:
        """Every replica picks up a rotated CA directory; only the leader rotates."""
        ca = self.ca_server.ca
        while not stop.is_set():
            ca.reload_if_changed()
            if self.election.is_leader():
                ca.tick(dt.datetime.now(dt.UTC))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ROTATION_INTERVAL)


async def serve_replica(options: ReplicaOptions, stop: asyncio.Event) -> int:
    """Serve until ``stop``; 1 (with a JSON line saying why) if it cannot start."""
    try:
        if not options.store.startswith(("etcd://", "https://")):
            raise StoreError(
                f"--store {options.store}: a replica needs https://HOST:PORT[,…] "
                "or etcd://HOST:PORT[,…]"
            )
        client = connect(options.store, options.etcd_tls)
    except StoreError as exc:
        return _fail(str(exc))
    host = options.listen.rpartition(":")[0]
    options.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    try:
        ca = _open_ca(options.ca_dir, options.trust_domain, now)
    except StoreError as exc:
        return _fail(f"the mesh CA is refused: {exc}")
    records = EtcdCaRecords(client)
    revocations = WatchedRevocations(client)
    ca.use_shared_records(records, revocations)
    metrics = ControlPlaneMetrics(ca=ca)
    ca_server = CaServer(
        ca,
        address=f"{host}:{options.ca_port}",
        renewal_address=f"{host}:{options.ca_renewal_port}",
        observer=metrics,
        extra_handlers=[
            NodeRegistrar(
                ca, client, lambda: read_replicas(client), controller=options.name
            ).handler()
        ],  # hosts join here
    )
    metrics_server = MetricsServer(host, options.metrics_port, plane_text=metrics.render)
    debug: DebugServer | None = None
    source_dir = options.state_dir / "config"
    tasks: list[asyncio.Task[None]] = []
    plane: ControlPlane | None = None
    replica: _Replica | None = None
    try:
        try:
            registry = WorkloadRegistry(client)
            workloads, registry_revision = await registry.workloads()
            await revocations.start()
        except StoreError as exc:
            return _fail(f"cannot read the store: {exc}")
        source = StoreConfigSource(EtcdResourceStore(client), source_dir)
        plane = ControlPlane(
            [str(source_dir)],
            ca=ca,
            address=options.listen,
            mesh_config=options.mesh_config,
            workload_addresses={w.ref: w.address for w in workloads},
            observer=metrics,
            sources=source.sources,  # the mirror compiled from memory, not re-read
        )
        replica = _Replica(options, client, plane, ca_server, source)
        replica.registry_revision = registry_revision
        replica.records = list(workloads)
        replica.addresses = {w.ref: w.address for w in workloads}
        try:
            await replica.source.load()
        except StoreError as exc:
            return _fail(f"cannot read the store: {exc}")
        replica.sync_registrations(workloads)  # checked against the mesh at start
        await plane.set_not_ready(unhealthy(workloads))
        await ca_server.start()
        try:
            await plane.start()
        except ConfigRejected as exc:
            if not any(source_dir.rglob("*.json")):
                return _fail(
                    f"{options.store} holds no configuration yet: "
                    "`trustmesh apply -f DIR --store …` the mesh's manifests first"
                )
            return _fail(str(exc))
        replica.source.loaded_into_plane()
        # What start-up built (the mesh, every proxy's snapshot) lives long: out of the
        # cyclic collector's reach, so no later collection rescans it (with thousands of
        # proxies that scan cost a second of CPU at the first change). Acyclic objects
        # among them are still freed by reference counting when replaced.
        gc.collect()
        gc.freeze()
        # As `up`'s control plane: /debug/syncz on an owner-only Unix socket (with the
        # store's health), Prometheus text on HOST:--metrics-port.
        debug = DebugServer(
            debug_socket(options.state_dir),
            {SYNCZ: lambda: {**_syncz(plane), "store": replica.source.status()}},
        )
        try:
            await debug.start()
            replica.metrics_port = await metrics_server.start()
        except (OSError, DebugEndpointError) as exc:
            return _fail(f"cannot serve the debug endpoint or metrics: {exc}")
        try:
            await replica.keeper.grant()
            taken = await replica.claim()
        except StoreError as exc:
            return _fail(f"cannot register in the store: {exc}")
        if taken is not None:
            with contextlib.suppress(StoreError):
                await client.revoke_lease(replica.keeper.lease_id)
            return _fail(taken)
        replica.keeper.on_lease.append(lambda _: replica.write_record(force=True))
        tasks += [
            asyncio.create_task(replica.keeper.run(stop)),
            asyncio.create_task(replica.election.run(stop)),
            asyncio.create_task(replica.source.follow(replica.reload, stop, reload_first=False)),
            asyncio.create_task(replica.follow_registry(stop)),
            asyncio.create_task(replica.keep_record(stop)),
            asyncio.create_task(replica.rotate_when_leader(stop)),
        ]
        info = {"ready": True, **replica.record()}
        write_json(options.state_dir / "replica.json", info)
        print(json.dumps(info), flush=True)
        await stop.wait()
        return 0
    finally:
        stop.set()
        if tasks:  # each ends on stop; a stuck one must not keep a dead replica around
            _, stuck = await asyncio.wait(tasks, timeout=STOP_GRACE)
            for task in stuck:
                log.error("stopping: %s did not end, cancelled", task.get_coro())
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await metrics_server.stop()
        if debug is not None:
            await debug.stop()
        if plane is not None:
            await plane.stop()
        await ca_server.stop()
        await revocations.stop()
        await client.close()
