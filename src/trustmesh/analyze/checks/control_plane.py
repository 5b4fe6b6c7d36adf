"""What the inputs say about the installed Istio control planes, for the injection checks.

Not a check module (it registers nothing). Evidence comes from the objects an install leaves
in a cluster dump — sidecar-injector webhooks and ConfigMaps, istiod Deployments and Pods —
and from IstioOperator / Helm values. From it: which revisions are served, what each
revision's injector would put in a pod (the proxy image, ``enableNamespacesByDefault``), and
whether a given pod gets a sidecar, decided the way the webhooks decide it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from trustmesh.analyze.checks.install_util import (
    PodTemplate,
    is_false,
    is_true,
    pilot_env,
    pod_templates,
)
from trustmesh.analyze.checks.raw_objects import (
    RawObject,
    embedded_document,
    items,
    mapping,
    raw_objects,
    text_map,
)
from trustmesh.analyze.context import AnalysisContext
from trustmesh.api.diagnostics import Location
from trustmesh.api.snapshot import INJECT

INJECTION_LABEL = "istio-injection"
REV_LABEL = "istio.io/rev"
TAG_LABEL = "istio.io/tag"
DATAPLANE_LABEL = "istio.io/dataplane-mode"
DEFAULT_REVISION = "default"
INJECTOR_CONFIGMAP = "istio-sidecar-injector"
# Namespaces the injector never injects by default (enableNamespacesByDefault excludes them).
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease", "istio-system"})
_VARIANTS = ("-distroless", "-debug")


# --- label selectors (Kubernetes LabelSelector semantics) ----------------------------------


def selector_matches(selector: Any, labels: Mapping[str, str]) -> bool:
    """Whether a LabelSelector matches ``labels``; an absent or empty selector matches all."""
    if selector is None:
        return True
    if not isinstance(selector, Mapping):
        return False  # not a selector: the API server would have refused it
    for key, value in text_map(selector.get("matchLabels")).items():
        if labels.get(key) != value:
            return False
    for expression in items(selector.get("matchExpressions")):
        expr = mapping(expression)
        key, operator = str(expr.get("key", "")), str(expr.get("operator", ""))
        values = {str(v) for v in items(expr.get("values"))}
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return True


# --- webhooks and injector configuration ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Webhook:
    """One entry of ``webhooks:`` in a Mutating/ValidatingWebhookConfiguration."""

    config: RawObject
    index: int
    name: str
    body: Mapping[str, Any] = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.config.name}/{self.name}"

    def at(self, *path: str | int) -> Location:
        return self.config.at("webhooks", self.index, *path)

    def selects(self, namespace_labels: Mapping[str, str], pod_labels: Mapping[str, str]) -> bool:
        return selector_matches(
            self.body.get("namespaceSelector"), namespace_labels
        ) and selector_matches(self.body.get("objectSelector"), pod_labels)

    def revisions(self) -> set[str]:
        """Revisions this entry names in its selectors (Istio's own reading)."""
        found: set[str] = set()
        for part in ("namespaceSelector", "objectSelector"):
            selector = mapping(self.body.get(part))
            value = text_map(selector.get("matchLabels")).get(REV_LABEL)
            if value:
                found.add(value)
            for expression in items(selector.get("matchExpressions")):
                expr = mapping(expression)
                if expr.get("key") == REV_LABEL and expr.get("operator") == "In":
                    found |= {str(v) for v in items(expr.get("values"))}
        return found


def webhooks(ctx: AnalysisContext, kind: str) -> Iterator[Webhook]:
    for config in raw_objects(ctx, kind, groups=("admissionregistration.k8s.io",)):
        for index, entry in enumerate(items(config.get("webhooks"))):
            if isinstance(entry, Mapping):  # anything else the API server refuses
                name = str(entry.get("name") or f"webhooks[{index}]")
                yield Webhook(config, index, name, entry)


def is_istio_webhook(hook: Webhook) -> bool:
    """Istio's injector entries are named ``*.istio.io``; a revision label marks them too."""
    return hook.name.endswith("istio.io") or REV_LABEL in hook.config.labels


@dataclass(frozen=True, slots=True)
class InjectorConfig:
    """An ``istio-sidecar-injector[-REVISION]`` ConfigMap: what that revision injects."""

    revision: str
    source: RawObject
    values: Mapping[str, Any] = field(repr=False)

    @property
    def proxy_image(self) -> str | None:
        """The image the injector writes into ``istio-proxy`` (its template's rule)."""
        glob = mapping(self.values.get("global"))
        image = str(mapping(glob.get("proxy")).get("image") or "")
        if "/" in image:
            return image
        hub, tag = glob.get("hub"), glob.get("tag")
        if not image or not hub or tag is None:
            return None
        return f"{hub}/{image}:{tag}"

    @property
    def namespaces_by_default(self) -> bool:
        hook = mapping(self.values.get("sidecarInjectorWebhook"))
        return is_true(hook.get("enableNamespacesByDefault"))


def _injector_configs(ctx: AnalysisContext) -> dict[str, InjectorConfig]:
    found: dict[str, InjectorConfig] = {}
    for config in raw_objects(ctx, "ConfigMap"):
        if not config.name.startswith(INJECTOR_CONFIGMAP):
            continue
        suffix = config.name.removeprefix(INJECTOR_CONFIGMAP)
        if suffix and not suffix.startswith("-"):
            continue
        values = embedded_document(str(mapping(config.get("data")).get("values") or ""))
        revision = suffix[1:] or DEFAULT_REVISION
        found[revision] = InjectorConfig(revision, config, values or {})
    return found


# --- proxy images ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Image:
    """A container image reference split the way registries read it."""

    repository: str  # with the registry: docker.io/istio/proxyv2
    tag: str  # "" when given by digest only

    @classmethod
    def parse(cls, text: str) -> Image:
        name = text.strip().partition("@")[0]
        slash, colon = name.rfind("/"), name.rfind(":")
        repository, tag = (name[:colon], name[colon + 1 :]) if colon > slash else (name, "")
        first, _, rest = repository.partition("/")
        if not rest:
            repository = f"docker.io/library/{repository}"
        elif "." not in first and ":" not in first and first != "localhost":
            repository = f"docker.io/{repository}"
        return cls(repository.removeprefix("index."), tag)

    @property
    def release(self) -> str:
        """The tag without the image variant (``1.24.2-distroless`` → ``1.24.2``)."""
        for variant in _VARIANTS:
            if self.tag.endswith(variant):
                return self.tag.removesuffix(variant)
        return self.tag


# --- the control plane -----------------------------------------------------------------------


class Injection(enum.Enum):
    YES = "injected"
    NO = "not injected"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class InjectionVerdict:
    injection: Injection
    reason: str
    revision: str | None = None


@dataclass(frozen=True, slots=True)
class ControlPlane:
    """Revisions, injectors and injection webhooks found among the inputs."""

    revisions: frozenset[str]
    injectors: Mapping[str, InjectorConfig]
    injection_webhooks: tuple[Webhook, ...]
    istiods: tuple[PodTemplate, ...]
    namespace_labels: Mapping[str, Mapping[str, str]]

    @property
    def evidenced(self) -> bool:
        """Whether the inputs show any installed control plane at all."""
        return bool(self.revisions)

    @property
    def namespaces_by_default(self) -> bool:
        default = self.injectors.get(DEFAULT_REVISION)
        return default is not None and default.namespaces_by_default

    def namespace(self, name: str) -> Mapping[str, str] | None:
        """A namespace's labels, None when it is not among the inputs."""
        return self.namespace_labels.get(name)

    def injection(self, pod: PodTemplate) -> InjectionVerdict:
        """Whether ``pod`` gets a sidecar when it is created, and from which revision."""
        if pod.spec.get("hostNetwork") is True:
            return InjectionVerdict(Injection.NO, "it uses the host network (never injected)")
        if _istiod(pod):
            return InjectionVerdict(Injection.NO, "it is the control plane (never injected)")
        labels, notes = text_map(pod.labels), text_map(pod.annotations)
        explicit = labels.get(INJECT, notes.get(INJECT))
        if explicit is not None and is_false(explicit):
            return InjectionVerdict(Injection.NO, f'it sets {INJECT}: "false"')
        ns_labels = self.namespace(pod.resource.namespace)
        if self.injection_webhooks:
            return self._by_webhooks(ns_labels, labels, pod.resource.namespace)
        return self._by_default_webhooks(ns_labels, labels, pod.resource.namespace)

    def _by_webhooks(
        self, ns_labels: Mapping[str, str] | None, labels: Mapping[str, str], namespace: str
    ) -> InjectionVerdict:
        matched = [h for h in self.injection_webhooks if h.selects(ns_labels or {}, labels)]
        if matched:
            hook = matched[0]
            revision = hook.config.labels.get(REV_LABEL) or next(
                iter(sorted(hook.revisions())), DEFAULT_REVISION
            )
            return InjectionVerdict(Injection.YES, f"webhook {hook.label} selects it", revision)
        if ns_labels is None:
            return InjectionVerdict(
                Injection.UNKNOWN,
                f"no injection webhook selects it unless namespace {namespace} (not among the "
                "inputs) carries an injection label",
            )
        return InjectionVerdict(Injection.NO, "no injection webhook selects it")

    def _by_default_webhooks(
        self, ns_labels: Mapping[str, str] | None, labels: Mapping[str, str], namespace: str
    ) -> InjectionVerdict:
        """Istio's standard webhooks: namespace label, revision label, then the pod's own."""
        ns = ns_labels or {}
        if INJECTION_LABEL in ns:
            if ns[INJECTION_LABEL] == "enabled":
                return InjectionVerdict(
                    Injection.YES, f"namespace {namespace} has {INJECTION_LABEL}=enabled"
                )
            return InjectionVerdict(
                Injection.NO, f"namespace {namespace} has {INJECTION_LABEL}={ns[INJECTION_LABEL]}"
            )
        if ns.get(REV_LABEL):
            return InjectionVerdict(
                Injection.YES,
                f"namespace {namespace} has {REV_LABEL}={ns[REV_LABEL]}",
                ns[REV_LABEL],
            )
        if labels.get(REV_LABEL):
            return InjectionVerdict(
                Injection.YES, f"it has {REV_LABEL}={labels[REV_LABEL]}", labels[REV_LABEL]
            )
        if is_true(labels.get(INJECT)):
            return InjectionVerdict(Injection.YES, f'it has the label {INJECT}: "true"')
        if ns_labels is None:
            return InjectionVerdict(
                Injection.UNKNOWN,
                f"namespace {namespace} is not among the inputs, so its injection label is unknown",
            )
        if ns.get(DATAPLANE_LABEL) == "ambient":
            return InjectionVerdict(Injection.NO, f"namespace {namespace} is ambient")
        if self.namespaces_by_default and namespace not in SYSTEM_NAMESPACES:
            return InjectionVerdict(
                Injection.YES, "the injector has enableNamespacesByDefault", DEFAULT_REVISION
            )
        return InjectionVerdict(
            Injection.NO, f"namespace {namespace} has no {INJECTION_LABEL} or {REV_LABEL} label"
        )


def _istiod(pod: PodTemplate) -> bool:
    labels = text_map(pod.labels)
    return labels.get("app") == "istiod" or (
        labels.get("istio") == "pilot" and pod.resource.name.startswith("istiod")
    )


def _revisions(
    ctx: AnalysisContext,
    injectors: Mapping[str, InjectorConfig],
    hooks: list[Webhook],
    istiods: list[PodTemplate],
) -> set[str]:
    found = set(injectors)
    for hook in hooks:
        labels = hook.config.labels
        found |= hook.revisions()
        found |= {labels[k] for k in (REV_LABEL, TAG_LABEL) if labels.get(k)}
        if not hook.revisions() and REV_LABEL not in labels and TAG_LABEL not in labels:
            found.add(DEFAULT_REVISION)
    for pod in istiods:
        found.add(text_map(pod.labels).get(REV_LABEL) or DEFAULT_REVISION)
    for source in ctx.install.sources:  # IstioOperator spec.revision, Helm values revision
        revision = source.body.get("revision")
        found.add(str(revision) if revision else DEFAULT_REVISION)
    return found


def control_plane(ctx: AnalysisContext) -> ControlPlane:
    """The control plane the inputs describe."""
    injectors = _injector_configs(ctx)
    hooks = [h for h in webhooks(ctx, "MutatingWebhookConfiguration") if is_istio_webhook(h)]
    istiods = [p for p in pod_templates(ctx) if _istiod(p)]
    namespace_labels = {ns.name: ns.labels for ns in raw_objects(ctx, "Namespace") if ns.name}
    return ControlPlane(
        revisions=frozenset(_revisions(ctx, injectors, hooks, istiods)),
        injectors=injectors,
        injection_webhooks=tuple(hooks),
        istiods=tuple(istiods),
        namespace_labels=namespace_labels,
    )


def proxy_containers(pod: PodTemplate) -> Iterator[tuple[str, int, Mapping[str, Any]]]:
    """The ``istio-proxy`` container(s) of a pod: ``containers`` or native-sidecar init."""
    for field_name, index, container in pod.containers():
        if container.get("name") == "istio-proxy":
            yield field_name, index, container


def is_dumped(pod: PodTemplate) -> bool:
    """A Pod read back from a cluster (the snapshot's own test), not a manifest."""
    return pod.resource.kind == "Pod" and bool(pod.resource.spec.is_live)


def has_finished(pod: PodTemplate) -> bool:
    """A dumped Pod that has run to completion (a Job's): it serves no traffic any more."""
    body = pod.resource.document.body
    for part in pod.resource.base_path:
        body = body[part]
    phase = mapping(mapping(body).get("status")).get("phase")
    return phase in ("Succeeded", "Failed")


def istiod_env(ctx: AnalysisContext, name: str) -> tuple[str | None, Location | None]:
    """An istiod environment variable's value and where it is set, from the istiod
    Deployments/Pods among the inputs (their ``discovery`` container) or the install values;
    ``(None, None)`` when it is set nowhere the inputs show."""
    for pod in pod_templates(ctx):
        if not _istiod(pod):
            continue
        for field_name, index, container in pod.containers():
            for number, entry in enumerate(items(container.get("env"))):
                env = mapping(entry)
                if env.get("name") == name and "value" in env:
                    where = pod.at(field_name, index, "env", number, "value")
                    return str(env.get("value") or ""), where
    found = pilot_env(ctx, name)
    if found is not None:
        return str(found.value if found.value is not None else ""), found.location
    return None, None
