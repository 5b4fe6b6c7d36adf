"""Sidecar proxies that differ from what the control plane injects (TM-INST-021).

A sidecar keeps the proxy image it was injected with until its pod is recreated. After an
upgrade (or a security release) pods that were never restarted run the old proxy, with
whatever it lacks; a proxy from another repository is not the one the mesh vetted at all.
The expected image comes from the revision's injector ConfigMap (``values.global``), else
from the install's hub/tag, else only the release is compared, with istiod's image or
``--istio-version``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from trustmesh.analyze.checks.control_plane import (
    DEFAULT_REVISION,
    INJECTION_LABEL,
    REV_LABEL,
    ControlPlane,
    Image,
    control_plane,
    proxy_containers,
)
from trustmesh.analyze.checks.install_util import PodTemplate, is_true, plural, pod_templates
from trustmesh.analyze.checks.raw_objects import text_map
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api.diagnostics import Location
from trustmesh.api.snapshot import INJECT

_PROXY_IMAGE_ANNOTATION = "sidecar.istio.io/proxyImage"


@dataclass(frozen=True, slots=True)
class _Expected:
    image: Image | None  # the full image, when known
    release: str  # the release (tag without variant) the control plane runs
    source: str  # where that came from, for the message

    def differs(self, actual: Image) -> bool:
        if self.image is not None and actual.repository != self.image.repository:
            return True
        return bool(self.release) and actual.release != self.release

    def describe(self) -> str:
        shown = (
            f"{self.image.repository}:{self.image.tag}" if self.image else f"release {self.release}"
        )
        return f"{shown} ({self.source})"


def _revision(cp: ControlPlane, pod: PodTemplate) -> str | None:
    """The revision whose injector put the proxy in, when the inputs say so."""
    labels = text_map(pod.labels)
    ns = cp.namespace(pod.resource.namespace) or {}
    if labels.get(REV_LABEL):
        return labels[REV_LABEL]  # the injector labels the pods it injects
    if ns.get(INJECTION_LABEL) == "enabled":
        return DEFAULT_REVISION
    if ns.get(REV_LABEL):
        return ns[REV_LABEL]
    if is_true(labels.get(INJECT)):
        return DEFAULT_REVISION
    return None  # injected by hand or by an injector the inputs do not show


def _install_expected(ctx: AnalysisContext, revision: str) -> _Expected | None:
    install = ctx.install
    if not install.present:
        return None
    installed = install.find(("revision",))
    if (str(installed.value) if installed and installed.value else DEFAULT_REVISION) != revision:
        return None
    tag = install.find(("tag",), ("values", "global", "tag"), ("global", "tag"))
    if tag is None or not isinstance(tag.value, str | int | float):
        return None
    hub = install.find(("hub",), ("values", "global", "hub"), ("global", "hub"))
    name = install.find(("values", "global", "proxy", "image"), ("global", "proxy", "image"))
    image_name = str(name.value) if name and name.value else "proxyv2"
    source = f"the install's tag, {tag.location}" if tag.location else "the install's tag"
    if "/" in image_name:
        image = Image.parse(image_name)
        return _Expected(image, image.release, source)
    if hub is None or not hub.value:
        return _Expected(None, Image.parse(f"x:{tag.value}").release, source)
    image = Image.parse(f"{hub.value}/{image_name}:{tag.value}")
    return _Expected(image, image.release, source)


def _expected(ctx: AnalysisContext, cp: ControlPlane, revision: str) -> _Expected | None:
    injector = cp.injectors.get(revision)
    if injector is not None and injector.proxy_image:
        image = Image.parse(injector.proxy_image)
        return _Expected(image, image.release, f"injector ConfigMap {injector.source.ref}")
    found = _install_expected(ctx, revision)
    if found is not None:
        return found
    for istiod in cp.istiods:
        if (text_map(istiod.labels).get(REV_LABEL) or DEFAULT_REVISION) != revision:
            continue
        for _, _, container in istiod.containers():
            release = Image.parse(str(container.get("image", ""))).release
            if release:
                return _Expected(None, release, f"istiod {istiod.ref} runs it")
    if revision == DEFAULT_REVISION and ctx.istio_version is not None:
        return _Expected(None, str(ctx.istio_version.value), "the Istio version given")
    return None


@rule(
    "TM-INST-021",
    title="Sidecar proxy image differs from what the control plane injects",
    severity=Severity.WARNING,
    family="install",
    rationale="A sidecar keeps the proxy it was injected with until its pod is recreated: after "
    "an upgrade or a security release, pods that were not restarted run the old proxy and its "
    "vulnerabilities; a proxy from another repository is not the one the mesh vetted.",
)
def proxy_image_mismatch(ctx: AnalysisContext) -> Iterator[Issue]:
    cp = control_plane(ctx)
    by_namespace: dict[str, list[tuple[PodTemplate, str, Location]]] = {}
    expected_for: dict[str, _Expected] = {}
    for pod in pod_templates(ctx):
        if pod.annotations.get(_PROXY_IMAGE_ANNOTATION):
            continue  # the pod chose its proxy (TM-INST-012 reports the override)
        revision = _revision(cp, pod)
        expected = _expected(ctx, cp, revision) if revision else None
        if expected is None:
            continue
        for field, index, container in proxy_containers(pod):
            text = str(container.get("image", "")).strip()
            if not text or text == "auto" or not expected.differs(Image.parse(text)):
                continue
            namespace = pod.resource.namespace
            by_namespace.setdefault(namespace, []).append(
                (pod, text, pod.at(field, index, "image"))
            )
            expected_for.setdefault(namespace, expected)
    for namespace, found in sorted(by_namespace.items()):
        expected = expected_for[namespace]
        pods = [f"{pod.resource.name} ({image})" for pod, image, _ in found]
        restarts = sorted({f"{p.resource.kind.lower()}/{p.resource.name}" for p, _, _ in found})
        yield Issue(
            message=f"Namespace {namespace}: the sidecars of {plural(pods)} differ from the "
            f"proxy the control plane injects, {expected.describe()}: they keep it until their "
            "pods are recreated, with the fixes the current proxy has missing",
            location=found[0][2],
            resource=f"Namespace//{namespace}",
            workloads=tuple(sorted({p.ref for p, _, _ in found})),
            fix=f"kubectl -n {namespace} delete {' '.join(restarts)}  "
            "# or rollout restart their controllers\n",
        )
