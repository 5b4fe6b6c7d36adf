"""Typed resources: a parsed document with its kind, metadata, spec and origin."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from trustmesh.api.diagnostics import Location
from trustmesh.api.yamldoc import FieldPath, YamlDocument

SpecT = TypeVar("SpecT", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Resource(Generic[SpecT]):
    """One configuration object. ``order`` is its position in the input (0 = first)."""

    group: str
    version: str
    kind: str
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    creation_timestamp: str | None
    order: int
    spec: SpecT
    document: YamlDocument = field(repr=False, compare=False)
    base_path: FieldPath = field(repr=False, compare=False, default=())
    spec_path: FieldPath = field(repr=False, compare=False, default=("spec",))

    @property
    def key(self) -> str:
        """``Kind/namespace/name``: unique within one snapshot."""
        return f"{self.kind}/{self.namespace}/{self.name}"

    @property
    def file(self) -> str:
        return self.document.file

    @property
    def line(self) -> int:
        return self.document.line_of(self.base_path)

    def location(self, *path: str | int) -> Location:
        """Location of a field given relative to the spec: ``location("rules", 0)``."""
        return self.document.location((*self.base_path, *self.spec_path, *path))

    def raw_spec(self) -> Any:
        """The spec as written ({} if absent): what a loosely modelled kind's model does
        not keep (a VirtualService's model holds its hosts only)."""
        body: Any = self.document.body
        for part in (*self.base_path, *self.spec_path):
            body = body.get(part) if isinstance(body, dict) else None
        return body if body is not None else {}

    def meta_location(self, *path: str | int) -> Location:
        return self.document.location((*self.base_path, "metadata", *path))

    def age_key(self) -> tuple[int, str, int, str]:
        """Sort key for Istio's "oldest wins": creationTimestamp, else order of appearance.

        Objects with a timestamp are older than ones without (those are about to be
        applied); ties are broken by name, as Istio does.
        """
        if self.creation_timestamp:
            return (0, self.creation_timestamp, 0, self.name)
        return (1, "", self.order, self.name)


@dataclass(frozen=True, slots=True)
class UnknownResource:
    """A kind trustmesh does not read: kept so nothing is silently lost, never enforced."""

    api_version: str
    kind: str
    name: str
    namespace: str
    location: Location
    body: Any = field(repr=False, compare=False)
    # where the object sits, so a check can point at one of its fields
    document: YamlDocument | None = field(default=None, repr=False, compare=False)
    base_path: FieldPath = field(default=(), repr=False, compare=False)
