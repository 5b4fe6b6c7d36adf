"""The control plane's configuration from etcd: read at one revision, followed by watch;
each change validated, compiled and published as a file change is; a configuration with
errors refused whole; a store that cannot be reached leaves the last good configuration
served (and says so), and once back the source re-lists and follows again."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.envoy.conftest import eventually, run
from tests.store.replica_rig import apply_text
from tests.xds.controlplane_rig import DENY_GET, EXAMPLES, STRICT, Probe
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.store.config_source import StoreConfigSource, mirror_path
from trustmesh.store.etcd_server import EtcdCluster
from trustmesh.store.etcd_store import EtcdResourceStore
from trustmesh.store.model import ResourceDelete, ResourceKey, ResourceWrite, StoredResource
from trustmesh.xds.controlplane import ControlPlane, ProxyRegistration

HTTPBIN = ProxyRegistration.sidecar("foo/httpbin", "127.0.0.20")
BROKEN_KEY = ResourceKey("security.istio.io", "AuthorizationPolicy", "foo", "broken")


@pytest.fixture()
def own_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """This test's own member: it is killed and restarted."""
    cluster = EtcdCluster(tmp_path / "etcd", size=1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_store_changes_reach_the_plane_in_order_bad_ones_refused_and_outages_survived(
    tmp_path: Path, own_etcd: EtcdCluster
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), dt.datetime.now(dt.UTC))

    async def scenario() -> None:  # gRPC channels belong to the loop they are made in
        writer = EtcdResourceStore(own_etcd.client())
        reader = EtcdResourceStore(own_etcd.client())
        source = StoreConfigSource(reader, tmp_path / "mirror")
        workloads = (EXAMPLES / "mesh" / "workloads.yaml").read_text()
        await apply_text(writer, workloads + "\n---\n" + STRICT, tmp_path)
        await source.load()
        # As a replica: the mirror compiled from memory (its errors still name the files)
        plane = ControlPlane([str(source.directory)], ca=ca, sources=source.sources)
        plane.register(HTTPBIN)
        assert await plane.reload() == []
        source.loaded_into_plane()
        stop = asyncio.Event()
        follower = asyncio.create_task(source.follow(plane.reload, stop, reload_first=False))
        try:
            allowing = plane.cache.get(HTTPBIN.node_id)
            assert source.status()["healthy"] is True

            # A change through the store: compiled and published like a file change.
            revision = await apply_text(writer, DENY_GET, tmp_path)
            await asyncio.wait_for(source.wait_applied(revision), 10)
            denying = plane.cache.get(HTTPBIN.node_id)
            assert denying is not None and denying != allowing
            assert plane.reloads == 2 and plane.rejected_reloads == 0
            policy = plane.mesh.for_workload("foo/httpbin") if plane.mesh else None
            assert policy is not None and "DENY" in repr(policy)

            # A writer that bypassed validation: the whole configuration is refused, every
            # proxy keeps what it had, and the error names the object's mirror file.
            bad = json.loads(json.dumps(_broken_policy()))
            revision = await writer.commit([ResourceWrite(BROKEN_KEY, json.dumps(bad), 0)])
            await asyncio.wait_for(source.wait_applied(revision), 10)
            assert plane.rejected_reloads == 1
            assert plane.cache.get(HTTPBIN.node_id) is denying
            assert str(mirror_path(source.directory, BROKEN_KEY)) in str(plane.last_errors)

            # A burst: ten commits in a row, applied in order (the last one wins).
            await writer.commit([], [_delete(await writer.get(BROKEN_KEY))])
            for i in range(10):
                revision = await apply_text(
                    writer, DENY_GET.replace('"GET"', f'"GET{i}"'), tmp_path
                )
            await asyncio.wait_for(source.wait_applied(revision), 10)
            last = plane.cache.get(HTTPBIN.node_id)
            assert last is not None and last not in (allowing, denying)
            assert "GET9" in repr(plane.mesh.for_workload("foo/httpbin") if plane.mesh else None)

            # The store goes away: the last good configuration stays, status says why.
            served = plane.cache.get(HTTPBIN.node_id)
            own_etcd.kill("m0")
            await eventually(
                _unhealthy(source), what="the source reports the store unreachable", timeout=15
            )
            status = source.status()
            assert status["healthy"] is False and status["problem"]
            assert plane.cache.get(HTTPBIN.node_id) is served
            own_etcd.start()  # same data directory: the store is back as it was
            await eventually(_healthy(source), what="the source is back", timeout=30)
            revision = await apply_text(writer, DENY_GET, tmp_path)
            await asyncio.wait_for(source.wait_applied(revision), 15)
            assert plane.cache.get(HTTPBIN.node_id) == denying  # same content as before
        finally:
            stop.set()
            await asyncio.wait_for(follower, 10)
            await writer.close()
            await reader.close()

    run(scenario(), timeout=120)


SLEEP = ProxyRegistration.sidecar("foo/sleep", "127.0.0.21", outbound_address="127.0.0.21")


def test_a_change_through_the_store_compiles_to_what_a_full_load_of_the_files_gives(
    tmp_path: Path, own_etcd: EtcdCluster
) -> None:
    """The replica compiles the mirror from memory (``sources``) and only re-parses what
    changed; after every commit — policy added, edited, broken, deleted, a Service and a
    workload changed — its snapshots and errors equal those of a plane that reads every
    mirror file from disk and compiles them from scratch."""
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), dt.datetime.now(dt.UTC))

    async def scenario() -> None:
        writer = EtcdResourceStore(own_etcd.client())
        reader = EtcdResourceStore(own_etcd.client())
        source = StoreConfigSource(reader, tmp_path / "mirror")
        workloads = (EXAMPLES / "mesh" / "workloads.yaml").read_text()
        await apply_text(writer, workloads + "\n---\n" + STRICT, tmp_path)
        await source.load()
        memory = ControlPlane([str(source.directory)], ca=ca, sources=source.sources)
        compared: list[int] = []

        async def both() -> None:
            memory_errors = await memory.reload()
            disk = ControlPlane([str(source.directory)], ca=ca)  # no cache: from scratch
            for registration in (HTTPBIN, SLEEP):
                memory.register(registration)
                disk.register(registration)
            disk_errors = await disk.reload()
            assert [str(d) for d in memory_errors] == [str(d) for d in disk_errors]
            assert [str(d) for d in memory.last_errors] == [str(d) for d in disk.last_errors]
            assert memory.rejected_reloads + memory.reloads == len(compared) + 1
            for node in (HTTPBIN.node_id, SLEEP.node_id):
                if disk.rejected_reloads:  # refused whole: memory keeps its last good one
                    assert memory.last_errors and memory.cache.get(node) is not None
                else:
                    assert memory.cache.get(node) == disk.cache.get(node), node
            compared.append(source.revision)

        stop = asyncio.Event()
        follower = asyncio.create_task(source.follow(both, stop))
        try:
            edits = [
                DENY_GET,
                DENY_GET.replace('"GET"', '"PUT"'),
                DENY_GET.replace("action: DENY", "action: ALLOW"),
            ]
            for text in edits:
                revision = await apply_text(writer, text, tmp_path)
                await asyncio.wait_for(source.wait_applied(revision), 20)
            revision = await writer.commit(
                [ResourceWrite(BROKEN_KEY, json.dumps(_broken_policy()), 0)]
            )
            await asyncio.wait_for(source.wait_applied(revision), 20)
            assert memory.rejected_reloads == 1
            revision = await writer.commit([], [_delete(await writer.get(BROKEN_KEY))])
            await asyncio.wait_for(source.wait_applied(revision), 20)
            policy = ResourceKey(
                "security.istio.io", "AuthorizationPolicy", "foo", "deny-method-get"
            )
            stored = await writer.get(policy)
            assert stored is not None, "the example policy's name changed"
            revision = await writer.commit([], [_delete(stored)])
            await asyncio.wait_for(source.wait_applied(revision), 20)
            service = workloads.replace("port: 8000", "port: 8001", 1)
            assert service != workloads
            revision = await apply_text(writer, service, tmp_path)
            await asyncio.wait_for(source.wait_applied(revision), 20)
            assert memory.rejected_reloads == 1 and len(compared) >= 7
        finally:
            stop.set()
            await asyncio.wait_for(follower, 10)
            await writer.close()
            await reader.close()

    run(scenario(), timeout=180)


def _unhealthy(source: StoreConfigSource) -> Probe:
    async def probe() -> bool:
        return source.status()["healthy"] is False

    return probe


def _healthy(source: StoreConfigSource) -> Probe:
    async def probe() -> bool:
        return source.status()["healthy"] is True

    return probe


def _broken_policy() -> dict[str, object]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "broken", "namespace": "foo"},
        "spec": {"action": "MAYBE"},
    }


def _delete(stored: StoredResource | None) -> ResourceDelete:
    assert stored is not None
    return ResourceDelete(stored.key, stored.resource_version)


def test_a_replica_refuses_to_start_on_a_store_without_configuration(
    tmp_path: Path, own_etcd: EtcdCluster
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trustmesh", "control-plane", *own_etcd.store_args(),
         "--listen", "127.0.0.1:0", "--name", "a", "--ca", str(tmp_path / "ca"),
         "--state", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    answer = json.loads(done.stdout)
    assert answer["ready"] is False and "holds no configuration yet" in answer["error"]
    assert "Traceback" not in done.stderr
