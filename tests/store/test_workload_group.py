"""WorkloadGroup auto-registration at a replica (Istio's VM onboarding): a host's node
token registers a VM's proxy with the WorkloadGroup of its namespace; the replica writes
the WorkloadEntry istiod would create into the store's resources under the host's lease
(Istio's name and annotations, owned by the group), refuses — writing nothing — an
unknown group, another host's workload, an identity not the group's and a name not
Istio's; the entry leaves with the lease and with its group."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import grpc
import yaml

from tests.envoy.conftest import eventually, run
from tests.store.replica_rig import apply_text, replicas
from tests.store.test_node_join import refused
from tests.store.test_replicas import fill_store
from trustmesh.config import load_config
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.runtime import debug_client
from trustmesh.runtime.registration import RegistryClient
from trustmesh.runtime.replica import registration_of
from trustmesh.store.etcd_server import EtcdCluster
from trustmesh.store.etcd_store import EtcdResourceStore, WorkloadRegistry
from trustmesh.store.model import ResourceKey, WorkloadHealth, WorkloadRecord

EXAMPLE = Path(__file__).parents[2] / "examples" / "vm-group" / "vm.yaml"
VM = WorkloadRecord(
    "foo", "vm-127.0.0.31", "host-3", "127.0.0.31", "vm", labels=(("zone", "z1"),), group="vm"
)
ENTRY = ResourceKey("networking.istio.io", "WorkloadEntry", "foo", "vm-127.0.0.31")
HAND_MADE = """\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: legacy-vm, namespace: foo}
spec: {address: 127.0.0.39, serviceAccount: vm, labels: {app: vm}}
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", *args], capture_output=True, text=True, timeout=60
    )


def test_a_vm_auto_registers_with_its_group_and_leaves_with_its_lease_and_group(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), now)
    run(fill_store(etcd, tmp_path))

    async def prepare() -> None:
        client = etcd.client()
        try:
            await apply_text(
                EtcdResourceStore(client), EXAMPLE.read_text() + "\n---\n" + HAND_MADE, tmp_path
            )
        finally:
            await client.close()

    run(prepare())
    with replicas(etcd, tmp_path, ["a", "b"], tmp_path / "ca") as (a, b):

        async def scenario() -> None:
            client = etcd.client()
            store = EtcdResourceStore(client)

            async def entries() -> list[str]:
                listed, _ = await store.list(kind="WorkloadEntry", namespace="foo")
                return [r.key.name for r in listed]

            roots = ca.bundle_pem(now)
            at_a = RegistryClient([a.info["ca"]], roots)
            registry = WorkloadRegistry(client)
            try:
                # Refused, each with a clear error, and nothing written.
                cases = [
                    (
                        WorkloadRecord(
                            "foo", "nope-127.0.0.31", "host-3", "127.0.0.31", "vm", group="nope"
                        ),
                        grpc.StatusCode.FAILED_PRECONDITION,
                        "workloadgroup-not-found: auto-registration of foo/nope-127.0.0.31 "
                        "failed: cannot find WorkloadGroup foo/nope",
                    ),
                    (
                        WorkloadRecord(
                            "foo", "vm-127.0.0.31", "host-1", "127.0.0.31", "vm", group="vm"
                        ),
                        grpc.StatusCode.PERMISSION_DENIED,
                        "token-wrong-node",
                    ),
                    (
                        WorkloadRecord(
                            "foo", "vm-127.0.0.31", "host-3", "127.0.0.31", "sleep", group="vm"
                        ),
                        grpc.StatusCode.PERMISSION_DENIED,
                        "identity-not-group: WorkloadGroup foo/vm runs as service account "
                        "'vm', not 'sleep'",
                    ),
                    (
                        WorkloadRecord("foo", "vm-1", "host-3", "127.0.0.31", "vm", group="vm"),
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "is named 'vm-127.0.0.31'",
                    ),
                ]
                for record, status, message in cases:
                    error = await refused(at_a.join(ca.node_token("host-3", now), [record]))
                    assert error.code() is status, error.details()
                    assert message in str(error.details())
                    assert await entries() == ["legacy-vm"]
                    assert (await registry.workloads("host-3"))[0] == []

                joined = await at_a.join(ca.node_token("host-3", now), [VM], ttl=30)
                later = dt.datetime.now(dt.UTC)
                assert ca.redeem_token(joined.tokens[VM.ref], later).service_account == "vm"
                # The group has a probe: not ready until the first report says healthy.
                unhealthy = dataclasses.replace(VM, health=WorkloadHealth.UNHEALTHY)
                assert (await registry.workloads("host-3"))[0] == [unhealthy]
                stored = await store.get(ENTRY)
                assert stored is not None
                entry = json.loads(stored.manifest)
                metadata = entry["metadata"]
                annotations = metadata["annotations"]
                assert annotations["istio.io/autoRegistrationGroup"] == "vm"
                assert annotations["istio.io/workloadController"] == "a"
                assert annotations["example.com/owner"] == "vm-team"  # the group's own
                assert annotations["proxy.istio.io/health-checks-enabled"] == "true"
                assert "status" not in entry
                connected = dt.datetime.fromisoformat(annotations["istio.io/connectedAt"])
                assert abs((connected - later).total_seconds()) < 30
                assert "istio.io/disconnectedAt" not in annotations
                assert metadata["ownerReferences"] == [
                    {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
                     "name": "vm", "controller": True}
                ]  # fmt: skip
                # template < group metadata < the proxy's own labels
                labels = {"app": "vm", "version": "v1", "zone": "z1"}
                assert metadata["labels"] == labels
                assert entry["spec"] == {
                    "address": "127.0.0.31", "labels": labels, "ports": {"http": 8000},
                    "serviceAccount": "vm",
                }  # fmt: skip
                lease = await client.get(b"/trustmesh/resources/" + ENTRY.path().encode())
                assert lease is not None and lease.lease == joined.lease

                # `get workloadentry -n foo` lists it; its YAML is valid as an applied one.
                shown = await asyncio.to_thread(
                    _cli, "get", "workloadentry", "-n", "foo", *etcd.store_args()
                )
                assert shown.returncode == 0, shown.stderr
                assert "vm-127.0.0.31" in shown.stdout and "legacy-vm" in shown.stdout
                as_yaml = await asyncio.to_thread(
                    _cli,
                    "get",
                    "we",
                    "vm-127.0.0.31",
                    "-n",
                    "foo",
                    "-o",
                    "yaml",
                    *etcd.store_args(),
                )
                assert yaml.safe_load(as_yaml.stdout)["metadata"]["name"] == "vm-127.0.0.31"
                written = tmp_path / "entry.yaml"
                written.write_text(as_yaml.stdout)
                loaded = load_config([str(EXAMPLE), str(written)], compile_policy=False)
                assert not loaded.errors, loaded.errors

                # Both replicas serve the VM's proxy (the entry is in their configuration).
                node = registration_of(VM).node_id

                async def both_serve() -> bool:
                    for name in ("a", "b"):
                        syncz = await asyncio.to_thread(
                            debug_client.get, tmp_path / f"replica-{name}"
                        )
                        if syncz is None or node not in syncz["proxies"]:
                            return False
                    return True

                await eventually(both_serve, what="both replicas serve the VM", timeout=30)

                # Its probe's reports: the entry's Healthy condition, and a ready endpoint
                # at every replica only while it is True.
                async def not_ready_everywhere(wanted: bool) -> bool:
                    for name in ("a", "b"):
                        syncz = await asyncio.to_thread(
                            debug_client.get, tmp_path / f"replica-{name}"
                        )
                        if syncz is None or (VM.ref in syncz["not_ready"]) != wanted:
                            return False
                    return True

                await eventually(
                    lambda: not_ready_everywhere(True), what="VM not ready", timeout=30
                )
                at_b = RegistryClient([b.info["ca"]], roots)
                try:
                    await at_b.health(joined, VM.ref, True)  # at the other replica
                    await eventually(
                        lambda: not_ready_everywhere(False), what="VM ready", timeout=30
                    )
                    stored = await store.get(ENTRY)
                    assert stored is not None
                    conditions = json.loads(stored.manifest)["status"]["conditions"]
                    assert [(c["type"], c["status"]) for c in conditions] == [("Healthy", "True")]
                    assert (await registry.workloads("host-3"))[0] == [VM]
                    await at_b.health(
                        joined, VM.ref, False, "HTTP probe failed with statuscode: 503"
                    )
                    await eventually(
                        lambda: not_ready_everywhere(True), what="VM out again", timeout=30
                    )
                    stored = await store.get(ENTRY)
                    assert stored is not None
                    (condition,) = json.loads(stored.manifest)["status"]["conditions"]
                    assert condition["status"] == "False"
                    assert condition["message"] == "HTTP probe failed with statuscode: 503"
                    # Only the host's own session reports; only for its own workloads.
                    forged = dataclasses.replace(joined, session="guessed")
                    error = await refused(at_b.health(forged, VM.ref, True))
                    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
                    error = await refused(at_b.health(joined, "foo/sleep", True))
                    assert error.code() is grpc.StatusCode.NOT_FOUND
                    await at_b.health(joined, VM.ref, True)
                finally:
                    await at_b.close()

                # A VM whose host stops keeping its lease: its entry goes within the TTL
                # (the grace period Istio's PILOT_WORKLOAD_ENTRY_GRACE_PERIOD gives).
                short = WorkloadRecord("foo", "vm-127.0.0.32", "host-4", "127.0.0.32", "vm",
                                       group="vm")  # fmt: skip
                await at_a.join(ca.node_token("host-4", now), [short], ttl=5)
                assert "vm-127.0.0.32" in await entries()

                async def expired() -> bool:
                    return "vm-127.0.0.32" not in await entries()

                await eventually(expired, what="the entry leaves with its lease", timeout=20)
                assert (await registry.workloads("host-4"))[0] == []

                # Deleting the group deletes the entries it owns (and their records);
                # a WorkloadEntry applied by hand stays.
                deleted = await asyncio.to_thread(
                    _cli, "delete", "workloadgroup", "vm", "-n", "foo", *etcd.store_args()
                )
                assert deleted.returncode == 0, deleted.stderr
                assert await entries() == ["legacy-vm"]
                assert (await registry.workloads("host-3"))[0] == []

                async def nobody_serves() -> bool:
                    for name in ("a", "b"):
                        syncz = await asyncio.to_thread(
                            debug_client.get, tmp_path / f"replica-{name}"
                        )
                        if syncz is None or node in syncz["proxies"]:
                            return False
                    return True

                await eventually(nobody_serves, what="the replicas forget the VM", timeout=30)
                # Without its group, the VM cannot register again.
                error = await refused(at_a.join(ca.node_token("host-3", now), [VM]))
                assert "workloadgroup-not-found" in str(error.details())
            finally:
                await at_a.close()
                await client.close()

        run(scenario(), timeout=120)
