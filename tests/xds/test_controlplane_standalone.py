"""The control plane's parts that need no running sidecar: refusing invalid config at
start, proxy registration, the watcher's debounce and content hashing, the ADS bootstrap
(checked by ``envoy --mode validate``) and the serving certificate's renewal. The Envoy
tests are in test_controlplane.py; the rig is in controlplane_rig.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.envoy.conftest import eventually, run
from tests.xds.controlplane_rig import BAD_ACTION, BAD_YAML, DENY_GET, HTTPBIN, SLEEP, Probe, _plane
from trustmesh.agent.envoy import validate_bootstrap
from trustmesh.agent.xds_bootstrap import (
    CONTROL_PLANE_ID,
    XDS_CLUSTER,
    ads_bootstrap,
    control_plane_spiffe_id,
)
from trustmesh.identity import pki
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.xds.controlplane import ConfigRejected, ProxyRegistration


def test_start_refuses_invalid_config_with_every_diagnostic(tmp_path: Path) -> None:
    config, plane = _plane(tmp_path)
    config.write_policy(BAD_ACTION + "\n---\n" + BAD_YAML)
    with pytest.raises(ConfigRejected) as refused:
        run(plane.start())
    codes = sorted(d.code for d in refused.value.diagnostics)
    assert codes == ["invalid-field", "yaml-syntax"], refused.value
    assert str(config.path / "policy.yaml") in str(refused.value)
    assert (plane.server, plane.mesh, plane.rejected_reloads, plane.reloads) == (None, None, 1, 0)


def test_registration_names_a_known_workload_once(tmp_path: Path) -> None:
    _, plane = _plane(tmp_path)
    httpbin = ProxyRegistration.sidecar("foo/httpbin", "127.0.0.20")
    assert httpbin.node_id == "sidecar~127.0.0.20~httpbin.foo~foo.svc.cluster.local"
    with pytest.raises(ValueError, match="namespace/name"):
        ProxyRegistration("n", "httpbin", "127.0.0.20")
    with pytest.raises(ValueError, match="IP"):
        ProxyRegistration.sidecar("foo/httpbin", "localhost")

    async def scenario() -> None:
        plane.register(httpbin)
        assert await plane.reload() == []  # loaded, not served: a registration translates now
        assert plane.cache.get(httpbin.node_id) is not None
        assert plane.identity_of(httpbin.node_id) == HTTPBIN.uri
        plane.register(httpbin)  # the same again is fine
        with pytest.raises(ValueError, match="already"):
            plane.register(ProxyRegistration(httpbin.node_id, "foo/sleep", "127.0.0.20"))
        with pytest.raises(LookupError):
            plane.register(ProxyRegistration.sidecar("foo/nope", "127.0.0.21"))
        with pytest.raises(ValueError, match="no sidecar"):
            plane.register(ProxyRegistration.sidecar("legacy/httpbin", "127.0.0.22"))
        assert set(plane.registrations) == {httpbin.node_id}
        assert plane.identity_of("sidecar~127.0.0.21~nope.foo~foo.svc.cluster.local") is None

    run(scenario())


def test_watch_reloads_once_per_settled_change_and_same_content_publishes_nothing(
    tmp_path: Path,
) -> None:
    config, plane = _plane(tmp_path, debounce=0.15)
    httpbin = ProxyRegistration.sidecar("foo/httpbin", "127.0.0.20")
    plane.register(httpbin)

    def reloaded(count: int) -> Probe:
        async def probe() -> bool:
            return plane.reloads == count

        return probe

    async def scenario() -> None:
        await plane.reload()
        stop = asyncio.Event()
        watcher = asyncio.create_task(plane.watch(stop, interval=0.02))
        try:
            first = plane.cache.get(httpbin.node_id)
            for text in (BAD_YAML, DENY_GET.replace("GET", "PUT"), DENY_GET):  # an editor
                config.write_policy(text)
                await asyncio.sleep(0.04)  # well inside the debounce window
            await eventually(reloaded(2), what="one reload", timeout=5)
            denying = plane.cache.get(httpbin.node_id)
            assert denying != first and plane.rejected_reloads == 0
            config.write_policy(DENY_GET)  # new inode and mtime, same content
            await eventually(reloaded(3), what="a reload of the rewrite", timeout=5)
            assert plane.cache.get(httpbin.node_id) is denying  # nothing new published
        finally:
            stop.set()
            await watcher
        assert plane.reloads == 3

    run(scenario())


def test_ads_bootstrap_pins_the_control_plane_and_passes_envoy_validate(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {
        "node_id": "sidecar~127.0.0.20~httpbin.foo~foo.svc.cluster.local",
        "cluster": "httpbin.foo",
        "sds_socket": str(tmp_path / "sds.sock"),
        "xds_port": 15012,
    }
    by_ip = ads_bootstrap(xds_address="127.0.0.1", **kwargs)
    other_domain = control_plane_spiffe_id("example.org")
    by_name = ads_bootstrap(xds_address="xds.mesh", control_plane_id=other_domain, **kwargs)
    assert by_ip == ads_bootstrap(xds_address="127.0.0.1", **kwargs)  # pure
    xds, sds = by_ip["static_resources"]["clusters"]
    assert (xds["name"], xds["type"], sds["name"]) == (XDS_CLUSTER, "STATIC", "sds-grpc")
    assert by_name["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"
    tls = xds["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2"]
    assert [s["name"] for s in tls["tls_certificate_sds_secret_configs"]] == ["default"]
    validation = tls["combined_validation_context"]
    assert validation["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": CONTROL_PLANE_ID}}
    ]
    ads = by_ip["dynamic_resources"]
    assert ads["ads_config"]["grpc_services"][0]["envoy_grpc"]["cluster_name"] == XDS_CLUSTER
    assert ads["lds_config"] == ads["cds_config"] == {"ads": {}, "resource_api_version": "V3"}
    for bad in ({"xds_port": 0}, {"sds_socket": "x.sock"}, {"admin_address": "10.0.0.1"}):
        with pytest.raises(ValueError):
            ads_bootstrap(**{**kwargs, "xds_address": "127.0.0.1", **bad})
    with pytest.raises(ValueError, match="spiffe"):
        ads_bootstrap(xds_address="127.0.0.1", control_plane_id="trustmesh-ca", **kwargs)

    async def check() -> None:
        await asyncio.gather(
            validate_bootstrap(by_ip, workdir=tmp_path),
            validate_bootstrap(by_name, workdir=tmp_path),
        )

    run(check(), timeout=60)


def test_serving_certificate_is_renewed_at_half_life(tmp_path: Path) -> None:
    # The control plane's clock starts 13 h back and catches up with the real one, so
    # the client (on the real clock) accepts every certificate it is served.
    clock = [dt.datetime.now(dt.UTC) - dt.timedelta(hours=13)]
    _, plane = _plane(tmp_path, clock=lambda: clock[0])
    ca = CertificateAuthority.load(tmp_path / "ca")
    key = pki.generate_key()
    issued = ca.issue(pki.build_csr(key, [SLEEP.uri]), SLEEP, clock[0])
    pem = tmp_path / "client.pem"
    pem.write_bytes("".join(issued.chain_pem[:-1]).encode() + pki.key_to_pem(key))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.load_verify_locations(cadata=issued.chain_pem[-1])
    tls.load_cert_chain(pem)
    tls.set_alpn_protocols(["h2"])

    async def served_certificate() -> x509.Certificate:
        _, writer = await asyncio.open_connection("127.0.0.1", plane.port, ssl=tls)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.transport.abort()
        return x509.load_der_x509_certificate(der)

    async def scenario() -> None:
        await plane.start()
        try:
            first = await served_certificate()
            assert pki.uri_sans(first) == [plane.spiffe_id]
            clock[0] += dt.timedelta(hours=11)  # before half of its 24 h: kept
            assert (await served_certificate()).serial_number == first.serial_number
            clock[0] += dt.timedelta(hours=2)  # past half: a new one for new handshakes
            renewed = await served_certificate()
            assert renewed.serial_number != first.serial_number
            assert renewed.not_valid_after_utc > first.not_valid_after_utc
        finally:
            await plane.stop()

    run(scenario())
