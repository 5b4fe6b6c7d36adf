"""The counting hooks, through the real servers: an mTLS ADS stream that ACKs and NACKs,
a CA refusing certificate requests for each kind of reason, a refused reload. Each
count is read back from the Prometheus text as a scraper parses it."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from tests.envoy.conftest import Loopback
from tests.metrics.promtext import families, series, value
from tests.xds.controlplane_rig import BAD_ACTION, SLEEP, ConfigDir, agent_for, credentials_of
from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.client import CaClient, CaRefused
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.metrics.controlplane import ControlPlaneMetrics
from trustmesh.xds.cache import TYPE_CLUSTER, TYPE_LISTENER
from trustmesh.xds.controlplane import XDS_SERVER_NAME, ControlPlane, ProxyRegistration
from trustmesh.xds.server import ADS_SERVICE


def _now() -> dt.datetime:
    """Real TLS and a server on the real clock: the CA, its certificates and tokens are
    made at the real now of each test (a suite run takes longer than a token lives)."""
    return dt.datetime.now(dt.UTC)


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for another task of this loop (the server's stream) to get there."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def _request(node_id: str, type_url: str, response: Any = None) -> Any:
    request = discovery_pb2.DiscoveryRequest(type_url=type_url)
    request.node.id = node_id
    if response is not None:
        request.version_info = response.version_info
        request.response_nonce = response.nonce
    return request


def test_pushes_acks_and_a_nack_are_counted_per_type(tmp_path: Path) -> None:
    async def main() -> None:
        now = _now()
        metrics = ControlPlaneMetrics(process=False)
        config = ConfigDir(tmp_path / "config")
        ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), now)
        ca_server = CaServer(ca, observer=metrics)
        await ca_server.start()
        registration = ProxyRegistration.sidecar("foo/sleep", Loopback().address())
        plane = ControlPlane([str(config.path)], ca=ca, observer=metrics)
        plane.register(registration)
        await plane.start()
        try:
            async with agent_for(SLEEP, registration, ca_server, tmp_path) as proxy:
                credentials = credentials_of(proxy.secret, ca.bundle_pem(now))
                await _ack_cds_then_nack_lds(plane.port, registration.node_id, credentials, metrics)
        finally:
            await plane.stop()
            await ca_server.stop()
        await _until(lambda: metrics.connected == 0)  # the stream's end is counted too
        text = metrics.render()
        parsed = series(text)
        assert value(parsed, "pilot_xds") == 0
        assert value(parsed, "pilot_xds_pushes", type="cds") == 1
        assert value(parsed, "pilot_xds_pushes", type="lds") == 1
        assert value(parsed, "trustmesh_xds_acks", type="cds") == 1
        assert value(parsed, "trustmesh_xds_acks", type="lds") == 0
        assert value(parsed, "pilot_total_xds_rejects", type="lds") == 1
        assert value(parsed, "pilot_total_xds_rejects", type="cds") == 0
        # one push → ACK latency observed for CDS, none for the NACKed LDS
        assert value(parsed, "trustmesh_xds_push_to_ack_seconds_count", type="cds") == 1
        assert value(parsed, "trustmesh_xds_push_to_ack_seconds_count", type="lds") == 0
        assert 0 < value(parsed, "trustmesh_xds_push_to_ack_seconds_sum", type="cds") < 5
        # the agent's enrollment: one CSR, one certificate, valid for about a day
        assert value(parsed, "citadel_server_csr_count") == 1
        assert value(parsed, "citadel_server_success_cert_issuance_count") == 1
        left = value(parsed, "trustmesh_workload_cert_expiry_seconds", identity=SLEEP.uri)
        assert 0 < left <= CaConfig().default_ttl.total_seconds()
        for server in ("xds", "ca"):  # the control plane's own serving certificates
            left = value(parsed, "trustmesh_serving_cert_expiry_seconds", server=server)
            assert 0 < left <= CaConfig().default_ttl.total_seconds()
        # Istio's counter names exactly, no "_total" added in the text
        assert "# TYPE pilot_total_xds_rejects counter" in text
        assert 'pilot_total_xds_rejects{type="lds"} 1.0' in text
        assert families(text)["pilot_xds"] == "gauge"

    asyncio.run(main())


async def _ack_cds_then_nack_lds(
    port: int, node_id: str, credentials: grpc.ChannelCredentials, metrics: ControlPlaneMetrics
) -> None:
    target, name = f"127.0.0.1:{port}", [("grpc.ssl_target_name_override", XDS_SERVER_NAME)]
    async with grpc.aio.secure_channel(target, credentials, options=name) as channel:
        call = channel.stream_stream(
            f"/{ADS_SERVICE}/StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        async with asyncio.timeout(10):
            await call.write(_request(node_id, TYPE_CLUSTER))
            clusters = await call.read()
            assert metrics.connected == 1
            await call.write(_request(node_id, TYPE_CLUSTER, clusters))  # ACK
            await call.write(_request(node_id, TYPE_LISTENER))
            listeners = await call.read()
            nack = _request(node_id, TYPE_LISTENER)
            nack.response_nonce = listeners.nonce  # version_info stays "": nothing accepted
            nack.error_detail.code = 3
            nack.error_detail.message = "Proto constraint validation failed"
            await call.write(nack)
            await _until(lambda: metrics.rejects.value(("lds",)) == 1)
        call.cancel()


def test_ca_refusals_are_counted_by_reason(tmp_path: Path) -> None:
    async def main() -> None:
        now = _now()
        metrics = ControlPlaneMetrics(process=False)
        ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), now)
        server = CaServer(ca, observer=metrics)
        await server.start()
        roots = ca.bundle_pem(now)
        client = CaClient(f"127.0.0.1:{server.port}", roots)
        key = pki.generate_key()
        try:
            token = ca.token("foo", "sleep", now)
            await client.create_certificate(pki.build_csr(key, [SLEEP.uri]), token=token)
            admin = SpiffeId("cluster.local", "foo", "admin")
            attempts: list[tuple[bytes, str | None]] = [
                (pki.build_csr(key, [SLEEP.uri]), token),  # the same token again
                (pki.build_csr(key, [SLEEP.uri]), "not-a-token"),
                (pki.build_csr(key, [admin.uri]), ca.token("foo", "sleep", now)),
                (pki.build_ca_csr(key), ca.token("foo", "sleep", now)),
                (pki.build_csr(key, [SLEEP.uri]), None),  # no credentials at all
            ]
            for csr, credential in attempts:
                with pytest.raises(CaRefused):
                    await client.create_certificate(csr, token=credential)
        finally:
            await client.close()
            await server.stop()
        parsed = series(metrics.render())
        refusals = {
            dict(labels)["reason"]: count
            for (name, labels), count in parsed.items()
            if name == "trustmesh_ca_refusals"
        }
        assert refusals == {
            "token-reused": 1,
            "token-malformed": 1,
            "san-mismatch": 1,
            "csr-requests-ca": 1,
            "unauthenticated": 1,
        }
        assert value(parsed, "citadel_server_csr_count") == 6
        assert value(parsed, "citadel_server_success_cert_issuance_count") == 1
        assert value(parsed, "citadel_server_authentication_failure_count") == 3
        assert value(parsed, "citadel_server_id_extraction_err_count") == 1
        assert value(parsed, "citadel_server_csr_parsing_err_count") == 1

    asyncio.run(main())


def test_a_refused_reload_counts_its_errors_by_code(tmp_path: Path) -> None:
    async def main() -> None:
        now = _now()
        metrics = ControlPlaneMetrics(process=False)
        config = ConfigDir(tmp_path / "config")
        ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), now)
        plane = ControlPlane([str(config.path)], ca=ca, observer=metrics)
        assert await plane.reload() == []
        config.write_policy(BAD_ACTION)
        problems = await plane.reload()
        assert problems
        parsed = series(metrics.render())
        assert value(parsed, "trustmesh_config_reloads", result="applied") == 1
        assert value(parsed, "trustmesh_config_reloads", result="rejected") == 1
        assert value(parsed, "trustmesh_config_last_reload_errors") == len(problems)
        for code in {p.code for p in problems}:
            expected = sum(p.code == code for p in problems)
            assert value(parsed, "trustmesh_config_errors", code=code) == expected
        labelled = {
            dict(labels)["code"]
            for name, labels in parsed
            if name.startswith("trustmesh_config_errors")
        }
        assert labelled == {p.code for p in problems}  # codes only: no file, no message

    asyncio.run(main())
