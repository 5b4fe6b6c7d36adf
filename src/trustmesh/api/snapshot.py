"""ConfigSnapshot: the whole input as one immutable value the policy layer reads.

Built from a :class:`LoadResult` (pure). It resolves what Istio resolves before any
policy is looked at: the mesh config (IstioOperator < ConfigMap ``istio`` < an explicit
mesh-config file), the workloads (Pods, pod templates, WorkloadEntries) with how each takes
part in the mesh (:mod:`trustmesh.api.dataplane`), and the services that select them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from trustmesh.api import models as m
from trustmesh.api.dataplane import INJECT as INJECT  # re-exported for the checks
from trustmesh.api.dataplane import (
    Dataplane,
    InjectionSettings,
    MeshMode,
    PodFacts,
    classify,
    running_pods_mode,
)
from trustmesh.api.diagnostics import Diagnostic, Location, error, warning
from trustmesh.api.loader import LoadResult, validate_model
from trustmesh.api.resources import Resource
from trustmesh.api.yamldoc import YamlDocument, parse_yaml

_CONTROLLERS = ("Deployment", "StatefulSet", "DaemonSet")


@dataclass(frozen=True, slots=True)
class Workload:
    """A running instance's identity and labels, as policy selection sees it."""

    namespace: str
    name: str
    kind: str
    labels: Mapping[str, str]
    service_account: str
    dataplane: Dataplane
    ports: tuple[int, ...]
    ip: str | None
    resource: Resource[Any] = field(repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def has_sidecar(self) -> bool:
        """An injected istio-proxy enforces this workload's inbound policy (not a gateway,
        not ambient, not unknown)."""
        return self.dataplane.mode is MeshMode.SIDECAR

    def principal(self, trust_domain: str) -> str:
        """SPIFFE ID without ``spiffe://``, the form AuthorizationPolicy principals use."""
        return f"{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


@dataclass(frozen=True, slots=True)
class ServicePortInfo:
    port: int
    target_port: int | str
    name: str
    protocol: str


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    selector: Mapping[str, str]
    ports: tuple[ServicePortInfo, ...]

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    def selects(self, workload: Workload) -> bool:
        return (
            bool(self.selector)
            and workload.namespace == self.namespace
            and all(workload.labels.get(k) == v for k, v in self.selector.items())
        )


@dataclass(frozen=True, slots=True)
class MeshLayer:
    """One place mesh config came from: an IstioOperator, the ConfigMap, a file."""

    body: Mapping[str, Any]
    document: YamlDocument = field(repr=False, compare=False)
    path: tuple[str | int, ...] = ()


@dataclass(frozen=True, slots=True)
class ConfigSnapshot:
    """Every resource of the input, typed, plus the derived mesh, workloads and services."""

    mesh: m.MeshConfigModel
    resources: tuple[Resource[Any], ...]
    workloads: tuple[Workload, ...]
    services: tuple[Service, ...]
    namespace_labels: Mapping[str, Mapping[str, str]]
    diagnostics: tuple[Diagnostic, ...] = ()
    mesh_layers: tuple[MeshLayer, ...] = ()
    # Documents a later one with the same kind/namespace/name replaced: never enforced,
    # still validated (the cluster's webhook would have refused them when applied).
    replaced: tuple[Resource[Any], ...] = field(default=(), repr=False, compare=False)
    _by_kind: Mapping[str, tuple[Resource[Any], ...]] = field(
        default_factory=dict, repr=False, compare=False
    )
    _by_ref: Mapping[str, Workload] = field(default_factory=dict, repr=False, compare=False)
    _services_by_ns: Mapping[str, tuple[Service, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )
    _services_by_label: Mapping[tuple[str, str, str], tuple[Service, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )
    _service_position: Mapping[int, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_kind: dict[str, list[Resource[Any]]] = {}
        for r in self.resources:
            by_kind.setdefault(r.kind, []).append(r)
        object.__setattr__(self, "_by_kind", {k: tuple(v) for k, v in by_kind.items()})
        by_ref: dict[str, Workload] = {}
        for w in self.workloads:
            by_ref.setdefault(w.ref, w)  # a Pod and its Deployment may share a name
        object.__setattr__(self, "_by_ref", by_ref)
        services: dict[str, list[Service]] = {}
        for service in self.services:
            services.setdefault(service.namespace, []).append(service)
        object.__setattr__(self, "_services_by_ns", {k: tuple(v) for k, v in services.items()})
        by_label: dict[tuple[str, str, str], list[Service]] = {}
        for service in self.services:
            if service.selector:  # an empty selector selects nothing
                key, value = min(service.selector.items())
                by_label.setdefault((service.namespace, key, value), []).append(service)
        object.__setattr__(self, "_services_by_label", {k: tuple(v) for k, v in by_label.items()})
        positions = {id(s): i for i, s in enumerate(self.services)}
        object.__setattr__(self, "_service_position", positions)

    def of_kind(self, kind: str) -> tuple[Resource[Any], ...]:
        return self._by_kind.get(kind, ())

    def workload(self, ref: str) -> Workload | None:
        return self._by_ref.get(ref)

    def mesh_location(self, *path: str) -> Location | None:
        """Where a mesh config field was set (the last layer that sets it), if anywhere."""
        for layer in reversed(self.mesh_layers):
            value: Any = layer.body
            for part in path:
                if not isinstance(value, dict) or part not in value:
                    break
                value = value[part]
            else:
                return layer.document.location((*layer.path, *path))
        return None

    def services_of(self, workload: Workload) -> tuple[Service, ...]:
        # Only services whose first selector label the workload carries can select it:
        # a fleet of N workloads and N services costs N lookups, not N × N matches.
        index = self._services_by_label
        candidates = {
            id(s): s
            for key, value in workload.labels.items()
            for s in index.get((workload.namespace, key, value), ())
        }
        # In the namespace's order (that of self.services), without scanning it per workload.
        position = self._service_position
        found = sorted(candidates.values(), key=lambda s: position[id(s)])
        return tuple(s for s in found if s.selects(workload))


def build_snapshot(
    loaded: LoadResult,
    mesh_documents: tuple[YamlDocument, ...] = (),
    *,
    assume_injected: bool = False,
) -> ConfigSnapshot:
    """Resolve mesh config, workloads and services. ``mesh_documents``: --mesh-config files.

    ``assume_injected``: workloads whose namespace is not among the inputs (so its
    injection labels are unknown) are taken to have a sidecar, not left unknown.
    """
    problems: list[Diagnostic] = []
    mesh, layers = _mesh_config(loaded.resources, mesh_documents, problems)
    namespaces = {r.name: dict(r.labels) for r in loaded.resources if r.kind == "Namespace"}
    settings = _injection_settings(loaded)
    workloads = tuple(_workloads(loaded.resources, namespaces, settings, assume_injected))
    services = tuple(_services(loaded.resources))
    return ConfigSnapshot(
        mesh=mesh,
        resources=tuple(loaded.resources),
        workloads=workloads,
        services=services,
        namespace_labels=namespaces,
        diagnostics=tuple(problems),
        mesh_layers=layers,
        replaced=tuple(loaded.replaced),
    )


def _mesh_config(
    resources: list[Resource[Any]],
    mesh_documents: tuple[YamlDocument, ...],
    problems: list[Diagnostic],
) -> tuple[m.MeshConfigModel, tuple[MeshLayer, ...]]:
    layers: list[tuple[dict[str, Any], YamlDocument, tuple[str | int, ...]]] = []
    for r in resources:
        if r.kind == "IstioOperator" and r.spec.mesh_config is not None:
            layers.append((r.spec.mesh_config, r.document, (*r.base_path, "spec", "meshConfig")))
    for r in resources:
        if r.kind == "ConfigMap" and r.name == "istio" and "mesh" in r.spec.data:
            where = r.meta_location()
            docs, parse_problems = parse_yaml(r.spec.data["mesh"], f"{where.file} (data.mesh)")
            problems.extend(parse_problems)
            for doc in docs:
                if isinstance(doc.body, dict):
                    layers.append((doc.body, doc, ()))
                else:
                    problems.append(
                        error("invalid-field", doc.location(()), "mesh must be a mapping")
                    )
    for doc in mesh_documents:
        body = doc.body
        if isinstance(body, dict) and body.get("kind") == "IstioOperator":
            body = cast(dict[str, Any], body.get("spec", {})).get("meshConfig", {})
        if isinstance(body, dict):
            layers.append((body, doc, ()))
        else:
            problems.append(
                error("invalid-field", doc.location(()), "mesh config must be a mapping")
            )
    merged: dict[str, Any] = {}
    for body, doc, path in layers:
        checked, layer_problems = validate_model(m.MeshConfigModel, body, doc, path)
        problems.extend(layer_problems)
        if checked is not None:
            merged.update(body)
    if len(layers) > 1:
        sources = ", ".join(sorted({doc.file for _, doc, _ in layers}))
        problems.append(
            warning(
                "mesh-config-layers",
                layers[-1][1].location(()),
                f"mesh config given {len(layers)} times ({sources}); later fields override earlier",
            )
        )
    model = m.MeshConfigModel.model_validate(merged) if merged else m.MeshConfigModel()
    return model, tuple(MeshLayer(body, doc, path) for body, doc, path in layers)


def _injection_settings(loaded: LoadResult) -> InjectionSettings:
    values: list[Mapping[str, Any]] = [
        r.spec.values for r in loaded.resources if r.kind == "IstioOperator"
    ]
    values += [d.body for d in loaded.helm_values if isinstance(d.body, dict)]
    return InjectionSettings.from_values(values)


def _workloads(
    resources: list[Resource[Any]],
    namespaces: Mapping[str, Mapping[str, str]],
    settings: InjectionSettings,
    assume_injected: bool,
) -> list[Workload]:
    out: list[Workload] = []
    for r in resources:
        if r.kind == "Pod" or r.kind in _CONTROLLERS:
            live = False
            if r.kind == "Pod":
                labels, annotations = r.labels, r.annotations
                spec: m.PodSpec = r.spec.spec
                ip = r.spec.status.pod_ip or None
                live = r.spec.is_live
            else:
                template: m.PodTemplate = r.spec.template
                labels, annotations = template.metadata.labels, template.metadata.annotations
                spec, ip = template.spec, None
            facts = PodFacts(r.kind, r.namespace, labels, annotations, spec, live)
            out.append(
                Workload(
                    namespace=r.namespace,
                    name=r.name,
                    kind=r.kind,
                    labels=labels,
                    service_account=spec.service_account_name or spec.service_account or "default",
                    dataplane=classify(
                        facts,
                        namespaces.get(r.namespace),
                        settings,
                        assume_injected=assume_injected,
                    ),
                    ports=tuple(p.container_port for c in spec.containers for p in c.ports),
                    ip=ip,
                    resource=r,
                )
            )
        elif r.kind == "WorkloadEntry":
            entry: m.WorkloadEntrySpec = r.spec
            out.append(
                Workload(
                    namespace=r.namespace,
                    name=r.name,
                    kind=r.kind,
                    labels=entry.labels,
                    service_account=entry.service_account or "default",
                    dataplane=Dataplane(
                        MeshMode.SIDECAR, "WorkloadEntry: a VM or host running an Istio sidecar"
                    ),
                    ports=tuple(entry.ports.values()),
                    ip=entry.address or None,
                    resource=r,
                )
            )
    return _follow_running_pods(out)


def _follow_running_pods(workloads: list[Workload]) -> list[Workload]:
    """A controller whose injection the input leaves uncertain takes the mode its running
    pods show (a ``kubectl get all`` dump holds them but not the Namespace objects)."""
    running = [w for w in workloads if w.kind == "Pod" and w.resource.spec.is_live]
    if not running:
        return workloads
    out = []
    for w in workloads:
        if w.kind in _CONTROLLERS and w.dataplane.uncertain:
            pods = [
                p
                for p in running
                if p.namespace == w.namespace
                and w.labels
                and all(p.labels.get(k) == v for k, v in w.labels.items())
            ]
            adopted = running_pods_mode([(p.ref, p.dataplane) for p in pods])
            if adopted is not None:
                w = dataclasses.replace(w, dataplane=adopted)
        out.append(w)
    return out


def _services(resources: list[Resource[Any]]) -> list[Service]:
    out: list[Service] = []
    for r in resources:
        if r.kind != "Service":
            continue
        spec: m.ServiceSpec = r.spec
        ports = tuple(
            ServicePortInfo(
                port=p.port,
                target_port=p.target_port if p.target_port is not None else p.port,
                name=p.name,
                protocol=p.app_protocol or p.protocol,
            )
            for p in spec.ports
        )
        out.append(Service(r.namespace, r.name, spec.selector, ports))
    return out
