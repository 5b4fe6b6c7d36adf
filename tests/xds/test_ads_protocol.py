"""The ADS server against a bare gRPC client, where Envoy cannot show the point:
authorization (node ids, mTLS peer identity) and exact protocol behaviour (nonces,
ACK / NACK, subscriptions by name). The harness is in ads_rig.py.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3 import extension_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from tests.envoy.conftest import Loopback, eventually, run
from tests.xds.ads_rig import METHOD, NODE, WEB_ID, World, _routes, loopback
from trustmesh.xds.cache import TYPE_CLUSTER, TYPE_ECDS, TYPE_LISTENER, TYPE_ROUTE, SnapshotCache
from trustmesh.xds.server import AdsServer, peer_spiffe_ids

__all__ = ["loopback"]  # a fixture, registered by importing it

pytestmark = pytest.mark.envoy


class RawAds:
    """One ADS stream driven by hand, standing in for Envoy."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str) -> None:
        self.call = channel.stream_stream(
            METHOD,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        self._node_id: str | None = node_id

    async def send(
        self,
        type_url: str,
        names: tuple[str, ...] = (),
        *,
        answering: Any = None,
        nonce: str | None = None,
        error: str | None = None,
        kept: str = "",
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
        if self._node_id is not None:  # like Envoy: the node in the first message only
            request.node.id, self._node_id = self._node_id, None
        if answering is not None:
            request.response_nonce = answering.nonce
            if error is None:
                request.version_info = answering.version_info
            else:  # a NACK carries the version Envoy keeps
                request.version_info = kept
                request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        if nonce is not None:
            request.response_nonce = nonce
        await self.call.write(request)

    async def receive(self) -> Any:
        response = await self.call.read()
        assert response is not grpc.aio.EOF
        return response


def _names(response: Any) -> list[str]:
    types = {
        TYPE_LISTENER: listener_pb2.Listener,
        TYPE_ROUTE: route_pb2.RouteConfiguration,
        TYPE_ECDS: extension_pb2.TypedExtensionConfig,
    }
    names = []
    for packed in response.resources:
        message = types[packed.type_url]()
        packed.Unpack(message)
        names.append(str(message.name))
    return names


@contextlib.asynccontextmanager
async def serving(cache: SnapshotCache, **options: Any) -> AsyncIterator[AdsServer]:
    server = AdsServer(cache, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def refused_with(ads: RawAds) -> grpc.StatusCode:
    """How the server ended a stream that never got a response."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        assert await ads.call.read() is grpc.aio.EOF
    code: grpc.StatusCode = await ads.call.code()
    return code


def test_stream_protocol_acks_stale_nonces_names_and_nacks(loopback: Loopback) -> None:
    world = World.on(loopback)
    other_route = {"@type": TYPE_ROUTE, **_routes("other", "other")}
    snapshot = world.snapshot(extra=(other_route,))
    changed = world.snapshot(extra=(other_route,), action="DENY")

    async def scenario() -> None:
        cache = SnapshotCache()
        cache.set(NODE, snapshot)
        async with (
            serving(cache) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            ads = RawAds(channel, NODE)
            await ads.send(TYPE_LISTENER)
            lds = await ads.receive()
            assert lds.type_url == TYPE_LISTENER and lds.nonce == "1"
            assert sorted(_names(lds)) == ["authz", "lds", "rds"]  # wildcard: all of them
            assert lds.version_info == snapshot.version_of(TYPE_LISTENER)
            await ads.send(TYPE_CLUSTER)
            cds = await ads.receive()
            assert (cds.type_url, len(cds.resources)) == (TYPE_CLUSTER, 0)  # "none" is an answer

            await ads.send(TYPE_LISTENER, answering=lds)  # an ACK: never answered
            await ads.send(TYPE_ROUTE, ("rds-routes",))
            rds = await ads.receive()  # so the next response is this one
            assert rds.type_url == TYPE_ROUTE and _names(rds) == ["rds-routes"]  # by name
            assert rds.version_info == snapshot.version_of(TYPE_ROUTE, ["rds-routes"])

            # A stale nonce (not the last RDS response's) is ignored, whatever it asks for.
            await ads.send(TYPE_ROUTE, ("other", "rds-routes"), nonce=lds.nonce)
            await ads.send(TYPE_ROUTE, ("rds-routes",), answering=rds)  # ACK
            await ads.send(TYPE_ECDS, ("authz", "not-there"))
            ecds = await ads.receive()
            assert ecds.type_url == TYPE_ECDS and _names(ecds) == ["authz"]
            assert server.acks == 2

            cache.set(NODE, changed)  # only the RBAC filter changed: only ECDS is pushed
            push = await ads.receive()
            assert push.type_url == TYPE_ECDS and int(push.nonce) > int(ecds.nonce)
            await ads.send(
                TYPE_ECDS, ("authz",), answering=push, error="bad rbac", kept=ecds.version_info
            )
            nack = await cache.wait_nacked(NODE, TYPE_ECDS)
            assert (nack.rejected_version, nack.kept_version) == (
                push.version_info,
                ecds.version_info,
            )
            assert (nack.error_detail, nack.code, server.nacks) == ("bad rbac", 3, 1)

            # Not answered either: the next response is for this new RDS subscription.
            await ads.send(TYPE_ROUTE, ("other", "rds-routes"), answering=rds)
            both = await ads.receive()
            assert both.type_url == TYPE_ROUTE and _names(both) == ["other", "rds-routes"]
            assert server.pushes == 6 and server.acks == 3

    run(scenario())


def test_synced_nodes_lists_the_open_streams_synced_as_synced_says(loopback: Loopback) -> None:
    """``synced_nodes`` (what a replica's status record lists, from open streams only)
    agrees with ``synced`` per node: not before the ACK, yes once answered from the current
    snapshot and ACKed; a node with a snapshot but no stream is never listed."""
    world = World.on(loopback)
    snapshot, changed = world.snapshot(), world.snapshot(action="DENY")

    async def scenario() -> None:
        cache = SnapshotCache()
        cache.set(NODE, snapshot)
        cache.set("not-connected", snapshot)
        async with (
            serving(cache) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            ads = RawAds(channel, NODE)
            await ads.send(TYPE_LISTENER)
            lds = await ads.receive()
            assert server.synced_nodes() == [] and not server.synced(NODE)
            await ads.send(TYPE_LISTENER, answering=lds)  # ACK
            cache.set(NODE, changed)  # not an LDS change: answered from it without a push

            async def synced() -> bool:
                return server.synced(NODE)

            await eventually(synced, what="the stream synced", timeout=10)
            assert server.synced_nodes() == [NODE]
            assert not server.synced("not-connected")

    run(scenario())


def test_authorize_refuses_a_node_it_does_not_allow(loopback: Loopback) -> None:
    snapshot = World.on(loopback).snapshot()
    evil = "sidecar~127.0.0.9~evil.x~x.svc.cluster.local"
    seen: list[str] = []

    def authorize(node_id: str, context: Any) -> bool:
        seen.append(node_id)
        if node_id == "broken":
            raise RuntimeError("hook failed")
        return node_id == NODE

    async def scenario() -> None:
        cache = SnapshotCache()
        cache.set(NODE, snapshot)
        cache.set(evil, snapshot)  # it has config: it still must not get it
        async with (
            serving(cache, authorize=authorize) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            for node_id, code in (
                (evil, grpc.StatusCode.PERMISSION_DENIED),
                ("broken", grpc.StatusCode.PERMISSION_DENIED),  # fails closed
                ("", grpc.StatusCode.INVALID_ARGUMENT),
            ):
                refused = RawAds(channel, node_id)
                await refused.send(TYPE_LISTENER)
                assert await refused_with(refused) == code
            assert server.pushes == 0
            allowed = RawAds(channel, NODE)
            await allowed.send(TYPE_LISTENER)
            assert len((await allowed.receive()).resources) == 3
            assert seen == [evil, "broken", NODE]

    run(scenario())


def _certificates() -> tuple[bytes, tuple[bytes, bytes], tuple[bytes, bytes]]:
    """A test root, a server pair (DNS SAN) and a workload pair (SPIFFE URI SAN)."""
    now = datetime.datetime.now(datetime.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "xds test root")])

    def certificate(subject: x509.Name, key: Any, san: x509.GeneralName | None) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(root_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=san is None, path_length=None), critical=True)
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=True)
        return builder.sign(root_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def pair(san: x509.GeneralName) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem, certificate(x509.Name([]), key, san)

    root = certificate(root_name, root_key, None)
    return root, pair(x509.DNSName("xds.test")), pair(x509.UniformResourceIdentifier(WEB_ID))


def test_mtls_peer_identity_decides_which_node_config_it_gets(loopback: Loopback) -> None:
    snapshot = World.on(loopback).snapshot()
    other = "sidecar~127.0.0.9~cart.shop~shop.svc.cluster.local"
    owners = {NODE: WEB_ID, other: "spiffe://cluster.local/ns/shop/sa/cart"}
    root, server_pair, web_pair = _certificates()

    def only_its_own(node_id: str, context: Any) -> bool:
        return owners.get(node_id) in peer_spiffe_ids(context)

    async def scenario() -> None:
        cache = SnapshotCache()
        cache.set(NODE, snapshot)
        cache.set(other, snapshot)
        credentials = grpc.ssl_server_credentials(
            [server_pair], root_certificates=root, require_client_auth=True
        )
        client = grpc.ssl_channel_credentials(root, *web_pair)
        async with (
            serving(cache, authorize=only_its_own, server_credentials=credentials) as server,
            grpc.aio.secure_channel(
                f"127.0.0.1:{server.port}",
                client,
                options=[("grpc.ssl_target_name_override", "xds.test")],
            ) as channel,
        ):
            own = RawAds(channel, NODE)
            await own.send(TYPE_LISTENER)
            assert len((await own.receive()).resources) == 3
            foreign = RawAds(channel, other)  # web's certificate, cart's node id
            await foreign.send(TYPE_LISTENER)
            assert await refused_with(foreign) == grpc.StatusCode.PERMISSION_DENIED
        async with (
            serving(cache, authorize=only_its_own) as plaintext,
            grpc.aio.insecure_channel(f"127.0.0.1:{plaintext.port}") as channel,
        ):
            anonymous = RawAds(channel, NODE)  # no certificate: no identity, no config
            await anonymous.send(TYPE_LISTENER)
            assert await refused_with(anonymous) == grpc.StatusCode.PERMISSION_DENIED

    run(scenario())
