"""How a workload takes part in the mesh: sidecar, ambient (ztunnel), gateway, or not at all.

Istio decides sidecar injection when a Pod is created: the injector's
MutatingWebhookConfiguration must match first (``namespaceSelector`` on the namespace's
``istio-injection`` / ``istio.io/rev`` labels, ``objectSelector`` on the pod's
``sidecar.istio.io/inject`` / ``istio.io/rev`` *labels*), then the injector's
``injectRequired`` refuses host-network pods and the system namespaces, and reads the
pod's ``sidecar.istio.io/inject`` label (or, without it, the annotation), the
never/always-inject selectors and ``global.proxy.autoInject`` (istio/istio
``manifests/charts/istio-control/istio-discovery/templates/mutatingwebhook.yaml``,
``pkg/kube/inject/inject.go``). A Pod read back from a cluster already carries the
outcome: it has an ``istio-proxy`` container or it has none.

Ambient enrolment follows istio-cni's default enablement selectors: a pod labelled
``istio.io/dataplane-mode: ambient``, or any pod of a namespace so labelled unless the pod
says ``none``; host-network pods and pods with a sidecar are never enrolled
(``cni/pkg/util/enablement_selector.go``). Gateways (Istio's ingress / egress gateway
deployments, the gateway injection template, Gateway-API and waypoint deployments) run
an Envoy in router mode: a proxy, but not a sidecar.

Pure: everything is decided from labels, annotations and pod specs.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api import models as m

INJECT = "sidecar.istio.io/inject"
INJECTION_LABEL = "istio-injection"
REVISION = "istio.io/rev"
DATAPLANE_MODE = "istio.io/dataplane-mode"
USE_WAYPOINT = "istio.io/use-waypoint"
AMBIENT_REDIRECTION = "ambient.istio.io/redirection"
INJECT_TEMPLATES = "inject.istio.io/templates"
PROXY_CONTAINER = "istio-proxy"
# pkg/kube/inject/initializer.go IgnoredNamespaces: never injected.
NEVER_INJECTED_NAMESPACES = frozenset(
    {"kube-system", "kube-public", "kube-node-lease", "local-path-storage"}
)
# istio-cni's default excludeNamespaces: never enrolled in ambient.
AMBIENT_EXCLUDED_NAMESPACES = frozenset({"kube-system"})
_GATEWAY_NAME_LABELS = ("gateway.networking.k8s.io/gateway-name", "istio.io/gateway-name")


class MeshMode(enum.Enum):
    """How a workload's traffic meets the mesh."""

    SIDECAR = "sidecar"  # an injected istio-proxy enforces inbound policy and originates mTLS
    AMBIENT = "ambient"  # ztunnel (and a waypoint, if one is bound) enforces policy
    GATEWAY = "gateway"  # an Envoy in router mode: ingress/egress gateway or waypoint
    NONE = "none"  # not in the mesh: plaintext, nothing enforced
    UNKNOWN = "unknown"  # injection depends on namespace labels the input does not hold


@dataclass(frozen=True, slots=True)
class Dataplane:
    """A workload's mesh mode and why: which label, annotation or namespace decided it.

    ``assumed`` marks a mode taken without knowing the namespace's labels (the namespace
    is not among the inputs): from ``--assume-injected``, or from a pod-level label that
    a namespace label could still override. ``uncertain``: the mode rests on an
    assumption about labels the input does not show (assumed, or unknown).
    """

    mode: MeshMode
    reason: str
    assumed: bool = False
    waypoint: str | None = None  # ambient: the istio.io/use-waypoint the pod or namespace names
    # Read on every decision: a field, not a property.
    uncertain: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "uncertain", self.assumed or self.mode is MeshMode.UNKNOWN)

    @property
    def has_sidecar(self) -> bool:
        return self.mode is MeshMode.SIDECAR

    @property
    def has_mesh_identity(self) -> bool:
        """Speaks mesh mTLS with its own SPIFFE identity when it calls others."""
        return self.mode in (MeshMode.SIDECAR, MeshMode.AMBIENT, MeshMode.GATEWAY)

    @property
    def enforces_policy(self) -> bool:
        """Something (a sidecar, ztunnel or the gateway itself) enforces selector policies."""
        return self.mode in (MeshMode.SIDECAR, MeshMode.AMBIENT, MeshMode.GATEWAY)

    def describe(self) -> str:
        label = self.mode.value
        if self.mode is MeshMode.AMBIENT and self.waypoint:
            label += f" (waypoint {self.waypoint})"
        if self.mode is MeshMode.UNKNOWN:
            label = "injection unknown"
        elif self.assumed:
            label += " (assumed)"
        return f"{label}: {self.reason}"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A Kubernetes LabelSelector (``matchLabels`` + ``matchExpressions``)."""

    match_labels: Mapping[str, str]
    expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if not self.match_labels and not self.expressions:
            return False  # the injector skips empty selectors
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for key, operator, values in self.expressions:
            present = key in labels
            if operator == "In" and not (present and labels[key] in values):
                return False
            if operator == "NotIn" and present and labels[key] in values:
                return False
            if operator == "Exists" and not present:
                return False
            if operator == "DoesNotExist" and present:
                return False
        return True


@dataclass(frozen=True, slots=True)
class InjectionSettings:
    """The injector's install-time settings (Helm values / IstioOperator ``values``)."""

    auto_inject: bool = True  # global.proxy.autoInject: enabled
    namespaces_by_default: bool = False  # sidecarInjectorWebhook.enableNamespacesByDefault
    never_inject: tuple[LabelSelector, ...] = ()
    always_inject: tuple[LabelSelector, ...] = ()

    @classmethod
    def from_values(cls, values: Sequence[Mapping[str, Any]]) -> InjectionSettings:
        """Read from Helm values documents, later ones winning (IstioOperator ``spec.values``)."""
        settings = cls()
        for body in values:
            proxy = _dig(body, "global", "proxy")
            webhook = _dig(body, "sidecarInjectorWebhook")
            auto = proxy.get("autoInject") if isinstance(proxy, Mapping) else None
            if isinstance(auto, str):
                settings = dataclasses.replace(settings, auto_inject=auto != "disabled")
            if not isinstance(webhook, Mapping):
                continue
            by_default = webhook.get("enableNamespacesByDefault")
            if isinstance(by_default, bool):
                settings = dataclasses.replace(settings, namespaces_by_default=by_default)
            never = _selectors(webhook.get("neverInjectSelector"))
            if never is not None:
                settings = dataclasses.replace(settings, never_inject=never)
            always = _selectors(webhook.get("alwaysInjectSelector"))
            if always is not None:
                settings = dataclasses.replace(settings, always_inject=always)
        return settings


def _dig(body: Mapping[str, Any], *path: str) -> Any:
    value: Any = body
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _selectors(raw: Any) -> tuple[LabelSelector, ...] | None:
    if not isinstance(raw, list):
        return None
    return tuple(s for s in map(_selector, raw) if s is not None)


def _selector(raw: Any) -> LabelSelector | None:
    if not isinstance(raw, Mapping):
        return None
    labels = raw.get("matchLabels") or {}
    expressions = []
    for item in raw.get("matchExpressions") or ():
        if isinstance(item, Mapping) and isinstance(item.get("key"), str):
            values = tuple(str(v) for v in item.get("values") or ())
            expressions.append((item["key"], str(item.get("operator", "")), values))
    if not isinstance(labels, Mapping):
        return None
    return LabelSelector({str(k): str(v) for k, v in labels.items()}, tuple(expressions))


@dataclass(frozen=True, slots=True)
class PodFacts:
    """What classification reads of a Pod or a controller's pod template."""

    kind: str
    namespace: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    spec: m.PodSpec
    live: bool = False  # a Pod read back from a cluster: injection already happened


def classify(
    pod: PodFacts,
    namespace_labels: Mapping[str, str] | None,
    settings: InjectionSettings = InjectionSettings(),
    *,
    assume_injected: bool = False,
) -> Dataplane:
    """The mesh mode of one pod. ``namespace_labels`` is None when the namespace is not
    among the inputs (its labels are unknown)."""
    gateway = _gateway(pod)
    if gateway is not None:
        return Dataplane(MeshMode.GATEWAY, gateway)
    if pod.spec.host_network:
        # Istio never injects or captures them: a proxy container there captures nothing.
        return Dataplane(
            MeshMode.NONE, "hostNetwork: true: Istio never injects or captures host-network pods"
        )
    proxy = _proxy_container(pod.spec)
    if proxy is not None:
        return Dataplane(MeshMode.SIDECAR, f"{proxy} (already injected)")
    ns = pod.namespace
    if pod.live:
        if pod.annotations.get(AMBIENT_REDIRECTION) == "enabled":
            return _ambient(
                pod, namespace_labels, f"running Pod with {AMBIENT_REDIRECTION}=enabled"
            )
        return Dataplane(
            MeshMode.NONE,
            "running Pod (read back from a cluster) without an istio-proxy container or"
            f" {AMBIENT_REDIRECTION}=enabled: not in the mesh, whatever its namespace says",
        )
    if ns in NEVER_INJECTED_NAMESPACES:
        return Dataplane(MeshMode.NONE, f"namespace {ns}: Istio never injects it")
    injected, why, assumed = _injection(pod, namespace_labels, settings, assume_injected)
    if injected is True:
        return Dataplane(MeshMode.SIDECAR, why, assumed)
    enrolled = _ambient_selector(pod, namespace_labels)
    if enrolled is not None:
        if injected is None:
            enrolled += (
                f" (namespace {ns} is not among the inputs: an injected sidecar would take"
                " precedence)"
            )
        return _ambient(pod, namespace_labels, enrolled, assumed=injected is None)
    if injected is None:
        return Dataplane(MeshMode.UNKNOWN, why)
    return Dataplane(MeshMode.NONE, why, assumed)


def _gateway(pod: PodFacts) -> str | None:
    labels = pod.labels
    managed = labels.get("gateway.istio.io/managed")
    if managed:
        what = "waypoint" if managed == "istio.io-mesh-controller" else "Gateway API gateway"
        return f"{what}: label gateway.istio.io/managed={managed}"
    for key in _GATEWAY_NAME_LABELS:
        if key in labels:
            return f"Gateway API gateway: label {key}={labels[key]}"
    istio = labels.get("istio", "")
    if istio.endswith("gateway"):
        return f"Istio gateway: label istio={istio}"
    templates = pod.annotations.get(INJECT_TEMPLATES, "")
    if "gateway" in (t.strip() for t in templates.split(",")):
        return f"Istio gateway: annotation {INJECT_TEMPLATES}={templates}"
    for container in pod.spec.containers:
        if container.name == PROXY_CONTAINER and "router" in container.args:
            return "Istio gateway: istio-proxy container runs in router mode (args: router)"
    return None


def _proxy_container(spec: m.PodSpec) -> str | None:
    if any(c.name == PROXY_CONTAINER for c in spec.containers):
        return "istio-proxy container"
    for c in spec.init_containers:
        if c.name == PROXY_CONTAINER and c.restart_policy == "Always":
            return "istio-proxy native sidecar (init container with restartPolicy: Always)"
    return None


def _injection(
    pod: PodFacts,
    namespace_labels: Mapping[str, str] | None,
    settings: InjectionSettings,
    assume_injected: bool,
) -> tuple[bool | None, str, bool]:
    """(injected, why, assumed); injected is None when it depends on unknown labels."""
    ns = pod.namespace
    label = pod.labels.get(INJECT)
    annotation = pod.annotations.get(INJECT)
    if namespace_labels is None:
        # Whatever the namespace says, a pod-level "false" keeps the injector out.
        if label == "false" or (label is None and annotation == "false"):
            where = "label" if label is not None else "annotation"
            return False, f"{where} {INJECT}=false", False
        if label == "true" or REVISION in pod.labels:
            what = f"{INJECT}=true" if label == "true" else f"{REVISION}={pod.labels[REVISION]}"
            return (
                True,
                f"pod label {what}; namespace {ns} is not among the inputs (injected unless it"
                f" is labelled {INJECTION_LABEL}=disabled)",
                True,
            )
        if assume_injected and pod.labels.get(DATAPLANE_MODE) != "ambient":
            return True, f"--assume-injected: namespace {ns} is not among the inputs", True
        return (
            None,
            f"namespace {ns} is not among the inputs, so its {INJECTION_LABEL} /"
            f" {REVISION} labels are unknown (--assume-injected treats it as injected)",
            False,
        )
    triggered, webhook = _webhook(pod, namespace_labels, settings)
    if not triggered:
        return False, webhook, False
    required, why = _inject_required(pod, settings)
    return required, f"{webhook}; {why}", False


def _webhook(
    pod: PodFacts, ns_labels: Mapping[str, str], settings: InjectionSettings
) -> tuple[bool, str]:
    """Does one of the injector's webhooks match (namespace + object selectors)?"""
    ns = pod.namespace
    label = pod.labels.get(INJECT)
    injection = ns_labels.get(INJECTION_LABEL)
    revision = ns_labels.get(REVISION)
    if injection is not None:
        if injection != "enabled":
            return False, f"namespace {ns} has {INJECTION_LABEL}={injection}"
        if label == "false":
            return False, f"pod label {INJECT}=false"
        return True, f"namespace {ns} has {INJECTION_LABEL}=enabled"
    if revision is not None:
        if not revision:
            return False, f"namespace {ns} has an empty {REVISION} label"
        if label == "false":
            return False, f"pod label {INJECT}=false"
        return True, f"namespace {ns} has {REVISION}={revision} (that revision's injector)"
    if REVISION in pod.labels:
        if label == "false":
            return False, f"pod label {INJECT}=false"
        return True, f"pod label {REVISION}={pod.labels[REVISION]}"
    if label == "true":
        return True, f"pod label {INJECT}=true"
    if settings.namespaces_by_default and label is None:
        return True, "sidecarInjectorWebhook.enableNamespacesByDefault"
    why = f"namespace {ns} has no {INJECTION_LABEL} or {REVISION} label"
    if pod.annotations.get(INJECT) == "true":
        why += f" (the {INJECT} annotation does not select a pod for injection; the label does)"
    return False, why


def _inject_required(pod: PodFacts, settings: InjectionSettings) -> tuple[bool, str]:
    """The injector's own decision once its webhook was called (``injectRequired``)."""
    label = pod.labels.get(INJECT)
    value = label if label is not None else pod.annotations.get(INJECT)
    where = "label" if label is not None else "annotation"
    if value == "true":
        return True, f"{where} {INJECT}=true"
    if value == "false":
        return False, f"{where} {INJECT}=false"
    for selector in settings.never_inject:
        if selector.matches(pod.labels):
            return False, "labels match sidecarInjectorWebhook.neverInjectSelector"
    for selector in settings.always_inject:
        if selector.matches(pod.labels):
            return True, "labels match sidecarInjectorWebhook.alwaysInjectSelector"
    if not settings.auto_inject:
        return False, "global.proxy.autoInject is disabled and the pod does not ask for injection"
    return True, "injected by default"


def _ambient_selector(pod: PodFacts, ns_labels: Mapping[str, str] | None) -> str | None:
    if pod.namespace in AMBIENT_EXCLUDED_NAMESPACES:
        return None
    mode = pod.labels.get(DATAPLANE_MODE)
    if mode == "ambient":
        return f"pod label {DATAPLANE_MODE}=ambient"
    if mode == "none":
        return None
    if ns_labels is not None and ns_labels.get(DATAPLANE_MODE) == "ambient":
        return f"namespace {pod.namespace} has {DATAPLANE_MODE}=ambient"
    return None


def _ambient(
    pod: PodFacts, ns_labels: Mapping[str, str] | None, why: str, *, assumed: bool = False
) -> Dataplane:
    own = pod.labels.get(USE_WAYPOINT)
    waypoint = own if own is not None else (ns_labels or {}).get(USE_WAYPOINT)
    if waypoint == "none":
        waypoint = None
    if ns_labels is None and own is None:
        why += f"; namespace {pod.namespace} is not among the inputs: no waypoint assumed"
        assumed = True
    return Dataplane(MeshMode.AMBIENT, why, assumed, waypoint or None)


def running_pods_mode(pods: Sequence[tuple[str, Dataplane]]) -> Dataplane | None:
    """The mode a controller's running pods agree on, if they do (None: no pods, or they
    disagree, e.g. some created before the namespace was labelled)."""
    modes = {d.mode for _, d in pods}
    if len(modes) != 1:
        return None
    (mode,) = modes
    names = ", ".join(ref for ref, _ in pods[:3]) + (" …" if len(pods) > 3 else "")
    first = pods[0][1]
    assumed = any(d.assumed for _, d in pods)
    return Dataplane(mode, f"its running pods ({names}): {first.reason}", assumed, first.waypoint)
