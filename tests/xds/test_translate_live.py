"""xds.translate, live: the inbound listener enforces what the evaluator predicts, in a
real Envoy fed over SDS by a test CA, in front of a tiny HTTP app; client and server
sidecars both from translate() speak mesh mTLS; over ADS a new policy reaches an open
connection. The harness is in translate_rig.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.envoy.conftest import (  # fixtures are registered by importing them
    Loopback,
    MiniCA,
    Sidecars,
    ca,
    eventually,
    loopback,
    run,
    sidecars,
    workroot,
)
from tests.xds.translate_rig import (
    SLEEP_ID,
    _ads_patch,
    _app,
    _bootstrap_patch,
    _client_patch,
    _exchange,
    _mesh,
    _mesh_client,
    _no_cert_client,
    _request,
)
from trustmesh.xds.cache import Snapshot, SnapshotCache
from trustmesh.xds.server import AdsServer
from trustmesh.xds.translate import translate

__all__ = ["ca", "loopback", "sidecars", "workroot"]  # re-exported fixtures, used by name


@pytest.mark.envoy
def test_live_strict_refuses_plaintext_and_accepts_mesh_mtls(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars, workroot: Path
) -> None:
    inbound, app = loopback.address(), loopback.address()
    resources = translate(
        _mesh("12-mesh-strict"), "foo/httpbin", inbound_address=inbound, app_address=app
    )

    async def scenario() -> None:
        async with (
            _app(app, 8000),
            sidecars.run("httpbin", ca.issue("foo", "httpbin"), patch=_bootstrap_patch(resources)),
        ):
            reply = await _request(inbound, 8000, path="/get", tls=_mesh_client(ca, workroot))
            assert reply.status == 200, reply
            seen = json.loads(reply.body)
            assert seen["path"] == "/get"
            # The app learns the caller from the handshake, not from anything it sent.
            assert f"URI={SLEEP_ID}" in seen["xfcc"]
            with pytest.raises((ConnectionError, OSError)):  # plaintext: no chain, reset
                await _request(inbound, 8000, path="/get")
            with pytest.raises((ConnectionError, OSError)):  # TLS without a client cert
                await _request(inbound, 8000, path="/get", tls=_no_cert_client(ca))

    run(scenario(), timeout=30)


@pytest.mark.envoy
def test_live_permissive_accepts_both_and_enforces_rbac_with_logs(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars, workroot: Path
) -> None:
    inbound, app = loopback.address(), loopback.address()
    mesh = _mesh("02-deny-get", "15-dry-run-deny")
    resources = translate(mesh, "foo/httpbin", inbound_address=inbound, app_address=app)
    mesh_tls = _mesh_client(ca, workroot, alpn=("istio-http/1.1",))

    async def scenario() -> Path:
        async with (
            _app(app, 8000),
            sidecars.run(
                "httpbin", ca.issue("foo", "httpbin"), patch=_bootstrap_patch(resources)
            ) as sidecar,
        ):
            plain = await _request(inbound, 8000, "POST", "/post")
            assert plain.status == 200, plain
            assert json.loads(plain.body)["xfcc"] is None
            over_mtls = await _request(inbound, 8000, "POST", "/post", tls=mesh_tls)
            assert over_mtls.status == 200, over_mtls
            assert f"URI={SLEEP_ID}" in json.loads(over_mtls.body)["xfcc"]
            # TLS that is not mesh mTLS (no istio ALPN) has no chain on an HTTP port.
            with pytest.raises((ConnectionError, OSError)):
                await _request(inbound, 8000, "POST", "/post", tls=_mesh_client(ca, workroot))

            denied = await _request(inbound, 8000, "GET", "/get", tls=mesh_tls)
            assert (denied.status, denied.body) == (403, b"RBAC: access denied")
            shadow = await _request(inbound, 8000, "POST", "/headers")
            assert shadow.status == 200  # dry run: evaluated, logged, not enforced

            return sidecar.envoy.log_path

    # Envoy flushes access logs every 10 s, and at exit: read them once it has stopped.
    log = run(scenario(), timeout=30)
    entries: dict[str, dict[str, Any]] = {}
    unmatched = 0
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("workload") == "foo/httpbin":
                if "path" in entry:
                    entries[entry["path"]] = entry
                else:
                    unmatched += entry["message"] == "no filter chain matched"
    assert unmatched == 1  # the TLS connection without a mesh ALPN, logged by the listener
    assert entries["/get"]["response_code"] == 403
    assert "ns[foo]-policy[deny-method-get]-rule[0]" in entries["/get"]["response_code_details"]
    assert entries["/get"]["peer_principal"] == SLEEP_ID
    rbac = entries["/headers"]["rbac"]
    assert rbac["istio_dry_run_deny_shadow_effective_policy_id"] == (
        "ns[foo]-policy[deny-path-headers]-rule[0]"
    )
    assert rbac["istio_dry_run_deny_shadow_engine_result"] == "denied"


@pytest.mark.envoy
def test_live_outbound_cluster_speaks_mesh_mtls_to_the_inbound_listener(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars
) -> None:
    """Client and server sidecars both from translate(): auto mTLS with the server's
    SPIFFE ID pinned reaches a STRICT port; an unknown host gets REGISTRY_ONLY's 502."""
    mesh = _mesh("12-mesh-strict", "17b-registry-only-service-entry")
    inbound, app, client = loopback.address(), loopback.address(), loopback.endpoint()
    server = translate(mesh, "foo/httpbin", inbound_address=inbound, app_address=app)
    sleep = translate(mesh, "foo/sleep", inbound_address=loopback.address())

    async def scenario() -> None:
        async with (
            _app(app, 8000),
            sidecars.run("httpbin", ca.issue("foo", "httpbin"), patch=_bootstrap_patch(server)),
            sidecars.run(
                "sleep", ca.issue("foo", "sleep"), patch=_client_patch(sleep, client, inbound)
            ),
        ):
            reply = await _request(*client, "GET", "/get", authority="httpbin.foo:8000")
            assert reply.status == 200, reply
            assert f"URI={SLEEP_ID}" in json.loads(reply.body)["xfcc"]
            unknown = await _request(*client, "GET", "/", authority="edition.cnn.com")
            assert unknown.status == 502

    run(scenario(), timeout=30)


@pytest.mark.envoy
def test_live_client_refuses_a_server_with_another_identity(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars
) -> None:
    mesh = _mesh("12-mesh-strict")
    inbound, app, client = loopback.address(), loopback.address(), loopback.endpoint()
    server = translate(mesh, "foo/httpbin", inbound_address=inbound, app_address=app)
    sleep = translate(mesh, "foo/sleep", inbound_address=loopback.address())

    async def scenario() -> None:
        async with (
            _app(app, 8000),
            # The server presents bar/httpbin's identity where foo/httpbin's is pinned.
            sidecars.run("httpbin", ca.issue("bar", "httpbin"), patch=_bootstrap_patch(server)),
            sidecars.run(
                "sleep", ca.issue("foo", "sleep"), patch=_client_patch(sleep, client, inbound)
            ),
        ):
            reply = await _request(*client, "GET", "/get", authority="httpbin.foo:8000")
            assert reply.status == 503, reply

    run(scenario(), timeout=30)


@pytest.mark.envoy
def test_live_over_ads_a_new_policy_reaches_an_open_connection(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars
) -> None:
    """The reason for ECDS delivery: adding a DENY policy changes only an extension
    config, and Envoy applies it to a keep-alive connection that is already open."""
    inbound, app = loopback.address(), loopback.address()
    node = "sidecar~127.0.0.1~httpbin.foo~foo.svc.cluster.local"

    def snapshot(*scenarios: str) -> Snapshot:
        mesh = _mesh(*scenarios)
        resources = translate(mesh, "foo/httpbin", inbound_address=inbound, app_address=app)
        return Snapshot.from_resources(resources.all())

    cache = SnapshotCache()
    cache.set(node, snapshot())
    server = AdsServer(cache)

    async def scenario() -> None:
        port = await server.start()
        try:
            async with (
                _app(app, 8000),
                sidecars.run("httpbin", ca.issue("foo", "httpbin"), patch=_ads_patch(node, port)),
            ):
                reader, writer = await asyncio.open_connection(inbound, 8000)
                try:

                    async def get() -> int:
                        reply = await _exchange(
                            reader, writer, "GET", "/get", "httpbin.foo:8000", close=False
                        )
                        return reply.status

                    assert await get() == 200
                    cache.set(node, snapshot("02-deny-get"))

                    async def denied() -> bool:
                        return await get() == 403

                    await eventually(denied, what="403 on the open connection", timeout=5)
                finally:
                    writer.transport.abort()
        finally:
            await server.stop()

    run(scenario(), timeout=30)
