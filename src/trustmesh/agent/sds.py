"""Envoy SDS over a Unix socket: how a workload's Envoy gets its certificate and trust bundle.

The agent owns one :class:`SecretStore`, a latest-value cell, and writes every new
:class:`WorkloadSecret` into it. :class:`SdsServer` serves the newest value to Envoy
over ``envoy.service.secret.v3.SecretDiscoveryService`` (state of the world), as the two
secrets an Istio sidecar asks for:

- ``default``: the certificate chain and private key Envoy presents;
- ``ROOTCA``: the trust bundle Envoy validates peers against.

Example::

    store = SecretStore()
    sds = SdsServer(store, "/run/trustmesh/sds.sock")
    await sds.start()
    store.update(WorkloadSecret(chain_pem, key_pem, roots_pem))  # every open stream gets it

The private key crosses only the Unix socket, which is created with mode 0600. With
``allow_peer`` (the sandboxed sidecar: every pod's Envoy has the same uid) the socket is a
:class:`~trustmesh.agent.peer_gate.PeerGate` that serves only the processes ``allow_peer``
accepts by their kernel credentials — the agent's own Envoy, by pid — and gRPC listens on
a socket in ``private_dir``, a directory only this pod's proxy processes can open.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from trustmesh.agent.peer_gate import PeerCredentials, PeerGate
from trustmesh.envoy_json import CERTIFICATE_SECRET, TRUST_BUNDLE_SECRET
from trustmesh.streaming import pump_requests

__all__ = [
    "CERTIFICATE_SECRET",
    "SECRET_TYPE_URL",
    "TRUST_BUNDLE_SECRET",
    "SdsServer",
    "SecretStore",
    "WorkloadSecret",
]

_log = logging.getLogger(__name__)

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the trailing NUL


@dataclass(frozen=True, slots=True)
class WorkloadSecret:
    """One workload identity as Envoy consumes it: what it presents and whom it trusts."""

    cert_chain_pem: bytes  # leaf first, then intermediates
    private_key_pem: bytes = field(repr=False)  # kept out of logs and tracebacks
    trust_bundle_pem: bytes  # one or more root certificates, concatenated

    def __post_init__(self) -> None:
        for name, marker in (
            ("cert_chain_pem", b"-----BEGIN CERTIFICATE-----"),
            ("private_key_pem", b"PRIVATE KEY-----"),
            ("trust_bundle_pem", b"-----BEGIN CERTIFICATE-----"),
        ):
            value = getattr(self, name)
            if not isinstance(value, bytes):
                raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
            if marker not in value:
                raise ValueError(f"{name} holds no PEM block with {marker.decode()!r}")


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class SecretStore:
    """Latest-value cell: the agent writes, every SDS stream reads the newest.

    The writer never blocks and never waits for readers: a slow stream skips straight to
    the newest version. ``update`` may be called from any thread; readers are coroutines.
    Versions start at 1 and grow by one with every update that changes the secret.
    """

    def __init__(self) -> None:
        # A threading lock because update() may run on another thread; it guards a few
        # assignments and is never held across an await.
        self._lock = threading.Lock()
        self._version = 0
        self._secret: WorkloadSecret | None = None
        self._waiters: set[asyncio.Future[None]] = set()

    def update(self, secret: WorkloadSecret) -> None:
        """Publish ``secret``; a value equal to the current one is not a new version."""
        if not isinstance(secret, WorkloadSecret):
            raise TypeError(f"expected a WorkloadSecret, not {type(secret).__name__}")
        with self._lock:
            if secret == self._secret:
                return  # equality decides: an unchanged identity causes no push
            self._version += 1
            self._secret = secret
            waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            # asyncio futures are not thread-safe: wake each on its own loop's thread.
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    def current(self) -> tuple[int, WorkloadSecret] | None:
        """The newest ``(version, secret)``, or None before the first update."""
        with self._lock:
            if self._secret is None:
                return None
            return self._version, self._secret

    async def wait_newer(self, version: int) -> tuple[int, WorkloadSecret]:
        """Wait until the store holds a version above ``version`` and return the newest."""
        while True:
            with self._lock:
                if self._secret is not None and self._version > version:
                    return self._version, self._secret
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.add(waiter)
            try:
                await waiter
            finally:
                with self._lock:
                    self._waiters.discard(waiter)


class _Signal(enum.Enum):
    STORE_CHANGED = enum.auto()
    CLOSED = enum.auto()


def _secret_resources(secret: WorkloadSecret, names: tuple[str, ...]) -> tuple[Any, ...]:
    """The Envoy ``Secret`` messages for the ``names`` this server knows, in order."""
    built = []
    for name in names:
        if name == CERTIFICATE_SECRET:
            built.append(
                secret_pb2.Secret(
                    name=name,
                    tls_certificate=common_pb2.TlsCertificate(
                        certificate_chain=base_pb2.DataSource(inline_bytes=secret.cert_chain_pem),
                        private_key=base_pb2.DataSource(inline_bytes=secret.private_key_pem),
                    ),
                )
            )
        elif name == TRUST_BUNDLE_SECRET:
            built.append(
                secret_pb2.Secret(
                    name=name,
                    validation_context=common_pb2.CertificateValidationContext(
                        trusted_ca=base_pb2.DataSource(inline_bytes=secret.trust_bundle_pem)
                    ),
                )
            )
    return tuple(built)


def _pack(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


@dataclass(slots=True)
class _Stream:
    """Protocol state of one SDS stream, owned by that stream's loop alone (no lock)."""

    id: int
    node: str = ""
    names: tuple[str, ...] = ()
    nonces: int = 0
    sent: tuple[tuple[str, ...], tuple[bytes, ...]] | None = None  # names and content last sent

    @property
    def last_nonce(self) -> str:
        return str(self.nonces) if self.nonces else ""

    def next_nonce(self) -> str:
        self.nonces += 1
        return self.last_nonce

    def on_request(self, request: Any) -> bool:
        """Take one DiscoveryRequest; True when it asks for a response.

        Only a changed subscription does: ACKs, NACKs and repeats never get an answer, and
        a request carrying an older nonce than the last response is stale (Envoy has not
        seen that response yet, and will send its full subscription again when it has).
        """
        if not self.node and request.node.id:
            self.node = request.node.id  # Envoy sends its node only in the first message
        if request.type_url not in ("", SECRET_TYPE_URL):
            _log.warning(
                "sds stream %d (%s): ignoring type %s", self.id, self.node, request.type_url
            )
            return False
        if request.response_nonce != self.last_nonce:
            return False
        if request.HasField("error_detail"):
            _log.warning(
                "sds stream %d (%s) rejected nonce %s, keeping version %r: %s",
                self.id,
                self.node,
                request.response_nonce,
                request.version_info,
                request.error_detail.message,
            )
        names = tuple(sorted(set(request.resource_names)))
        if names == self.names:
            return False
        unknown = set(names) - {CERTIFICATE_SECRET, TRUST_BUNDLE_SECRET}
        if unknown:
            _log.warning("sds stream %d (%s): unknown secrets %s", self.id, self.node, unknown)
        self.names = names
        return True


class SdsServer:
    """Serves a :class:`SecretStore` to one Envoy over SDS on a Unix socket.

    Each stream gets the secrets it names as soon as the store has a value, then again
    whenever the store changes what those names hold. ``pushes`` counts the
    DiscoveryResponses sent (streamed and fetched), for tests and metrics.
    """

    def __init__(
        self,
        store: SecretStore,
        socket_path: str,
        *,
        allow_peer: Callable[[PeerCredentials], bool] | None = None,
        private_dir: str | None = None,
    ) -> None:
        self._store = store
        self._socket_path = os.path.abspath(socket_path)
        self._allow_peer = allow_peer
        self._private_dir = private_dir
        self._gate: PeerGate | None = None
        self._refused: Sequence[PeerCredentials] = ()
        self._server: Any = None
        self._socket_inode: int | None = None
        self._grpc_path = self._socket_path
        self._stopping = asyncio.Event()
        self._stream_ids = itertools.count(1)
        self.pushes = 0

    @property
    def socket_path(self) -> str:
        return self._socket_path

    @property
    def refused(self) -> list[PeerCredentials]:
        """Connections the peer check turned away (pid, uid, gid of each)."""
        return list(self._refused)

    async def start(self) -> None:
        """Listen on ``unix:<socket_path>``; the socket file is mode 0600 before anyone can
        connect, and replaces whatever stale file is left at that path."""
        if self._server is not None:
            raise RuntimeError("SdsServer already started")
        if self._allow_peer is None:
            await self._listen(self._socket_path)
            return
        folder = self._private_dir or os.path.dirname(self._socket_path)
        upstream = os.path.join(folder, f"sds-{os.getpid()}.grpc")
        await self._listen(upstream)
        self._gate = PeerGate(self._socket_path, upstream, self._allow_peer)
        self._refused = self._gate.refused
        try:
            await self._gate.start()
        except BaseException:
            await self.stop()
            raise

    async def _listen(self, socket_path: str) -> None:
        parent = os.path.dirname(socket_path)
        # gRPC creates the socket with the process umask; binding it inside a fresh 0700
        # directory and renaming it into place after the chmod leaves no window in which
        # another local user could connect and read the private key.
        bind_dir = tempfile.mkdtemp(prefix=".sds-", dir=parent)
        bind_path = os.path.join(bind_dir, "s")
        for path in (socket_path, bind_path):
            if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
                os.rmdir(bind_dir)
                raise ValueError(f"Unix socket path too long (max {_MAX_SOCKET_PATH}): {path}")
        self._stopping = asyncio.Event()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((self._handlers(),))
        try:
            server.add_insecure_port(f"unix:{bind_path}")
            await server.start()
            os.chmod(bind_path, 0o600)
            os.replace(bind_path, socket_path)
        except BaseException:
            await server.stop(None)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(bind_path)
            os.rmdir(bind_dir)
        self._grpc_path = socket_path
        self._socket_inode = os.stat(socket_path).st_ino
        self._server = server
        _log.debug("sds serving on unix:%s", socket_path)

    async def stop(self, grace: float = 0.5) -> None:
        """End every stream, stop listening and remove the socket file."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        gate, self._gate = self._gate, None
        if gate is not None:
            await gate.stop()
        await server.stop(grace)
        # Only our own socket: a newer server may already have replaced the file.
        with contextlib.suppress(OSError):
            if os.stat(self._grpc_path).st_ino == self._socket_inode:
                os.unlink(self._grpc_path)

    def _handlers(self) -> Any:
        request_type = discovery_pb2.DiscoveryRequest
        response_type = discovery_pb2.DiscoveryResponse
        # DeltaSecrets is left out on purpose: gRPC answers it UNIMPLEMENTED.
        return grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                "StreamSecrets": grpc.stream_stream_rpc_method_handler(
                    self._stream_secrets,
                    request_deserializer=request_type.FromString,
                    response_serializer=response_type.SerializeToString,
                ),
                "FetchSecrets": grpc.unary_unary_rpc_method_handler(
                    self._fetch_secrets,
                    request_deserializer=request_type.FromString,
                    response_serializer=response_type.SerializeToString,
                ),
            },
        )

    async def _stream_secrets(self, requests: AsyncIterator[Any], context: Any) -> None:
        stream = _Stream(next(self._stream_ids))
        # Everything that can wake this stream lands in one inbox, so one loop owns the
        # stream's state and is the only writer on it.
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        async with asyncio.TaskGroup() as tasks:
            pumps = (
                tasks.create_task(pump_requests(requests, inbox, _Signal.CLOSED, _log)),
                tasks.create_task(self._pump_versions(inbox)),
                tasks.create_task(self._pump_stop(inbox)),
            )
            try:
                await self._serve(stream, inbox, context)
            finally:
                for pump in pumps:
                    pump.cancel()
        _log.debug("sds stream %d (%s) closed", stream.id, stream.node)

    async def _serve(self, stream: _Stream, inbox: asyncio.Queue[Any], context: Any) -> None:
        while True:
            event = await inbox.get()
            if event is _Signal.CLOSED:
                return
            if event is _Signal.STORE_CHANGED or stream.on_request(event):
                await self._send(stream, context)

    async def _send(self, stream: _Stream, context: Any) -> None:
        snapshot = self._store.current()
        if snapshot is None or not stream.names:
            return  # nothing to say yet: the first store update wakes this stream again
        version, secret = snapshot
        resources = _secret_resources(secret, stream.names)
        if not resources:
            return  # only unknown names: Envoy keeps waiting, as for a missing resource
        content = (stream.names, tuple(r.SerializeToString(deterministic=True) for r in resources))
        if content == stream.sent:
            return  # e.g. ROOTCA when only the leaf rotated: Envoy already has this
        response = discovery_pb2.DiscoveryResponse(
            version_info=str(version),
            type_url=SECRET_TYPE_URL,
            nonce=stream.next_nonce(),
            resources=[_pack(r) for r in resources],
        )
        stream.sent = content
        self.pushes += 1  # counted before the await: a reader may see the push before we resume
        await context.write(response)
        _log.debug(
            "sds stream %d (%s): pushed %s v%d", stream.id, stream.node, stream.names, version
        )

    async def _fetch_secrets(self, request: Any, context: Any) -> Any:
        if request.type_url not in ("", SECRET_TYPE_URL):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not SDS: {request.type_url}")
        version, secret = await self._store.wait_newer(0)
        names = tuple(sorted(set(request.resource_names)))
        self.pushes += 1
        return discovery_pb2.DiscoveryResponse(
            version_info=str(version),
            type_url=SECRET_TYPE_URL,
            resources=[_pack(r) for r in _secret_resources(secret, names)],
        )

    async def _pump_versions(self, inbox: asyncio.Queue[Any]) -> None:
        version = 0
        while True:
            version, _ = await self._store.wait_newer(version)
            inbox.put_nowait(_Signal.STORE_CHANGED)

    async def _pump_stop(self, inbox: asyncio.Queue[Any]) -> None:
        await self._stopping.wait()
        inbox.put_nowait(_Signal.CLOSED)
