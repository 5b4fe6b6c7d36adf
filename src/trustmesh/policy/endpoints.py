"""Services and their endpoints: which workloads a Service selects, and which Service (and
service port) a client reaches a workload's port through. Remembered per compiled mesh.
"""

from __future__ import annotations

from trustmesh.api.snapshot import Service, Workload
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.derived import Derived
from trustmesh.policy.targets import named_ports


def service_workloads(mesh: MeshPolicy, service: Service) -> list[Workload]:
    """The workloads ``service`` selects (its endpoints), by reference."""
    # Every proxy asks this about every service: computed once per compiled mesh, over
    # the workloads of the service's namespace only.
    endpoints = _SERVICE_ENDPOINTS.table(mesh)
    key = (service.namespace, service.name)
    found = endpoints.get(key)
    if found is not None:
        return found
    by_label = _WORKLOADS_BY_LABEL.get(mesh, None)
    by_ref: dict[str, Workload] = {}
    if service.selector:  # an empty selector selects nothing
        first = min(service.selector.items())
        for workload in by_label.get((service.namespace, *first), ()):
            if service.selects(workload):
                by_ref.setdefault(workload.ref, workload)
    found = endpoints[key] = [by_ref[ref] for ref in sorted(by_ref)]
    return found


def _workloads_by_label(mesh: MeshPolicy, _: None) -> dict[tuple[str, str, str], list[Workload]]:
    """(namespace, label, value) → the workloads carrying that label."""
    by_label: dict[tuple[str, str, str], list[Workload]] = {}
    for workload in mesh.snapshot.workloads:
        for label in workload.labels.items():
            by_label.setdefault((workload.namespace, *label), []).append(workload)
    return by_label


_WORKLOADS_BY_LABEL: Derived[MeshPolicy, None, dict[tuple[str, str, str], list[Workload]]] = (
    Derived("workloads by label", _workloads_by_label)
)


# (namespace, name) of a Service → the workloads it selects, by ref.
_SERVICE_ENDPOINTS: Derived[MeshPolicy, tuple[str, str], list[Workload]] = Derived(
    "service endpoints"
)


def service_for(target: WorkloadPolicy, port: int) -> tuple[Service | None, int | None]:
    """The Service (and its port) a client reaches ``port`` of the workload through."""
    fallback: Service | None = None
    named: dict[str, int] | None = None
    for service in target.services:
        fallback = fallback or service
        for sp in service.ports:
            number: int | None
            if sp.target_port is None:
                number = sp.port
            elif isinstance(sp.target_port, str):  # named: the workload's container port
                if named is None:
                    named = dict(named_ports(target.workload))
                number = named.get(sp.target_port)
            else:
                number = sp.target_port
            if number == port:
                return service, sp.port
    return fallback, None
