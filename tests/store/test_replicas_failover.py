"""A sidecar that knows every replica survives losing the one it streams from: SIGKILL
it and the sidecar's Envoy reconnects to the other (its bootstrap lists both), which
then pushes the next `apply`; the workload's CA client fails over the same way."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from tests.envoy.conftest import eventually, run
from tests.store.replica_rig import HTTPBIN_ID, apply_text, sidecar_on_replica_b
from tests.xds.controlplane_rig import DENY_GET
from tests.xds.controlplane_traffic import Connection
from trustmesh.agent.envoy import validate_bootstrap
from trustmesh.agent.xds_bootstrap import ads_bootstrap
from trustmesh.identity import pki
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.identity.client import CaClient, channel_target
from trustmesh.runtime.replica import read_replicas
from trustmesh.store.etcd_server import EtcdCluster


def test_sigkill_the_serving_replica_and_the_sidecar_gets_config_from_the_other(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    async def scenario() -> None:
        async with sidecar_on_replica_b(etcd, tmp_path, failover=True) as rig:
            replicas = {"a": rig.a, "b": rig.b}

            async def serving() -> str | None:
                records = await read_replicas(rig.client)
                found = [n for n, r in records.items() if rig.node_id in r["proxies"]]
                return found[0] if len(found) == 1 else None

            async def someone_serves() -> bool:
                return await serving() is not None

            await eventually(someone_serves, what="one replica serves the sidecar", timeout=10)
            victim_name = await serving()
            assert victim_name is not None
            victim = replicas[victim_name]
            survivor = replicas["b" if victim_name == "a" else "a"]
            connection = await Connection.open(rig.inbound, rig.sleep_tls)
            try:
                assert (await connection.request())[0] == 200
                victim.kill()
                killed = time.monotonic()

                async def survivor_serves() -> bool:  # (the dead one's record lasts its TTL)
                    records = await read_replicas(rig.client)
                    return rig.node_id in records.get(survivor.name, {}).get("proxies", [])

                await eventually(survivor_serves, what="the other replica serves it", timeout=15)
                reconnected = time.monotonic() - killed
                await apply_text(rig.store, DENY_GET, tmp_path)

                async def denied() -> bool:
                    return (await connection.request())[0] == 403

                await eventually(denied, what="GET denied after failover", timeout=10)
                print(
                    f"\nserving replica {victim_name} SIGKILLed -> {survivor.name} serves the "
                    f"sidecar after {reconnected * 1000:.0f} ms (records: every 0.5 s)"
                )
            finally:
                connection.close()

            # The CA client with both replicas' addresses: the dead one first.
            ca = CertificateAuthority.load(tmp_path / "ca")
            now = dt.datetime.now(dt.UTC)
            roots = ca.bundle_pem(now)
            client = CaClient(f"{victim.info['ca']},{survivor.info['ca']}", roots)
            try:
                key = pki.generate_key()
                csr = pki.build_csr(key, [HTTPBIN_ID.uri])
                token = ca.token(HTTPBIN_ID.namespace, HTTPBIN_ID.service_account, now)
                chain = await client.create_certificate(csr, token=token)
                assert HTTPBIN_ID.uri in pki.uri_sans(pki.load_certs(chain[0].encode())[0])
            finally:
                await client.close()

    run(scenario(), timeout=240)


def test_bootstrap_lists_every_replica_and_passes_envoy_validate(tmp_path: Path) -> None:
    common: dict[str, Any] = {
        "node_id": "sidecar~127.0.0.20~httpbin.foo~foo.svc.cluster.local",
        "cluster": "httpbin.foo",
        "sds_socket": str(tmp_path / "sds.sock"),
        "xds_address": "127.0.0.1",
        "xds_port": 15012,
    }
    one = ads_bootstrap(**common)
    two = ads_bootstrap(**common, more_xds=[("127.0.0.2", 15012)])
    named = ads_bootstrap(**common, more_xds=[("replica-b.mesh", 15012)])
    xds_one, xds_two = (b["static_resources"]["clusters"][0] for b in (one, two))
    assert "outlier_detection" not in xds_one  # one replica: as before
    endpoints = xds_two["load_assignment"]["endpoints"][0]["lb_endpoints"]
    addresses = [e["endpoint"]["address"]["socket_address"]["address"] for e in endpoints]
    assert addresses == ["127.0.0.1", "127.0.0.2"] and xds_two["type"] == "STATIC"
    assert xds_two["outlier_detection"]["consecutive_local_origin_failure"] == 1
    assert named["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"
    with pytest.raises(ValueError, match="more_xds ports"):
        ads_bootstrap(**common, more_xds=[("127.0.0.2", 0)])

    async def check() -> None:
        await validate_bootstrap(two, workdir=tmp_path / "two")
        await validate_bootstrap(named, workdir=tmp_path / "named")

    run(check(), timeout=60)


def test_ca_client_target_over_several_replicas() -> None:
    assert channel_target("127.0.0.1:15010") == "127.0.0.1:15010"
    assert channel_target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target("[::1]:1,[::2]:2") == "ipv6:[::1]:1,[::2]:2"
    for bad, why in (
        ("ca.mesh:1,127.0.0.1:2", "must be IPs"),
        ("127.0.0.1,127.0.0.2:2", "is not IP:PORT"),
        ("127.0.0.1:1,[::1]:2", "mix"),
    ):
        with pytest.raises(ValueError, match=why):
            channel_target(bad)
