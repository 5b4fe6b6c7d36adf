"""The fleet benchmark's probes: per sidecar one keep-alive mTLS connection to its inbound
listener, GETting from the moment of a change until RBAC answers 403, paced so that the
probes do not starve the control plane they measure."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from dataclasses import dataclass, field

from benchlib.fleet_config import APP_PORT, NAMESPACE, pod_ip
from benchlib.progress import log


@dataclass(frozen=True)
class Pacing:
    """How fast the probes ask, from ``go`` (the change is made) on.

    100 connections probed back to back saturate 2 cores (Python TLS client + Envoys) and
    slow the control plane they measure several fold. So the probes ask every
    ``idle_gap`` (all together: ``--probe-idle-rate`` requests per second) until any of
    them sees a 403 — a signal clients observe themselves — and from then on every
    ``gap`` (0: back to back), when the change is arriving.
    """

    idle_gap: float
    gap: float
    go: asyncio.Event = field(default_factory=asyncio.Event)
    anyone_denied: asyncio.Event = field(default_factory=asyncio.Event)

    async def pause(self, idle: float | None = None) -> None:
        """Until the next GET: ``idle`` (default ``idle_gap``) or less while nobody has
        seen a 403, ``gap`` after."""
        if not self.anyone_denied.is_set():
            with contextlib.suppress(TimeoutError):
                wait = self.idle_gap if idle is None else idle
                await asyncio.wait_for(self.anyone_denied.wait(), wait)
        elif self.gap:
            await asyncio.sleep(self.gap)


@dataclass(frozen=True)
class Denied:
    """When a probe saw its sidecar enforce the change."""

    received: float  # the first 403 arrived
    last_allowed_sent: float  # the last request that still got through was sent
    requests: int


class Probe:
    """One keep-alive mTLS connection to a sidecar's inbound listener, reused for every
    request: the change must reach connections that are already open."""

    def __init__(self, index: int, tls: ssl.SSLContext) -> None:
        self.index, self.tls = index, tls
        self.reconnects = 0
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._request = f"GET /get HTTP/1.1\r\nHost: app-{index}.{NAMESPACE}:{APP_PORT}\r\n\r\n"

    async def get(self) -> int:
        """One GET; the status. A connection the sidecar closes is opened again (counted)."""
        if self._stream is None:
            self._stream = await asyncio.open_connection(pod_ip(self.index), APP_PORT, ssl=self.tls)
        reader, writer = self._stream
        try:
            writer.write(self._request.encode())
            async with asyncio.timeout(10):
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                status_line, *lines = head.strip().split("\r\n")
                headers = {k.strip(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
                await reader.readexactly(int(headers.get("content-length", "0")))
        except (OSError, asyncio.IncompleteReadError):
            self.close()
            self.reconnects += 1
            raise
        if headers.get("connection") == "close":
            self.close()
            self.reconnects += 1
        return int(status_line.split()[1])

    async def until_denied(self, pacing: Pacing, timeout: float) -> Denied:
        """From ``pacing.go`` on, GET until one is answered 403 (see :class:`Pacing`)."""
        await pacing.go.wait()
        deadline, requests, last_allowed = time.monotonic() + timeout, 0, time.monotonic()
        # Spread over the idle gap: 100 probes firing in step would queue behind each other.
        await pacing.pause(random.uniform(0, pacing.idle_gap))
        while True:
            sent = time.monotonic()
            try:
                code = await self.get()
            except (OSError, asyncio.IncompleteReadError):
                code = 0  # counted in reconnects: that sidecar was not probed on an open one
            requests += 1
            if code == 403:
                pacing.anyone_denied.set()
                return Denied(time.monotonic(), last_allowed, requests)
            last_allowed = sent
            if sent > deadline:
                raise TimeoutError(f"app-{self.index}: no 403 within {timeout}s (last {code})")
            await pacing.pause()

    async def expect_allowed(self, timeout: float = 5) -> None:
        """The state before a change: anything but 403 (503: no app runs behind it)."""
        deadline = time.monotonic() + timeout
        while (code := await self.get()) == 403:
            if time.monotonic() > deadline:
                raise TimeoutError(f"app-{self.index}: still 403 after {timeout}s")
            await asyncio.sleep(0.05)
        if code != 503:
            log(f"app-{self.index}: expected 503 before the change, got {code}")

    def close(self) -> None:
        if self._stream is not None:
            self._stream[1].transport.abort()  # no TLS close_notify wait
            self._stream = None
