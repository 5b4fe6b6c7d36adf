"""Which DestinationRule applies, and which of its ``tls`` settings a cluster uses.

Istio's lookup: the client's namespace, then the service's (or ServiceEntry's), then the
root namespace, among the rules exported to the client (its own namespace's always); an
exact host before a wildcard, then the oldest. Within the winning rule, a port-level
``tls`` over the rule's, a subset's own setting over the rule's. Remembered per compiled
mesh; nothing here decides a mode, see :mod:`trustmesh.policy.upstream_tls`.
"""

from __future__ import annotations

from typing import Any

from trustmesh.api import models as m
from trustmesh.api.gateway import exported_to
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import Service
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.derived import Derived


def destination_rule_for(
    mesh: MeshPolicy, client_namespace: str, service: Service
) -> Resource[Any] | None:
    """The DestinationRule that wins for this client namespace and service: the client's
    namespace, the service's, the root namespace, among the rules exported to the client
    (``exportTo``; its own namespace's always); exact host before wildcard, then the oldest
    (remembered per mesh)."""
    chosen = _CHOSEN_RULES.table(mesh)
    key = (client_namespace, service.namespace, service.name)
    if key in chosen:
        return chosen[key]
    index = _DR_INDEX.get(mesh, None)
    root = mesh.snapshot.mesh.root_namespace
    result = None
    for namespace in dict.fromkeys((client_namespace, service.namespace, root)):
        exact, wildcards = index.get(namespace, ({}, []))
        matching = [
            r
            for r in exact.get(service.hostname, [])
            + [r for r in wildcards if _host_matches(r, service)]
            if _visible(r, client_namespace)
        ]
        if matching:
            result = min(matching, key=lambda r: (r.spec.host.startswith("*"), r.age_key()))
            break
    chosen[key] = result
    return result


def _visible(rule: Resource[Any], client_namespace: str) -> bool:
    """istiod's DestinationRule visibility: a proxy sees every rule of its own namespace,
    and another namespace's rule when its ``exportTo`` reaches the proxy's namespace."""
    return rule.namespace == client_namespace or exported_to(rule, client_namespace)


_DrIndex = dict[str, tuple[dict[str, list[Resource[Any]]], list[Resource[Any]]]]


def _index_destination_rules(mesh: MeshPolicy, _: None) -> _DrIndex:
    """Per namespace: DestinationRules by the FQDN they name, and wildcard ones."""
    index: _DrIndex = {}
    for rule in mesh.snapshot.of_kind("DestinationRule"):
        exact, wildcards = index.setdefault(rule.namespace, ({}, []))
        host: str = rule.spec.host
        if host.startswith("*"):
            wildcards.append(rule)
            continue
        parts = host.split(".")
        if len(parts) == 1:
            host = f"{host}.{rule.namespace}.svc.cluster.local"
        elif len(parts) == 2:
            host = f"{host}.svc.cluster.local"
        exact.setdefault(host, []).append(rule)
    return index


_DR_INDEX: Derived[MeshPolicy, None, _DrIndex] = Derived("dr index", _index_destination_rules)


# (client namespace, service namespace, service name) → the DestinationRule that wins.
_CHOSEN_RULES: Derived[MeshPolicy, tuple[str, str, str], Resource[Any] | None] = Derived(
    "chosen destination rules"
)


def _host_matches(rule: Resource[Any], service: Service) -> bool:
    host: str = rule.spec.host
    fqdn = service.hostname
    if host == "*" or host == fqdn:
        return True
    if host.startswith("*."):
        return fqdn.endswith(host[1:])
    parts = host.split(".")
    if len(parts) == 1:
        return f"{host}.{rule.namespace}.svc.cluster.local" == fqdn
    if len(parts) == 2:
        return f"{host}.svc.cluster.local" == fqdn
    return False


def destination_rule_tls(
    mesh: MeshPolicy, client_namespace: str, service: Service, service_port: int | None
) -> tuple[Resource[Any], m.ClientTlsSettings] | None:
    """The DestinationRule TLS setting a client in ``client_namespace`` uses, if any."""
    rule = destination_rule_for(mesh, client_namespace, service)
    found = _rule_tls_setting(rule, service_port) if rule is not None else None
    return (rule, found[0]) if rule is not None and found is not None else None


def destination_subsets(
    mesh: MeshPolicy, client_namespace: str, service: Service
) -> tuple[m.Subset, ...]:
    """The subsets of the DestinationRule a client in ``client_namespace`` uses for
    ``service`` (Istio builds a cluster per subset, routed to or not)."""
    rule = destination_rule_for(mesh, client_namespace, service)
    return rule.spec.subsets if rule is not None else ()


def rule_subset(rule: Resource[Any] | None, name: str) -> m.Subset | None:
    if rule is None or not name:
        return None
    subsets: tuple[m.Subset, ...] = rule.spec.subsets
    return next((s for s in subsets if s.name == name), None)


FieldPath = tuple[str | int, ...]


def cluster_tls_setting(
    rule: Resource[Any] | None, port: int | None, subset_name: str
) -> tuple[m.ClientTlsSettings, FieldPath] | None:
    """The DestinationRule TLS setting of the port's cluster, with its field path; for a
    subset, the subset's own (its port-level entry for the port wholesale, else its
    top-level ``tls``) when it sets one, else the rule's."""
    if rule is None:
        return None
    inherited = _rule_tls_setting(rule, port)
    subset = rule_subset(rule, subset_name)
    if subset is None or subset.traffic_policy is None:
        return inherited
    policy = subset.traffic_policy
    index = rule.spec.subsets.index(subset)
    base: FieldPath = ("subsets", index, "trafficPolicy")
    for i, level in enumerate(policy.port_level_settings):
        if level.port is not None and level.port.number == port:
            if level.tls is None:
                return None
            return level.tls, (*base, "portLevelSettings", i, "tls")
    if policy.tls is not None:
        return policy.tls, (*base, "tls")
    return inherited


def _rule_tls_setting(
    rule: Resource[Any], port: int | None
) -> tuple[m.ClientTlsSettings, FieldPath] | None:
    policy: m.TrafficPolicy | None = rule.spec.traffic_policy
    if policy is None:
        return None
    for i, level in enumerate(policy.port_level_settings):
        if level.port is not None and level.port.number == port and level.tls:
            return level.tls, ("trafficPolicy", "portLevelSettings", i, "tls")
    return (policy.tls, ("trafficPolicy", "tls")) if policy.tls is not None else None


def origination_rule(
    mesh: MeshPolicy, client_namespace: str, entry_namespace: str, host: str
) -> Resource[Any] | None:
    """The DestinationRule a proxy of ``client_namespace`` uses for ServiceEntry host
    ``host``: its own namespace, the entry's, the root namespace; exact before wildcard,
    then the oldest; ``exportTo`` honoured (its own namespace's rules always apply).
    Remembered per mesh: every sidecar asks it for every ServiceEntry host."""
    return _ORIGINATION_RULES.get(mesh, (client_namespace, entry_namespace, host))


def _origination_rule(mesh: MeshPolicy, key: tuple[str, str, str]) -> Resource[Any] | None:
    client_namespace, entry_namespace, host = key
    root = mesh.snapshot.mesh.root_namespace
    exact, wildcards = _ENTRY_RULE_INDEX.get(mesh, None)
    rules: list[Resource[Any]] = [
        r
        for r in (*exact.get(host, ()), *wildcards)
        if _entry_rule_matches(r.spec.host, host) and _visible(r, client_namespace)
    ]
    for namespace in dict.fromkeys((client_namespace, entry_namespace, root)):
        here = [r for r in rules if r.namespace == namespace]
        if here:
            return min(here, key=lambda r: (str(r.spec.host).startswith("*"), r.age_key()))
    return None


_ORIGINATION_RULES: Derived[MeshPolicy, tuple[str, str, str], Resource[Any] | None] = Derived(
    "origination rules", _origination_rule
)


_EntryRuleIndex = tuple[dict[str, list[Resource[Any]]], list[Resource[Any]]]


def _entry_rule_index(mesh: MeshPolicy, _: None) -> _EntryRuleIndex:
    """DestinationRules by the host they name as written (lowercase), and the wildcard
    ones: what :func:`origination_rule` looks a ServiceEntry host up in."""
    exact: dict[str, list[Resource[Any]]] = {}
    wildcards: list[Resource[Any]] = []
    for rule in mesh.snapshot.of_kind("DestinationRule"):
        host = str(rule.spec.host).lower()
        if host.startswith("*"):
            wildcards.append(rule)
        else:
            exact.setdefault(host, []).append(rule)
    return exact, wildcards


_ENTRY_RULE_INDEX: Derived[MeshPolicy, None, _EntryRuleIndex] = Derived(
    "entry rule index", _entry_rule_index
)


def _entry_rule_matches(pattern: str, host: str) -> bool:
    pattern = pattern.lower()
    if pattern in ("*", host):
        return True
    return pattern.startswith("*.") and host.endswith(pattern[1:])
