"""Istio's WorkloadGroup auto-registration, the pure part: the WorkloadEntry a connecting
workload gets from its group (istiod's ``pilot/pkg/autoregistration/controller.go``).

* The entry is named ``<group>-<ip>`` (``:`` of an IPv6 address as ``-``), with
  ``-<network>`` when the proxy names a network; the last 253 characters if longer.
* Its spec is the group's ``template`` with the proxy's address; its labels are the
  template's, overridden by the group's ``metadata.labels``, overridden by the proxy's
  own; ``network`` is the proxy's when it names one.
* Its annotations: ``istio.io/autoRegistrationGroup: <group>`` merged with the group's
  ``metadata.annotations``, then ``istio.io/workloadController`` (the replica that
  registered it) and ``istio.io/connectedAt`` (RFC 3339, nanoseconds).
* It is owned by the group (an ownerReference with ``controller: true``): deleting the
  group deletes it.
* A group with a ``probe`` gives its entries ``proxy.istio.io/health-checks-enabled``:
  such an entry is a ready endpoint only while its ``Healthy`` condition is ``True`` (not
  set yet: not ready), as the proxy's probe reports it (:func:`with_health`).
* The proxy's verified identity must be the entry's: the same namespace, and the
  template's serviceAccount when it names one (``ensureProxyCanControlEntry``). trustmesh
  also refuses another service account than ``default`` when the template names none: the
  endpoint's identity would otherwise differ from the certificate's (fail closed).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from pydantic import ValidationError

from trustmesh.api import models as m

GROUP_ANNOTATION = "istio.io/autoRegistrationGroup"
CONTROLLER_ANNOTATION = "istio.io/workloadController"
CONNECTED_AT_ANNOTATION = "istio.io/connectedAt"
DISCONNECTED_AT_ANNOTATION = "istio.io/disconnectedAt"
HEALTH_CHECK_ANNOTATION = "proxy.istio.io/health-checks-enabled"
CONDITION_HEALTHY = "Healthy"
API_VERSION = "networking.istio.io/v1"

__all__ = [
    "CONNECTED_AT_ANNOTATION",
    "CONTROLLER_ANNOTATION",
    "GROUP_ANNOTATION",
    "HEALTH_CHECK_ANNOTATION",
    "GroupRefused",
    "check_identity",
    "entry_from_group",
    "entry_name",
    "is_healthy",
    "owned_by",
    "parse_group",
    "with_health",
]


class GroupRefused(ValueError):
    """A registration the group does not allow; ``code`` names why (for the caller's
    status and the test)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def entry_name(group: str, address: str, network: str = "") -> str:
    """Istio's ``autoregisteredWorkloadEntryName``."""
    parts = [group, address.replace(":", "-")]
    if network:
        parts.append(network)
    name = "-".join(parts)
    return name[-253:] if len(name) > 253 else name


def parse_group(manifest: str | dict[str, Any]) -> m.WorkloadGroupSpec:
    """The spec of a stored WorkloadGroup manifest (:class:`GroupRefused` if invalid)."""
    body = json.loads(manifest) if isinstance(manifest, str) else manifest
    try:
        return m.WorkloadGroupSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        raise GroupRefused("workloadgroup-invalid", str(exc).splitlines()[0]) from None


def identity_of(spec: m.WorkloadGroupSpec) -> str:
    """The service account every entry of the group runs as."""
    return spec.template.service_account or "default"


def check_identity(group: str, spec: m.WorkloadGroupSpec, service_account: str) -> None:
    """Refuse a workload whose identity is not the group's (the namespace is the group's
    by construction: a group is looked up in the workload's own namespace)."""
    wanted = identity_of(spec)
    if service_account != wanted:
        raise GroupRefused(
            "identity-not-group",
            f"WorkloadGroup {group} runs as service account {wanted!r}, not {service_account!r}",
        )


def entry_from_group(
    group_manifest: str | dict[str, Any],
    *,
    address: str,
    proxy_labels: dict[str, str] | None = None,
    network: str = "",
    controller: str,
    connected_at: dt.datetime,
) -> dict[str, Any]:
    """The WorkloadEntry manifest istiod would create for a proxy of this group."""
    group = json.loads(group_manifest) if isinstance(group_manifest, str) else group_manifest
    metadata = group.get("metadata") or {}
    name, namespace = str(metadata.get("name", "")), str(metadata.get("namespace", ""))
    spec = parse_group(group)
    template = spec.template.model_dump(by_alias=True, exclude_defaults=True)
    template.pop("address", None)
    labels = {**spec.template.labels, **spec.metadata.labels, **(proxy_labels or {})}
    annotations = {GROUP_ANNOTATION: name, **spec.metadata.annotations}
    if spec.probe is not None:
        annotations[HEALTH_CHECK_ANNOTATION] = "true"
    annotations[CONTROLLER_ANNOTATION] = controller
    annotations[CONNECTED_AT_ANNOTATION] = _rfc3339_nano(connected_at)
    entry_spec: dict[str, Any] = {**template, "address": address}
    if labels:
        entry_spec["labels"] = labels
    if network:
        entry_spec["network"] = network
    owner: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "WorkloadGroup",
        "name": name,
        "controller": True,
    }
    if metadata.get("uid"):
        owner["uid"] = metadata["uid"]
    entry_metadata: dict[str, Any] = {
        "name": entry_name(name, address, network),
        "namespace": namespace,
        "annotations": annotations,
        "ownerReferences": [owner],
    }
    if labels:
        entry_metadata["labels"] = labels
    return {
        "apiVersion": API_VERSION,
        "kind": "WorkloadEntry",
        "metadata": entry_metadata,
        "spec": entry_spec,
    }


def with_health(
    entry_manifest: str | dict[str, Any], healthy: bool, message: str, now: dt.datetime
) -> dict[str, Any]:
    """The entry with its ``Healthy`` condition set (istiod's ``transformHealthEvent``:
    probe and transition time are the report's; the message when unhealthy)."""
    entry = json.loads(entry_manifest) if isinstance(entry_manifest, str) else entry_manifest
    at = _rfc3339_nano(now)
    condition: dict[str, Any] = {
        "type": CONDITION_HEALTHY,
        "status": "True" if healthy else "False",
        "lastProbeTime": at,
        "lastTransitionTime": at,
    }
    if not healthy and message:
        condition["message"] = message
    status = dict(entry.get("status") or {})
    others = [c for c in status.get("conditions") or () if c.get("type") != CONDITION_HEALTHY]
    status["conditions"] = [*others, condition]
    return {**entry, "status": status}


def is_healthy(entry_manifest: str | dict[str, Any]) -> bool:
    """Istio's ``IsWorkloadEntryHealthy``: without health checks, always; with them, only
    while the ``Healthy`` condition is ``True``."""
    entry = json.loads(entry_manifest) if isinstance(entry_manifest, str) else entry_manifest
    if HEALTH_CHECK_ANNOTATION not in ((entry.get("metadata") or {}).get("annotations") or {}):
        return True
    for condition in (entry.get("status") or {}).get("conditions") or ():
        if isinstance(condition, dict) and condition.get("type") == CONDITION_HEALTHY:
            return condition.get("status") == "True"
    return False


def owned_by(entry_manifest: str | dict[str, Any], group: str) -> bool:
    """Whether a WorkloadEntry is controlled by the WorkloadGroup ``group`` (its namespace)."""
    entry = json.loads(entry_manifest) if isinstance(entry_manifest, str) else entry_manifest
    for owner in (entry.get("metadata") or {}).get("ownerReferences") or ():
        if (
            isinstance(owner, dict)
            and owner.get("kind") == "WorkloadGroup"
            and str(owner.get("apiVersion", "")).startswith("networking.istio.io/")
            and owner.get("name") == group
        ):
            return True
    return False


def _rfc3339_nano(when: dt.datetime) -> str:
    """Go's ``time.RFC3339Nano`` of a UTC time (trailing zeros of the fraction dropped)."""
    when = when.astimezone(dt.UTC)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += ("." + f"{when.microsecond:06d}000").rstrip("0")
    return text + "Z"
