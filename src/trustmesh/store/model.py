"""Values the store holds and hands out: immutable, with the store's revision attached.

Keys follow Kubernetes: an Istio resource is ``group/kind/namespace/name`` and carries a
``resource_version`` (etcd's ``mod_revision`` of its key; in the file store, the store's
own counter at the write). A write names the version it expects, and a write against a
stale version is a :class:`Conflict`, never a silent overwrite.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

# One error type for the CA's directory and the shared store: the CA server fails closed
# on either. It means: the store cannot be read or written (unreachable, corrupt, bad URL).
from trustmesh.identity.store import StoreError

__all__ = ["StoreError"]

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_KIND = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_GROUP = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?)(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def is_object_name(name: str, *, label_only: bool = False) -> bool:
    """Kubernetes' rule: a DNS-1123 subdomain (≤ 253), or a label (≤ 63) where asked."""
    if label_only:
        return len(name) <= 63 and _LABEL.fullmatch(name) is not None
    return len(name) <= 253 and all(_LABEL.fullmatch(part) for part in name.split("."))


class Conflict(StoreError):
    """A compare-and-swap lost: someone else changed the object since it was read."""

    def __init__(self, key: ResourceKey, expected: int, found: int) -> None:
        what = "does not exist" if found == 0 else f"is at resourceVersion {found}"
        wanted = "not to exist" if expected == 0 else f"resourceVersion {expected}"
        super().__init__(
            f"{key.display()}: the object was changed by someone else: expected {wanted}, "
            f"it {what}; read it again and retry"
        )
        self.key = key
        self.expected = expected
        self.found = found


@dataclass(frozen=True, slots=True, order=True)
class ResourceKey:
    """Which object: API group (``security.istio.io``; empty for core), kind, namespace, name."""

    group: str
    kind: str
    namespace: str
    name: str

    def __post_init__(self) -> None:
        # Keys become etcd key segments and file names: nothing that could escape them.
        if (
            not is_object_name(self.name)
            or (self.namespace and not is_object_name(self.namespace, label_only=True))
            or not _KIND.fullmatch(self.kind)
            or (self.group and not _GROUP.fullmatch(self.group))
        ):
            raise StoreError(
                f"not a valid object key: {self.group}/{self.kind}/{self.namespace}/{self.name}"
            )

    def display(self) -> str:
        """kubectl's ``authorizationpolicy.security.istio.io/deny-get``."""
        kind = self.kind.lower()
        return f"{kind}.{self.group}/{self.name}" if self.group else f"{kind}/{self.name}"

    def path(self) -> str:
        return f"{self.group or 'core'}/{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class StoredResource:
    """One object as stored: its manifest (canonical JSON text) and its version."""

    key: ResourceKey
    manifest: str
    resource_version: int

    def body(self) -> dict[str, Any]:
        """The manifest with ``metadata.resourceVersion`` set, as ``get -o`` prints it."""
        value: dict[str, Any] = json.loads(self.manifest)
        metadata = value.setdefault("metadata", {})
        metadata["resourceVersion"] = str(self.resource_version)
        return value


@dataclass(frozen=True, slots=True)
class ResourceWrite:
    """Put ``manifest`` at ``key`` if the object is at ``expected_version`` (0: absent)."""

    key: ResourceKey
    manifest: str
    expected_version: int


@dataclass(frozen=True, slots=True)
class ResourceDelete:
    """Delete ``key`` if it is at ``expected_version``."""

    key: ResourceKey
    expected_version: int


class ChangeType(Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class ResourceEvent:
    """One change, in store order; ``revision`` is the store revision of the change."""

    type: ChangeType
    key: ResourceKey
    revision: int
    resource: StoredResource | None  # None for DELETE


# One commit's events (or several commits'), in store order; outside the classes whose
# ``list`` method shadows the builtin.
EventBatch = list[ResourceEvent]


class WorkloadHealth(Enum):
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


@dataclass(frozen=True, slots=True)
class WorkloadRecord:
    """A pod or WorkloadEntry on a host, as the registry holds it under the host's lease.

    Istio's WorkloadEntry fields (address, labels, serviceAccount, network) plus the host
    it runs on and its health; when the host's lease ends, its records go with it.
    """

    namespace: str
    name: str
    host: str
    address: str
    service_account: str
    labels: tuple[tuple[str, str], ...] = ()
    health: WorkloadHealth = WorkloadHealth.HEALTHY
    kind: str = "WorkloadEntry"  # or "Pod"
    # Process mode (no capture): where the app itself listens, and where the sidecar
    # offers it outbound listeners; empty when not used (the control plane's defaults).
    app_address: str = ""
    outbound_address: str = ""
    # Pod sandbox (netns hosts): "transparent" — the pod's traffic is captured (Istio's
    # virtualInbound/Outbound layout) and its Services' ClusterIPs (``namespace/name`` →
    # address) are the ones its host's kube-proxy rules use. Empty: process mode.
    capture: str = ""
    service_addresses: tuple[tuple[str, str], ...] = ()
    # Istio's auto-registration (``ISTIO_META_AUTO_REGISTER_GROUP``): the WorkloadGroup of
    # the record's namespace it registers with (its name must then be Istio's
    # ``<group>-<ip>[-<network>]``), and the network the proxy names.
    group: str = ""
    network: str = ""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> str:
        value = {
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "host": self.host,
            "address": self.address,
            "serviceAccount": self.service_account,
            "labels": dict(self.labels),
            "health": self.health.value,
        }
        if self.app_address:
            value["appAddress"] = self.app_address
        if self.outbound_address:
            value["outboundAddress"] = self.outbound_address
        if self.capture:
            value["capture"] = self.capture
        if self.service_addresses:
            value["serviceAddresses"] = dict(self.service_addresses)
        if self.group:
            value["group"] = self.group
        if self.network:
            value["network"] = self.network
        return json.dumps(value, sort_keys=True)

    @classmethod
    def from_json(cls, text: bytes | str) -> WorkloadRecord:
        data = json.loads(text)
        return cls(
            namespace=data["namespace"],
            name=data["name"],
            host=data["host"],
            address=data["address"],
            service_account=data["serviceAccount"],
            labels=tuple(sorted(data.get("labels", {}).items())),
            health=WorkloadHealth(data.get("health", "Healthy")),
            kind=data.get("kind", "WorkloadEntry"),
            app_address=data.get("appAddress", ""),
            outbound_address=data.get("outboundAddress", ""),
            capture=_capture(data.get("capture", "")),
            service_addresses=tuple(sorted(_str_map(data.get("serviceAddresses", {})).items())),
            group=_str(data.get("group", ""), "group"),
            network=_str(data.get("network", ""), "network"),
        )


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    return value


def _capture(value: Any) -> str:
    if value not in ("", "transparent"):
        raise ValueError(f"capture must be 'transparent' or absent, not {value!r}")
    return str(value)


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("serviceAddresses must map namespace/name to an address")
    return value
