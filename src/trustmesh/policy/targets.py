"""``--to NS/NAME``: a workload, or a Service resolved to the workloads it selects.

A client calls a Service, and Envoy enforces policy at whichever workload behind it gets
the request, so a Service name stands for every workload it selects (bookinfo's
``reviews`` → reviews-v1, -v2, -v3): each is decided on its own. A name that is both a
workload and a Service (a Deployment ``httpbin`` behind a Service ``httpbin``) means the
workload, as before. On a miss the error lists what the namespace holds, closest names
first. Pure: reads the snapshot only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from trustmesh.api import models as m
from trustmesh.api.kinds import suggest
from trustmesh.api.snapshot import ConfigSnapshot, Service, Workload
from trustmesh.policy.decision import RequestError
from trustmesh.policy.request import Request

MAX_CANDIDATES = 8


@dataclass(frozen=True, slots=True)
class Target:
    """One workload to decide the request at, with the port and Host a client's call to
    the Service turns into there (None: the workload was named, nothing to translate)."""

    workload: Workload
    port: int | None
    host: str | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    """What ``--to`` named: a workload, or a Service and the workloads behind it."""

    ref: str
    service: Service | None
    service_port: int | None
    targets: tuple[Target, ...]

    @property
    def is_service(self) -> bool:
        return self.service is not None


def resolve_destination(snapshot: ConfigSnapshot, ref: str, port: int | None) -> Destination:
    """The workload(s) ``ref`` names. ``port``: the workload's port for a workload, the
    Service port (or one of its target ports) for a Service."""
    namespace, slash, name = ref.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise RequestError(f"--to takes NAMESPACE/NAME, got {ref!r}")
    workload = snapshot.workload(ref)
    if workload is not None:
        return Destination(ref, None, None, (_workload_target(snapshot, workload, port),))
    service = next(
        (s for s in snapshot.services if s.namespace == namespace and s.name == name), None
    )
    if service is None:
        raise RequestError(_miss(snapshot, namespace, name))
    selected = [w for w in snapshot.workloads if service.selects(w)]
    if not selected:
        selector = ", ".join(f"{k}={v}" for k, v in service.selector.items()) or "none"
        raise RequestError(
            f"Service {ref} selects no workload (selector: {selector}): a request to it "
            "has no endpoint to reach"
        )
    service_port, target_ports = _ports(service, port)
    targets = []
    for w in _unique(selected):
        target_port = _target_port(w, target_ports) if target_ports is not None else None
        host = f"{service.name}.{service.namespace}:{service_port}"
        targets.append(Target(w, target_port, host))
    return Destination(ref, service, service_port, tuple(targets))


def _workload_target(snapshot: ConfigSnapshot, workload: Workload, port: int | None) -> Target:
    """A port the workload does not declare but a Service selecting it serves is that
    Service's port (``--to foo/httpbin --port 8000`` with Istio's sample: 8000 → 8080)."""
    if port is None or port in workload.ports:
        return Target(workload, port)
    for service in snapshot.services_of(workload):
        for sp in service.ports:
            if sp.port == port:
                target = _target_port(workload, sp.target_port)
                host = f"{service.name}.{service.namespace}:{sp.port}"
                return Target(workload, target, host)
    return Target(workload, port)


def request_to(request: Request, target: Target) -> Request:
    """``request`` sent through the Service to ``target``: its port and, unless the user
    gave one, the Host a client calling the Service sends."""
    http = request.http
    if http is not None and http.host is None and target.host is not None:
        http = dataclasses.replace(http, host=target.host)
    return dataclasses.replace(
        request, destination=target.workload.ref, port=target.port, http=http
    )


def _unique(workloads: Sequence[Workload]) -> list[Workload]:
    """One entry per NS/NAME (a Pod and its Deployment may share a name, as in lookups),
    and a Deployment whose Pods are in the input is left to them: the running pods (with
    the sidecar a dump shows) are what the request reaches."""
    seen: dict[str, Workload] = {}
    for w in workloads:
        seen.setdefault(w.ref, w)
    pods = [w for w in seen.values() if w.kind == "Pod"]

    def has_pods(controller: Workload) -> bool:
        return any(
            p.namespace == controller.namespace
            and p.service_account == controller.service_account
            and controller.labels.items() <= p.labels.items()
            for p in pods
        )

    return [w for w in seen.values() if w.kind in ("Pod", "WorkloadEntry") or not has_pods(w)]


def _ports(service: Service, port: int | None) -> tuple[int, int | str | None]:
    """(service port, target port) for the port a user gave; target None: none declared."""
    if not service.ports:
        if port is None:
            raise RequestError(f"Service {service.namespace}/{service.name} declares no ports")
        return port, port
    if port is None:
        if len(service.ports) == 1:
            only = service.ports[0]
            return only.port, only.target_port
        raise RequestError(
            f"Service {service.namespace}/{service.name} serves {_describe(service)}: give --port"
        )
    for sp in service.ports:
        if sp.port == port:
            return sp.port, sp.target_port
    for sp in service.ports:
        if sp.target_port == port:
            return sp.port, sp.target_port
    raise RequestError(
        f"Service {service.namespace}/{service.name} has no port {port}; "
        f"it serves {_describe(service)}"
    )


def _describe(service: Service) -> str:
    parts = []
    for sp in service.ports:
        target = "" if sp.target_port == sp.port else f" (→ {sp.target_port})"
        parts.append(f"{sp.port}{target}")
    return "ports " + ", ".join(parts)


def _target_port(workload: Workload, target: int | str | None) -> int | None:
    """A named target port is looked up among the workload's container ports."""
    if isinstance(target, int) or target is None:
        return target
    for name, number in named_ports(workload):
        if name == target:
            return number
    raise RequestError(
        f"{workload.ref} has no container port named {target!r} (the Service's targetPort)"
    )


def named_ports(workload: Workload) -> list[tuple[str, int]]:
    """The workload's named ports (container ports, WorkloadEntry ports): a Service's
    named targetPort resolves among them."""
    spec = workload.resource.spec
    if isinstance(spec, m.WorkloadEntrySpec):
        return list(spec.ports.items())
    pod: m.PodSpec | None = None
    if isinstance(spec, m.PodObject):
        pod = spec.spec
    elif isinstance(spec, m.WorkloadControllerSpec):
        pod = spec.template.spec
    if pod is None:
        return []
    return [(p.name, p.container_port) for c in pod.containers for p in c.ports if p.name]


def _miss(snapshot: ConfigSnapshot, namespace: str, name: str) -> str:
    kinds: dict[str, list[str]] = {}
    for w in snapshot.workloads:
        if w.namespace == namespace:
            kinds.setdefault(w.name, []).append("workload")
    for s in snapshot.services:
        if s.namespace == namespace:
            kinds.setdefault(s.name, []).append("Service")
    head = f"no workload or Service {namespace}/{name}"
    if not kinds:
        namespaces = sorted(
            {w.namespace for w in snapshot.workloads} | {s.namespace for s in snapshot.services}
        )
        if not namespaces:
            return f"{head}: the configuration has no workloads or Services"
        closest = suggest(namespace, namespaces, MAX_CANDIDATES)
        return f"{head}: namespace {namespace} has none; namespaces with some: " + ", ".join(
            closest
        )
    names = suggest(name, list(kinds), MAX_CANDIDATES)
    listed = ", ".join(f"{namespace}/{n} ({' and '.join(dict.fromkeys(kinds[n]))})" for n in names)
    more = len(kinds) - len(names)
    tail = f" and {more} more" if more > 0 else ""
    return f"{head}; in {namespace}, closest first: {listed}{tail}"


__all__ = ["Destination", "Target", "request_to", "resolve_destination"]
