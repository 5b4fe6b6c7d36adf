"""Which DestinationRule ``connectionPool`` and ``outlierDetection`` apply to one cluster (pure).

Istio's semantics (``pilot/pkg/networking/core/cluster_traffic_policy.go``,
``util.MergeSubsetTrafficPolicy``):

* a ``portLevelSettings`` entry for the cluster's port replaces the top-level policy
  wholesale: a field it omits falls back to the default, it is not inherited;
* a subset's policy (itself resolved per port the same way) overrides the destination's
  field by field — and entirely when the subset has settings for this port.

The rule is the one client TLS is read from (:mod:`trustmesh.policy.destination_rules`);
the result is a :class:`ClusterTrafficPolicy` value that ``trustmesh.xds.traffic_policy``
maps to Envoy.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh.api import models as m
from trustmesh.api import traffic as t
from trustmesh.api.snapshot import Service
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.destination_rules import destination_rule_for, origination_rule

__all__ = [
    "ClusterTrafficPolicy",
    "cluster_traffic_policy",
    "origination_traffic_policy",
    "service_traffic_policy",
]


@dataclass(frozen=True, slots=True)
class ClusterTrafficPolicy:
    """The parts of a DestinationRule's traffic policy that apply to one cluster."""

    connection_pool: t.ConnectionPoolSettings | None = None
    outlier_detection: t.OutlierDetection | None = None

    @property
    def is_empty(self) -> bool:
        return self.connection_pool is None and self.outlier_detection is None


def _port_level(
    policy: m.TrafficPolicy | None, port: int | None
) -> tuple[ClusterTrafficPolicy | None, bool]:
    """The policy for ``port``: a matching port-level entry wholesale, else the top level."""
    if policy is None:
        return None, False
    if port is not None:
        for level in policy.port_level_settings:
            if level.port is not None and level.port.number == port:
                return ClusterTrafficPolicy(level.connection_pool, level.outlier_detection), True
    return ClusterTrafficPolicy(policy.connection_pool, policy.outlier_detection), False


def cluster_traffic_policy(
    rule: m.DestinationRuleSpec | None, port: int | None, subset: str | None = None
) -> ClusterTrafficPolicy:
    """What ``rule`` sets for the cluster of ``port`` (and ``subset``, when one is named)."""
    if rule is None:
        return ClusterTrafficPolicy()
    destination, _ = _port_level(rule.traffic_policy, port)
    chosen = next((s for s in rule.subsets if s.name == subset), None) if subset else None
    if chosen is None or chosen.traffic_policy is None:
        return destination or ClusterTrafficPolicy()
    own, has_port_level = _port_level(chosen.traffic_policy, port)
    assert own is not None
    if destination is None:
        return own
    pool = destination.connection_pool
    if own.connection_pool is not None or has_port_level:
        pool = own.connection_pool
    outlier = destination.outlier_detection
    if own.outlier_detection is not None or has_port_level:
        outlier = own.outlier_detection
    return ClusterTrafficPolicy(pool, outlier)


def service_traffic_policy(
    mesh: MeshPolicy, client_namespace: str, service: Service, port: int, subset: str = ""
) -> ClusterTrafficPolicy:
    """The policy of the DestinationRule a client in ``client_namespace`` uses for the
    service's ``port`` cluster (its ``subset`` one, when named): the rule its TLS setting
    comes from."""
    rule = destination_rule_for(mesh, client_namespace, service)
    return cluster_traffic_policy(rule.spec if rule is not None else None, port, subset or None)


def origination_traffic_policy(
    mesh: MeshPolicy,
    proxy_namespace: str,
    entry_namespace: str,
    host: str,
    port: int,
    subset: str = "",
) -> ClusterTrafficPolicy | None:
    """The policy of a gateway's or sidecar's cluster to ServiceEntry ``host``:``port``
    (its ``subset`` one, when named); None when no DestinationRule names the host (the
    rule its TLS origination comes from)."""
    rule = origination_rule(mesh, proxy_namespace, entry_namespace, host)
    return cluster_traffic_policy(rule.spec, port, subset or None) if rule is not None else None
