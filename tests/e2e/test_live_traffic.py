"""The running mesh under traffic: policy changes and a control plane that dies.

Clients act as foo/sleep's app does: HTTP through its sidecar's proxy (``$OUTBOUND_IP:
15001``), on keep-alive connections and on a new connection per request. Latencies are
printed as ``MEASURED`` lines (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field

import pytest

from tests.e2e.mesh import SCENARIOS, LiveMesh
from trustmesh.runtime.layout import read_json
from trustmesh.runtime.plan import HTTP_PROXY_PORT

pytestmark = pytest.mark.envoy

URL = "http://httpbin.foo:8000"


class KeepAlive:
    """One HTTP/1.1 connection to the sidecar's proxy, reused for every request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, mesh: LiveMesh, pod: str = "foo/sleep") -> KeepAlive:
        plan = mesh.running.plan.pod(pod)
        assert plan is not None and plan.outbound_ip is not None
        return cls(
            *await asyncio.open_connection(
                plan.outbound_ip, HTTP_PROXY_PORT, local_addr=(plan.app_ip, 0)
            )
        )

    async def send(self, method: str, path: str) -> int:
        request = f"{method} {URL}{path} HTTP/1.1\r\nHost: httpbin.foo:8000\r\n"
        request += "content-length: 0\r\n\r\n"
        self.writer.write(request.encode())
        async with asyncio.timeout(5):
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            status_line, *lines = head.strip().split("\r\n")
            headers = {k.strip(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
            assert headers.get("connection") != "close", head  # must stay open
            await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1])

    def close(self) -> None:
        self.writer.transport.abort()


async def once(mesh: LiveMesh, method: str, path: str) -> int:
    connection = await KeepAlive.open(mesh)
    try:
        return await connection.send(method, path)
    finally:
        connection.close()


async def first_status(probe: KeepAlive | None, mesh: LiveMesh, status: int) -> float:
    """Seconds until GET /get answers ``status`` (on ``probe``, or a new connection each)."""
    started = time.monotonic()
    async with asyncio.timeout(10):
        while True:
            got = await (probe.send("GET", "/get") if probe else once(mesh, "GET", "/get"))
            if got == status:
                return time.monotonic() - started
            await asyncio.sleep(0.002)  # pacing: a request every few ms, not a busy loop


def test_a_policy_change_reaches_open_and_new_connections(mesh: LiveMesh) -> None:
    mesh.apply(None)  # no policy: whatever an earlier test left is gone

    async def scenario() -> tuple[float, float]:
        probe = await KeepAlive.open(mesh)
        try:
            assert await probe.send("GET", "/get") == 200
            mesh.write(SCENARIOS / "02-deny-get")  # the control plane notices by itself
            open_connection = await first_status(probe, mesh, 403)
            assert await probe.send("POST", "/post") == 200  # only GET is denied
            assert await once(mesh, "GET", "/get") == 403  # a new connection too
            mesh.write(None)
            lifted = await first_status(probe, mesh, 200)
            return open_connection, lifted
        finally:
            probe.close()

    denied, lifted = asyncio.run(scenario())
    print(
        f"MEASURED file write -> 403 on an open keep-alive connection: {denied:.3f}s; "
        f"policy removed -> 200 again on it: {lifted:.3f}s"
    )
    assert denied < 3 and lifted < 3


@dataclass
class Traffic:
    """Paced POSTs from foo/sleep: two keep-alive connections and one new connection per
    request. Anything but 200 is a failure."""

    mesh: LiveMesh
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, keep_alive: bool) -> None:
        connection: KeepAlive | None = None
        while not self.stop.is_set() and self.ok < 50_000:
            try:
                connection = connection or await KeepAlive.open(self.mesh)
                status = await connection.send("POST", "/post")
                self.ok += status == 200
                if status != 200:
                    self.failures.append(f"status {status}")
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                if connection is not None:
                    connection.close()
                connection = None
            if not keep_alive and connection is not None:
                connection.close()
                connection = None
            await asyncio.sleep(0.005)
        if connection is not None:
            connection.close()


def test_control_plane_killed_during_traffic(mesh: LiveMesh) -> None:
    """SIGKILL the control plane process while requests flow: none fails; the supervisor
    restarts it and every proxy is SYNCED again; a policy change then still applies."""
    mesh.apply(None)
    cp_file = mesh.state / "control-plane.json"
    killed_pid = read_json(cp_file)["pid"]

    async def scenario() -> tuple[Traffic, float, float]:
        traffic = Traffic(mesh)
        tasks = [asyncio.create_task(traffic.worker(keep)) for keep in (True, True, False)]
        try:
            await _more(traffic, 50)
            os.kill(killed_pid, signal.SIGKILL)
            killed = time.monotonic()
            await _more(traffic, 50)  # served while the control plane is down
            restarted = await _restarted(mesh, killed_pid)
            await mesh.running.wait_synced(timeout=10)
            synced = time.monotonic()
            await _more(traffic, 50)
        finally:
            traffic.stop.set()
            await asyncio.gather(*tasks)
        return traffic, restarted - killed, synced - restarted

    traffic, down, resync = asyncio.run(scenario())
    print(
        f"MEASURED control plane SIGKILL -> restarted by the supervisor {down:.2f}s; "
        f"restart -> all proxies SYNCED {resync:.3f}s; {traffic.ok} requests, "
        f"{len(traffic.failures)} failed"
    )
    assert traffic.failures == []
    assert resync < 1.0
    mesh.apply(SCENARIOS / "02-deny-get")  # the restarted control plane pushes changes
    assert asyncio.run(once(mesh, "GET", "/get")) == 403
    mesh.apply(None)


async def _more(traffic: Traffic, count: int) -> None:
    target = traffic.ok + count
    async with asyncio.timeout(20):
        while traffic.ok < target:
            await asyncio.sleep(0.01)  # the workers count; nothing to await on per request


async def _restarted(mesh: LiveMesh, old_pid: int) -> float:
    """When the control plane serves again (its state file names a new, ready process)."""
    async with asyncio.timeout(30):
        while True:
            try:
                info = read_json(mesh.state / "control-plane.json")
            except (OSError, ValueError):
                info = {}
            if info.get("pid") not in (None, old_pid) and mesh.running.syncz() is not None:
                return time.monotonic()
            await asyncio.sleep(0.01)  # another process's progress: no event to wait on
