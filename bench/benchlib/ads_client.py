"""A light ADS client that subscribes and ACKs like Envoy, many per process (for
bench_ads_scale.py).

Each client opens its own gRPC connection (``grpc.use_local_subchannel_pool``: channels to
one address would otherwise share one HTTP/2 connection) with mutual TLS, presenting a
workload certificate, and runs Envoy's state-of-the-world ADS protocol: it subscribes to
clusters (CDS) and listeners (LDS) as wildcards, then to what those name over ADS —
cluster load assignments (EDS), route configurations (RDS), extension configs (ECDS) and
secrets (SDS) — and ACKs every response with its version and nonce. Names are read from
the resources themselves (decoded as Envoy would, then the same walk the control plane's
consistency check does). Every ECDS response it accepts is timestamped (CLOCK_MONOTONIC,
shared between processes): a policy change reaches the proxy when it ACKs the new
policy's extension configs.

Run as ``python -m benchlib.ads_client`` with a JSON job on stdin; it answers on stdout,
one JSON line per event (``connected``, ``synced``, then per ``wait`` command a report).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from trustmesh.xds.cache import (
    TYPE_CLUSTER,
    TYPE_ECDS,
    TYPE_ENDPOINT,
    TYPE_LISTENER,
    TYPE_ROUTE,
    TYPE_SECRET,
    _import_package_of,
    _references,
)
from trustmesh.xds.controlplane import XDS_SERVER_NAME
from trustmesh.xds.server import ADS_SERVICE

_BY_NAME = (TYPE_ENDPOINT, TYPE_ROUTE, TYPE_ECDS, TYPE_SECRET)
# Which types' names each wildcard type's resources decide (clusters: their endpoints;
# listeners: routes, filter configs, secrets).
_NAMED_BY = {TYPE_CLUSTER: (TYPE_ENDPOINT,), TYPE_LISTENER: (TYPE_ROUTE, TYPE_ECDS, TYPE_SECRET)}
CONNECT_BATCH = 25  # TLS handshakes in flight per process
_ACKED = asyncio.Event()  # every marked client ACKed a new ECDS version (this loop only)
_PENDING = [0]  # marked clients that have not yet


@dataclass
class Client:
    node_id: str
    target: str
    credentials: grpc.ChannelCredentials
    names: dict[str, set[str]] = field(default_factory=dict)
    acked: dict[str, str] = field(default_factory=dict)  # type → version ACKed
    ecds_acks: list[tuple[float, str]] = field(default_factory=list)  # (time, version)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    marked: str = ""  # the ECDS version ACKed when told a change comes
    reached: tuple[float, str] | None = None  # first ACK of another version since marked
    error: str = ""

    def request(
        self, type_url: str, version: str = "", nonce: str = ""
    ) -> discovery_pb2.DiscoveryRequest:
        return discovery_pb2.DiscoveryRequest(
            node=base_pb2.Node(id=self.node_id),
            type_url=type_url,
            resource_names=sorted(self.names.get(type_url, ())),
            version_info=version,
            response_nonce=nonce,
        )

    async def run(self) -> None:
        options = [
            ("grpc.ssl_target_name_override", XDS_SERVER_NAME),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        try:
            async with grpc.aio.secure_channel(self.target, self.credentials, options) as ch:
                call = ch.stream_stream(
                    f"/{ADS_SERVICE}/StreamAggregatedResources",
                    request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                    response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
                )()
                await call.write(self.request(TYPE_CLUSTER))
                await call.write(self.request(TYPE_LISTENER))
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        return
                    await self._on_response(call, response)
        except grpc.aio.AioRpcError as exc:
            self.error = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            return

    async def _on_response(self, call: Any, response: discovery_pb2.DiscoveryResponse) -> None:
        type_url = response.type_url
        wanted: dict[str, set[str]] = {}
        if type_url in (TYPE_CLUSTER, TYPE_LISTENER):
            message = _message_class(type_url)
            for packed in response.resources:
                for ref_type, ref_name in _names_in(type_url, message, packed.value):
                    wanted.setdefault(ref_type, set()).add(ref_name)
        # ACK first (Envoy ACKs once it applied the response), then subscribe to new names.
        await call.write(self.request(type_url, response.version_info, response.nonce))
        self.acked[type_url] = response.version_info
        if type_url == TYPE_ECDS:
            now = time.monotonic()
            self.ecds_acks.append((now, response.version_info))
            if self.reached is None and response.version_info != self.marked:
                self.reached = (now, response.version_info)
                _PENDING[0] -= 1
                if _PENDING[0] <= 0:
                    _ACKED.set()
        for ref_type in _NAMED_BY.get(type_url, ()):
            names = wanted.get(ref_type, set())
            if names != self.names.get(ref_type, set()):
                self.names[ref_type] = names
                await call.write(self.request(ref_type, self.acked.get(ref_type, "")))
        needed = {TYPE_CLUSTER, TYPE_LISTENER} | {t for t in _BY_NAME if self.names.get(t)}
        if needed <= set(self.acked):
            self.synced.set()


def _names_in(type_url: str, message: Any, value: bytes) -> tuple[tuple[str, str], ...]:
    """What one resource fetches over ADS: (type, name) pairs; decoded once per distinct
    encoding in this process (clients of one service get the same clusters)."""
    found = _NAMES.get(value)
    if found is None:
        resource = _as_dict(message.FromString(value))
        resource["@type"] = type_url
        found = _NAMES[value] = tuple(
            (ref_type, str(ref_name)) for ref_type, ref_name, _ in _references(type_url, resource)
        )
    return found


_NAMES: dict[bytes, tuple[tuple[str, str], ...]] = {}


def _as_dict(message: Any) -> dict[str, Any]:
    """proto3 JSON of ``message``, loading the modules of the ``Any`` types it holds."""
    for _ in range(50):
        try:
            found: dict[str, Any] = json_format.MessageToDict(
                message, preserving_proto_field_name=True
            )
            return found
        except TypeError as exc:
            type_url = str(exc).rpartition("type_url: ")[2]
            if not type_url or type_url in _tried:
                raise
            _tried.add(type_url)
            _import_package_of(type_url.rpartition("/")[2])
    raise RuntimeError("too many unknown types")


_tried: set[str] = set()


def _message_class(type_url: str) -> Any:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.listener.v3 import listener_pb2

    return cluster_pb2.Cluster if type_url == TYPE_CLUSTER else listener_pb2.Listener


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _serve(job: dict[str, Any]) -> None:
    roots = Path(job["roots"]).read_bytes()
    credentials: dict[str, grpc.ChannelCredentials] = {}
    clients = []
    for node_id, account, target in job["clients"]:
        if account not in credentials:
            key = Path(job["certs"], f"{account}.key").read_bytes()
            chain = Path(job["certs"], f"{account}.pem").read_bytes()
            credentials[account] = grpc.ssl_channel_credentials(roots, key, chain)
        clients.append(Client(node_id, target, credentials[account]))
    tasks = []
    for first in range(0, len(clients), CONNECT_BATCH):
        batch = clients[first : first + CONNECT_BATCH]
        running = [asyncio.create_task(c.run()) for c in batch]
        tasks += running
        for c, task in zip(batch, running, strict=True):
            synced = asyncio.create_task(c.synced.wait())
            await asyncio.wait({synced, task}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
            synced.cancel()
            if not c.synced.is_set():
                why = c.error or "not synced in 120 s"
                if task.done() and not task.cancelled() and task.exception() is not None:
                    why = repr(task.exception())
                _emit({"event": "error", "node": c.node_id, "error": why, "acked": c.acked})
                raise SystemExit(1)
        _emit({"event": "connected", "count": first + len(batch)})
    _emit({"event": "synced", "count": len(clients), "pid": os.getpid()})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        if command["command"] == "mark":
            for c in clients:
                c.marked, c.reached = c.acked.get(TYPE_ECDS, ""), None
            _PENDING[0] = len(clients)
            _ACKED.clear()
            _emit({"event": "marked"})
        elif command["command"] == "wait":
            await _report(clients, command["since"], command["timeout"])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _report(clients: list[Client], since: float, timeout: float) -> None:
    """Per client, when it ACKed an ECDS version other than the one it had when marked
    (after ``since``); waits until all did or ``timeout`` seconds passed. Each client
    notes its own first new ACK as it happens (a count reaching 0 wakes this): nothing
    here runs per ACK, so the bench's clients take no CPU from the replicas for it."""
    if _PENDING[0] > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_ACKED.wait(), timeout)

    def first_new(c: Client) -> tuple[float, str] | None:
        if c.reached is not None and c.reached[0] >= since:
            return c.reached
        return next(((t, v) for t, v in c.ecds_acks if t >= since and v != c.marked), None)

    _emit(
        {
            "event": "report",
            "acks": {c.node_id: first_new(c) for c in clients},
            "errors": {c.node_id: c.error for c in clients if c.error},
            "versions": {c.node_id: c.acked.get(TYPE_ECDS, "") for c in clients},
        }
    )


def main() -> None:
    job = json.loads(sys.stdin.readline())
    asyncio.run(_serve(job))


if __name__ == "__main__":
    main()
