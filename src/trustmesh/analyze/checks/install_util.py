"""Shared reading of install settings, mesh config and raw pod specs for the install,
capture and version checks.

Install settings are looked up by their IstioOperator path (relative to ``spec``); Helm
values use the same path without the leading ``values``. Pod specs are read raw because the
typed model keeps only what policy selection needs (no securityContext, no images).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from trustmesh.analyze.context import AnalysisContext, Setting
from trustmesh.api.diagnostics import Location
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import Workload
from trustmesh.api.yamldoc import FieldPath

IOP_HEADER = "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\n"


def raw_body(resource: Resource[Any]) -> Mapping[str, Any]:
    """The resource's object as written (the typed spec drops fields policy never reads)."""
    body: Any = resource.document.body
    for part in resource.base_path:
        body = body[part]
    return body if isinstance(body, Mapping) else {}


def dig(value: Any, *path: str | int) -> Any:
    """``value[path[0]][path[1]]…`` or None when any step is missing."""
    for part in path:
        if isinstance(part, int):
            if not isinstance(value, list) or not 0 <= part < len(value):
                return None
        elif not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def is_false(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.strip().lower() == "false")


def setting(ctx: AnalysisContext, *iop_path: str) -> Setting | None:
    """An install setting by its IstioOperator path (relative to ``spec``).

    ``("values", …)`` maps to the Helm path without ``values``; ``meshConfig``/``tag``/
    ``components`` paths are looked up as given (Helm values use the same ``meshConfig``).
    """
    paths = [iop_path]
    if iop_path and iop_path[0] == "values":
        paths.append(iop_path[1:])
    return ctx.install.find(*paths)


def pilot_env(ctx: AnalysisContext, name: str) -> Setting | None:
    """An istiod environment variable set through the install (later sources win)."""
    found = setting(ctx, "values", "pilot", "env", name)
    for source in ctx.install.sources:
        env = dig(source.body, "components", "pilot", "k8s", "env")
        for index, entry in enumerate(env if isinstance(env, list) else ()):
            if isinstance(entry, Mapping) and entry.get("name") == name:
                path = (*source.base, "components", "pilot", "k8s", "env", index, "value")
                found = Setting(entry.get("value"), source.document.location(path))
    return found


def mesh_setting(ctx: AnalysisContext, *path: str) -> Setting | None:
    """A mesh config field from the effective layers, else from Helm ``meshConfig`` values."""
    for layer in reversed(ctx.snapshot.mesh_layers):
        value = dig(layer.body, *path)
        if value is not None:
            return Setting(value, layer.document.location((*layer.path, *path)))
    return ctx.install.find(("meshConfig", *path))


def install_target(ctx: AnalysisContext, *iop_path: str) -> Location | None:
    """Where an absent setting belongs: the path in the last install source (its line is the
    deepest parent that exists), so the finding points at the file to edit."""
    if not ctx.install.sources:
        return None
    source = ctx.install.sources[-1]
    path: tuple[str, ...] = iop_path
    if source.kind == "helm" and iop_path and iop_path[0] == "values":
        path = iop_path[1:]
    return source.document.location((*source.base, *path))


def owner_key(ctx: AnalysisContext, location: Location | None) -> str:
    """The IstioOperator a location falls in (for suppression by resource), else ``""``."""
    if location is None:
        return ""
    best: Resource[Any] | None = None
    for r in ctx.resources("IstioOperator"):
        inside = r.file == location.file and r.line <= location.line
        if inside and (best is None or r.line > best.line):
            best = r
    return best.key if best else ""


def values_fix(ctx: AnalysisContext, helm_fragment: dict[str, Any]) -> str:
    """The fix for a Helm-values setting, in the form the install uses."""
    if ctx.install.sources and ctx.install.sources[-1].kind == "helm":
        return "# in your Helm values\n" + yaml.safe_dump(helm_fragment, sort_keys=False)
    return IOP_HEADER + yaml.safe_dump({"spec": {"values": helm_fragment}}, sort_keys=False)


def mesh_fix(fragment: dict[str, Any]) -> str:
    return yaml.safe_dump({"meshConfig": fragment}, sort_keys=False)


@dataclass(frozen=True, slots=True)
class PodTemplate:
    """A Pod or a controller's pod template, read raw, with its workload if modelled."""

    resource: Resource[Any]
    workload: Workload | None
    meta: Mapping[str, Any]
    spec: Mapping[str, Any]
    meta_path: FieldPath
    spec_path: FieldPath

    @property
    def ref(self) -> str:
        return f"{self.resource.namespace}/{self.resource.name}"

    @property
    def has_sidecar(self) -> bool:
        return self.workload is not None and self.workload.has_sidecar

    @property
    def annotations(self) -> Mapping[str, Any]:
        value = self.meta.get("annotations")
        return value if isinstance(value, Mapping) else {}

    @property
    def labels(self) -> Mapping[str, Any]:
        value = self.meta.get("labels")
        return value if isinstance(value, Mapping) else {}

    def at(self, *path: str | int) -> Location:
        return self.resource.document.location((*self.spec_path, *path))

    def meta_at(self, *path: str | int) -> Location:
        return self.resource.document.location((*self.meta_path, *path))

    def containers(self) -> Iterator[tuple[str, int, Mapping[str, Any]]]:
        """``(field, index, container)`` over ``initContainers`` then ``containers``."""
        for field in ("initContainers", "containers"):
            items = self.spec.get(field)
            for index, container in enumerate(items if isinstance(items, list) else ()):
                if isinstance(container, Mapping):
                    yield field, index, container


def pod_templates(ctx: AnalysisContext) -> Iterator[PodTemplate]:
    by_resource = {id(w.resource): w for w in ctx.snapshot.workloads}
    for kind in ("Pod", "Deployment", "StatefulSet", "DaemonSet"):
        for r in ctx.resources(kind):
            base: FieldPath = r.base_path if kind == "Pod" else (*r.base_path, "spec", "template")
            body = raw_body(r) if kind == "Pod" else dig(raw_body(r), "spec", "template")
            meta, spec = dig(body, "metadata") or {}, dig(body, "spec") or {}
            if isinstance(meta, Mapping) and isinstance(spec, Mapping):
                workload = by_resource.get(id(r))
                yield PodTemplate(r, workload, meta, spec, (*base, "metadata"), (*base, "spec"))


def cni_enabled(ctx: AnalysisContext) -> tuple[bool, Setting | None]:
    """Whether Istio CNI is installed, and the explicit setting that says so (or says not).

    Evidence, any of: ``components.cni.enabled``, ``istio_cni.enabled``/``pilot.cni.enabled``
    (istiod chart), the ``ambient`` profile (it always installs CNI), values of the ``cni``
    chart itself, or a deployed ``istio-cni-node`` DaemonSet.
    """
    explicit: Setting | None = None
    for path in (
        ("components", "cni", "enabled"),
        ("values", "istio_cni", "enabled"),
        ("values", "pilot", "cni", "enabled"),
        ("values", "cni", "enabled"),
    ):
        found = setting(ctx, *path)
        if found is not None and is_true(found.value):
            return True, found
        explicit = explicit or found
    profile = setting(ctx, "profile")
    if profile is not None and profile.value == "ambient":
        return True, profile
    chart_keys = {"cniBinDir", "cniConfDir", "chained", "excludeNamespaces", "repair"}
    for source in ctx.install.sources:
        cni = source.body.get("cni") if source.kind == "helm" else None
        if isinstance(cni, Mapping) and chart_keys & set(cni):
            return True, Setting(True, source.document.location(("cni",)))
    for r in ctx.resources("DaemonSet"):
        if r.name == "istio-cni-node":
            return True, Setting(True, r.meta_location("name"))
    return False, explicit


def plural(items: list[str] | tuple[str, ...], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
