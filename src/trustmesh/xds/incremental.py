"""Rebuild only what a configuration change can affect (pure).

A fleet's reload used to translate, encode and check every proxy's whole snapshot even
when the change was one AuthorizationPolicy. Here a new compiled mesh is compared with
the one the published snapshots were built from:

* :func:`policies_only_changed` — the two meshes differ at most in AuthorizationPolicies
  and RequestAuthentications (every other resource, the mesh config, the workloads,
  services and namespaces are equal, and no EnvoyFilter can patch the result). Anything
  else rebuilds every proxy, as before.
* :func:`patched_snapshot` — then, per sidecar, what translation reads of those policies
  is the workload's own :class:`~trustmesh.policy.compose.WorkloadPolicy` ``authz`` and
  ``jwt_providers``: a proxy whose ``authz`` and JWT providers are equal keeps its
  snapshot (same versions: no push); one whose ``authz`` changed but whose listener would
  not (the same policy slots and the same TCP RBAC) gets its previous snapshot with only
  the extension configs (ECDS) and the slot switches of its inbound route configurations
  (RDS) re-translated — its listeners and clusters keep their encodings and versions.
  Anything else (new slots, TCP rules, JWT providers, a gateway) is translated whole.

``tests/xds/test_incremental.py`` proves the result equal, version for version, to a full
rebuild over generated changes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from trustmesh.envoy_json import HCM_TYPE
from trustmesh.policy.compose import AuthzPolicy, MeshPolicy
from trustmesh.xds.cache import TYPE_ECDS, TYPE_LISTENER, TYPE_ROUTE, Canonical, Snapshot, _Lru
from trustmesh.xds.inbound import inbound_ports
from trustmesh.xds.outbound import Protocol
from trustmesh.xds.rbac import network_rbac_filters
from trustmesh.xds.translate import (
    CaptureMode,
    FilterDelivery,
    http_policy_filters,
    slot_switches,
)

__all__ = ["POLICY_KINDS", "patched_snapshot", "policies_only_changed"]

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
    )


def policies_only_changed(old: MeshPolicy, new: MeshPolicy) -> bool:
    """Whether ``new`` differs from ``old`` at most in :data:`POLICY_KINDS` resources and
    what they compile to, with no EnvoyFilter anywhere (a patch may touch anything)."""
    if old is new:
        return True
    a, b = old.snapshot, new.snapshot
    if (
        old.bundle != new.bundle
        or old.path_normalization != new.path_normalization
        or old.extension_providers != new.extension_providers
        or a.mesh != b.mesh
        or a.mesh_layers != b.mesh_layers
        or a.workloads != b.workloads
        or a.services != b.services
        or a.namespace_labels != b.namespace_labels
        or old.workloads.keys() != new.workloads.keys()
    ):
        return False
    if any(True for _ in b.of_kind("EnvoyFilter")) or any(True for _ in a.of_kind("EnvoyFilter")):
        return False
    rest_a = [_resource_key(r) for r in a.resources if r.kind not in POLICY_KINDS]
    rest_b = [_resource_key(r) for r in b.resources if r.kind not in POLICY_KINDS]
    return rest_a == rest_b


def patched_snapshot(
    old_mesh: MeshPolicy,
    new_mesh: MeshPolicy,
    workload_ref: str,
    previous: Snapshot,
    canonical: Canonical | None = None,
    capture: CaptureMode = CaptureMode.PROCESS,
) -> Snapshot | None:
    """The sidecar snapshot of ``workload_ref`` under ``new_mesh`` from ``previous`` (its
    full translation under ``old_mesh``, with listener layout ``capture``), or None when
    it must be translated whole.

    Only valid when :func:`policies_only_changed` holds for the two meshes and the proxy's
    registration, workload addresses and endpoint readiness are those ``previous`` was
    built with (the caller checks)."""
    old_wp = old_mesh.for_workload(workload_ref)
    new_wp = new_mesh.for_workload(workload_ref)
    if old_wp is None or new_wp is None or not new_wp.workload.has_sidecar:
        return None
    if (
        old_wp.workload != new_wp.workload
        or old_wp.mtls != new_wp.mtls
        or old_wp.egress_mode != new_wp.egress_mode
        or old_wp.services != new_wp.services
        or old_wp.jwt_providers != new_wp.jwt_providers
    ):
        return None
    if _authz_inputs(old_wp.authz) == _authz_inputs(new_wp.authz):
        return previous
    slots = previous.get(TYPE_ECDS)
    if not slots:  # no HTTP policy filters (no HTTP port): authz lives in listeners only
        return None
    # TCP RBAC sits in the listener: on a non-HTTP port's chains, and on the passthrough
    # chains of a captured sidecar.
    tcp_chains = capture is CaptureMode.TRANSPARENT or any(
        p.protocol is not Protocol.HTTP for p in inbound_ports(new_wp)
    )
    if tcp_chains and network_rbac_filters(old_wp, old_mesh, None) != network_rbac_filters(
        new_wp, new_mesh, None
    ):
        return None
    old_filters, _ = http_policy_filters(old_wp, old_mesh, FilterDelivery.ECDS)
    filters, configs = http_policy_filters(new_wp, new_mesh, FilterDelivery.ECDS)
    if filters != old_filters or {str(c["name"]) for c in configs} != set(slots):
        return None  # other slots: the listener changes
    enabled = slot_switches(configs)
    routes = previous.get(TYPE_ROUTE)
    switched = {}
    for name in _inbound_routes(previous):
        if name not in routes:
            return None
        switched[name] = _with_switches(routes[name], enabled)
    return previous.replaced(
        {TYPE_ECDS: {str(c["name"]): c for c in configs}, TYPE_ROUTE: switched}, canonical
    )


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


def _inbound_routes(snapshot: Snapshot) -> frozenset[str]:
    """Route configurations the snapshot's listeners fetch from an HTTP manager that has
    policy slots (what ``translate._slots_by_route`` moved to RDS)."""
    names: set[str] = set()
    digests = snapshot.digests(TYPE_LISTENER)
    for name, listener in snapshot.get(TYPE_LISTENER).items():
        names |= _slot_routes_of(digests[name], listener)
    return frozenset(names)


_SLOT_ROUTES: _Lru[str, frozenset[str]] = _Lru(20_000)  # listener digest → route names


def _slot_routes_of(digest: str, listener: Mapping[str, Any]) -> frozenset[str]:
    def compute() -> frozenset[str]:
        return frozenset(
            str(node["rds"]["route_config_name"])
            for node in _objects(listener)
            if node.get("@type") == HCM_TYPE
            and isinstance(node.get("rds"), Mapping)
            and any(
                isinstance(f, Mapping) and "config_discovery" in f
                for f in node.get("http_filters", ())
            )
        )

    return _SLOT_ROUTES.get(digest, compute)


def _objects(value: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        yield value
        for item in value.values():
            yield from _objects(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _objects(item)
