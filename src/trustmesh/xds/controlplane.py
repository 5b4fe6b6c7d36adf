"""The control plane: configuration files → compiled mesh → each sidecar's Envoy config,
served over ADS with mutual TLS, and re-served when the files change.

:class:`ControlPlane` wires pieces that each do one thing elsewhere: ``load_config``
(read, validate, compile), ``xds.translate`` (one proxy's resources, pure),
``SnapshotCache`` (content-hashed, so an unchanged proxy gets no push) and ``AdsServer``
(the gRPC stream protocol).

Who gets what. The runtime registers each sidecar it starts (:meth:`ControlPlane.register`):
its Envoy node id, its workload and its addresses. The xDS port requires a client
certificate issued by the mesh CA, and a stream is served only if its node id is
registered and the certificate's one SPIFFE ID is that workload's identity
(``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``): a proxy only ever
gets its own configuration, and the node id itself is never trusted to say who it is.

Changes. :meth:`~ControlPlane.watch` polls the files' size, inode and mtime (a few stat
calls per interval), waits until they settle (editors write in steps), then reloads
(:meth:`~ControlPlane.reload`). A configuration with errors is refused as a whole: every
proxy keeps what it has, and the diagnostics say why. Loading, compiling and translating
run in a worker thread so the streams keep being served meanwhile.

Example::

    plane = ControlPlane(["mesh/"], ca=ca, address="127.0.0.1:15012")
    plane.register(ProxyRegistration.sidecar("foo/httpbin", "127.0.0.20"))
    port = await plane.start()                 # raises ConfigRejected on errors
    watcher = asyncio.create_task(plane.watch(stop))
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import hashlib
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import grpc

from trustmesh.api.diagnostics import Diagnostic, Location, error
from trustmesh.api.loader import SourceCache
from trustmesh.config import YAML_SUFFIXES, load_config
from trustmesh.identity import pki
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.identity.server import Clock, utc_now
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.policy.compose import MeshPolicy
from trustmesh.xds.cache import Canonical, Snapshot, SnapshotCache
from trustmesh.xds.gateway import GatewayResources, translate_gateway
from trustmesh.xds.incremental import Patcher, policies_only_changed, prepare
from trustmesh.xds.readiness import EndpointFilter
from trustmesh.xds.server import AdsServer, Context, XdsObserver, peer_spiffe_ids
from trustmesh.xds.translate import CaptureMode, FilterDelivery, ProxyResources, translate

__all__ = [
    "XDS_SERVER_NAME",
    "ConfigRejected",
    "ControlPlane",
    "Fingerprint",
    "PlaneObserver",
    "ProxyRegistration",
    "RebuildStats",
    "fingerprint_digest",
]

_log = logging.getLogger(__name__)

XDS_SERVER_NAME = "trustmesh-xds"  # DNS SAN of the serving certificate (for gRPC clients)
MAX_WATCHED_FILES = 5_000  # bounds the stat calls of one poll
LAZY_CANONICAL_ENTRIES = 4_096  # shared resources remembered for proxies built on connect
_SHOWN_ERRORS = 20


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class ProxyRegistration:
    """Which workload the Envoy with ``node_id`` serves, and where.

    ``inbound_address``: the IP its inbound listener binds (the workload's own address);
    ``app_address``: where the application itself listens, on the workload's ports;
    ``outbound_address``: where the sidecar offers the app its outbound listeners (HTTP
    proxy on 15001, one TCP listener per TCP service port, TLS egress on 443) — None: no
    outbound listeners. (Which IP its upstream connections leave from is the bootstrap's
    business: ``ads_bootstrap(source_address=...)``.)
    ``capture``: the listener layout (a sandboxed pod's traffic is captured: TRANSPARENT),
    with ``service_addresses`` (Service ``namespace/name``, ClusterIP) where the app
    dials each Service.
    The node id is only a lookup key: authorization uses the workload's identity.
    """

    node_id: str
    workload_ref: str  # "namespace/name"
    inbound_address: str
    app_address: str = "127.0.0.1"
    outbound_address: str | None = None
    capture: CaptureMode = CaptureMode.PROCESS
    service_addresses: tuple[tuple[str, str], ...] = ()
    gateway: bool = False  # a router-mode Envoy: Gateway + VirtualService (xds.gateway)

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ValueError("node_id must be a non-empty string")
        namespace, _, name = self.workload_ref.partition("/")
        if not namespace or not name or "/" in name:
            raise ValueError(f"workload_ref must be namespace/name, got {self.workload_ref!r}")
        for what in ("inbound_address", "app_address", "outbound_address"):
            if what == "outbound_address" and self.outbound_address is None:
                continue
            try:
                ipaddress.ip_address(getattr(self, what))
            except ValueError:
                raise ValueError(f"{what} must be an IP, got {getattr(self, what)!r}") from None

    @classmethod
    def sidecar(
        cls,
        workload_ref: str,
        inbound_address: str,
        *,
        app_address: str = "127.0.0.1",
        outbound_address: str | None = None,
        capture: CaptureMode = CaptureMode.PROCESS,
        service_addresses: Mapping[str, str] | None = None,
    ) -> ProxyRegistration:
        """A registration under Istio's sidecar node id,
        ``sidecar~<inbound address>~<name>.<namespace>~<namespace>.svc.cluster.local``."""
        namespace, _, name = workload_ref.partition("/")
        node_id = f"sidecar~{inbound_address}~{name}.{namespace}~{namespace}.svc.cluster.local"
        services = tuple(sorted((service_addresses or {}).items()))
        return cls(
            node_id, workload_ref, inbound_address, app_address, outbound_address, capture, services
        )

    @classmethod
    def router(cls, workload_ref: str, address: str) -> ProxyRegistration:
        """A gateway pod's registration under Istio's router node id,
        ``router~<address>~<name>.<namespace>~<namespace>.svc.cluster.local``; its
        listeners bind ``address``."""
        namespace, _, name = workload_ref.partition("/")
        node_id = f"router~{address}~{name}.{namespace}~{namespace}.svc.cluster.local"
        return cls(node_id, workload_ref, address, address, gateway=True)


class ConfigRejected(ValueError):
    """The configuration has errors; ``diagnostics`` holds every one, sorted."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        shown = "\n  ".join(str(d) for d in self.diagnostics[:_SHOWN_ERRORS])
        more = len(self.diagnostics) - _SHOWN_ERRORS
        tail = f"\n  … and {more} more" if more > 0 else ""
        super().__init__(
            f"configuration refused ({len(self.diagnostics)} errors):\n  {shown}{tail}"
        )


class PlaneObserver(XdsObserver, Protocol):
    """What metrics are told: the ADS streams' events and each reload's outcome."""

    def reloaded(self, applied: bool, errors: Sequence[Diagnostic]) -> None:
        """A reload ended: ``applied`` (else refused whole) with these errors — the
        configuration's when refused, proxies that could not be configured when applied."""

    def published(self, node_id: str, version: str) -> None:
        """A changed snapshot ``version`` replaced the one ``node_id`` had (a config change
        reaching that proxy starts now; :meth:`XdsObserver.converged` ends it)."""

    def xds_serving_certificate(self, not_after: dt.datetime) -> None:
        """The xDS server's TLS certificate was (re)issued (maybe on a gRPC thread)."""


# In-memory configuration files (name, bytes) in reading order, and a stamp naming them.
Preread = Callable[[], tuple[Sequence[tuple[str, bytes]], str]]
# A file's identity and content stamp; (path,) alone when it cannot be read.
_Stamp = tuple[str, int, int, int] | tuple[str]
Fingerprint = tuple[_Stamp, ...]


@dataclass(frozen=True, slots=True)
class _Build:
    """What one reload computed (in a worker thread), before anything is published."""

    errors: tuple[Diagnostic, ...]  # configuration errors: nothing may be published
    mesh: MeshPolicy | None
    # What was translated (dicts: a proxy registered later against the same mesh is
    # added, from the event loop's thread, see ControlPlane._remember).
    registrations: dict[str, ProxyRegistration]
    snapshots: dict[str, Snapshot]
    problems: tuple[Diagnostic, ...]  # proxies that could not be translated
    # What the snapshots were built with, so the next build can reuse them.
    addresses: Mapping[str, str] = field(default_factory=dict)
    not_ready: frozenset[str] = frozenset()
    stats: RebuildStats | None = None
    # Proxies with no stream open that this build left for later (no snapshot here): each
    # is built when it connects (ControlPlane._authorize), or by a later build.
    deferred: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RebuildStats:
    """How one build's proxies were served: ``reused`` kept their snapshot (the change
    could not affect them), ``patched`` got only their policy filters re-translated,
    ``translated`` were translated whole; ``deferred``: not connected, built when they
    connect; ``seconds``: the build's wall time (load, compile, translate, encode,
    check)."""

    reused: int
    patched: int
    translated: int
    seconds: float
    deferred: int = 0


# ---------------------------------------------------------------------------- control plane


class ControlPlane:
    """Serves each registered sidecar its own Envoy configuration over ADS + mTLS.

    ``config_paths`` / ``mesh_config``: files or directories, as for ``load_config``.
    ``ca`` issues the serving certificate and its trust bundle decides which client
    certificates are accepted. ``debounce``: how long the files must stay unchanged
    before :meth:`watch` reloads. ``workload_addresses``: workload ref → IP where the
    manifests carry none (a Deployment's pods), for the service endpoints of every proxy.
    ``not_ready``: workloads whose endpoints no proxy gets (pods that are not Ready);
    :meth:`set_not_ready` changes it while serving.

    ``reloads`` counts configurations applied (the one :meth:`start` loads included),
    ``rejected_reloads`` those refused for errors; ``last_errors`` is what the last
    reload returned. Methods are called from the event loop's thread. ``observer``
    (metrics) is told every stream event and reload outcome. ``sources``: where the
    files of ``config_paths`` are already in memory (a store's mirror,
    :meth:`~trustmesh.store.config_source.StoreConfigSource.sources`): each reload
    compiles those instead of reading the files, and its fingerprint is their stamp.
    """

    def __init__(
        self,
        config_paths: Sequence[str],
        *,
        ca: CertificateAuthority,
        address: str = "127.0.0.1:0",
        clock: Clock = utc_now,
        debounce: float = 0.05,
        mesh_config: Sequence[str] = (),
        workload_addresses: Mapping[str, str] | None = None,
        not_ready: Sequence[str] = (),
        observer: PlaneObserver | None = None,
        sources: Preread | None = None,
    ) -> None:
        if isinstance(config_paths, str) or isinstance(mesh_config, str):
            raise TypeError("config_paths and mesh_config are sequences of paths, not one str")
        if not config_paths:
            raise ValueError("config_paths must name at least one file or directory")
        if "-" in (*config_paths, *mesh_config):
            raise ValueError("the control plane reads files it can watch, not stdin ('-')")
        if debounce < 0:
            raise ValueError(f"debounce must be >= 0, got {debounce}")
        self._paths = tuple(config_paths)
        self._preread = sources
        self._mesh_config = tuple(mesh_config)
        self._addresses = MappingProxyType(dict(workload_addresses or {}))
        self._not_ready = frozenset(not_ready)
        # What the published snapshots leave out: syncz reports this one, so "every proxy
        # synced" never pairs a new readiness with the configuration from before it.
        self._served_not_ready = self._not_ready
        self._ca = ca
        self._host, self._port = _split_address(address)
        self._clock = clock
        self._debounce = debounce
        self._cache = SnapshotCache()
        self._sources = SourceCache()  # used by one reload at a time (self._reloading)
        self._registrations: dict[str, ProxyRegistration] = {}
        self._mesh: MeshPolicy | None = None
        self._built: _Build | None = None  # the last build published (reused by the next)
        # Registered proxies whose published snapshot predates the mesh: nothing was
        # connected for them when it was built; each is brought up to date as it connects.
        self._deferred: set[str] = set()
        self._lazy_canonical: tuple[MeshPolicy, Canonical] | None = None
        self._seen: Fingerprint | None = None  # of the files the last reload read
        self._outcome_of: Fingerprint | None = None  # … once its result is published
        self._reloading = asyncio.Lock()
        self._server: AdsServer | None = None
        self._tls_bundle = b""
        self._tls_refresh_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        self._spiffe_id = ""
        self._observer = observer
        self.last_errors: list[Diagnostic] = []
        self.reloads = 0
        self.rejected_reloads = 0

    # -- what it serves

    @property
    def port(self) -> int:
        """The xDS port (known once started; kept across stop/start)."""
        return self._port

    @property
    def cache(self) -> SnapshotCache:
        """The published snapshots and what each proxy acknowledged or rejected."""
        return self._cache

    @property
    def last_rebuild(self) -> RebuildStats | None:
        """How the last published build served its proxies, and how long it took."""
        return self._built.stats if self._built is not None else None

    @property
    def server(self) -> AdsServer | None:
        """The running ADS server (its push/ACK/NACK counters), None while stopped."""
        return self._server

    @property
    def mesh(self) -> MeshPolicy | None:
        """The last configuration that compiled without errors."""
        return self._mesh

    @property
    def spiffe_id(self) -> str:
        """The URI SAN of the serving certificate: what a sidecar pins (known once started)."""
        return self._spiffe_id

    @property
    def registrations(self) -> Mapping[str, ProxyRegistration]:
        return MappingProxyType(dict(self._registrations))

    def register(self, registration: ProxyRegistration) -> None:
        """Serve ``registration.node_id`` its workload's config (from now on, if started).

        Raises ``ValueError`` if the node id is registered for something else; once a
        configuration is loaded, ``LookupError`` / ``ValueError`` if the workload is
        unknown or has no sidecar (nothing is registered then).
        """
        if not isinstance(registration, ProxyRegistration):
            raise TypeError(f"expected a ProxyRegistration, not {type(registration).__name__}")
        existing = self._registrations.get(registration.node_id)
        if existing == registration:
            return
        if existing is not None:
            raise ValueError(f"node {registration.node_id!r} is already {existing.workload_ref}")
        if self._mesh is not None:
            endpoints = EndpointFilter(self._not_ready)
            snapshot = _snapshot_for(self._mesh, registration, self._addresses, endpoints)
            self._registrations[registration.node_id] = registration
            self._cache.set(registration.node_id, snapshot)
            self._remember(registration, snapshot)
        else:
            self._registrations[registration.node_id] = registration

    @property
    def not_ready(self) -> frozenset[str]:
        """Workloads whose endpoints are left out of the configuration last published to
        every proxy (a change :meth:`set_not_ready` is still translating is not here yet)."""
        return self._served_not_ready

    async def set_not_ready(self, workloads: Sequence[str]) -> bool:
        """Leave the endpoints of ``workloads`` (``namespace/name``) out from now on and
        push every proxy whose configuration that changes; whether the set changed.

        Built from the last configuration that compiled, without reading the files: a
        pod's readiness changes what proxies get even while the files have errors."""
        wanted = frozenset(workloads)
        if wanted == self._not_ready:
            return False
        async with self._reloading:
            self._not_ready = wanted
            mesh = self._mesh
            if mesh is None:
                self._served_not_ready = wanted
                return True  # nothing published yet: the first build uses it
            registrations = dict(self._registrations)
            build = await asyncio.to_thread(
                _translate_all,
                mesh,
                registrations,
                self._addresses,
                wanted,
                self._built,
                None,
                self._deferrable(registrations),
            )
            problems, changed = self._publish(build)
            self._built = build
            self._served_not_ready = wanted
            _log.info(
                "not ready: %s; %d of %d proxies changed",
                ", ".join(sorted(wanted)) or "none",
                changed,
                len(self._registrations),
            )
            if problems:
                self.last_errors = problems
        return True

    def set_workload_addresses(self, workload_addresses: Mapping[str, str]) -> None:
        """Workload ref → IP from now on (a registry's hosts join and leave); the next
        :meth:`reload` builds every proxy's endpoints from it."""
        self._addresses = MappingProxyType(dict(workload_addresses))

    def unregister(self, node_id: str) -> None:
        """Forget a proxy that is gone. An open stream keeps its config until it closes;
        a new one is refused."""
        self._registrations.pop(node_id, None)
        self._deferred.discard(node_id)
        self._cache.clear(node_id)
        if self._built is not None:
            self._built.registrations.pop(node_id, None)
            self._built.snapshots.pop(node_id, None)

    def identity_of(self, node_id: str) -> str | None:
        """The SPIFFE ID a peer must prove to get ``node_id``'s config (None: nobody)."""
        registration = self._registrations.get(node_id)
        mesh = self._mesh
        if registration is None or mesh is None:
            return None
        policy = mesh.for_workload(registration.workload_ref)
        if policy is None:
            return None
        workload = policy.workload
        trust_domain = self._ca.config.trust_domain  # the domain its certificate is issued in
        return SpiffeId(trust_domain, workload.namespace, workload.service_account).uri

    def sync_status(self) -> dict[str, dict[str, object]]:
        """Per registered node: its workload, whether it accepted everything it is meant
        to have now (``synced``, istioctl's SYNCED) and its last rejection, if any."""
        nacks = self._cache.nacks
        server = self._server
        status: dict[str, dict[str, object]] = {}
        for node_id, registration in sorted(self._registrations.items()):
            synced = server is not None and server.synced(node_id)
            nack = nacks.get(node_id)
            status[node_id] = {
                "workload": registration.workload_ref,
                "synced": synced,
                "nack": None if nack is None else f"{nack.type_url}: {nack.error_detail}",
            }
        return status

    def synced_proxies(self) -> list[str]:
        """The registered node ids :meth:`sync_status` calls synced, sorted — from the
        open streams alone (cheap with thousands registered and few connected)."""
        server = self._server
        if server is None:
            return []
        return [n for n in server.synced_nodes() if n in self._registrations]

    # -- lifecycle

    async def start(self) -> int:
        """Load and compile the configuration, publish every registered proxy's snapshot
        and serve ADS over mTLS; the bound port.

        Raises :class:`ConfigRejected` with the diagnostics if the configuration has
        errors or a registered proxy cannot be configured.
        """
        if self._server is not None:
            raise RuntimeError("control plane already started")
        problems = await self.reload()
        if problems:
            raise ConfigRejected(problems)
        server = AdsServer(
            self._cache,
            address=_join_address(self._host, self._port),
            authorize=self._authorize,
            server_credentials=self._server_credentials(),
            observer=self._observer,
        )
        self._port = await server.start()  # a restart binds the same port again
        self._server = server
        _log.info(
            "control plane serving xDS on %s (%d proxies)",
            _join_address(self._host, self._port),
            len(self._registrations),
        )
        return self._port

    async def stop(self, grace: float = 0.5) -> None:
        """Stop serving. Envoys keep their config and reconnect when it is back."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
            _log.info("control plane stopped serving xDS on port %d", self._port)

    async def reload(self) -> list[Diagnostic]:
        """Read the configuration again and publish what changed; the errors, if any.

        With configuration errors nothing is published (every proxy keeps its last good
        snapshot) and those errors are returned. Otherwise every registered proxy gets a
        new snapshot — one whose content did not change pushes nothing — and the return
        value lists proxies that could not be configured (they keep their last one).
        """
        async with self._reloading:
            registrations = dict(self._registrations)
            # Taken before reading: an edit made while this reload reads is seen by watch().
            preread: Sequence[tuple[str, bytes]] | None = None
            seen: Fingerprint
            if self._preread is not None:
                preread, stamp = self._preread()
                seen = self._seen = ((stamp,),)
            else:
                seen = self._seen = await asyncio.to_thread(self.fingerprint)
            not_ready = self._not_ready
            try:
                build = await asyncio.to_thread(
                    _build_without_gc,
                    self._paths,
                    self._mesh_config,
                    registrations,
                    self._addresses,
                    self._sources,
                    not_ready,
                    self._built,
                    preread,
                    self._deferrable(registrations),
                )
            except Exception as exc:  # a bug must not end the watcher: report it as data
                _log.exception("control plane: reloading the configuration failed")
                where = Location(self._paths[0])
                build = _Build((error("reload-failed", where, repr(exc)),), None, {}, {}, ())
            if build.errors or build.mesh is None:
                self.rejected_reloads += 1
                self.last_errors = list(build.errors)
                _log.warning(
                    "configuration refused, still serving the last good one:\n  %s",
                    "\n  ".join(map(str, build.errors[:_SHOWN_ERRORS])),
                )
                self._outcome_of = seen
                if self._observer is not None:
                    self._observer.reloaded(False, self.last_errors)
                return list(self.last_errors)
            self._mesh = build.mesh
            self._lazy_canonical = None  # of the mesh before (keeps it alive otherwise)
            problems, changed = self._publish(build)
            self._built = build
            self._served_not_ready = not_ready
            self.reloads += 1
            self.last_errors = problems
            self._outcome_of = seen  # published: streams push from here on
            if self._observer is not None:
                self._observer.reloaded(True, problems)
            _log.info(
                "configuration applied: %d of %d proxies changed, %d could not be configured",
                changed,
                len(self._registrations),
                len(problems),
            )
            return list(problems)

    async def watch(self, stop: asyncio.Event, interval: float = 0.2) -> None:
        """Reload whenever the configuration files change, until ``stop`` is set.

        Each ``interval`` costs one ``stat`` per file (at most ``MAX_WATCHED_FILES``); a
        change is acted on once the files stayed the same for ``debounce`` seconds.
        """
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        while not await _stopped_within(stop, interval):
            current = await asyncio.to_thread(self.fingerprint)
            if current == self._seen:
                continue
            while True:  # settle: an editor or `cp -r` writes in several steps
                if await _stopped_within(stop, self._debounce):
                    return
                settled = await asyncio.to_thread(self.fingerprint)
                if settled == current:
                    break
                current = settled
            await self.reload()

    def fingerprint(self) -> Fingerprint:
        """Path, inode, size and mtime of every configuration file, in reading order
        (with ``sources``: their stamp)."""
        if self._preread is not None:
            return ((self._preread()[1],),)
        return _fingerprint((*self._paths, *self._mesh_config))

    @property
    def loaded_digest(self) -> str:
        """:func:`fingerprint_digest` of the files the last finished reload read (its
        snapshots are published, or its errors are in :attr:`last_errors`)."""
        return _digest(self._outcome_of) if self._outcome_of is not None else ""

    # -- internals

    def _remember(self, registration: ProxyRegistration, snapshot: Snapshot) -> None:
        """Add a proxy built outside a reload to the last build (the next reload may
        reuse its snapshot) — when it was built as that build's proxies were."""
        built = self._built
        if (
            built is None
            or built.mesh is not self._mesh
            or built.not_ready != self._not_ready
            or dict(built.addresses) != dict(self._addresses)
        ):
            return
        built.registrations[registration.node_id] = registration
        built.snapshots[registration.node_id] = snapshot

    def _deferrable(self, registrations: Mapping[str, ProxyRegistration]) -> frozenset[str]:
        """The proxies a build may leave for later: registered, with no stream open to
        this server (none before it serves)."""
        server = self._server
        if server is None:
            return frozenset()
        return frozenset(n for n in registrations if not server.connected(n))

    def _build_deferred(self, node_id: str) -> None:
        """Bring a proxy a build left out up to date as it connects (on the event loop,
        before its stream reads the cache); if it cannot be configured it keeps its last
        snapshot and the problem joins :attr:`last_errors`."""
        registration = self._registrations.get(node_id)
        mesh = self._mesh
        self._deferred.discard(node_id)
        if registration is None or mesh is None:
            return
        try:
            endpoints = EndpointFilter(self._not_ready)
            snapshot = _snapshot_for(
                mesh, registration, self._addresses, endpoints, self._canonical_for(mesh)
            )
            if not registration.gateway:
                prepare(snapshot)
            self._cache.set(node_id, snapshot)
        except (LookupError, ValueError) as exc:
            problem = _proxy_problem(registration, exc)
            _log.error("%s", problem)
            self.last_errors = sorted([*self.last_errors, problem], key=Diagnostic.sort_key)
            return
        self._remember(registration, snapshot)

    def _canonical_for(self, mesh: MeshPolicy) -> Canonical:
        """What proxies built one at a time on the event loop (as they connect) share of
        ``mesh``'s translation: its shared dicts (a namespace's outbound clusters) are
        copied and hashed once, not once per proxy — measured ≈ 10× cheaper per proxy
        on the 5,000-proxy fleet. Bounded; a new mesh starts a new one."""
        found = self._lazy_canonical
        if found is None or found[0] is not mesh:
            found = self._lazy_canonical = (mesh, Canonical(LAZY_CANONICAL_ENTRIES))
        return found[1]

    def _publish(self, build: _Build) -> tuple[list[Diagnostic], int]:
        assert build.mesh is not None
        problems = list(build.problems)
        changed = 0
        server = self._server
        for node_id, registration in list(self._registrations.items()):
            if (
                node_id in build.deferred
                and build.registrations.get(node_id) == registration
                and (server is None or not server.connected(node_id))
            ):
                self._deferred.add(node_id)  # built when it connects
                continue
            # (a deferred one that connected while the build ran is built now, below)
            if build.registrations.get(node_id) == registration and node_id not in build.deferred:
                snapshot = build.snapshots.get(node_id)
                if snapshot is None:
                    continue  # it could not be configured: reported in build.problems
            else:  # registered while the reload ran, against the old mesh
                try:
                    endpoints = EndpointFilter(self._not_ready)
                    snapshot = _snapshot_for(
                        build.mesh,
                        registration,
                        self._addresses,
                        endpoints,
                        self._canonical_for(build.mesh),
                    )
                except (LookupError, ValueError) as exc:
                    problems.append(_proxy_problem(registration, exc))
                    continue
                if build.not_ready == self._not_ready and dict(build.addresses) == dict(
                    self._addresses
                ):
                    build.registrations[node_id] = registration
                    build.snapshots[node_id] = snapshot
            self._deferred.discard(node_id)
            try:
                previous = self._cache.get(node_id)
                changed += previous != snapshot
                self._cache.set(node_id, snapshot)
                if self._observer is not None and previous is not None and previous != snapshot:
                    self._observer.published(node_id, snapshot.version)
            except ValueError as exc:
                problems.append(_proxy_problem(registration, exc))
        return sorted(problems, key=Diagnostic.sort_key), changed

    def _authorize(self, node_id: str, context: Context) -> bool:
        expected = self.identity_of(node_id)
        presented = peer_spiffe_ids(context)
        if expected is not None and presented == (expected,):
            if node_id in self._deferred:
                self._build_deferred(node_id)
            return True
        _log.warning(
            "xds: refused node %r to peer %s presenting %s (needs %s)",
            node_id,
            context.peer(),
            list(presented) or "no SPIFFE ID",
            expected or "a registered node id",
        )
        return False

    def _server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._certificate_configuration(),
            self._refreshed_configuration,  # type: ignore[arg-type]  # None keeps the current
            require_client_authentication=True,
        )

    def _certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        now = self._clock()
        hostnames, ips = _server_names(self._host)
        key, chain = self._ca.server_certificate(now, hostnames, ips)
        leaf = pki.load_certs(chain)[0]
        life = leaf.not_valid_after_utc - now
        self._tls_bundle = self._ca.bundle_pem(now)
        self._tls_refresh_at = now + life / 2
        self._spiffe_id = pki.uri_sans(leaf)[0]
        if self._observer is not None:
            self._observer.xds_serving_certificate(leaf.not_valid_after_utc)
        return grpc.ssl_server_certificate_configuration(
            [(key, chain)], root_certificates=self._tls_bundle
        )

    def _refreshed_configuration(self) -> grpc.ServerCertificateConfiguration | None:
        # gRPC asks before each handshake (from its own threads): a new serving
        # certificate at half its life, new client roots as soon as the bundle changes.
        try:
            now = self._clock()
            if now < self._tls_refresh_at and self._ca.bundle_pem(now) == self._tls_bundle:
                return None
            return self._certificate_configuration()
        except Exception:  # keep serving the current certificate rather than fail handshakes
            _log.exception("xds: refreshing the serving certificate failed")
            return None


# ---------------------------------------------------------------------------- building


def _build_without_gc(
    paths: Sequence[str],
    mesh_config: Sequence[str],
    registrations: Mapping[str, ProxyRegistration],
    addresses: Mapping[str, str],
    sources: SourceCache | None = None,
    not_ready: frozenset[str] = frozenset(),
    previous: _Build | None = None,
    preread: Sequence[tuple[str, bytes]] | None = None,
    deferrable: frozenset[str] = frozenset(),
) -> _Build:
    """:func:`_build` with the cyclic garbage collector paused: a fleet's build makes
    hundreds of thousands of short-lived dicts, and collections triggered by them scan
    the whole (large, long-lived) heap — measured, half of a 100-proxy rebuild. Garbage
    cycles made meanwhile are collected once it is back on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _build(
            paths,
            mesh_config,
            registrations,
            addresses,
            sources,
            not_ready,
            previous,
            preread,
            deferrable,
        )
    finally:
        if was_enabled:
            gc.enable()


def _build(
    paths: Sequence[str],
    mesh_config: Sequence[str],
    registrations: Mapping[str, ProxyRegistration],
    addresses: Mapping[str, str],
    sources: SourceCache | None = None,
    not_ready: frozenset[str] = frozenset(),
    previous: _Build | None = None,
    preread: Sequence[tuple[str, bytes]] | None = None,
    deferrable: frozenset[str] = frozenset(),
) -> _Build:
    """Load, compile and translate for every proxy; pure apart from reading the files
    (``preread``: ``paths``' files already read)."""
    started = time.perf_counter()
    loaded = load_config(paths, mesh_config=mesh_config, source_cache=sources, preread=preread)
    if loaded.errors or loaded.mesh is None:
        errors = loaded.errors or [error("not-compiled", Location(paths[0]), "no policy compiled")]
        return _Build(tuple(errors), None, dict(registrations), {}, ())
    return _translate_all(
        loaded.mesh, registrations, addresses, not_ready, previous, started, deferrable
    )


def _translate_all(
    mesh: MeshPolicy,
    registrations: Mapping[str, ProxyRegistration],
    addresses: Mapping[str, str],
    not_ready: frozenset[str],
    previous: _Build | None = None,
    started: float | None = None,
    deferrable: frozenset[str] = frozenset(),
) -> _Build:
    """Every registered proxy's snapshot from one compiled mesh (pure).

    With ``previous`` (the last build published), a change that touched only policies
    (:func:`~trustmesh.xds.incremental.policies_only_changed`) rebuilds only what it can
    affect: a proxy registered, addressed and filtered as then keeps its snapshot or gets
    only its policy filters re-translated (:class:`~trustmesh.xds.incremental.Patcher`);
    every other proxy is translated whole. Proxies in ``deferrable`` (no stream open) are
    left out when there is a ``previous`` build (not from the first): they are built when
    they connect, so a replica builds only the proxies it serves."""
    started = time.perf_counter() if started is None else started
    snapshots: dict[str, Snapshot] = {}
    problems = []
    canonical = Canonical()  # what the proxies share is encoded once
    endpoints = EndpointFilter(not_ready)  # … and filtered once
    base = _reusable(previous, mesh, addresses, not_ready)
    patcher = Patcher(base.mesh, mesh, canonical) if base is not None and base.mesh else None
    reused = patched = 0
    deferred = set()
    for node_id, registration in sorted(registrations.items()):
        if previous is not None and node_id in deferrable:
            deferred.add(node_id)
            continue
        try:
            snapshot = None
            if base is not None and patcher is not None and not registration.gateway:
                before = base.snapshots.get(node_id)
                if before is not None and base.registrations.get(node_id) == registration:
                    snapshot = patcher.snapshot(
                        registration.workload_ref, before, registration.capture
                    )
                    if snapshot is not None:
                        if snapshot.consistency_errors() or snapshot.encoding_errors():
                            snapshot = None  # translated whole: that reports the problem
                        elif snapshot is before:
                            reused += 1
                        else:
                            patched += 1
            if snapshot is None:
                snapshot = _snapshot_for(mesh, registration, addresses, endpoints, canonical)
                if not registration.gateway:
                    prepare(snapshot)
            snapshots[node_id] = snapshot
        except (LookupError, ValueError) as exc:
            problems.append(_proxy_problem(registration, exc))
        except Exception as exc:  # a bug for one workload must not stall every other update
            _log.exception("translating %s for %s failed", registration.workload_ref, node_id)
            problems.append(_proxy_problem(registration, exc))
    stats = RebuildStats(
        reused,
        patched,
        len(snapshots) - reused - patched,
        time.perf_counter() - started,
        len(deferred),
    )
    frozen_addresses = MappingProxyType(dict(addresses))
    return _Build(
        (),
        mesh,
        dict(registrations),
        snapshots,
        tuple(problems),
        frozen_addresses,
        not_ready,
        stats,
        frozenset(deferred),
    )


def _reusable(
    previous: _Build | None,
    mesh: MeshPolicy,
    addresses: Mapping[str, str],
    not_ready: frozenset[str],
) -> _Build | None:
    """``previous`` if its snapshots may be patched into ``mesh``'s, else None."""
    if previous is None or previous.mesh is None or previous.errors:
        return None
    if previous.not_ready != not_ready or dict(previous.addresses) != dict(addresses):
        return None
    return previous if policies_only_changed(previous.mesh, mesh) else None


def _snapshot_for(
    mesh: MeshPolicy,
    registration: ProxyRegistration,
    addresses: Mapping[str, str],
    endpoints: EndpointFilter,
    canonical: Canonical | None = None,
) -> Snapshot:
    """One proxy's checked snapshot; ``LookupError`` / ``ValueError`` if there is none."""
    resources: ProxyResources | GatewayResources
    if registration.gateway:
        resources = translate_gateway(
            mesh,
            registration.workload_ref,
            address=registration.inbound_address,
            workload_addresses=addresses,
        )
    else:
        resources = _sidecar_resources(mesh, registration, addresses)
    snapshot = Snapshot.from_resources(endpoints.apply(resources.all()), canonical)
    # Checked (and encoded, which is remembered) here, off the event loop: publishing it
    # later repeats neither.
    problems = snapshot.consistency_errors() or snapshot.encoding_errors()
    if problems:
        raise ValueError("; ".join(problems))
    return snapshot


def _sidecar_resources(
    mesh: MeshPolicy, registration: ProxyRegistration, addresses: Mapping[str, str]
) -> ProxyResources:
    return translate(
        mesh,
        registration.workload_ref,
        inbound_address=registration.inbound_address,
        app_address=registration.app_address,
        delivery=FilterDelivery.ECDS,  # authorization changes reach open connections
        outbound_address=registration.outbound_address,
        workload_addresses=addresses,
        capture=registration.capture,
        service_addresses=dict(registration.service_addresses) or None,
    )


def _proxy_problem(registration: ProxyRegistration, exc: BaseException) -> Diagnostic:
    where = Location(f"<proxy {registration.node_id}>")
    message = f"{registration.workload_ref}: {exc}; it keeps its last configuration"
    return error("proxy-not-configured", where, message)


# ---------------------------------------------------------------------------- watching


def _fingerprint(paths: Sequence[str]) -> Fingerprint:
    stamps: list[_Stamp] = []
    for path in _config_files(paths):
        if len(stamps) >= MAX_WATCHED_FILES:
            _log.warning("watching only the first %d configuration files", MAX_WATCHED_FILES)
            break
        try:
            info = os.stat(path)
        except OSError:
            stamps.append((path,))
            continue
        # The inode catches an os.replace whose size and coarse mtime happen to match.
        stamps.append((path, info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(stamps)


def fingerprint_digest(paths: Sequence[str]) -> str:
    """A short digest of the configuration files' stamps: equal to a running control
    plane's :attr:`~ControlPlane.loaded_digest` once it has read the files as they are."""
    return _digest(_fingerprint(paths))


def _digest(fingerprint: Fingerprint) -> str:
    return hashlib.sha256(repr(fingerprint).encode()).hexdigest()[:16]


def _config_files(paths: Sequence[str]) -> Iterator[str]:
    """The files ``load_config`` reads from ``paths``, in its order."""
    for raw in paths:
        if not os.path.isdir(raw):
            yield raw
            continue
        found = []
        for folder, folders, files in os.walk(raw):
            folders.sort()
            found += [os.path.join(folder, f) for f in files if f.endswith(YAML_SUFFIXES)]
        yield from sorted(found)


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


# ---------------------------------------------------------------------------- addresses


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def _join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _server_names(host: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """DNS and IP SANs of the serving certificate for a server bound to ``host``."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return (XDS_SERVER_NAME, host), ()
    return (XDS_SERVER_NAME,), (() if ip.is_unspecified else (host,))
