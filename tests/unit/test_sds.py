"""The SDS server's protocol, over a real gRPC channel on a Unix socket (no Envoy).

Secrets here are PEM-shaped placeholders: the server never parses certificates, Envoy
does (tests/envoy covers that with real ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc  # type: ignore[import-untyped, unused-ignore]
import pytest
from envoy.extensions.transport_sockets.tls.v3 import (  # type: ignore[import-untyped, unused-ignore]
    secret_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped, unused-ignore]
from envoy.service.secret.v3 import sds_pb2_grpc  # type: ignore[import-untyped, unused-ignore]

from trustmesh.agent.peer_gate import REFUSED_KEPT, PeerGate
from trustmesh.agent.sds import SECRET_TYPE_URL, SdsServer, SecretStore, WorkloadSecret

T = TypeVar("T")
BOTH = ["default", "ROOTCA"]


def pem(kind: str, text: str) -> bytes:
    return f"-----BEGIN {kind}-----\n{text}\n-----END {kind}-----\n".encode()


def secret(leaf: str = "leaf-1", root: str = "root-1") -> WorkloadSecret:
    return WorkloadSecret(
        pem("CERTIFICATE", leaf), pem("PRIVATE KEY", f"key-of-{leaf}"), pem("CERTIFICATE", root)
    )


def run(coro: Coroutine[Any, Any, T], timeout: float = 5) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def request(names: list[str], *, nonce: str = "", version: str = "", error: str = "") -> Any:
    message = discovery_pb2.DiscoveryRequest(
        type_url=SECRET_TYPE_URL,
        resource_names=names,
        response_nonce=nonce,
        version_info=version,
    )
    message.node.id = "sidecar~unit"
    if error:
        message.error_detail.code = 3
        message.error_detail.message = error
    return message


def decode(response: Any) -> dict[str, Any]:
    secrets = {}
    for packed in response.resources:
        message = secret_pb2.Secret()
        assert packed.Unpack(message)
        secrets[message.name] = message
    return secrets


@dataclass
class Harness:
    store: SecretStore
    server: SdsServer
    stub: Any


@contextlib.asynccontextmanager
async def serving(store: SecretStore | None = None) -> AsyncIterator[Harness]:
    folder = tempfile.mkdtemp(prefix="tm-sds-", dir="/tmp")
    store = store or SecretStore()
    server = SdsServer(store, os.path.join(folder, "sds.sock"))
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix:{server.socket_path}")
    try:
        yield Harness(store, server, sds_pb2_grpc.SecretDiscoveryServiceStub(channel))
    finally:
        await channel.close()
        await server.stop()
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------- values


def test_workload_secret_checks_its_fields_and_hides_the_key() -> None:
    with pytest.raises(TypeError):
        WorkloadSecret("not bytes", pem("PRIVATE KEY", "k"), pem("CERTIFICATE", "r"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="private_key_pem"):
        WorkloadSecret(pem("CERTIFICATE", "c"), b"nothing", pem("CERTIFICATE", "r"))
    assert "key-of" not in repr(secret())


def test_store_versions_only_changes() -> None:
    store = SecretStore()
    assert store.current() is None
    store.update(secret("a"))
    store.update(secret("a"))  # equal: not a new version, so no push
    store.update(secret("b"))
    assert store.current() == (2, secret("b"))


def test_wait_newer_is_woken_by_an_update_from_another_thread() -> None:
    store = SecretStore()

    async def scenario() -> None:
        waiter = asyncio.create_task(store.wait_newer(0))
        await asyncio.sleep(0)  # let the waiter park on its future
        assert not waiter.done()
        thread = threading.Thread(target=store.update, args=(secret("from-thread"),))
        thread.start()
        assert await waiter == (1, secret("from-thread"))
        thread.join()
        # A version already newer returns at once; a cancelled waiter leaves nothing behind.
        assert await store.wait_newer(0) == (1, secret("from-thread"))
        late = asyncio.create_task(store.wait_newer(1))
        await asyncio.sleep(0)
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        store.update(secret("after-cancel"))  # must not touch the cancelled future

    run(scenario())


# ---------------------------------------------------------------------------- server


def test_socket_is_private_and_removed_on_stop() -> None:
    async def scenario() -> None:
        async with serving() as sds:
            path = Path(sds.server.socket_path)
            mode = path.stat().st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            assert [p.name for p in path.parent.iterdir()] == ["sds.sock"]  # no bind leftovers
        assert not path.exists()

    run(scenario())


def test_stream_serves_requested_names_and_never_answers_an_ack() -> None:
    async def scenario() -> None:
        store = SecretStore()
        store.update(secret("leaf-1"))
        async with serving(store) as sds:
            call = sds.stub.StreamSecrets()
            await call.write(request(BOTH))
            first = await call.read()
            assert (first.version_info, first.nonce, first.type_url) == ("1", "1", SECRET_TYPE_URL)
            secrets = decode(first)
            certificate = secrets["default"].tls_certificate
            assert certificate.certificate_chain.inline_bytes == secret("leaf-1").cert_chain_pem
            assert certificate.private_key.inline_bytes == secret("leaf-1").private_key_pem
            trusted = secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes
            assert trusted == secret().trust_bundle_pem

            await call.write(request(BOTH, nonce="1", version="1"))  # ACK
            store.update(secret("leaf-2"))
            # Had the ACK been answered, that answer (version 1) would come first.
            second = await call.read()
            assert (second.version_info, second.nonce) == ("2", "2")
            assert set(decode(second)) == {"default", "ROOTCA"}  # state of the world
            assert sds.server.pushes == 2
            call.cancel()

    run(scenario())


def test_stream_waits_for_the_first_secret() -> None:
    async def scenario() -> None:
        async with serving() as sds:
            call = sds.stub.StreamSecrets()
            await call.write(request(["default"]))
            sds.store.update(secret("late"))
            response = await call.read()  # a premature empty answer would arrive first
            assert response.version_info == "1" and list(decode(response)) == ["default"]
            call.cancel()

    run(scenario())


class LogSeen(logging.Handler):
    """Sets an event when a matching record is logged: lets a test wait for the server to
    have handled a request, instead of sleeping."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.WARNING)
        self.needle = needle
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.seen.set()


def test_stale_nonce_is_ignored_and_a_nack_keeps_the_stream() -> None:
    async def scenario() -> None:
        nack_logged = LogSeen("bad certificate chain")
        logger = logging.getLogger("trustmesh.agent.sds")
        logger.addHandler(nack_logged)
        store = SecretStore()
        store.update(secret("leaf-1"))
        try:
            async with serving(store) as sds:
                call = sds.stub.StreamSecrets()
                await call.write(request(BOTH))
                assert (await call.read()).nonce == "1"
                # Stale: answers a response this server never sent; its names must not count.
                await call.write(request(["ROOTCA"], nonce="0"))
                await call.write(request(BOTH, nonce="1", error="bad certificate chain"))
                await nack_logged.seen.wait()  # requests are handled in order: both are in
                store.update(secret("leaf-2"))
                response = await call.read()
                assert (response.version_info, response.nonce) == ("2", "2")
                assert set(decode(response)) == {"default", "ROOTCA"}
                call.cancel()
        finally:
            logger.removeHandler(nack_logged)

    run(scenario())


def test_subscription_change_is_answered_and_unchanged_content_is_not_pushed() -> None:
    async def scenario() -> None:
        store = SecretStore()
        store.update(secret("leaf-1", root="root-1"))
        async with serving(store) as sds:
            call = sds.stub.StreamSecrets()
            await call.write(request(["ROOTCA"]))
            assert list(decode(await call.read())) == ["ROOTCA"]
            await call.write(request(["ROOTCA"], nonce="1", version="1"))
            store.update(secret("leaf-2", root="root-1"))  # same bundle: nothing to push
            store.update(secret("leaf-2", root="root-2"))
            response = await call.read()
            assert (response.version_info, response.nonce) == ("3", "2")
            # Asking for one more name, with the latest nonce, is a new subscription.
            await call.write(request(BOTH, nonce="2", version="3"))
            widened = await call.read()
            assert (widened.version_info, widened.nonce) == ("3", "3")
            assert set(decode(widened)) == {"default", "ROOTCA"}
            assert sds.server.pushes == 3
            call.cancel()

    run(scenario())


def test_update_reaches_every_open_stream() -> None:
    async def scenario() -> None:
        store = SecretStore()
        store.update(secret("leaf-1"))
        async with serving(store) as sds:
            calls = [sds.stub.StreamSecrets() for _ in range(3)]
            for call in calls:
                await call.write(request(["default"]))
                await call.read()
                await call.write(request(["default"], nonce="1", version="1"))
            store.update(secret("leaf-2"))
            for call in calls:
                response = await call.read()
                chain = decode(response)["default"].tls_certificate.certificate_chain
                assert chain.inline_bytes == secret("leaf-2").cert_chain_pem
                call.cancel()

    run(scenario())


def test_fetch_secrets_returns_the_current_value() -> None:
    async def scenario() -> None:
        store = SecretStore()
        store.update(secret("leaf-1"))
        async with serving(store) as sds:
            response = await sds.stub.FetchSecrets(request(["ROOTCA"]))
            assert response.version_info == "1" and list(decode(response)) == ["ROOTCA"]

    run(scenario())


def test_stop_ends_open_streams() -> None:
    async def scenario() -> None:
        store = SecretStore()
        store.update(secret())
        async with serving(store) as sds:
            call = sds.stub.StreamSecrets()
            await call.write(request(["default"]))
            await call.read()
            await sds.server.stop()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK

    run(scenario())


# ---------------------------------------------------------------------------- peer check


@contextlib.asynccontextmanager
async def gated(allow: Any) -> AsyncIterator[Harness]:
    folder = tempfile.mkdtemp(prefix="tm-sds-", dir="/tmp")
    private = os.path.join(folder, "private")
    os.mkdir(private, 0o700)
    store = SecretStore()
    store.update(secret())
    server = SdsServer(
        store, os.path.join(folder, "sds.sock"), allow_peer=allow, private_dir=private
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix:{server.socket_path}")
    try:
        yield Harness(store, server, sds_pb2_grpc.SecretDiscoveryServiceStub(channel))
    finally:
        await channel.close()
        await server.stop()
        assert os.listdir(folder) == ["private"] and not os.listdir(private)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_peer_checked_socket_serves_the_allowed_process() -> None:
    seen = []

    def allow(peer: Any) -> bool:
        seen.append(peer)
        return bool(peer.pid == os.getpid())

    async def scenario() -> None:
        async with gated(allow) as h:
            response = await h.stub.FetchSecrets(request(BOTH))
            assert set(decode(response)) == set(BOTH)
            assert stat.S_IMODE(os.stat(h.server.socket_path).st_mode) == 0o600
            assert h.server.refused == []

    run(scenario())
    assert seen and seen[0].pid == os.getpid() and seen[0].uid == os.getuid()


def test_a_peer_checked_socket_refuses_any_other_process() -> None:
    """Every sidecar's Envoy has uid 1337: only the pid tells this pod's from another's."""

    async def scenario() -> None:
        async with gated(lambda peer: peer.pid == os.getpid() + 100_000) as h:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await h.stub.FetchSecrets(request(BOTH), timeout=2)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert h.server.refused and h.server.refused[0].pid == os.getpid()

    run(scenario())


def test_the_peer_gate_keeps_only_the_latest_refusals_but_counts_all(tmp_path: Path) -> None:
    """A local process reconnecting without end must not grow the agent's memory."""
    gate = PeerGate(str(tmp_path / "public.sock"), str(tmp_path / "up.sock"), lambda _: False)

    async def scenario() -> None:
        await gate.start()
        try:
            for _ in range(REFUSED_KEPT + 36):
                reader, writer = await asyncio.open_unix_connection(gate.public)
                assert await reader.read() == b""  # closed by the gate at once
                writer.close()
        finally:
            await gate.stop()

    asyncio.run(scenario())
    assert gate.refused_total == REFUSED_KEPT + 36
    assert len(gate.refused) == REFUSED_KEPT
    assert all(peer.pid == os.getpid() for peer in gate.refused)
