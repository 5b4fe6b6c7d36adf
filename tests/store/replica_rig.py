"""Replicas as real processes (``python -m trustmesh control-plane``) over a real etcd,
and small helpers to fill the store. Every process is stopped by PID, also on failure."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.envoy.conftest import mesh_client_tls
from tests.xds.controlplane_rig import EXAMPLES, STRICT
from tests.xds.controlplane_traffic import APP_PORT, app_server
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.agent.sds import SdsServer, SecretStore
from trustmesh.agent.workload import AgentConfig, WorkloadAgent
from trustmesh.agent.xds_bootstrap import ads_bootstrap
from trustmesh.config import load_config
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.runtime.replica import registration_of
from trustmesh.store.apply import apply_resources
from trustmesh.store.base import ResourceStore
from trustmesh.store.etcd_client import EtcdClient
from trustmesh.store.etcd_server import EtcdCluster
from trustmesh.store.etcd_store import EtcdResourceStore, WorkloadRegistry
from trustmesh.store.model import WorkloadRecord

HTTPBIN_ID = SpiffeId("cluster.local", "foo", "httpbin")
SLEEP_ID = SpiffeId("cluster.local", "foo", "sleep")

START_TIMEOUT = 60.0  # a replica's start under a loaded 2-core machine


@dataclass
class ReplicaProcess:
    name: str
    process: subprocess.Popen[str]
    info: dict[str, Any]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def xds_port(self) -> int:
        return int(self.info["address"].rpartition(":")[2])

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def terminate(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"replica {self.name} did not stop on SIGTERM") from None


def start_replica(
    etcd: EtcdCluster, workdir: Path, name: str, ca_dir: Path, *extra: str
) -> ReplicaProcess:
    """One replica; returns once it printed its ready line (AssertionError otherwise)."""
    state = workdir / f"replica-{name}"
    state.mkdir(parents=True, exist_ok=True)
    log = state / "stderr.log"
    command = [
        sys.executable, "-m", "trustmesh", "control-plane",
        *etcd.store_args(), "--listen", "127.0.0.1:0", "--name", name,
        "--ca", str(ca_dir), "--state", str(state), *extra,
    ]  # fmt: skip
    with open(log, "wb") as err:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    line = ""
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()  # blocks until the ready line or exit
            if line.strip().startswith("{") or process.poll() is not None:
                break
        info = json.loads(line) if line.strip() else {}
        if not info.get("ready"):
            raise AssertionError(
                f"replica {name} did not start: {line!r}\n{log.read_text()[-3000:]}"
            )
    except BaseException:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        raise
    return ReplicaProcess(name, process, info, log)


@contextlib.contextmanager
def replicas(
    etcd: EtcdCluster, workdir: Path, names: list[str], ca_dir: Path, *extra: str
) -> Iterator[list[ReplicaProcess]]:
    started: list[ReplicaProcess] = []
    try:
        for name in names:
            started.append(start_replica(etcd, workdir, name, ca_dir, *extra))
        yield started
    finally:
        for replica in started:
            replica.kill()


_applies = 0


async def apply_text(store: ResourceStore, text: str, workdir: Path) -> int:
    """``trustmesh apply -f`` of ``text`` (validated as the CLI does); the revision of the
    newest object stored."""
    global _applies
    _applies += 1
    path = workdir / f"apply-{_applies}.yaml"
    await asyncio.to_thread(path.write_text, text)
    loaded = load_config([str(path)], compile_policy=False)
    assert not loaded.errors, loaded.errors
    await apply_resources(store, loaded.snapshot.resources)
    stored, _ = await store.list()
    return max(r.resource_version for r in stored)  # the commit's (the store's may be later)


# ---------------------------------------------------------------------------- a real sidecar


def free_loopback(count: int, port: int) -> list[str]:
    """``count`` random 127.x.y.z addresses where ``port`` can be bound now: away from
    the 127.0.0.x and 127.B blocks other checkouts' tests use at the same time."""
    found: list[str] = []
    rng = random.Random()
    while len(found) < count:
        address = f"127.{rng.randrange(100, 200)}.{rng.randrange(1, 255)}.{rng.randrange(2, 250)}"
        with socket.socket() as probe:
            try:
                probe.bind((address, port))
            except OSError:
                continue
        found.append(address)
    return found


@dataclass
class SidecarRig:
    """Replicas A and B over one etcd; httpbin's real Envoy gets its configuration from
    B (and its certificate from B's CA); sleep's certificate comes from A's CA."""

    workdir: Path
    a: ReplicaProcess
    b: ReplicaProcess
    client: EtcdClient
    store: EtcdResourceStore
    envoy: EnvoyProcess
    node_id: str
    inbound: tuple[str, int]
    sleep_tls: ssl.SSLContext


@contextlib.asynccontextmanager
async def _agent(
    identity: SpiffeId, on: Sequence[ReplicaProcess], ca: CertificateAuthority, workdir: Path
) -> AsyncIterator[tuple[WorkloadAgent, SdsServer]]:
    """A workload agent enrolled (bootstrap token) with the CA of the replicas ``on``
    (several: its client fails over between them), serving SDS."""
    home = workdir / identity.service_account
    home.mkdir(mode=0o700)
    now = dt.datetime.now(dt.UTC)
    config = AgentConfig(
        identity=identity,
        ca_address=",".join(r.info["ca"] for r in on),
        ca_renewal_address=",".join(r.info["ca_renewal"] for r in on),
        ca_roots_pem=ca.bundle_pem(now),
        token=ca.token(identity.namespace, identity.service_account, now),
        bundle_refresh_seconds=3600,
    )
    agent = WorkloadAgent(config, SecretStore())
    sds = SdsServer(agent.store, str(home / "sds.sock"))
    await sds.start()
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.ready.wait(), 30)
        yield agent, sds
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await sds.stop()


@contextlib.asynccontextmanager
async def sidecar_on_replica_b(
    etcd: EtcdCluster, workdir: Path, *, failover: bool = False
) -> AsyncIterator[SidecarRig]:
    """The example mesh's workloads and STRICT mTLS in the store, httpbin registered on
    host-1, replicas A and B running, httpbin's app and Envoy (xDS from B) serving.

    ``failover``: httpbin's Envoy and agent know both replicas (B first), as a sidecar
    whose bootstrap lists every control-plane address."""
    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.init(workdir / "ca", CaConfig(), now)
    httpbin_at, app_at = free_loopback(2, APP_PORT)
    client = etcd.client()
    store = EtcdResourceStore(client)
    try:
        workloads = (EXAMPLES / "mesh" / "workloads.yaml").read_text()
        await apply_text(store, workloads + "\n---\n" + STRICT, workdir)
        registry = WorkloadRegistry(client)
        record = WorkloadRecord(
            "foo", "httpbin", "host-1", httpbin_at, "httpbin", app_address=app_at
        )
        await registry.register(record, await registry.host_lease(3600))
        node_id = registration_of(record).node_id
        with replicas(etcd, workdir, ["a", "b"], workdir / "ca") as (a, b):
            async with (
                app_server(app_at),
                _agent(HTTPBIN_ID, [b, a] if failover else [b], ca, workdir) as (_, sds),
                _agent(SLEEP_ID, [a], ca, workdir) as (sleep, _),
            ):
                bootstrap = ads_bootstrap(
                    node_id=node_id,
                    cluster="httpbin.foo",
                    sds_socket=sds.socket_path,
                    xds_address="127.0.0.1",
                    xds_port=b.xds_port,
                    control_plane_id=b.info["spiffe_id"],
                    more_xds=[("127.0.0.1", a.xds_port)] if failover else (),
                )
                envoy = EnvoyProcess(bootstrap, workdir=workdir / "httpbin", concurrency=1)
                try:
                    await envoy.start(timeout=30)
                    secret = sleep.store.current()
                    assert secret is not None
                    tls = mesh_client_tls(secret[1], workdir)
                    yield SidecarRig(
                        workdir, a, b, client, store, envoy, node_id, (httpbin_at, APP_PORT), tls
                    )
                except BaseException:
                    print(f"envoy log {envoy.log_path}:\n{envoy.log_tail(40)}")
                    for replica in (a, b):
                        print(f"replica {replica.name}:\n{replica.log.read_text()[-3000:]}")
                    raise
                finally:
                    await envoy.stop()
    finally:
        await client.close()
