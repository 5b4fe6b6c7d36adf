"""Endpoints of pods that are not ready are taken out of every proxy's configuration (pure).

Kubernetes lists a pod in its Services' endpoints only while the pod is Ready, and istiod
builds EDS from that: a pod whose app exited (and is waiting to be restarted) gets no
traffic. Istio's newest releases send such endpoints marked ``UNHEALTHY`` with Envoy's
panic threshold off, which routes exactly as leaving them out does — what this does.

The translation names each endpoint's workload in ``metadata.filter_metadata.trustmesh``;
:class:`EndpointFilter` drops the endpoints of the workloads it is given from every cluster
(``load_assignment``) and load assignment resource. Translated resources are shared
between proxies and read-only: changed ones are copies, made once per build.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["EndpointFilter", "endpoint_workload"]

_LOAD_ASSIGNMENT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def endpoint_workload(lb_endpoint: Mapping[str, Any]) -> str | None:
    """The workload (``namespace/name``) an ``lb_endpoints`` entry belongs to, if named."""
    metadata = lb_endpoint.get("metadata", {}).get("filter_metadata", {}).get("trustmesh", {})
    workload = metadata.get("workload") if isinstance(metadata, Mapping) else None
    return workload if isinstance(workload, str) else None


class EndpointFilter:
    """Drops the endpoints of ``not_ready`` workloads; one instance per build (it keeps the
    copies it made, so a cluster shared by many proxies is filtered once)."""

    def __init__(self, not_ready: Iterable[str]) -> None:
        self.not_ready = frozenset(not_ready)
        # id(original) → (original, filtered): holding the original keeps its id unique.
        self._done: dict[int, tuple[Mapping[str, Any], Mapping[str, Any]]] = {}

    def apply(self, resources: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        resources = list(resources)
        if not self.not_ready:
            return resources
        return [self._filtered(resource) for resource in resources]

    def _filtered(self, resource: Mapping[str, Any]) -> Mapping[str, Any]:
        found = self._done.get(id(resource))
        if found is None:
            found = self._done[id(resource)] = (resource, self._filter(resource))
        return found[1]

    def _filter(self, resource: Mapping[str, Any]) -> Mapping[str, Any]:
        if resource.get("@type") == _LOAD_ASSIGNMENT_TYPE:
            return self._assignment(resource)
        assignment = resource.get("load_assignment")
        if not isinstance(assignment, Mapping):
            return resource
        kept = self._assignment(assignment)
        return resource if kept is assignment else {**resource, "load_assignment": kept}

    def _assignment(self, assignment: Mapping[str, Any]) -> Mapping[str, Any]:
        groups = assignment.get("endpoints")
        if not isinstance(groups, list):
            return assignment
        changed = False
        kept_groups = []
        for group in groups:
            endpoints = group.get("lb_endpoints", []) if isinstance(group, Mapping) else []
            kept = [e for e in endpoints if endpoint_workload(e) not in self.not_ready]
            if len(kept) != len(endpoints):
                changed = True
                if kept:
                    kept_groups.append({**group, "lb_endpoints": kept})
            else:
                kept_groups.append(group)
        return {**assignment, "endpoints": kept_groups} if changed else assignment
