"""Rebuild only what a configuration change can affect (pure).

A fleet's reload used to translate, encode and check every proxy's whole snapshot even
when the change was one AuthorizationPolicy. Here a new compiled mesh is compared with
the one the published snapshots were built from:

* :func:`policies_only_changed` — the two meshes differ at most in AuthorizationPolicies
  and RequestAuthentications (every other resource, the mesh config, the workloads,
  services and namespaces are equal, and no EnvoyFilter can patch the result). Anything
  else rebuilds every proxy, as before.
* :class:`Patcher` (one per build) — then, per sidecar, what translation reads of those policies
  is the workload's own :class:`~trustmesh.policy.compose.WorkloadPolicy` ``authz`` and
  ``jwt_providers``: a proxy whose ``authz`` and JWT providers are equal keeps its
  snapshot (same versions: no push); one whose ``authz`` changed but whose listener would
  not (the same policy slots and the same TCP RBAC) gets its previous snapshot with only
  the extension configs (ECDS) and the slot switches of its inbound route configurations
  (RDS) re-translated — its listeners and clusters keep their encodings and versions.
  Anything else (new slots, TCP rules, JWT providers, a gateway) is translated whole.
  Workloads selecting the same policies share one compiled ``AuthzPolicy``, so the work
  (slot configs, encodings, type versions, checks) is done once per policy set.

``tests/xds/test_incremental.py`` proves the result equal, version for version, to a full
rebuild over generated changes.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from trustmesh.api.models import Strict
from trustmesh.envoy_json import HCM_TYPE, TCP_PROXY_TYPE
from trustmesh.policy.compose import AuthzPolicy, MeshPolicy, WorkloadPolicy
from trustmesh.xds.cache import TYPE_ECDS, TYPE_LISTENER, TYPE_ROUTE, Canonical, Snapshot, _Lru
from trustmesh.xds.rbac import network_rbac_filters
from trustmesh.xds.translate import (
    CaptureMode,
    FilterDelivery,
    http_policy_filters,
    slot_switches,
)

__all__ = ["POLICY_KINDS", "Patcher", "policies_only_changed", "prepare"]

TCP_PROXY = "envoy.filters.network.tcp_proxy"
# Kinds whose effect on a sidecar's translation is confined to WorkloadPolicy.authz and
# WorkloadPolicy.jwt_providers of the workloads they select.
POLICY_KINDS = frozenset({"AuthorizationPolicy", "RequestAuthentication"})


def _resource_key(resource: Any) -> tuple[object, ...]:
    # Everything but the document (where it was read) and its order among all resources
    # (a policy added earlier in the files shifts it; the relative order of the rest is
    # kept by comparing them as a sequence).
    return (
        resource.kind,
        resource.namespace,
        resource.name,
        resource.group,
        resource.version,
        resource.labels,
        resource.annotations,
        resource.creation_timestamp,
        resource.spec,
        # A loosely modelled kind's model holds only part of what it says (a
        # VirtualService's, its hosts): the spec as written decides for those.
        None if isinstance(resource.spec, Strict) else resource.raw_spec(),
    )


def policies_only_changed(old: MeshPolicy, new: MeshPolicy) -> bool:
    """Whether ``new`` differs from ``old`` at most in :data:`POLICY_KINDS` resources and
    what they compile to, with no EnvoyFilter anywhere (a patch may touch anything).

    The workloads, services and namespaces of a snapshot are derived from its resources
    and mesh config alone (none from a policy kind), so equal inputs are compared, not
    the (large) derived values."""
    if old is new:
        return True
    a, b = old.snapshot, new.snapshot
    if (
        old.bundle != new.bundle
        or old.path_normalization != new.path_normalization
        or old.extension_providers != new.extension_providers
        or a.mesh != b.mesh
        or a.mesh_layers != b.mesh_layers
        or len(a.workloads) != len(b.workloads)
        or old.workloads.keys() != new.workloads.keys()
    ):
        return False
    if any(True for _ in b.of_kind("EnvoyFilter")) or any(True for _ in a.of_kind("EnvoyFilter")):
        return False
    rest_a = [r for r in a.resources if r.kind not in POLICY_KINDS]
    rest_b = [r for r in b.resources if r.kind not in POLICY_KINDS]
    # A reload's source cache hands back the very objects of unchanged files: compared
    # by identity first, by content only where they are different objects.
    return len(rest_a) == len(rest_b) and all(
        x is y or _resource_key(x) == _resource_key(y) for x, y in zip(rest_a, rest_b, strict=True)
    )


class Patcher:
    """Patches sidecar snapshots from ``old_mesh`` into ``new_mesh`` — for one build, when
    :func:`policies_only_changed` holds for the two meshes.

    What proxies share is worked out once: workloads that select the same policies share
    one compiled ``AuthzPolicy`` (and JWT providers) in a mesh, so the policy filters, the
    "unchanged?" answers and the replaced resources (with their encodings and type
    versions) are remembered per those objects and per the previous content they replace.
    """

    def __init__(
        self, old_mesh: MeshPolicy, new_mesh: MeshPolicy, canonical: Canonical | None = None
    ) -> None:
        self.old_mesh = old_mesh
        self.new_mesh = new_mesh
        self.canonical = canonical
        self._same_authz: dict[tuple[int, int], bool] = {}
        self._same_jwt: dict[tuple[int, int], bool] = {}
        self._same_network: dict[tuple[int, int], bool] = {}
        self._filters: dict[tuple[int, int], _SlotConfigs] = {}
        self._changes: dict[tuple[object, ...], Mapping[str, Mapping[str, Any]] | None] = {}
        self._types: dict[tuple[object, ...], Any] = {}  # for Snapshot.replaced
        self._slot_types: dict[str, dict[str, str]] = {}  # ECDS version → slot → type
        self._alive: list[object] = []  # what the id() keys above name, kept alive

    def snapshot(
        self, workload_ref: str, previous: Snapshot, capture: CaptureMode = CaptureMode.PROCESS
    ) -> Snapshot | None:
        """The sidecar snapshot of ``workload_ref`` under the new mesh from ``previous``
        (its full translation under the old mesh, with listener layout ``capture``), or
        None when it must be translated whole.

        The caller checks that the proxy's registration, workload addresses and endpoint
        readiness are those ``previous`` was built with."""
        old_wp = self.old_mesh.for_workload(workload_ref)
        new_wp = self.new_mesh.for_workload(workload_ref)
        if old_wp is None or new_wp is None or not new_wp.workload.has_sidecar:
            return None
        # Its workload, services, mTLS and egress mode are derived from equal inputs
        # (policies_only_changed): only what the policies compile to can differ.
        if not self._remember(
            self._same_jwt, old_wp.jwt_providers, new_wp.jwt_providers, operator.eq
        ):
            return None
        if self._remember(self._same_authz, old_wp.authz, new_wp.authz, _same_authz_inputs):
            return previous
        slots = previous.get(TYPE_ECDS)
        if not slots:  # no HTTP policy filters (no HTTP port): authz lives in listeners only
            return None
        inbound_routes, tcp_chains = _listener_facts(previous)
        # TCP RBAC sits in the listener (a non-HTTP port's chains, a captured sidecar's
        # passthrough chains).
        if tcp_chains and not self._remember(
            self._same_network, old_wp.authz, new_wp.authz, self._network_rbac_equal
        ):
            return None
        slot_configs = self._slot_configs(new_wp)
        ecds_version = previous.version_of(TYPE_ECDS)
        types = self._slot_types.get(ecds_version)
        if types is None:
            types = self._slot_types[ecds_version] = {
                str(n): _typed_type(r) for n, r in slots.items()
            }
        if slot_configs.types != types:
            return None  # other slots or filter types: the listener changes
        key = (
            id(slot_configs),
            ecds_version,
            previous.version_of(TYPE_ROUTE),
            inbound_routes,
        )
        if key not in self._changes:
            self._changes[key] = _changes(previous, slot_configs, inbound_routes)
        changes = self._changes[key]
        if changes is None:
            return None
        return previous.replaced(changes, self.canonical, self._types)

    def _remember(
        self,
        table: dict[tuple[int, int], bool],
        old: Any,
        new: Any,
        same: Callable[[Any, Any], bool],
    ) -> bool:
        key = (id(old), id(new))
        found = table.get(key)
        if found is None:
            self._alive += (old, new)
            found = table[key] = bool(same(old, new))
        return found

    def _network_rbac_equal(self, old: AuthzPolicy, new: AuthzPolicy) -> bool:
        old_wp = _with_authz(old)
        new_wp = _with_authz(new)
        return network_rbac_filters(old_wp, self.old_mesh, None) == network_rbac_filters(
            new_wp, self.new_mesh, None
        )

    def _slot_configs(self, wp: WorkloadPolicy) -> _SlotConfigs:
        # http_policy_filters reads wp.authz, wp.jwt_providers and the mesh only.
        key = (id(wp.authz), id(wp.jwt_providers))
        found = self._filters.get(key)
        if found is None:
            _, configs = http_policy_filters(wp, self.new_mesh, FilterDelivery.ECDS)
            found = self._filters[key] = _SlotConfigs(configs)
            self._alive += (wp.authz, wp.jwt_providers)
        return found


class _SlotConfigs:
    """The ECDS configs of one policy set, with each slot's filter type."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        self.configs = configs
        self.types = {str(c["name"]): _typed_type(c) for c in configs}


def _typed_type(config: Mapping[str, Any]) -> str:
    typed = config.get("typed_config")
    return str(typed.get("@type")) if isinstance(typed, Mapping) else ""


def _with_authz(authz: AuthzPolicy) -> Any:
    """A stand-in WorkloadPolicy for network_rbac_filters, which reads ``authz`` only."""
    return _AuthzOnly(authz)


class _AuthzOnly:
    __slots__ = ("authz",)

    def __init__(self, authz: AuthzPolicy) -> None:
        self.authz = authz


def _changes(
    previous: Snapshot, slot_configs: _SlotConfigs, inbound_routes: frozenset[str]
) -> Mapping[str, Mapping[str, Any]] | None:
    enabled = slot_switches(slot_configs.configs)
    routes = previous.get(TYPE_ROUTE)
    switched = {}
    for name in sorted(inbound_routes):
        if name not in routes:
            return None
        switched[name] = _with_switches(routes[name], enabled)
    return {
        TYPE_ECDS: {str(c["name"]): c for c in slot_configs.configs},
        TYPE_ROUTE: switched,
    }


def _same_authz_inputs(old: AuthzPolicy, new: AuthzPolicy) -> bool:
    return _authz_inputs(old) == _authz_inputs(new)


def _authz_inputs(authz: AuthzPolicy) -> tuple[object, ...]:
    """What an AuthzPolicy is compiled from (its rule sets compare by identity): the
    policies of each action, in order, with the mesh's trust bundle (equal by then)."""
    actions = (
        authz.custom,
        authz.deny,
        authz.allow,
        authz.audit,
        authz.dry_run_deny,
        authz.dry_run_allow,
    )
    return (
        tuple(tuple(_resource_key(p) for p in a.policies) for a in actions),
        authz.condition_headers,
        authz.reads_host,
    )


def _with_switches(route: Mapping[str, Any], enabled: Mapping[str, Any]) -> dict[str, Any]:
    """An inbound route configuration whose virtual hosts switch on ``enabled`` (as
    ``translate._slots_by_route`` builds them: its hosts carry no switches of their own)."""
    hosts = []
    for host in route.get("virtual_hosts", ()):
        plain = {k: v for k, v in host.items() if k != "typed_per_filter_config"}
        if enabled:
            plain["typed_per_filter_config"] = {k: dict(v) for k, v in enabled.items()}
        hosts.append(plain)
    return {**route, "virtual_hosts": hosts}


def _listener_facts(snapshot: Snapshot) -> tuple[frozenset[str], bool]:
    """The route configurations the snapshot's listeners fetch from an HTTP manager that
    has policy slots (what ``translate._slots_by_route`` moved to RDS), and whether any
    listener has a TCP chain (a ``tcp_proxy`` filter: network RBAC may sit in front)."""
    names: set[str] = set()
    tcp = False
    digests = snapshot.digests(TYPE_LISTENER)
    for name, listener in snapshot.get(TYPE_LISTENER).items():
        routes, has_tcp = _LISTENER_FACTS.get(digests[name], functools.partial(_facts_of, listener))
        names |= routes
        tcp = tcp or has_tcp
    return frozenset(names), tcp


_LISTENER_FACTS: _Lru[str, tuple[frozenset[str], bool]] = _Lru(20_000)  # by listener digest


def prepare(snapshot: Snapshot) -> None:
    """Work out now what the next policy change will ask of ``snapshot`` (its listeners'
    facts): a proxy translated whole — at start, or as it connects — is then patched on
    the first change as cheaply as on later ones (the walk of every listener was most of
    the first change's extra cost)."""
    _listener_facts(snapshot)


def _facts_of(listener: Mapping[str, Any]) -> tuple[frozenset[str], bool]:
    routes = set()
    tcp = False
    for node in _objects(listener):
        if node.get("name") == TCP_PROXY or node.get("@type") == TCP_PROXY_TYPE:
            tcp = True
        if (
            node.get("@type") == HCM_TYPE
            and isinstance(node.get("rds"), Mapping)
            and any(
                isinstance(f, Mapping) and "config_discovery" in f
                for f in node.get("http_filters", ())
            )
        ):
            routes.add(str(node["rds"]["route_config_name"]))
    return frozenset(routes), tcp


def _objects(value: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        yield value
        for item in value.values():
            yield from _objects(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _objects(item)
