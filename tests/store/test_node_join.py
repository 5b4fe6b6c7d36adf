"""Hosts join at a replica with a node token (``trustmesh ca token --node``): their
workloads are registered under their own lease, only on their own node, once per token,
and kept alive with the session secret at any replica."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import grpc
import pytest

from tests.envoy.conftest import eventually, run
from tests.store.replica_rig import replicas
from tests.store.test_replicas import fill_store
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.runtime import debug_client
from trustmesh.runtime.registration import Joined, RegistryClient
from trustmesh.runtime.replica import registration_of
from trustmesh.store.etcd_server import EtcdCluster
from trustmesh.store.etcd_store import WorkloadRegistry
from trustmesh.store.model import WorkloadRecord

SLEEP = WorkloadRecord("foo", "sleep", "host-2", "127.0.0.21", "sleep", kind="Pod")


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def test_a_host_joins_with_its_node_token_only_for_itself_and_once(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), now)
    run(fill_store(etcd, tmp_path))
    with replicas(etcd, tmp_path, ["a", "b"], tmp_path / "ca") as (a, b):

        async def scenario() -> None:
            roots = ca.bundle_pem(now)
            at_a = RegistryClient([a.info["ca"]], roots)
            at_b = RegistryClient([b.info["ca"]], roots)
            client = etcd.client()
            registry = WorkloadRegistry(client)
            try:
                token = ca.node_token("host-2", now)
                # Another host's workload in the request: refused, nothing registered.
                stray = WorkloadRecord("foo", "intruder", "host-1", "127.0.0.22", "sleep")
                error = await refused(at_a.join(token, [SLEEP, stray]))
                assert error.code() is grpc.StatusCode.PERMISSION_DENIED
                assert "token-wrong-node" in str(error.details())
                assert (await registry.workloads("host-2"))[0] == []
                assert (await registry.workloads("host-1"))[0] != []  # httpbin, untouched
                # The token was burnt by that refused attempt: a fresh one joins.
                token = ca.node_token("host-2", now)
                joined = await at_a.join(token, [SLEEP], ttl=30)
                assert joined.node == "host-2" and joined.ttl == 30
                assert set(joined.tokens) == {"foo/sleep"}  # its sidecar's bootstrap token
                later = dt.datetime.now(dt.UTC)
                assert ca.redeem_token(joined.tokens["foo/sleep"], later).service_account == "sleep"
                assert {r["name"] for r in joined.replicas} == {"a", "b"}
                assert (await registry.workloads("host-2"))[0] == [SLEEP]

                # Single use across replicas; a workload token is no node token.
                error = await refused(at_b.join(token, [SLEEP]))
                assert error.code() is grpc.StatusCode.UNAUTHENTICATED
                assert "token-reused" in str(error.details())
                error = await refused(at_b.join(ca.token("foo", "sleep", now), [SLEEP]))
                assert "token-not-node" in str(error.details())

                # Both replicas know the new proxy (it came through the registry).
                sleep_node = registration_of(SLEEP).node_id

                async def both_serve() -> bool:
                    for name in ("a", "b"):
                        syncz = await asyncio.to_thread(
                            debug_client.get, tmp_path / f"replica-{name}"
                        )
                        if syncz is None or sleep_node not in syncz["proxies"]:
                            return False
                    return True

                await eventually(both_serve, what="both replicas list sleep", timeout=30)

                # Kept alive at the other replica with the session; a guessed one fails.
                assert await at_b.keep_alive(joined) > 0
                forged = Joined("host-2", joined.lease, joined.ttl, "guessed")
                error = await refused(at_b.keep_alive(forged))
                assert error.code() is grpc.StatusCode.UNAUTHENTICATED

                # A host that stops keeping its lease loses its workloads within the TTL.
                short = await at_a.join(ca.node_token("host-3", now), [], ttl=5)
                gone = WorkloadRecord("foo", "gone", "host-3", "127.0.0.23", "sleep")
                third = await at_a.join(ca.node_token("host-3", now), [gone], ttl=5)
                assert third.lease != short.lease  # the re-join replaced the first lease

                async def expired() -> bool:
                    return (await registry.workloads("host-3"))[0] == []

                await eventually(expired, what="host-3's records end with its lease", timeout=20)
                error = await refused(at_a.keep_alive(third))
                assert error.code() is grpc.StatusCode.NOT_FOUND
            finally:
                await at_a.close()
                await at_b.close()
                await client.close()

        run(scenario(), timeout=90)
