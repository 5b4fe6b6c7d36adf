"""Sidecar injection, as the webhooks decide it (TM-INST-017…020, TM-INST-022).

A pod without a sidecar accepts plaintext and enforces none of the PeerAuthentication or
AuthorizationPolicy written for it, so every way injection silently does not happen is a
security finding: a namespace without an injection label, labels that contradict each other
(one silently wins), a running pod that missed injection, a revision nothing serves, and a
gateway template whose ``image: auto`` is never filled in.

Injection is decided from the inputs the way Istio's webhooks decide it: the injection
webhooks among the inputs when there are any, else Istio's standard ones (namespace
``istio-injection`` / ``istio.io/rev``, then the pod's ``istio.io/rev`` or
``sidecar.istio.io/inject`` label).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from trustmesh.analyze.checks.control_plane import (
    DATAPLANE_LABEL,
    INJECTION_LABEL,
    REV_LABEL,
    SYSTEM_NAMESPACES,
    ControlPlane,
    Injection,
    control_plane,
    has_finished,
    is_dumped,
    proxy_containers,
)
from trustmesh.analyze.checks.install_util import (
    PodTemplate,
    is_false,
    is_true,
    plural,
    pod_templates,
)
from trustmesh.analyze.checks.raw_objects import RawObject, raw_objects, text_map
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api.snapshot import INJECT

FAMILY = "install"


def _user_namespaces(ctx: AnalysisContext) -> Iterator[RawObject]:
    """Declared namespaces that hold applications (not Kubernetes' or the control plane's)."""
    for namespace in raw_objects(ctx, "Namespace"):
        name = namespace.name
        if name in SYSTEM_NAMESPACES or name == ctx.root_namespace or name.startswith("kube-"):
            continue
        yield namespace


def _workloads_in(ctx: AnalysisContext, namespace: str) -> tuple[str, ...]:
    return tuple(sorted(w.ref for w in ctx.snapshot.workloads if w.namespace == namespace))


def _policies_in(ctx: AnalysisContext, namespace: str) -> list[str]:
    kinds = ("PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication")
    return [
        f"{r.kind} {r.name}"
        for kind in kinds
        for r in ctx.resources(kind)
        if r.namespace == namespace
    ]


# --- TM-INST-017 ---------------------------------------------------------------------------


@rule(
    "TM-INST-017",
    title="Namespace without an injection label",
    severity=Severity.INFO,
    family=FAMILY,
    rationale="Pods of a namespace without istio-injection or istio.io/rev get no sidecar: they "
    "accept plaintext and none of the PeerAuthentication or AuthorizationPolicy written for "
    "them is enforced. With enableNamespacesByDefault they are injected, but only as long as "
    "that install option stays on.",
)
def namespace_not_labelled(ctx: AnalysisContext) -> Iterator[Issue]:
    cp = control_plane(ctx)
    for namespace in _user_namespaces(ctx):
        labels = namespace.labels
        if INJECTION_LABEL in labels or REV_LABEL in labels:
            continue
        if labels.get(DATAPLANE_LABEL) == "ambient":
            continue  # captured by ztunnel, no sidecar expected
        name, workloads = namespace.name, _workloads_in(ctx, namespace.name)
        where = namespace.at("metadata", "labels")
        label_fix = f"kubectl label namespace {name} {INJECTION_LABEL}=enabled"
        if cp.namespaces_by_default:
            source = cp.injectors["default"].source
            yield Issue(
                message=f"Namespace {name} has no {INJECTION_LABEL} or {REV_LABEL} label: its "
                f"pods are injected only because ConfigMap {source.ref} sets "
                "sidecarInjectorWebhook.enableNamespacesByDefault; they lose their sidecars "
                "on the next restart after that option changes",
                location=where,
                resource=namespace.key,
                workloads=workloads,
                fix=label_fix + "\n",
            )
            continue
        policies = _policies_in(ctx, name)
        lost = f"; not enforced: {plural(policies)}" if policies and workloads else ""
        yield Issue(
            message=f"Namespace {name} has no {INJECTION_LABEL} or {REV_LABEL} label: its pods "
            f"get no sidecar, accept plaintext and enforce no mesh policy{lost}",
            location=where,
            resource=namespace.key,
            workloads=workloads,
            severity=Severity.WARNING if lost else None,
            fix=f"{label_fix}\n# or, to record that it stays outside the mesh:\n"
            f"kubectl label namespace {name} {INJECTION_LABEL}=disabled\n",
        )


# --- TM-INST-018 ---------------------------------------------------------------------------


def _namespace_conflict(labels: Mapping[str, str]) -> tuple[list[str], str] | None:
    """The conflicting labels and what Istio actually does, or None without a conflict."""
    injection = labels.get(INJECTION_LABEL)
    if injection is not None and injection != "enabled":
        return None  # injection disabled: the other labels are deliberately inert
    stated = [f"{INJECTION_LABEL}={injection}"] if injection is not None else []
    stated += [f"{k}={labels[k]}" for k in (REV_LABEL, DATAPLANE_LABEL) if k in labels]
    if len(stated) < 2:
        return None
    if injection == "enabled" and REV_LABEL in labels:
        effect = (
            f"{INJECTION_LABEL} wins: the default revision injects, not revision "
            f"{labels[REV_LABEL]} (and nothing does if no default revision is installed)"
        )
    else:  # a sidecar label next to ambient
        effect = "pods get sidecars and ztunnel leaves them alone: the namespace is not ambient"
    return stated, effect


@rule(
    "TM-INST-018",
    title="Conflicting injection labels or annotations",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="When a namespace or pod states its data plane twice (istio-injection and "
    "istio.io/rev, a sidecar label and ambient, an inject label and annotation that disagree), "
    "Istio silently follows one of them: the pods may run another revision, no sidecar, or not "
    "be ambient, and the policies written for the mode the user expects are not enforced as "
    "expected.",
)
def conflicting_injection_labels(ctx: AnalysisContext) -> Iterator[Issue]:
    for namespace in raw_objects(ctx, "Namespace"):
        found = _namespace_conflict(namespace.labels)
        if found is None:
            continue
        stated, effect = found
        yield Issue(
            message=f"Namespace {namespace.name} has {', '.join(stated)}: {effect}",
            location=namespace.at("metadata", "labels"),
            resource=namespace.key,
            fix=f"# keep one way to choose the data plane of namespace {namespace.name}, e.g.\n"
            f"kubectl label namespace {namespace.name} {INJECTION_LABEL}-\n",
        )
    for pod in pod_templates(ctx):
        labels, notes = text_map(pod.labels), text_map(pod.annotations)
        if INJECT not in labels or INJECT not in notes:
            continue
        label, note = labels[INJECT], notes[INJECT]
        if (is_true(label) and is_true(note)) or (is_false(label) and is_false(note)):
            continue
        yield Issue(
            message=f'{pod.resource.kind} {pod.ref} has the label {INJECT}: "{label}" and the '
            f'annotation {INJECT}: "{note}": the label wins, so injection follows "{label}"',
            location=pod.meta_at("annotations", INJECT),
            resource=pod.resource.key,
            workloads=(pod.ref,),
            fix=f"# {pod.ref}: remove the annotation {INJECT} (the label decides)\n",
        )


# --- TM-INST-019 ---------------------------------------------------------------------------


@rule(
    "TM-INST-019",
    title="Running pod without a sidecar where injection is on",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="A pod created before injection was enabled, or while the injector was "
    "unreachable (failurePolicy Ignore), keeps running without a sidecar: it accepts plaintext "
    "and enforces no mesh policy although its namespace is meshed.",
)
def pod_missing_proxy(ctx: AnalysisContext) -> Iterator[Issue]:
    cp = control_plane(ctx)
    for pod in pod_templates(ctx):
        if not is_dumped(pod) or any(proxy_containers(pod)) or has_finished(pod):
            continue
        verdict = cp.injection(pod)
        if verdict.injection is not Injection.YES:
            continue
        unserved = ""
        if verdict.revision and cp.evidenced and verdict.revision not in cp.revisions:
            unserved = f"; no installed control plane serves revision {verdict.revision}"
        yield Issue(
            message=f"Pod {pod.ref} runs without an istio-proxy container although "
            f"{verdict.reason}: it was created before injection was enabled or the injector "
            f"failed{unserved}; it accepts plaintext and enforces no mesh policy",
            location=pod.meta_at("name"),
            resource=pod.resource.key,
            workloads=(pod.ref,),
            fix=f"kubectl -n {pod.resource.namespace} delete pod {pod.resource.name}  "
            "# or restart its controller: the new pod is injected\n",
        )


# --- TM-INST-020 ---------------------------------------------------------------------------


def _unserved(cp: ControlPlane, revision: str) -> bool:
    return cp.evidenced and revision not in cp.revisions


@rule(
    "TM-INST-020",
    title="istio.io/rev names a revision no installed control plane serves",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="Injection webhooks select pods by revision; a revision label nothing serves "
    "means no sidecar (or, with a failurePolicy Fail webhook, pods that cannot be created). "
    "Typical after an upgrade removed the old revision or a typo in the label.",
)
def unserved_revision(ctx: AnalysisContext) -> Iterator[Issue]:
    cp = control_plane(ctx)
    if not cp.evidenced:
        return  # nothing among the inputs says which revisions are installed
    installed = ", ".join(sorted(cp.revisions))
    for namespace in raw_objects(ctx, "Namespace"):
        revision = namespace.labels.get(REV_LABEL)
        if not revision or INJECTION_LABEL in namespace.labels or not _unserved(cp, revision):
            continue  # istio-injection, when present, decides instead of istio.io/rev
        yield Issue(
            message=f"Namespace {namespace.name} has {REV_LABEL}={revision}, but no control "
            f"plane among the inputs serves revision {revision} (installed: {installed}): its "
            "new pods get no sidecar",
            location=namespace.at("metadata", "labels", REV_LABEL),
            resource=namespace.key,
            workloads=_workloads_in(ctx, namespace.name),
            fix=f"kubectl label namespace {namespace.name} {REV_LABEL}=<one of: {installed}> "
            "--overwrite\n",
        )
    for pod in pod_templates(ctx):
        revision = text_map(pod.labels).get(REV_LABEL)
        ns_labels = cp.namespace(pod.resource.namespace) or {}
        if not revision or INJECTION_LABEL in ns_labels or REV_LABEL in ns_labels:
            continue  # the namespace label decides (its own finding above)
        if any(proxy_containers(pod)) or not _unserved(cp, revision):
            continue  # an injected pod carries the label of the revision that injected it
        yield Issue(
            message=f"{pod.resource.kind} {pod.ref} has {REV_LABEL}={revision}, but no control "
            f"plane among the inputs serves revision {revision} (installed: {installed}): it "
            "gets no sidecar",
            location=pod.meta_at("labels", REV_LABEL),
            resource=pod.resource.key,
            workloads=(pod.ref,),
            fix=f"# {pod.ref}: set {REV_LABEL} to one of: {installed}\n",
        )


# --- TM-INST-022 ---------------------------------------------------------------------------


def _auto_image(pod: PodTemplate) -> tuple[int, str] | None:
    containers = pod.spec.get("containers")
    for index, container in enumerate(containers if isinstance(containers, list) else ()):
        named = isinstance(container, Mapping) and container.get("name") == "istio-proxy"
        if named and str(container.get("image", "")).strip() == "auto":
            return index, "containers"
    return None


@rule(
    "TM-INST-022",
    title="istio-proxy with image: auto that is never injected",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="`image: auto` (gateway deployments, manual templates) asks the injector to fill "
    "in the proxy; where no injection webhook selects the pod the image stays `auto`, which "
    "does not exist: the gateway never starts and the traffic it was meant to secure goes "
    "elsewhere or nowhere.",
)
def image_auto_without_injection(ctx: AnalysisContext) -> Iterator[Issue]:
    cp = control_plane(ctx)
    for pod in pod_templates(ctx):
        found = _auto_image(pod)
        if found is None:
            continue
        index, field = found
        where = pod.at(field, index, "image")
        kind = pod.resource.kind
        if is_dumped(pod):
            yield Issue(
                message=f"Pod {pod.ref} still has image: auto for istio-proxy: injection did not "
                "happen, so the pod cannot start",
                location=where,
                resource=pod.resource.key,
                workloads=(pod.ref,),
                severity=Severity.ERROR,
                fix=f"# make the namespace {pod.resource.namespace} or the pod selected by an "
                f"injection webhook (e.g. label {INJECTION_LABEL}=enabled), then recreate it\n",
            )
            continue
        verdict = cp.injection(pod)
        if verdict.injection is Injection.YES:
            continue
        unknown = verdict.injection is Injection.UNKNOWN
        yield Issue(
            message=f"{kind} {pod.ref} has image: auto for istio-proxy, but "
            f"{'it may not be injected' if unknown else 'it is not injected'}: {verdict.reason}; "
            "the image stays `auto` and the pod cannot start",
            location=where,
            resource=pod.resource.key,
            workloads=(pod.ref,),
            severity=Severity.INFO if unknown else (Severity.ERROR if kind == "Pod" else None),
            fix=f"kubectl label namespace {pod.resource.namespace} {INJECTION_LABEL}=enabled\n"
            f'# or label the pod template {INJECT}: "true"\n',
        )
