"""Per-proxy xDS snapshots: versioned by content, checked before publishing, waited on.

A :class:`Snapshot` is one proxy's whole configuration as proto3-JSON dicts, grouped by
type URL and resource name. Its versions are content hashes, so two snapshots with the
same content are equal and carry the same versions: re-publishing an unchanged config
wakes nobody and pushes nothing.

:class:`SnapshotCache` holds the newest snapshot per proxy (node id). It is a latest-value
cell: :meth:`SnapshotCache.set` never waits for readers, and a slow stream that wakes up
late simply reads the newest snapshot, skipping those in between. It refuses a snapshot
that refers to a resource it does not hold (a listener naming a route configuration that
is not there would keep that listener warming forever) or that cannot be encoded.

The cache also records what each proxy acknowledged or rejected, as reported by the ADS
server (:mod:`trustmesh.xds.server`), for status reporting and for tests.

Example::

    cache = SnapshotCache()
    cache.set("sidecar~10.0.0.1~web.shop~shop.svc.cluster.local",
              Snapshot.from_resources([listener, route_config, rbac_filter]))
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib
import pkgutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import InitVar, dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import orjson

# Imported up front: ParseDict finds the message type of an ``@type`` only once its module
# is loaded, and these cover a sidecar's usual config (others load on first use).
from envoy.config.cluster.v3 import cluster_pb2  # noqa: F401
from envoy.config.core.v3 import extension_pb2  # noqa: F401
from envoy.config.endpoint.v3 import endpoint_pb2  # noqa: F401
from envoy.config.listener.v3 import listener_pb2  # noqa: F401
from envoy.config.route.v3 import route_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2  # noqa: F401
from google.protobuf import any_pb2, descriptor_pool, json_format

__all__ = [
    "EMPTY_VERSION",
    "PUSH_ORDER",
    "TYPE_CLUSTER",
    "TYPE_ECDS",
    "TYPE_ENDPOINT",
    "TYPE_LISTENER",
    "TYPE_ROUTE",
    "TYPE_SECRET",
    "WILDCARD_TYPES",
    "Nack",
    "Snapshot",
    "SnapshotCache",
    "content_version",
]

_T = "type.googleapis.com/"
TYPE_LISTENER = _T + "envoy.config.listener.v3.Listener"
TYPE_CLUSTER = _T + "envoy.config.cluster.v3.Cluster"
TYPE_ROUTE = _T + "envoy.config.route.v3.RouteConfiguration"
TYPE_ENDPOINT = _T + "envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPE_SECRET = _T + "envoy.extensions.transport_sockets.tls.v3.Secret"
TYPE_ECDS = _T + "envoy.config.core.v3.TypedExtensionConfig"

# Types a proxy subscribes to as a whole: a resource missing from a response is deleted.
# The others are asked for by name and a response may carry any subset of them.
WILDCARD_TYPES = frozenset({TYPE_LISTENER, TYPE_CLUSTER})
# Clusters before the listeners and routes that send traffic to them, as Envoy's xDS docs
# ask (make before break); types outside this list go last, by type URL.
PUSH_ORDER = (TYPE_CLUSTER, TYPE_ENDPOINT, TYPE_LISTENER, TYPE_ROUTE, TYPE_SECRET, TYPE_ECDS)
_NAME_FIELD = {TYPE_ENDPOINT: "cluster_name"}  # every other known type names itself "name"
_MEMO_MAX = 50_000  # resources whose encoding and references are kept for reuse
_IMPORTABLE_ROOTS = frozenset({"envoy", "xds", "udpa", "google"})


def content_version(digests: Mapping[str, str]) -> str:
    """The version of a set of resources: a hash of their names and content digests."""
    # orjson: compact JSON as json.dumps(..., separators=(",", ":")) writes it for ASCII
    # names, several times faster (a fleet's rebuild versions every proxy).
    return hashlib.sha256(orjson.dumps(sorted(digests.items()))).hexdigest()[:16]


EMPTY_VERSION = content_version({})


def _plain(value: Any) -> Any:
    """JSON for the read-only mappings a snapshot hands out, so they can be put back in."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON: resources must be proto3-JSON")


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def _walk(value: Any, path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every JSON object inside ``value`` with its field path, depth first, in order."""
    if isinstance(value, Mapping):
        yield path, value
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


def _is_ads(config_source: Any) -> bool:
    # Only references served over ADS must be in the snapshot: SDS from the agent's own
    # socket (an api_config_source) is served by somebody else.
    return isinstance(config_source, Mapping) and "ads" in config_source


def _references(type_url: str, resource: Mapping[str, Any]) -> Iterator[tuple[str, Any, str]]:
    """``(type URL, name, field path)`` of every resource ``resource`` fetches over ADS."""
    for path, node in _walk(resource, ""):
        rds = node.get("rds")
        if isinstance(rds, Mapping) and _is_ads(rds.get("config_source")):
            yield TYPE_ROUTE, rds.get("route_config_name"), f"{path}.rds.route_config_name"
        discovery = node.get("config_discovery")
        if isinstance(discovery, Mapping) and _is_ads(discovery.get("config_source")):
            # With config_discovery the filter's own name is the TypedExtensionConfig's.
            yield TYPE_ECDS, node.get("name"), f"{path}.name" if path else "name"
        if _is_ads(node.get("sds_config")):
            yield TYPE_SECRET, node.get("name"), f"{path}.name" if path else "name"
    if type_url == TYPE_CLUSTER and resource.get("type") == "EDS":
        eds = resource.get("eds_cluster_config", {})
        if isinstance(eds, Mapping) and _is_ads(eds.get("eds_config")):
            name = eds.get("service_name") or resource.get("name")
            yield TYPE_ENDPOINT, name, "eds_cluster_config.service_name"


def _reference_tuple(
    type_url: str, resource: Mapping[str, Any]
) -> tuple[tuple[str, Any, str], ...]:
    return tuple(_references(type_url, resource))


# ---------------------------------------------------------------------------- encoding

_K = TypeVar("_K")
_V = TypeVar("_V")


class _Lru(Generic[_K, _V]):
    """A bounded, thread-safe cache of work done per distinct resource content.

    Keys hold the content digest, so an entry never goes stale; bounded so a long-running
    control plane does not keep every resource it ever built.
    """

    def __init__(self, limit: int) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[_K, _V] = OrderedDict()
        self._limit = limit

    def get(self, key: _K, compute: Callable[[], _V]) -> _V:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        # Computed outside the lock: two threads may compute the same entry, which only
        # costs the duplicate work.
        value = compute()
        with self._lock:
            self._entries[key] = value
            if len(self._entries) > self._limit:
                self._entries.popitem(last=False)
        return value


_packed: _Lru[tuple[str, str, str], any_pb2.Any] = _Lru(_MEMO_MAX)
_referenced: _Lru[tuple[str, str], tuple[tuple[str, Any, str], ...]] = _Lru(_MEMO_MAX)
_known_types: set[str] = set()


def _ensure_types(resource: Mapping[str, Any]) -> None:
    """Load the ``*_pb2`` modules of every ``@type`` in ``resource`` not loaded yet.

    Importing all ~640 Envoy modules up front costs 0.4 s; a translation that uses a filter
    nobody listed above (JWT, ext_authz, ...) gets its package loaded on first use instead.
    """
    pool = descriptor_pool.Default()
    for _, node in _walk(resource, ""):
        type_url = node.get("@type")
        if not isinstance(type_url, str) or type_url in _known_types:
            continue
        full_name = type_url.rpartition("/")[2]
        try:
            pool.FindMessageTypeByName(full_name)
        except KeyError:
            _import_package_of(full_name)
        _known_types.add(type_url)  # once tried: ParseDict reports what is still unknown


def _import_package_of(full_name: str) -> None:
    package = full_name.rpartition(".")[0]
    if package.partition(".")[0] not in _IMPORTABLE_ROOTS:
        return
    try:
        module = importlib.import_module(package)
    except ImportError:
        return
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        if info.name.endswith("_pb2"):
            with contextlib.suppress(ImportError):
                importlib.import_module(f"{package}.{info.name}")


def _pack(type_url: str, name: str, digest: str, resource: Mapping[str, Any]) -> any_pb2.Any:
    """``resource`` as a packed Any, encoded once per distinct content."""

    def encode() -> any_pb2.Any:
        _ensure_types(resource)
        return json_format.ParseDict(dict(resource), any_pb2.Any())

    return _packed.get((type_url, name, digest), encode)


# ---------------------------------------------------------------------------- snapshot


def _canonical(resource: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """A deep copy the caller cannot reach, and the content digest (128 bits: it also
    keys the shared cache of encoded resources)."""
    # orjson: a fleet's rebuild serialises every proxy's own resources; json is 5x slower.
    text = orjson.dumps(resource, option=orjson.OPT_SORT_KEYS, default=_plain)
    return orjson.loads(text), hashlib.sha256(text).hexdigest()[:32]


class Canonical:
    """Copies and digests shared by the snapshots of one build.

    A control plane translating a fleet hands most proxies the very same dicts (the
    outbound clusters of a namespace are built once): each is serialised, copied and
    hashed once here instead of once per proxy. Keyed by identity — so the dicts must
    not change while this lives (it holds them, so an id is never reused meanwhile);
    use one per build and drop it.
    """

    def __init__(self, limit: int | None = None) -> None:
        self._by_id: OrderedDict[int, tuple[Mapping[str, Any], Mapping[str, Any], str]] = (
            OrderedDict()
        )
        # With a limit, only the most recently used entries stay: what many proxies share
        # keeps being used, one proxy's own resources drop out (a control plane building
        # proxies one at a time as they connect keeps one of these per mesh).
        self._limit = limit

    def encode(self, resource: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
        found = self._by_id.get(id(resource))
        if found is None:
            copy, digest = _canonical(resource)
            found = self._by_id[id(resource)] = (resource, copy, digest)
            if self._limit is not None and len(self._by_id) > self._limit:
                self._by_id.popitem(last=False)
        elif self._limit is not None:
            self._by_id.move_to_end(id(resource))
        return found[1], found[2]


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One proxy's full xDS configuration: ``type URL → {name: resource}``.

    Each resource is a proto3-JSON dict with its ``@type``; it is copied when the snapshot
    is built, so later changes to the caller's dicts change nothing here. Two snapshots are
    equal exactly when their content is, and ``version`` (like :meth:`version_of` per type)
    is a hash of that content.
    """

    resources: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(repr=False)
    canonical: InitVar[Canonical | None] = None
    version: str = field(init=False)
    _digests: Mapping[str, Mapping[str, str]] = field(init=False, repr=False)
    _versions: Mapping[str, str] = field(init=False, repr=False)
    _consistency: tuple[str, ...] | None = field(init=False, repr=False, default=None)
    _encoding: tuple[str, ...] | None = field(init=False, repr=False, default=None)

    def __post_init__(self, canonical: Canonical | None) -> None:
        encode = canonical.encode if canonical is not None else _canonical
        if not isinstance(self.resources, Mapping):
            raise TypeError(f"resources must be a mapping, not {type(self.resources).__name__}")
        resources: dict[str, Mapping[str, Mapping[str, Any]]] = {}
        digests: dict[str, Mapping[str, str]] = {}
        for type_url in sorted(self.resources):
            by_name = self.resources[type_url]
            if not isinstance(type_url, str) or not isinstance(by_name, Mapping):
                raise TypeError(f"resources[{type_url!r}] must map names to resource dicts")
            copies: dict[str, Mapping[str, Any]] = {}
            type_digests: dict[str, str] = {}
            for name in sorted(by_name):
                resource = by_name[name]
                if not isinstance(name, str) or not isinstance(resource, Mapping):
                    raise TypeError(f"{_short(type_url)} {name!r} must be a dict keyed by name")
                copies[name], type_digests[name] = encode(resource)
            if copies:  # an empty type and an absent one are the same content
                resources[type_url] = MappingProxyType(copies)
                digests[type_url] = MappingProxyType(type_digests)
        versions = {type_url: content_version(d) for type_url, d in digests.items()}
        object.__setattr__(self, "resources", MappingProxyType(resources))
        object.__setattr__(self, "_digests", MappingProxyType(digests))
        object.__setattr__(self, "_versions", MappingProxyType(versions))
        object.__setattr__(self, "version", content_version(versions))

    @classmethod
    def from_resources(
        cls, resources: Iterable[Mapping[str, Any]], canonical: Canonical | None = None
    ) -> Snapshot:
        """A snapshot of ``resources``, each filed under its ``@type`` and its name.

        ``canonical`` shares the work between snapshots built together from partly the
        same resource dicts (see :class:`Canonical`)."""
        grouped: dict[str, dict[str, Mapping[str, Any]]] = {}
        for resource in resources:
            type_url = resource.get("@type")
            name = resource.get(_NAME_FIELD.get(str(type_url), "name"))
            if not isinstance(type_url, str) or not isinstance(name, str) or not name:
                raise ValueError(f"resource without @type or name: {str(resource)[:200]}")
            by_name = grouped.setdefault(type_url, {})
            if name in by_name:
                raise ValueError(f"two {_short(type_url)} resources named {name!r}")
            by_name[name] = resource
        return cls(grouped, canonical)

    def replaced(
        self,
        changes: Mapping[str, Mapping[str, Mapping[str, Any]]],
        canonical: Canonical | None = None,
        memo: dict[tuple[object, ...], Any] | None = None,
    ) -> Snapshot:
        """This snapshot with some named resources replaced by new content, the names
        unchanged (so every reference stays resolvable): only those are copied, hashed,
        checked and encoded; every other resource keeps its copy, digest and type version.

        Equal, version for version, to a snapshot built from scratch with the same
        resources. Raises ``ValueError`` for a name the snapshot does not hold.

        ``memo`` (a dict kept by the caller, with ``changes`` alive as long as it is)
        shares the result per type between snapshots that hold the same content of that
        type (the same type version) and get the same ``changes`` object's resources."""
        encode = canonical.encode if canonical is not None else _canonical
        resources = dict(self.resources)
        digests = dict(self._digests)
        versions = dict(self._versions)
        touched: list[tuple[str, str]] = []
        known: list[tuple[str, ...]] = []  # errors of touched resources found in memo
        learn: list[tuple[tuple[object, ...], str, list[tuple[str, str]]]] = []
        for type_url, by_name in changes.items():
            if not by_name:
                continue
            key: tuple[object, ...] = (type_url, self._versions.get(type_url), id(by_name))
            done = memo.get(key) if memo is not None else None
            if done is None:
                current = self.get(type_url)
                copies = dict(current)
                type_digests = dict(self.digests(type_url))
                for name, resource in by_name.items():
                    if name not in current:
                        raise ValueError(f"{_short(type_url)} {name!r} is not in the snapshot")
                    if not isinstance(resource, Mapping):
                        raise TypeError(f"{_short(type_url)} {name!r} must be a dict")
                    copies[name], type_digests[name] = encode(resource)
                done = (
                    MappingProxyType(copies),
                    MappingProxyType(type_digests),
                    content_version(type_digests),
                )
                if memo is not None:
                    memo[key] = done
            resources[type_url], digests[type_url], versions[type_url] = done
            names = [(type_url, name) for name in by_name]
            errors = memo.get((*key, "errors")) if memo is not None else None
            if errors is not None:
                known.append(errors)
            else:
                touched += names
                if memo is not None:
                    learn.append((key, type_url, names))
        snapshot: Snapshot = object.__new__(Snapshot)
        object.__setattr__(snapshot, "resources", MappingProxyType(resources))
        object.__setattr__(snapshot, "_digests", MappingProxyType(digests))
        object.__setattr__(snapshot, "_versions", MappingProxyType(versions))
        object.__setattr__(snapshot, "version", content_version(versions))
        consistency = encoding = None
        if self._consistency == () and self._encoding == ():
            # Only what was replaced can be wrong now. A resource's check depends on other
            # resources only through what it references: without references, its errors
            # (like its encoding's) are the same in every snapshot it is put in.
            for learnt, _, names in learn:
                assert memo is not None
                if all(not snapshot._referenced_by(t, n) for t, n in names):
                    memo[(*learnt, "errors")] = (
                        tuple(e for t, n in names for e in snapshot._check(t, n)),
                        tuple(e for t, n in names for e in snapshot._encode(t, n)),
                    )
            checked = [e for t, n in touched for e in snapshot._check(t, n)]
            encoded = [e for t, n in touched for e in snapshot._encode(t, n)]
            for check_errors, encode_errors in known:
                checked += check_errors
                encoded += encode_errors
            consistency, encoding = tuple(sorted(checked)), tuple(sorted(encoded))
        object.__setattr__(snapshot, "_consistency", consistency)
        object.__setattr__(snapshot, "_encoding", encoding)
        return snapshot

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and other.version == self.version

    def __hash__(self) -> int:
        return hash(self.version)

    def get(self, type_url: str) -> Mapping[str, Mapping[str, Any]]:
        """The resources of one type by name (empty if the snapshot has none)."""
        return self.resources.get(type_url, MappingProxyType({}))

    def digests(self, type_url: str) -> Mapping[str, str]:
        """A content hash per resource of one type: what a stream compares to skip resends."""
        return self._digests.get(type_url, MappingProxyType({}))

    def version_of(self, type_url: str, names: Iterable[str] | None = None) -> str:
        """The content version of one type, or of the named subset of it that exists."""
        if names is None:
            return self._versions.get(type_url, EMPTY_VERSION)
        digests = self.digests(type_url)
        return content_version({n: digests[n] for n in names if n in digests})

    @property
    def versions(self) -> Mapping[str, str]:
        """Every type's version: the standard six always, other types when present.

        This is what :meth:`SnapshotCache.wait_newer` compares: pass it back to wait for
        the next snapshot with different content.
        """
        versions = dict.fromkeys(PUSH_ORDER, EMPTY_VERSION)
        versions.update(self._versions)
        return MappingProxyType(versions)

    def consistency_errors(self) -> list[str]:
        """Why this snapshot must not be published, sorted; empty if it may be.

        Checks that each resource is filed under its own ``@type`` and name, and that every
        route configuration (RDS), cluster load assignment (EDS), secret (SDS) and filter
        config (ECDS) a resource fetches over ADS is in the snapshot: Envoy would otherwise
        keep the listener or cluster warming until its initial fetch timeout. Computed
        once per snapshot (a control plane checks it while building, the cache again when
        publishing).
        """
        if self._consistency is not None:
            return list(self._consistency)
        errors = []
        for type_url, by_name in self.resources.items():
            for name in by_name:
                errors += self._check(type_url, name)
        object.__setattr__(self, "_consistency", tuple(sorted(errors)))
        return sorted(errors)

    def _referenced_by(self, type_url: str, name: str) -> tuple[tuple[str, Any, str], ...]:
        resource = self.resources[type_url][name]
        return _referenced.get(
            (type_url, self._digests[type_url][name]),
            functools.partial(_reference_tuple, type_url, resource),
        )

    def _check(self, type_url: str, name: str) -> list[str]:
        resource = self.resources[type_url][name]
        name_field = _NAME_FIELD.get(type_url, "name")
        where = f"{_short(type_url)} {name!r}"
        errors = []
        if resource.get("@type") != type_url:
            errors.append(f"{where}: @type is {resource.get('@type')!r}, not {type_url}")
        if resource.get(name_field, name) != name:
            errors.append(f"{where}: {name_field} is {resource.get(name_field)!r}")
        for ref_type, ref_name, path in self._referenced_by(type_url, name):
            if not isinstance(ref_name, str) or ref_name not in self.get(ref_type):
                errors.append(
                    f"{where}: {path} refers to {_short(ref_type)} {ref_name!r},"
                    " which is not in the snapshot"
                )
        return errors

    def encoding_errors(self) -> list[str]:
        """Encode every resource (kept for pushes) and return why any could not be.

        This catches unknown fields and wrong shapes; values Envoy validates itself (a
        regex, a duration range) pass here and are rejected by Envoy (a NACK). Computed
        once per snapshot, like :meth:`consistency_errors`.
        """
        if self._encoding is not None:
            return list(self._encoding)
        errors = []
        for type_url in self.resources:
            for name in self.get(type_url):
                errors += self._encode(type_url, name)
        object.__setattr__(self, "_encoding", tuple(sorted(errors)))
        return sorted(errors)

    def _encode(self, type_url: str, name: str) -> list[str]:
        try:
            self.packed(type_url, name)
        except (json_format.ParseError, TypeError, ValueError) as error:
            return [f"{_short(type_url)} {name!r}: {error}"]
        return []

    def packed(self, type_url: str, name: str) -> any_pb2.Any:
        """One resource as a packed ``Any``, encoded once per distinct content and shared.

        Raises ``KeyError`` if absent and ``json_format.ParseError`` if not encodable.
        """
        resource = self.resources[type_url][name]
        return _pack(type_url, name, self._digests[type_url][name], resource)


# ---------------------------------------------------------------------------- cache


@dataclass(frozen=True, slots=True)
class Nack:
    """A proxy rejected a response: what it rejected, what it still runs, and why."""

    type_url: str
    rejected_version: str  # the version of the response Envoy refused
    kept_version: str  # the version Envoy keeps serving ("" if it never accepted one)
    error_detail: str
    code: int = 0  # the google.rpc.Code Envoy reported (Envoy 1.40 uses 13, INTERNAL)


_R = TypeVar("_R")


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class SnapshotCache:
    """The newest snapshot of every proxy, plus what each proxy acknowledged or rejected.

    :meth:`set` may be called from any thread and never blocks on readers; readers are
    coroutines on any event loop. The lock guards a few dict operations and is never held
    across an await or a wake-up.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}
        self._acked: dict[str, dict[str, str]] = {}
        self._nacks: dict[str, Nack] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listeners: dict[str, list[Callable[[], None]]] = {}

    def listen(self, node_id: str, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` (from the thread that calls :meth:`set`, outside the lock)
        whenever a different snapshot of ``node_id`` is published; the function that
        stops it. Cheaper than a task per stream waiting in :meth:`wait_newer`: an ACK
        wakes nothing."""
        with self._lock:
            self._listeners.setdefault(node_id, []).append(listener)

        def stop() -> None:
            with self._lock:
                listeners = self._listeners.get(node_id)
                if listeners is not None and listener in listeners:
                    listeners.remove(listener)
                    if not listeners:
                        del self._listeners[node_id]

        return stop

    def set(self, node_id: str, snapshot: Snapshot) -> None:
        """Publish ``snapshot`` for ``node_id``; equal content is not a new version.

        Raises ``ValueError`` listing every problem if the snapshot is inconsistent or a
        resource cannot be encoded; the previous snapshot then stays published.
        """
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"expected a Snapshot, not {type(snapshot).__name__}")
        if not isinstance(node_id, str) or not node_id:
            raise ValueError("node_id must be a non-empty string")
        if self.get(node_id) == snapshot:
            return  # already checked and published: the common case, kept cheap
        errors = snapshot.consistency_errors() or snapshot.encoding_errors()
        if errors:
            raise ValueError(f"snapshot for {node_id} refused:\n  " + "\n  ".join(errors))
        with self._lock:
            if self._snapshots.get(node_id) == snapshot:
                return  # equality decides: an unchanged config wakes and pushes nothing
            self._snapshots[node_id] = snapshot
            waiters = self._waiters.pop(node_id, set())
            listeners = tuple(self._listeners.get(node_id, ()))
        _wake_all(waiters)
        for listener in listeners:
            listener()

    def clear(self, node_id: str) -> None:
        """Forget a proxy that is gone: its snapshot and status. Open streams keep what
        they have and wait for a new snapshot."""
        with self._lock:
            self._snapshots.pop(node_id, None)
            self._acked.pop(node_id, None)
            self._nacks.pop(node_id, None)

    def get(self, node_id: str) -> Snapshot | None:
        """The newest snapshot of ``node_id``, or None if none was set."""
        with self._lock:
            return self._snapshots.get(node_id)

    @property
    def node_ids(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._snapshots)

    async def wait_newer(self, node_id: str, versions: Mapping[str, str]) -> Snapshot:
        """The newest snapshot of ``node_id`` once its versions differ from ``versions``.

        Pass :attr:`Snapshot.versions` of the snapshot last acted on, or ``{}`` to get the
        first one. Snapshots set in between are skipped: only the newest is returned.
        """
        expected = dict(versions)

        def newer() -> Snapshot | None:
            snapshot = self._snapshots.get(node_id)
            if snapshot is not None and dict(snapshot.versions) != expected:
                return snapshot
            return None

        return await self._wait(node_id, newer)

    # -- proxy status, reported by the ADS server

    def record_ack(self, node_id: str, type_url: str, version: str) -> None:
        """``node_id`` accepted ``version`` of ``type_url``; clears its NACK of that type."""
        with self._lock:
            self._acked.setdefault(node_id, {})[type_url] = version
            nack = self._nacks.get(node_id)
            if nack is not None and nack.type_url == type_url:
                del self._nacks[node_id]
            waiters = self._waiters.pop(node_id, set())
        _wake_all(waiters)

    def record_nack(self, node_id: str, nack: Nack) -> None:
        """``node_id`` rejected a response; kept as its last error until it ACKs that type."""
        with self._lock:
            self._nacks[node_id] = nack
            waiters = self._waiters.pop(node_id, set())
        _wake_all(waiters)

    def acked(self, node_id: str) -> Mapping[str, str]:
        """The version of each type ``node_id`` last accepted."""
        with self._lock:
            return MappingProxyType(dict(self._acked.get(node_id, {})))

    @property
    def nacks(self) -> Mapping[str, Nack]:
        """Per node, the last rejection not yet followed by an ACK of the same type."""
        with self._lock:
            return MappingProxyType(dict(self._nacks))

    async def wait_acked(self, node_id: str, type_url: str, version: str) -> None:
        """Return once ``node_id`` has accepted ``version`` of ``type_url``.

        For listeners and clusters that is :meth:`Snapshot.version_of` the type; for types
        sent by name it is the version of the names the proxy asked for,
        ``snapshot.version_of(type_url, names)``.
        """

        def acked() -> bool | None:
            return True if self._acked.get(node_id, {}).get(type_url) == version else None

        await self._wait(node_id, acked)

    async def wait_nacked(self, node_id: str, type_url: str) -> Nack:
        """Return the NACK ``node_id`` holds (or next records) for ``type_url``."""

        def nacked() -> Nack | None:
            nack = self._nacks.get(node_id)
            return nack if nack is not None and nack.type_url == type_url else None

        return await self._wait(node_id, nacked)

    async def _wait(self, node_id: str, probe: Callable[[], _R | None]) -> _R:
        """Wait until ``probe`` (run under the lock) returns a value, re-checking on every
        change to ``node_id``'s snapshot or status."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                result = probe()
                if result is not None:
                    return result
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.setdefault(node_id, set()).add(waiter)
            try:
                await waiter
            finally:
                with self._lock:
                    waiting = self._waiters.get(node_id)
                    if waiting is not None:
                        waiting.discard(waiter)
                        if not waiting:
                            del self._waiters[node_id]


def _wake_all(waiters: Iterable[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        # asyncio futures are not thread-safe: each is woken on its own loop's thread.
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
            waiter.get_loop().call_soon_threadsafe(_wake, waiter)
