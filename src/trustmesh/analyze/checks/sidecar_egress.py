"""Sidecar ``outboundTrafficPolicy.egressProxy`` (TM-EDGE-008).

``egressProxy`` is hidden from Istio's documentation and ``istioctl analyze`` reports it as
deprecated and ignored. What istiod does with it: only under ALLOW_ANY, it replaces the
passthrough destination of unknown traffic with a cluster for the proxy host — a cluster the
sidecar has only when its ``egress`` hosts import that host. Egress control that rests on it
rests on an undocumented field; trustmesh's egress verdicts treat such traffic as passed
through directly.
"""

from __future__ import annotations

from collections.abc import Iterator

from trustmesh.analyze.checks.raw_objects import RawObject, items, mapping, raw_objects
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule


def _imports(sidecar: RawObject, host: str) -> bool:
    """Whether the Sidecar's egress hosts (``ns/dnsName``) import ``host`` (FQDN)."""
    listeners = items(sidecar.get("spec", "egress"))
    if not listeners:
        return True  # no egress section: every service is imported
    parts = host.split(".")
    host_ns = parts[1] if len(parts) > 2 and parts[2] == "svc" else ""
    for listener in listeners:
        for entry in items(mapping(listener).get("hosts")):
            namespace, _, name = str(entry).partition("/")
            if namespace == ".":
                namespace = sidecar.namespace
            if namespace not in ("*", "~") and host_ns and namespace != host_ns:
                continue
            if name == "*" or name == host or (name.startswith("*.") and host.endswith(name[1:])):
                return True
    return False


@rule(
    "TM-EDGE-008",
    title="Sidecar relies on the deprecated egressProxy",
    severity=Severity.WARNING,
    family="edge",
    rationale="egressProxy is undocumented and reported by istioctl as deprecated and ignored; "
    "it takes effect only under ALLOW_ANY and only when the Sidecar imports the proxy's host. "
    "Route external traffic through an egress gateway (ServiceEntry + VirtualService) under "
    "REGISTRY_ONLY instead.",
)
def egress_proxy(ctx: AnalysisContext) -> Iterator[Issue]:
    for sidecar in raw_objects(ctx, "Sidecar", groups=("networking.istio.io",)):
        policy = mapping(sidecar.get("spec", "outboundTrafficPolicy"))
        proxy = mapping(policy.get("egressProxy"))
        if "egressProxy" not in policy:
            continue
        host = str(proxy.get("host") or "")
        mode = str(policy.get("mode") or "REGISTRY_ONLY").upper()
        if mode != "ALLOW_ANY":
            effect = f"mode is {mode}, so it is ignored: unknown destinations are blocked"
        elif host and not _imports(sidecar, host):
            effect = (
                f"{host} is not among this Sidecar's egress hosts, so unknown traffic is sent "
                "to a cluster the sidecar does not have and fails"
            )
        else:
            effect = (
                f"unknown traffic goes to {host or '(no host)'} only through this undocumented "
                "field, which istioctl reports as ignored; trustmesh treats that traffic as "
                "passed through directly"
            )
        yield Issue(
            message=f"Sidecar {sidecar.ref} sets outboundTrafficPolicy.egressProxy: {effect}",
            location=sidecar.at("spec", "outboundTrafficPolicy", "egressProxy"),
            resource=sidecar.key,
            fix="outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n"
            "# and send external hosts through an egress gateway (ServiceEntry + "
            "VirtualService)\n",
        )
