"""The ADS server: State-of-the-World aggregated xDS over grpc.aio, fed by a SnapshotCache.

Every Envoy opens one ``StreamAggregatedResources`` stream and subscribes to each type on
it. The server answers from the newest :class:`~trustmesh.xds.cache.Snapshot` of that
Envoy's node id and pushes again whenever the cache holds different content for a type
the stream subscribed to. It knows nothing about what the resources mean: translation is
somebody else's job.

Protocol rules it follows (each one learned the hard way, see envoy-notes pitfall 9):

- nonces are a counter per stream; a request whose nonce is not the last one sent for its
  type is stale (Envoy has not seen the newest response yet) and is ignored;
- an ACK is never answered; in general a response is sent only when its content differs
  from what this stream last sent for that type;
- listeners and clusters are wildcard (every resource of the type is sent, and one left
  out is deleted); routes, secrets, filter configs and endpoints are sent by the names
  Envoy asks for;
- a NACK is recorded (:attr:`SnapshotCache.nacks`) and not answered: Envoy keeps running
  the last configuration it accepted, and the next snapshot is pushed as usual.

Each stream is one task reading requests into an inbox and one loop that owns the stream's
state; a cache change or :meth:`AdsServer.stop` is one more message in that inbox.

Example::

    cache = SnapshotCache()
    server = AdsServer(cache, address="127.0.0.1:15010",
                       authorize=lambda node_id, context: node_id in allowed)
    port = await server.start()
    cache.set(node_id, snapshot)   # pushed to that node's open stream, if any
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from trustmesh.streaming import pump_requests
from trustmesh.xds.cache import (
    PUSH_ORDER,
    WILDCARD_TYPES,
    Nack,
    Snapshot,
    SnapshotCache,
    content_version,
)

__all__ = ["ADS_SERVICE", "AdsServer", "Authorize", "XdsObserver", "peer_spiffe_ids"]

_log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
BODY_CACHE_BYTES = 32 * 1024 * 1024  # encoded responses kept for other proxies
NAME_SETS = 10_000  # distinct subscriptions shared between streams
ONCE_KEYS = 50_000  # … and the keys of those encoded once so far (kept on a second use)

Context = grpc.aio.ServicerContext[Any, Any]
Authorize = Callable[[str, Context], bool]
"""``authorize(node_id, context)``: may this peer receive ``node_id``'s configuration?"""


class XdsObserver(Protocol):
    """Told what the streams do, for metrics (:mod:`trustmesh.metrics`). Called on the
    event loop's thread, in the stream loop: each call must be a few dict updates."""

    def stream_opened(self) -> None:
        """An authorized stream is being served (a connected proxy)."""

    def stream_closed(self) -> None:
        """That stream ended."""

    def pushed(self, type_url: str) -> None:
        """A response of ``type_url`` was sent."""

    def acked(self, type_url: str, seconds: float) -> None:
        """Envoy ACKed the last response of ``type_url``, ``seconds`` after it was sent."""

    def rejected(self, type_url: str) -> None:
        """Envoy NACKed the last response of ``type_url``."""

    def converged(self, node_id: str, version: str) -> None:
        """``node_id``'s stream ACKed everything of its snapshot ``version`` (SYNCED)."""


# Per-connection memory, with thousands of proxies per replica (bench/bench_ads_scale.py):
# xDS streams carry small, rare messages, so no BDP probing (windows stay at their initial
# size instead of growing to megabytes), TLS records of 4 kB instead of 16 kB buffers per
# direction, and small HPACK tables (a few header names repeat).
CONNECTION_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.bdp_probe", 0),
    ("grpc.tsi.max_frame_size", 4096),
    ("grpc.http2.hpack_table_size.decoder", 512),
    ("grpc.http2.hpack_table_size.encoder", 512),
)


def peer_spiffe_ids(context: Context) -> tuple[str, ...]:
    """The ``spiffe://`` URI SANs of the mTLS peer's certificate; empty without mTLS.

    For an ``authorize`` hook that gives a proxy only its own configuration, e.g. by
    checking that the node id names the namespace and service account of the peer's ID.
    The certificate is verified only if the server credentials require client
    authentication (``grpc.ssl_server_credentials(..., require_client_auth=True)``).
    """
    # gRPC lists a verified peer certificate's URI SANs (only those) under "peer_uri".
    uris = context.auth_context().get("peer_uri", ())
    ids = (uri.decode(errors="replace") for uri in uris)
    return tuple(sorted(san for san in ids if san.startswith("spiffe://")))


class _Signal(enum.Enum):
    SNAPSHOT = enum.auto()  # the cache holds a different snapshot for this node
    CLOSED = enum.auto()  # the request stream ended, or the server is stopping


@dataclass(slots=True)
class _Watch:
    """One type on one stream: what Envoy asked for and what it was last sent."""

    names: frozenset[str] = frozenset()
    nonce: str = ""  # of the last response of this type; "" until one is sent
    version: str = ""  # version_info of that response
    sent: Mapping[str, str] | None = None  # name → content digest in it; None before any
    sent_at: float = 0.0  # monotonic time that response was sent; 0 once answered


@dataclass(slots=True)
class _Stream:
    """Protocol state of one ADS stream, owned by that stream's loop alone (no lock)."""

    id: int
    node_id: str
    watches: dict[str, _Watch] = field(default_factory=dict)
    nonces: int = 0
    seen: str = ""  # version of the last snapshot every watch was answered from

    def next_nonce(self) -> str:
        self.nonces += 1
        return str(self.nonces)


def _push_rank(type_url: str) -> tuple[int, str]:
    if type_url in PUSH_ORDER:
        return PUSH_ORDER.index(type_url), ""
    return len(PUSH_ORDER), type_url


def _selection(type_url: str, watch: _Watch, snapshot: Snapshot) -> Mapping[str, str]:
    """Name → digest of the resources a response for ``watch`` carries now (for a whole
    type, the snapshot's own read-only mapping: shared, not copied per stream)."""
    digests = snapshot.digests(type_url)
    if type_url in WILDCARD_TYPES or "*" in watch.names:
        return digests
    if len(watch.names) >= len(digests) and digests.keys() <= watch.names:
        # Every resource of the type (a sidecar's endpoints, its filter configs): the
        # snapshot's own mapping — equal to the selection, and not copied per stream.
        return digests
    return {name: digests[name] for name in sorted(watch.names) if name in digests}


def _serialize(response: bytes | Any) -> bytes:
    """A response already encoded (see :class:`_Bodies`), or a DiscoveryResponse."""
    if isinstance(response, bytes):
        return response
    encoded: bytes = response.SerializeToString()
    return encoded


class _Bodies:
    """Encoded DiscoveryResponses without their nonce, by type and content version.

    A change that gives thousands of proxies the same resources (one policy, one
    namespace's clusters) builds and serialises that response once. Bounded in bytes; used
    on the event loop's thread only."""

    def __init__(self, budget: int = BODY_CACHE_BYTES) -> None:
        self._entries: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._bytes = 0
        self._budget = budget
        # Responses asked for once: kept only when a second stream asks for the same
        # content. A proxy's own listeners (its inbound address) are never shared, and
        # keeping thousands of those bodies was ≈ 10 kB per connected proxy for nothing.
        self._once: OrderedDict[tuple[str, str], None] = OrderedDict()

    def encoded(
        self, type_url: str, content: Mapping[str, str], snapshot: Snapshot
    ) -> tuple[str, bytes]:
        version = content_version(content)
        key = (type_url, version)
        body = self._entries.get(key)
        if body is not None:
            self._entries.move_to_end(key)
            return version, body
        body = discovery_pb2.DiscoveryResponse(
            version_info=version,
            type_url=type_url,
            resources=[snapshot.packed(type_url, name) for name in content],
        ).SerializeToString()
        if key not in self._once:
            self._once[key] = None
            if len(self._once) > ONCE_KEYS:
                self._once.popitem(last=False)
            return version, body
        del self._once[key]
        self._entries[key] = body
        self._bytes += len(body)
        while self._bytes > self._budget and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= len(dropped)
        return version, body


class AdsServer:
    """Serves a :class:`SnapshotCache` to Envoys over ADS (state of the world, gRPC).

    ``authorize`` runs once per stream, on the node id of its first request; anything but
    ``True`` (an exception too) ends the stream with ``PERMISSION_DENIED`` before anything
    is sent.
    ``server_credentials`` turns on TLS (use ``grpc.ssl_server_credentials`` with
    ``require_client_auth=True`` for mTLS); without them the port speaks plaintext and
    should only listen on loopback.

    ``pushes``, ``acks`` and ``nacks`` count responses sent and the ACKs and NACKs
    received, over all streams; ``observer`` (metrics) is told each of them as well.
    """

    def __init__(
        self,
        cache: SnapshotCache,
        *,
        address: str = "127.0.0.1:0",
        authorize: Authorize | None = None,
        server_credentials: grpc.ServerCredentials | None = None,
        observer: XdsObserver | None = None,
    ) -> None:
        self._cache = cache
        self._observer = observer
        self._address = address
        self._authorize = authorize
        self._credentials = server_credentials
        self._server: grpc.aio.Server | None = None
        self._stopping = asyncio.Event()
        self._stream_ids = itertools.count(1)
        self._port = 0
        # node id → its open streams by id (a reconnect's old stream may linger): syncz
        # asks for every node, so a scan of all streams per node would be quadratic.
        self._streams: dict[str, dict[int, _Stream]] = {}
        self._inboxes: set[asyncio.Queue[Any]] = set()  # of the open streams
        self._bodies = _Bodies()
        self._name_sets: dict[frozenset[str], frozenset[str]] = {}
        self.pushes = 0
        self.acks = 0
        self.nacks = 0

    @property
    def port(self) -> int:
        """The bound port (known once started)."""
        return self._port

    async def start(self) -> int:
        """Listen on ``address`` and return the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("AdsServer already started")
        self._stopping = asyncio.Event()
        # No SO_REUSEPORT: a second server on the same port must fail, not silently take
        # half of the new streams.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *CONNECTION_OPTIONS])
        server.add_generic_rpc_handlers((self._handlers(),))
        try:
            if self._credentials is None:
                port = server.add_insecure_port(self._address)
            else:
                port = server.add_secure_port(self._address, self._credentials)
            if not port:
                raise OSError(f"cannot listen on {self._address}")
            await server.start()
        except BaseException:
            await server.stop(None)
            raise
        self._server, self._port = server, port
        _log.debug("ads serving on %s (port %d)", self._address, port)
        return port

    async def stop(self, grace: float = 0.5) -> None:
        """End every stream (Envoy keeps its config and reconnects) and stop listening."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        for inbox in list(self._inboxes):
            inbox.put_nowait(_Signal.CLOSED)
        await server.stop(grace)

    def _handlers(self) -> grpc.GenericRpcHandler:
        # DeltaAggregatedResources is left out on purpose: gRPC answers it UNIMPLEMENTED.
        return grpc.method_handlers_generic_handler(
            ADS_SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._stream_resources,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=_serialize,
                )
            },
        )

    async def _stream_resources(self, requests: AsyncIterator[Any], context: Context) -> None:
        reader = aiter(requests)
        try:
            first = await anext(reader)
        except StopAsyncIteration:
            return
        node_id = first.node.id
        if not node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first request has no node.id")
        if not self._authorized(node_id, context):
            _log.warning("ads: refused node %r from %s", node_id, context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"not authorized: {node_id}")
        stream = _Stream(next(self._stream_ids), node_id)
        _log.debug("ads stream %d opened by %s (%s)", stream.id, node_id, context.peer())
        # Everything that can wake this stream lands in one inbox, so one loop owns the
        # stream's state and is the only writer on it.
        # A new snapshot and the server stopping are signalled by callbacks, not by a
        # task each per stream (memory and an ACK's wake-up, times thousands of streams).
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        inbox.put_nowait(first)
        unlisten = self._cache.listen(node_id, _signaller(inbox, _Signal.SNAPSHOT))
        if self._cache.get(node_id) is not None:  # answer from the current one too
            inbox.put_nowait(_Signal.SNAPSHOT)
        self._streams.setdefault(node_id, {})[stream.id] = stream
        self._inboxes.add(inbox)
        if self._stopping.is_set():
            inbox.put_nowait(_Signal.CLOSED)
        observer = self._observer
        if observer is not None:
            observer.stream_opened()
        pump = asyncio.create_task(pump_requests(reader, inbox, _Signal.CLOSED, _log))
        try:
            await self._serve(stream, inbox, context)
        finally:
            unlisten()
            self._inboxes.discard(inbox)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            of_node = self._streams.get(node_id, {})
            of_node.pop(stream.id, None)
            if not of_node:
                self._streams.pop(node_id, None)
            if observer is not None:
                observer.stream_closed()
        _log.debug("ads stream %d (%s) closed", stream.id, node_id)

    def _authorized(self, node_id: str, context: Context) -> bool:
        if self._authorize is None:
            return True
        try:
            return self._authorize(node_id, context) is True
        except Exception:  # fail closed: a broken hook must not hand out configuration
            _log.exception("ads: authorize hook failed for node %r", node_id)
            return False

    async def _serve(self, stream: _Stream, inbox: asyncio.Queue[Any], context: Context) -> None:
        while True:
            event = await inbox.get()
            if event is _Signal.CLOSED:
                return
            if event is _Signal.SNAPSHOT:
                types = sorted(stream.watches, key=_push_rank)
            else:
                wanted = self._on_request(stream, event)
                types = [wanted] if wanted is not None else []
            # Read once per event: a newer snapshot set meanwhile is its own SNAPSHOT event.
            snapshot = self._cache.get(stream.node_id)
            if snapshot is None:
                continue  # subscribed before the node has config: its first set wakes us
            for type_url in types:
                await self._respond(stream, type_url, snapshot, context)
            if event is _Signal.SNAPSHOT:
                stream.seen = snapshot.version

    def synced(self, node_id: str) -> bool:
        """istioctl's SYNCED: a stream of ``node_id`` was answered from its current
        snapshot and Envoy ACKed the last response of every type it subscribed to."""
        current = self._cache.get(node_id)
        streams = list(self._streams.get(node_id, {}).values())
        if current is None or not streams:
            return False
        stream = max(streams, key=lambda s: s.id)  # a reconnect's old stream may linger
        return self._stream_synced(stream, current.version)

    def connected(self, node_id: str) -> bool:
        """Whether a stream of ``node_id`` is open (authorized and being served)."""
        return node_id in self._streams

    def synced_nodes(self) -> list[str]:
        """The node ids :meth:`synced` holds for, sorted — looking only at open streams
        (a replica's status record asks twice a second, with thousands registered)."""
        return sorted(node_id for node_id in list(self._streams) if self.synced(node_id))

    def _stream_synced(self, stream: _Stream, version: str) -> bool:
        acked = self._cache.acked(stream.node_id)
        return stream.seen == version and all(
            watch.sent is None or acked.get(type_url) == watch.version
            for type_url, watch in stream.watches.items()
        )

    def _interned(self, names: frozenset[str]) -> frozenset[str]:
        """One set object for the subscriptions thousands of streams share (the pods of
        one app ask for the same endpoints and configs): memory per stream."""
        found = self._name_sets.get(names)
        if found is None:
            if len(self._name_sets) >= NAME_SETS:
                self._name_sets.clear()
            found = self._name_sets[names] = names
        return found

    def _on_request(self, stream: _Stream, request: Any) -> str | None:
        """Take one DiscoveryRequest; the type to (maybe) respond for, or None."""
        type_url: str = request.type_url
        if not type_url:
            _log.warning("ads stream %d (%s): request without type_url", stream.id, stream.node_id)
            return None
        watch = stream.watches.setdefault(type_url, _Watch())
        names = self._interned(frozenset(request.resource_names))
        if not watch.nonce:
            # Nothing sent for this type on this stream: a subscription, whatever nonce an
            # Envoy reconnecting from an earlier stream still carries.
            watch.names = names
            return type_url
        if request.response_nonce != watch.nonce:
            return None  # stale: Envoy sends its full subscription again once it catches up
        if request.HasField("error_detail"):
            self.nacks += 1
            if self._observer is not None and watch.sent_at:
                self._observer.rejected(type_url)
            watch.sent_at = 0.0
            nack = Nack(
                type_url=type_url,
                rejected_version=watch.version,
                kept_version=request.version_info,
                error_detail=request.error_detail.message,
                code=request.error_detail.code,
            )
            self._cache.record_nack(stream.node_id, nack)
            _log.warning(
                "ads stream %d (%s) rejected %s version %s, keeps %r: %s",
                stream.id,
                stream.node_id,
                type_url,
                watch.version,
                request.version_info,
                nack.error_detail,
            )
            # Not answered: re-sending would only be rejected again. The next snapshot
            # (or subscription change) is compared with what was sent, the rejected one.
            watch.names = names
            return None
        self.acks += 1
        if watch.sent_at:  # the first answer to this response (later ones change names)
            if self._observer is not None:
                self._observer.acked(type_url, time.monotonic() - watch.sent_at)
            watch.sent_at = 0.0
        self._cache.record_ack(stream.node_id, type_url, request.version_info)
        watch.names = names
        if self._observer is not None:
            current = self._cache.get(stream.node_id)
            if current is not None and self._stream_synced(stream, current.version):
                self._observer.converged(stream.node_id, current.version)
        return type_url  # answered only if the subscription now selects other content

    async def _respond(
        self, stream: _Stream, type_url: str, snapshot: Snapshot, context: Context
    ) -> None:
        watch = stream.watches[type_url]
        content = _selection(type_url, watch, snapshot)
        if content is watch.sent or content == watch.sent:
            return  # Envoy has exactly this (an ACK, a repeat, an unrelated change)
        if watch.sent is None and not content and type_url not in WILDCARD_TYPES:
            return  # none of the names exist yet: Envoy waits, as for any missing resource
        version, body = self._bodies.encoded(type_url, content, snapshot)
        nonce = stream.next_nonce()
        # Protobuf fields may come in any order: the nonce is appended to the encoding of
        # the rest, which proxies sent the same content share.
        wire = body + discovery_pb2.DiscoveryResponse(nonce=nonce).SerializeToString()
        watch.nonce, watch.version, watch.sent = nonce, version, content
        watch.sent_at = time.monotonic()
        self.pushes += 1  # counted before the await: a reader may see the ACK before we resume
        if self._observer is not None:
            self._observer.pushed(type_url)
        await context.write(wire)
        _log.debug(
            "ads stream %d (%s): pushed %s v%s (%d resources, nonce %s)",
            stream.id,
            stream.node_id,
            type_url,
            version,
            len(content),
            nonce,
        )


def _signaller(inbox: asyncio.Queue[Any], signal: _Signal) -> Callable[[], None]:
    """``signal`` into ``inbox`` when called — from its loop's thread or any other."""
    loop = asyncio.get_running_loop()

    def put() -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            inbox.put_nowait(signal)
        else:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody reads
                loop.call_soon_threadsafe(inbox.put_nowait, signal)

    return put
