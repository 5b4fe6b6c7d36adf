"""A WorkloadGroup's ``probe`` on the host that runs its workload (what Istio's agent does
for a VM whose group has a readiness probe): the app is probed where it listens,
and each transition is reported to a replica (``Registry/Health``), which sets the
entry's ``Healthy`` condition; an entry that is not healthy is no ready endpoint.

Kubernetes' probe fields: ``httpGet`` (``path``, ``port``: a number or a template port
name; a status 200–399 passes) or ``tcpSocket`` (``port``: a connection passes);
``initialDelaySeconds`` (0), ``periodSeconds`` (10), ``timeoutSeconds`` (1),
``successThreshold`` (1), ``failureThreshold`` (3). ``exec``, ``grpc`` and HTTPS probes
are refused when the host starts (nothing here would run them as Istio's agent does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Probe", "ProbeError", "keep_probing", "parse_probe", "probe_once"]

log = logging.getLogger("trustmesh.node.probe")

Report = Callable[[bool, str], Awaitable[None]]


class ProbeError(ValueError):
    """A probe the host cannot run (the message names the field)."""


@dataclass(frozen=True, slots=True)
class Probe:
    kind: str  # "httpGet" or "tcpSocket"
    port: int
    path: str = "/"
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind, "port": self.port, "path": self.path,
                "initial_delay": self.initial_delay, "period": self.period,
                "timeout": self.timeout, "success_threshold": self.success_threshold,
                "failure_threshold": self.failure_threshold,
            }
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Probe:
        return cls(**json.loads(text))


def parse_probe(probe: Mapping[str, Any], ports: Mapping[str, int]) -> Probe:
    """The probe of a WorkloadGroup (``ports``: the template's, for a named port)."""
    kinds = [k for k in ("httpGet", "tcpSocket", "exec", "grpc") if probe.get(k) is not None]
    if len(kinds) != 1:
        raise ProbeError("probe: exactly one of httpGet, tcpSocket, exec or grpc")
    kind = kinds[0]
    if kind not in ("httpGet", "tcpSocket"):
        raise ProbeError(f"probe.{kind}: only httpGet and tcpSocket probes run on a host")
    action = probe[kind]
    if not isinstance(action, Mapping):
        raise ProbeError(f"probe.{kind}: an object")
    if str(action.get("scheme", "HTTP")).upper() != "HTTP":
        raise ProbeError(f"probe.{kind}.scheme: only HTTP")
    raw = action.get("port")
    port = ports.get(raw) if isinstance(raw, str) else raw
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ProbeError(f"probe.{kind}.port: a port number or a template port name, not {raw!r}")

    def number(field: str, default: float, least: float) -> float:
        value = probe.get(field, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < least:
            raise ProbeError(f"probe.{field}: a number ≥ {least}, not {value!r}")
        return float(value)

    path = str(action.get("path") or "/")
    return Probe(
        kind,
        port,
        path if path.startswith("/") else "/" + path,
        number("initialDelaySeconds", 0, 0),
        number("periodSeconds", 10, 1),
        number("timeoutSeconds", 1, 1),
        int(number("successThreshold", 1, 1)),
        int(number("failureThreshold", 3, 1)),
    )


async def probe_once(probe: Probe, address: str) -> tuple[bool, str]:
    """(passed, why not) of one probe of the app at ``address``."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address, probe.port), probe.timeout
        )
    except (OSError, TimeoutError) as exc:
        return False, f"{probe.kind} {address}:{probe.port}: {exc or 'timed out'}"
    try:
        if probe.kind == "tcpSocket":
            return True, ""
        request = (
            f"GET {probe.path} HTTP/1.1\r\nHost: {address}:{probe.port}\r\n"
            "User-Agent: trustmesh-probe\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), probe.timeout)
        parts = line.decode(errors="replace").split()
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if 200 <= code < 400:
            return True, ""
        return False, f"HTTP probe failed with statuscode: {code}"
    except (OSError, TimeoutError) as exc:
        return False, f"httpGet {address}:{probe.port}{probe.path}: {exc or 'timed out'}"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def keep_probing(probe: Probe, address: str, report: Report, stop: asyncio.Event) -> None:
    """Probe every period until ``stop``; report each transition (the first pass after
    ``successThreshold`` passes, the first failure after ``failureThreshold``). A report
    that does not reach a replica is sent again at the next period."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), probe.initial_delay)
    reported: bool | None = None
    passes = failures = 0
    while not stop.is_set():
        passed, why = await probe_once(probe, address)
        passes, failures = (passes + 1, 0) if passed else (0, failures + 1)
        now: bool | None = reported
        if passes >= probe.success_threshold:
            now = True
        elif failures >= probe.failure_threshold:
            now = False
        if now is not None and now != reported:
            try:
                await report(now, why)
                reported = now
            except Exception as exc:  # a replica unreachable now: again next period
                log.error("health report for %s: %s", address, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), probe.period)
