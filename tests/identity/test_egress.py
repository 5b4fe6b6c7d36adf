"""Client connections from a chosen source address (gRPC Python cannot bind one): through
the in-process CONNECT proxy, the server sees the source; a dead address in the list is
skipped as gRPC skips it without the proxy; nothing but the listed targets is dialled."""

from __future__ import annotations

import asyncio

import grpc

from tests.envoy.conftest import run
from trustmesh.identity.egress import SourceBoundProxy

SOURCE = "127.77.0.9"


def _raw(value: bytes) -> bytes:
    return value


async def _peer_server() -> tuple[grpc.aio.Server, int]:
    async def peer(_: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return context.peer().encode()

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        peer, request_deserializer=_raw, response_serializer=_raw
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {"P": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_a_channel_through_the_proxy_connects_from_the_source_and_fails_over() -> None:
    async def scenario() -> None:
        server, port = await _peer_server()
        dead = "127.0.0.1:1"  # nothing listens: the proxy answers 502, gRPC moves on
        proxy = SourceBoundProxy(SOURCE, [dead, f"127.0.0.1:{port}"])
        await proxy.start()
        channel = grpc.aio.insecure_channel(
            f"ipv4:{dead},127.0.0.1:{port}", options=proxy.channel_options()
        )
        try:
            call = channel.unary_unary(
                "/t.T/P", request_serializer=_raw, response_deserializer=_raw
            )
            peer = (await call(b"", timeout=10, wait_for_ready=True)).decode()
            assert peer.startswith(f"ipv4:{SOURCE}:"), peer
        finally:
            await channel.close()
            await proxy.stop()
            await server.stop(None)

    run(scenario(), timeout=30)


def test_the_proxy_dials_only_its_targets() -> None:
    async def ask(port: int, head: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        answer = await reader.readline()
        writer.close()
        return answer

    async def scenario() -> None:
        server, port = await _peer_server()
        proxy = SourceBoundProxy(SOURCE, [f"127.0.0.1:{port}"])
        await proxy.start()
        try:
            other = f"127.0.0.1:{port + 1}".encode()
            refused = await ask(proxy.port, b"CONNECT " + other + b" HTTP/1.1\r\n\r\n")
            assert refused.startswith(b"HTTP/1.1 403")
            assert (await ask(proxy.port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 403")
            allowed = f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode()
            assert (await ask(proxy.port, allowed)).startswith(b"HTTP/1.1 200")
        finally:
            await proxy.stop()
            await server.stop(None)

    run(scenario(), timeout=30)
