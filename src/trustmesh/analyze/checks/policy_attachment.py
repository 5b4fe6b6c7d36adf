"""Security policies attached by selector to Gateway API gateways (TM-EDGE-007).

Istio deploys a Gateway API ``Gateway`` as pods labelled
``gateway.networking.k8s.io/gateway-name: NAME``. Policies meant for them should say so with
``targetRefs`` (kind Gateway). A label ``selector`` still reaches such pods only while istiod
runs with ``ENABLE_SELECTOR_BASED_K8S_GATEWAY_POLICY`` (on by default, slated to go away) and
never on a waypoint (``pilot/pkg/model/policyattachment.go``): a RequestAuthentication,
AuthorizationPolicy or WasmPlugin written that way silently stops applying.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from trustmesh.analyze.checks.control_plane import istiod_env, selector_matches
from trustmesh.analyze.checks.install_util import is_false
from trustmesh.analyze.checks.raw_objects import mapping, raw_objects, text_map
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
_GATEWAY_API = ("gateway.networking.k8s.io",)
_WAYPOINT_CLASS = "istio-waypoint"
_FLAG = "ENABLE_SELECTOR_BASED_K8S_GATEWAY_POLICY"
_POLICY_KINDS = {
    "AuthorizationPolicy": ("security.istio.io",),
    "RequestAuthentication": ("security.istio.io",),
    "WasmPlugin": ("extensions.istio.io",),
}


@dataclass(frozen=True, slots=True)
class _GatewayPods:
    """The pods of one Gateway API gateway, as found or as Istio will create them."""

    namespace: str
    gateway: str
    labels: Mapping[str, str]
    waypoint: bool


def _gateway_pods(ctx: AnalysisContext) -> list[_GatewayPods]:
    classes: dict[tuple[str, str], str] = {}
    found: dict[tuple[str, str], _GatewayPods] = {}
    for gateway in raw_objects(ctx, "Gateway", groups=_GATEWAY_API):
        cls = str(gateway.get("spec", "gatewayClassName") or "")
        classes[(gateway.namespace, gateway.name)] = cls
        labels = {
            **text_map(mapping(gateway.get("spec", "infrastructure")).get("labels")),
            GATEWAY_NAME_LABEL: gateway.name,
        }
        key = (gateway.namespace, gateway.name)
        found[key] = _GatewayPods(gateway.namespace, gateway.name, labels, cls == _WAYPOINT_CLASS)
    for workload in ctx.snapshot.workloads:
        name = workload.labels.get(GATEWAY_NAME_LABEL)
        if not name:
            continue
        key = (workload.namespace, name)
        waypoint = classes.get(key) == _WAYPOINT_CLASS or (
            workload.labels.get("gateway.istio.io/managed") == "istio.io-mesh-controller"
        )
        found[key] = _GatewayPods(workload.namespace, name, dict(workload.labels), waypoint)
    return list(found.values())


@rule(
    "TM-EDGE-007",
    title="Selector-based policy on a Gateway API gateway (needs targetRefs)",
    severity=Severity.WARNING,
    family="edge",
    rationale="Policies reach Gateway API gateways by targetRefs. A label selector applies "
    "to such a gateway only while istiod keeps ENABLE_SELECTOR_BASED_K8S_GATEWAY_POLICY on "
    "(the default for now) and never to a waypoint: authentication and authorization written "
    "that way stop applying without any error.",
)
def selector_on_gateway_api(ctx: AnalysisContext) -> Iterator[Issue]:
    gateways = _gateway_pods(ctx)
    if not gateways:
        return
    flag, flag_at = istiod_env(ctx, _FLAG)
    disabled = flag is not None and is_false(flag)
    root = ctx.root_namespace
    for kind, groups in _POLICY_KINDS.items():
        for policy in raw_objects(ctx, kind, groups=groups):
            spec = mapping(policy.get("spec"))
            if spec.get("targetRef") or spec.get("targetRefs") or spec.get("selector") is None:
                continue
            selector = spec.get("selector")
            for pods in gateways:
                if policy.namespace not in (pods.namespace, root):
                    continue
                if not selector_matches(selector, pods.labels):
                    continue
                if pods.waypoint:
                    effect, severity = (
                        "waypoints never apply selector-based policies",
                        (Severity.ERROR),
                    )
                elif disabled:
                    effect = f"istiod sets {_FLAG}=false ({flag_at}), so it does not apply"
                    severity = Severity.ERROR
                else:
                    effect = (
                        f"it applies only while istiod keeps {_FLAG} on (Istio's default for "
                        "now) and stops applying, without an error, when that goes"
                    )
                    severity = None
                yield Issue(
                    message=f"{kind} {policy.ref} selects the pods of Gateway API gateway "
                    f"{pods.namespace}/{pods.gateway} by label: {effect}",
                    location=policy.at("spec", "selector"),
                    resource=policy.key,
                    severity=severity,
                    fix="spec:\n  targetRefs:\n  - group: gateway.networking.k8s.io\n"
                    f"    kind: Gateway\n    name: {pods.gateway}\n# and remove spec.selector\n",
                )
