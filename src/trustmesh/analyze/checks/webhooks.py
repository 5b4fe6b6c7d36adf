"""Istio's admission webhooks (TM-INST-023, TM-INST-024).

The sidecar injector and the config validator are webhooks: when two injectors select the
same pod it is injected twice (or by the wrong revision), and a webhook that calls nothing
either blocks every pod creation (failurePolicy Fail) or lets pods through without a sidecar
and configuration through without validation (Ignore).
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

from trustmesh.analyze.checks.control_plane import (
    INJECTION_LABEL,
    REV_LABEL,
    Webhook,
    is_istio_webhook,
    webhooks,
)
from trustmesh.analyze.checks.raw_objects import mapping
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api.snapshot import INJECT

_VALIDATORS = ("istio-validator", "istiod-default-validator")
_INJECTORS = ("istio-sidecar-injector",)


def _label_sets(revisions: set[str], key: str, values: tuple[str, ...]) -> list[dict[str, str]]:
    """Istio's own probe: no label, the label with each value, each plus every revision."""
    base: list[dict[str, str]] = [{}] + [{key: v} for v in values]
    return base + [{**b, REV_LABEL: r} for r in sorted(revisions) for b in base]


@rule(
    "TM-INST-023",
    title="Injection webhooks that select the same pods",
    severity=Severity.ERROR,
    family="install",
    rationale="When more than one injector webhook selects a pod, each is called: the pod gets "
    "the proxy of whichever runs first (or two), not the revision its labels chose; leftovers "
    "of an upgrade or a revision installed next to a revisionless one.",
)
def overlapping_injectors(ctx: AnalysisContext) -> Iterator[Issue]:
    hooks = [h for h in webhooks(ctx, "MutatingWebhookConfiguration") if is_istio_webhook(h)]
    revisions = {r for h in hooks for r in h.revisions()}
    revisions |= {h.config.labels[REV_LABEL] for h in hooks if h.config.labels.get(REV_LABEL)}
    namespaces = _label_sets(revisions, INJECTION_LABEL, ("enabled", "disabled"))
    pods = _label_sets(revisions, INJECT, ("true", "false"))
    overlaps: dict[str, tuple[Webhook, set[str], str]] = {}
    for ns_labels in namespaces:
        for pod_labels in pods:
            matched = [h for h in hooks if h.selects(ns_labels, pod_labels)]
            if len(matched) < 2:
                continue
            example = ", ".join(f"{k}={v}" for k, v in ns_labels.items()) or "no labels"
            pod_example = ", ".join(f"{k}={v}" for k, v in pod_labels.items()) or "no labels"
            for hook in matched:
                entry = overlaps.setdefault(
                    hook.label, (hook, set(), f"namespace {example}, pod {pod_example}")
                )
                entry[1].update(o.label for o in matched if o is not hook)
    for hook, others, example in overlaps.values():
        yield Issue(
            message=f"Injection webhook {hook.label} selects the same pods as "
            f"{', '.join(sorted(others))} (e.g. {example}): such pods go to more than one "
            "injector and get the proxy of whichever runs first (or are injected twice), not "
            "the revision their labels chose",
            location=hook.at("namespaceSelector"),
            resource=hook.config.key,
            fix="# delete the injector configuration left by the old install, or make the "
            "selectors exclusive (istio.io/rev In [<revision>] on one, DoesNotExist on the "
            "other)\n",
        )


def _target_problem(ctx: AnalysisContext, hook: Webhook) -> tuple[str, str] | None:
    """(field, what is wrong) with where the webhook sends requests, None when fine."""
    client = mapping(hook.body.get("clientConfig"))
    service = mapping(client.get("service"))
    url = client.get("url")
    if service:
        name, namespace = str(service.get("name", "")), str(service.get("namespace", ""))
        known = {s.name for s in ctx.snapshot.services if s.namespace == namespace}
        if known and name not in known:
            return "service", (
                f"calls Service {namespace}/{name}, which does not exist among the Services of "
                f"{namespace} in the inputs ({', '.join(sorted(known))})"
            )
        return None
    if url is None or not str(url).strip():
        return "url", "has neither a Service nor a URL to call (the URL is blank)"
    parts = urlsplit(str(url).strip())
    if parts.scheme != "https" or not parts.hostname:
        return "url", f"calls {url}, which is not an https:// URL with a host"
    return None


@rule(
    "TM-INST-024",
    title="Istio webhook calls a missing Service or a blank URL",
    severity=Severity.ERROR,
    family="install",
    rationale="An injector or validator webhook that cannot be called either blocks every "
    "pod or resource it selects (failurePolicy Fail) or lets them through untouched (Ignore): "
    "pods start without sidecars and invalid or unsafe Istio configuration is accepted.",
)
def webhook_target(ctx: AnalysisContext) -> Iterator[Issue]:
    for kind, prefixes in (
        ("MutatingWebhookConfiguration", _INJECTORS),
        ("ValidatingWebhookConfiguration", _VALIDATORS),
    ):
        for hook in webhooks(ctx, kind):
            if not (is_istio_webhook(hook) or hook.config.name.startswith(prefixes)):
                continue
            found = _target_problem(ctx, hook)
            if found is None:
                continue
            field, problem = found
            policy = str(hook.body.get("failurePolicy") or "Fail")
            effect = (
                "every object it selects is refused"
                if policy == "Fail"
                else "objects it selects pass unchecked"
            )
            what = "pods get no sidecar" if kind.startswith("Mutating") else "nothing is validated"
            yield Issue(
                message=f"{kind} {hook.config.name}, webhook {hook.name}, {problem}: with "
                f"failurePolicy {policy} {effect} ({what} if it is let through)",
                location=hook.at("clientConfig", field),
                resource=hook.config.key,
                fix="# point clientConfig at the control plane: service {name: istiod, "
                "namespace: istio-system} or, for an external control plane, "
                "url: https://<istiod host>:15017/...\n",
            )
