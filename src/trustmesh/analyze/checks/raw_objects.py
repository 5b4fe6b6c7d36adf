"""Objects as written, for checks that read fields the API model does not keep.

Not a check module (it registers nothing). Secrets, webhook configurations, EnvoyFilters,
Gateway API gateways, ProxyConfigs and WasmPlugins reach the analyzer as unknown resources
(their body kept); Pods, ConfigMaps, VirtualServices and AuthorizationPolicies are typed, but
their typed models drop fields (images, ``status``, HTTP routes) these checks need. Both
kinds are read here the same way, with field locations from the object's own document, so
a check does not depend on which kinds the loader happens to model.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from trustmesh.analyze.context import AnalysisContext
from trustmesh.api.diagnostics import Location
from trustmesh.api.yamldoc import FieldPath, YamlDocument

# Kinds without a namespace: their key is Kind//name whatever namespace the loader assumed.
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
        "CustomResourceDefinition",
        "GatewayClass",
        "ClusterRole",
        "ClusterRoleBinding",
    }
)


def mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def text_map(value: Any) -> dict[str, str]:
    """A labels/annotations map with string keys and values (YAML may give other scalars)."""
    return {str(k): "" if v is None else str(v) for k, v in mapping(value).items()}


@dataclass(frozen=True, slots=True)
class RawObject:
    """One Kubernetes object as written: its body, and where each of its fields is."""

    api_version: str
    kind: str
    name: str
    namespace: str  # "" for cluster-scoped kinds
    body: Mapping[str, Any] = field(repr=False, compare=False)
    origin: Location = field(compare=False)
    document: YamlDocument | None = field(default=None, repr=False, compare=False)
    base_path: FieldPath = field(default=(), repr=False, compare=False)

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def key(self) -> str:
        """``Kind/namespace/name``, the form findings name resources by."""
        return f"{self.kind}/{self.namespace}/{self.name}"

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def labels(self) -> dict[str, str]:
        return text_map(mapping(self.body.get("metadata")).get("labels"))

    @property
    def annotations(self) -> dict[str, str]:
        return text_map(mapping(self.body.get("metadata")).get("annotations"))

    def get(self, *path: str | int) -> Any:
        """The value at ``path`` (from the object's top level), None when absent."""
        value: Any = self.body
        for part in path:
            if isinstance(part, int):
                if not isinstance(value, list) or not 0 <= part < len(value):
                    return None
            elif not isinstance(value, Mapping) or part not in value:
                return None
            value = value[part]
        return value

    def at(self, *path: str | int) -> Location:
        """Location of the field at ``path`` (or of its deepest parent that exists)."""
        if self.document is None:
            return self.origin
        return self.document.location((*self.base_path, *path))


def raw_objects(
    ctx: AnalysisContext, kind: str, groups: Collection[str] | None = None
) -> Iterator[RawObject]:
    """Every object of ``kind`` (in API ``groups`` when given), typed or not, in input order."""
    for resource in ctx.resources(kind):
        if groups is not None and resource.group not in groups:
            continue
        body: Any = resource.document.body
        for part in resource.base_path:
            body = body[part]
        yield RawObject(
            api_version=f"{resource.group}/{resource.version}".lstrip("/"),
            kind=resource.kind,
            name=resource.name,
            namespace="" if kind in CLUSTER_SCOPED else resource.namespace,
            body=mapping(body),
            origin=resource.document.location(resource.base_path),
            document=resource.document,
            base_path=resource.base_path,
        )
    for unknown in ctx.unknown_resources:
        if unknown.kind != kind:
            continue
        group = unknown.api_version.rpartition("/")[0]
        if groups is not None and group not in groups:
            continue
        yield RawObject(
            api_version=unknown.api_version,
            kind=unknown.kind,
            name=unknown.name,
            namespace="" if kind in CLUSTER_SCOPED else unknown.namespace,
            body=mapping(unknown.body),
            origin=unknown.location,
            document=unknown.document,
            base_path=unknown.base_path,
        )


def embedded_document(text: str) -> Mapping[str, Any] | None:
    """A JSON or YAML document held in a string (ConfigMap data, annotations), if it is one."""
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return None
    return value if isinstance(value, Mapping) else None
