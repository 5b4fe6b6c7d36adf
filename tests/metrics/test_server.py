"""The /metrics listener: GET /metrics only, silent clients dropped, concurrent scrapes
sharing one reading of the sidecars, and no label value a proxy could mint."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from tests.metrics.promtext import series, value
from trustmesh.metrics import server as metrics_server
from trustmesh.metrics.controlplane import ControlPlaneMetrics
from trustmesh.metrics.server import CONTENT_TYPE, MetricsServer
from trustmesh.metrics.sidecars import SidecarCounts, SidecarTarget

SCRAPES = 5


async def _exchange(port: int, request: bytes) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.decode(), body


def test_only_get_metrics_is_served_and_silent_clients_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main() -> None:
        metrics = ControlPlaneMetrics(process=False)
        metrics.rejected("type.googleapis.com/attacker.chosen.Type")  # any URL a proxy sends
        server = MetricsServer("127.0.0.1", 0, plane_text=metrics.render)
        port = await server.start()
        try:
            head, body = await _exchange(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            assert head.startswith("HTTP/1.1 200") and f"content-type: {CONTENT_TYPE}" in head
            parsed = series(body.decode())
            assert value(parsed, "pilot_total_xds_rejects", type="other") == 1
            assert "attacker" not in body.decode()
            head, _ = await _exchange(port, b"POST /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            assert head.startswith("HTTP/1.1 405")
            head, _ = await _exchange(port, b"GET /debug/syncz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert head.startswith("HTTP/1.1 404")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # closed after REQUEST_TIMEOUT, unanswered
            writer.close()
        finally:
            await server.stop()

    # a silent client is dropped after the request timeout (shortened for the test)
    monkeypatch.setattr(metrics_server, "REQUEST_TIMEOUT", 0.2)
    asyncio.run(main())


def test_concurrent_scrapes_share_one_reading_of_the_sidecars() -> None:
    reads = 0
    release = threading.Event()

    def read_sidecars() -> list[SidecarCounts]:
        nonlocal reads
        reads += 1
        release.wait(5)  # a slow sidecar: every scrape meanwhile waits for this reading
        target = SidecarTarget("foo", "httpbin", "127.0.0.1:1")
        return [SidecarCounts(target, rbac={("http", "denied"): 3.0})]

    class Counting(MetricsServer):
        """Says when every scrape is waiting for the sidecars."""

        arrived = 0
        all_in = asyncio.Event()

        async def _read_sidecars(
            self, source: metrics_server.SidecarSource
        ) -> Sequence[SidecarCounts]:
            self.arrived += 1
            if self.arrived == SCRAPES:
                self.all_in.set()
            return await super()._read_sidecars(source)

    async def main() -> None:
        server = Counting("127.0.0.1", 0, plane_text=lambda: "", sidecars=read_sidecars)
        port = await server.start()
        try:
            scrapes = [
                asyncio.create_task(_exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
                for _ in range(SCRAPES)
            ]
            await asyncio.wait_for(server.all_in.wait(), 5)  # all of them during one reading
            release.set()
            answers = await asyncio.gather(*scrapes)
        finally:
            await server.stop()
        assert reads == 1
        for _, body in answers:
            parsed = series(body.decode())
            labels = {"namespace": "foo", "pod": "httpbin", "protocol": "http"}
            assert value(parsed, "trustmesh_sidecar_rbac", **labels, result="denied") == 3

    asyncio.run(main())
