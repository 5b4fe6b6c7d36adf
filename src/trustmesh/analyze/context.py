"""What every check reads: the snapshot, the compiled mesh, and install settings."""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api.dataplane import MeshMode
from trustmesh.api.diagnostics import Location
from trustmesh.api.resources import Resource, UnknownResource
from trustmesh.api.snapshot import ConfigSnapshot
from trustmesh.api.yamldoc import FieldPath, YamlDocument
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.ztunnel import waypoint_for

SUPPRESS_ANNOTATION = "trustmesh.dev/suppress"


@dataclass(frozen=True, slots=True)
class Setting:
    """An install setting's value and where it was written."""

    value: Any
    location: Location | None


@dataclass(frozen=True, slots=True)
class InstallSource:
    """An IstioOperator ``spec`` or a Helm values document."""

    kind: str  # "IstioOperator" | "helm"
    body: Mapping[str, Any]
    document: YamlDocument = field(repr=False)
    base: FieldPath = ()


@dataclass(frozen=True, slots=True)
class InstallSettings:
    sources: tuple[InstallSource, ...] = ()

    @property
    def present(self) -> bool:
        return bool(self.sources)

    def find(self, *paths: tuple[str, ...]) -> Setting | None:
        """The first of ``paths`` set in any source (later sources win).

        IstioOperator paths are relative to ``spec`` (``("values", "global", "tag")``),
        Helm paths to the document (``("global", "tag")``); a check passes both forms.
        """
        for source in reversed(self.sources):
            for path in paths:
                value: Any = source.body
                for part in path:
                    if not isinstance(value, Mapping) or part not in value:
                        break
                    value = value[part]
                else:
                    return Setting(value, source.document.location((*source.base, *path)))
        return None


@dataclass(frozen=True, slots=True, weakref_slot=True)  # weakref: policy.derived
class AnalysisContext:
    snapshot: ConfigSnapshot
    mesh: MeshPolicy
    install: InstallSettings = InstallSettings()
    istio_version: Setting | None = None
    unknown_resources: tuple[UnknownResource, ...] = ()  # kinds trustmesh does not model
    # "Now" for date-dependent rules (end of life); passed in so runs are reproducible.
    today: datetime.date = field(default_factory=datetime.date.today)
    # The instant certificates in Secrets are checked against (the real clock by default).
    now: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))

    # --- convenience for checks -------------------------------------------------------------

    def resources(self, kind: str) -> tuple[Resource[Any], ...]:
        return self.snapshot.of_kind(kind)

    def sidecar_workloads(self) -> Iterator[WorkloadPolicy]:
        """Workloads whose injected sidecar enforces their inbound policy (Envoy semantics)."""
        for policy in self.mesh.workloads.values():
            if policy.workload.has_sidecar:
                yield policy

    def enforcing_workloads(self, *, with_waypoint: bool = True) -> Iterator[WorkloadPolicy]:
        """Workloads where PeerAuthentication and AuthorizationPolicy are enforced on
        inbound traffic: a sidecar, or ztunnel for ambient ones (without those a waypoint
        also enforces for, unless ``with_waypoint``)."""
        for policy in self.mesh.workloads.values():
            mode = policy.workload.dataplane.mode
            ambient_counted = mode is MeshMode.AMBIENT and (
                with_waypoint or waypoint_for(self.mesh, policy) is None
            )
            if mode is MeshMode.SIDECAR or ambient_counted:
                yield policy

    def dataplane_notes(self) -> tuple[str, ...]:
        """What the findings assume about workloads whose mesh mode the input does not show."""
        groups: dict[tuple[str, str], list[str]] = {}
        for workload in self.snapshot.workloads:
            dataplane = workload.dataplane
            if not dataplane.uncertain:
                continue
            key = (dataplane.mode.value, dataplane.reason.replace(workload.namespace, "{ns}"))
            groups.setdefault(key, []).append(workload.ref)
        notes = []
        for (mode, _), refs in sorted(groups.items()):
            namespaces = sorted({ref.split("/", 1)[0] for ref in refs})
            where = ", ".join(namespaces)
            shown = ", ".join(refs[:8]) + (f" and {len(refs) - 8} more" if len(refs) > 8 else "")
            if mode == MeshMode.UNKNOWN.value:
                notes.append(
                    f"sidecar injection unknown for {shown}: namespace {where} is not among the"
                    " inputs, so its istio-injection / istio.io/rev labels are unknown; they are"
                    " analyzed as not injected (checks of sidecar workloads skip them, and"
                    " mTLS / default-deny findings for them are not reported). Pass"
                    " --assume-injected to analyze them as injected, or add the Namespace."
                )
            else:
                reason = self.snapshot.workload(refs[0])
                why = reason.dataplane.reason if reason is not None else ""
                notes.append(f"assumed {mode} for {shown}: {why}")
        return tuple(notes)

    def mesh_location(self, *path: str) -> Location | None:
        return self.snapshot.mesh_location(*path)

    @property
    def root_namespace(self) -> str:
        return self.snapshot.mesh.root_namespace

    def namespaces(self) -> set[str]:
        """Namespaces that exist: declared, or holding a workload or a resource."""
        found = set(self.snapshot.namespace_labels)
        found |= {w.namespace for w in self.snapshot.workloads}
        found |= {r.namespace for r in self.snapshot.resources if r.namespace}
        return found


def install_settings(snapshot: ConfigSnapshot, helm_values: list[YamlDocument]) -> InstallSettings:
    sources: list[InstallSource] = []
    for r in snapshot.of_kind("IstioOperator"):
        body = r.document.body
        for part in r.base_path:
            body = body[part]
        spec = body.get("spec") or {}
        if isinstance(spec, Mapping):
            sources.append(InstallSource("IstioOperator", spec, r.document, (*r.base_path, "spec")))
    for document in helm_values:
        if isinstance(document.body, Mapping):
            sources.append(InstallSource("helm", document.body, document))
    return InstallSettings(tuple(sources))


def istio_version(install: InstallSettings, given: str | None) -> Setting | None:
    """``--istio-version``, else the install's tag (``1.22.3-distroless`` → ``1.22.3``)."""
    if given:
        return Setting(given, None)
    tag = install.find(("tag",), ("values", "global", "tag"), ("global", "tag"))
    if tag is None or not isinstance(tag.value, str):
        return None
    return Setting(tag.value.removesuffix("-distroless"), tag.location)


def build_context(
    snapshot: ConfigSnapshot,
    mesh: MeshPolicy,
    helm_values: Sequence[YamlDocument] = (),
    version: str | None = None,
    unknown: Sequence[UnknownResource] = (),
    today: datetime.date | None = None,
    now: datetime.datetime | None = None,
) -> AnalysisContext:
    install = install_settings(snapshot, list(helm_values))
    return AnalysisContext(
        snapshot,
        mesh,
        install,
        istio_version(install, version),
        tuple(unknown),
        today or datetime.date.today(),
        now or datetime.datetime.now(datetime.UTC),
    )
