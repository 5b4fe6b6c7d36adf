"""What ``kubectl apply`` of the whole input leaves in a cluster: one object per name.

Two documents with the same group, kind, namespace and name (in one file or across files)
are one object applied twice: the last one's content wins. trustmesh used to enforce both
(a DENY and an ALLOW both named ``reviews-viewer`` gave DENY). Here the later document
replaces the earlier one where the earlier one stood — the object keeps its creation
position, so Istio's "oldest wins" ordering is that of the first apply — and a warning names
both locations. Cluster-scoped kinds (Namespace) have namespace ``""``: deduplicated by name.

IstioOperator is not applied by kubectl but overlaid by istioctl (``-f a.yaml -f b.yaml``):
its documents are kept; the mesh config layers them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

from trustmesh.api.diagnostics import Diagnostic, Location, warning
from trustmesh.api.resources import Resource, UnknownResource

_OVERLAID_KINDS = frozenset({"IstioOperator"})

T = TypeVar("T")


def last_applied(
    resources: Sequence[Resource[Any]],
) -> tuple[list[Resource[Any]], list[Resource[Any]], list[Diagnostic]]:
    """(kept, replaced, warnings) for typed resources, in input order."""

    def key(r: Resource[Any]) -> Hashable | None:
        if r.kind in _OVERLAID_KINDS:
            return None
        return (r.group, r.kind, r.namespace, r.name)

    def describe(r: Resource[Any]) -> tuple[str, Location]:
        return _name(r.kind, r.namespace, r.name), r.document.location(r.base_path)

    def adopt(later: Resource[Any], earlier: Resource[Any]) -> Resource[Any]:
        return dataclasses.replace(later, order=earlier.order)

    return _dedupe(resources, key, describe, adopt)


def last_applied_unknown(
    unknown: Sequence[UnknownResource],
) -> tuple[list[UnknownResource], list[UnknownResource], list[Diagnostic]]:
    """The same for kept-but-unread kinds (the analyzer reads some of them raw)."""

    def key(u: UnknownResource) -> Hashable | None:
        if u.name == "?":
            return None  # nameless: the cluster refuses it; nothing to merge it with
        return (u.api_version.rpartition("/")[0], u.kind, u.namespace, u.name)

    def describe(u: UnknownResource) -> tuple[str, Location]:
        return _name(u.kind, u.namespace, u.name), u.location

    return _dedupe(unknown, key, describe, lambda later, earlier: later)


def _name(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def _dedupe(
    items: Sequence[T],
    key: Callable[[T], Hashable | None],
    describe: Callable[[T], tuple[str, Location]],
    adopt: Callable[[T, T], T],
) -> tuple[list[T], list[T], list[Diagnostic]]:
    kept: list[T] = []
    replaced: list[T] = []
    problems: list[Diagnostic] = []
    slot_of: dict[Hashable, int] = {}
    for item in items:
        k = key(item)
        slot = slot_of.get(k) if k is not None else None
        if slot is None:
            if k is not None:
                slot_of[k] = len(kept)
            kept.append(item)
            continue
        earlier = kept[slot]
        name, here = describe(item)
        _, there = describe(earlier)
        problems.append(
            warning(
                "duplicate-resource",
                here,
                f"{name} is defined twice, at {_at(there)} and at {_at(here)}: as with "
                f"kubectl apply the last one applies and the one at {_at(there)} is ignored",
            )
        )
        replaced.append(earlier)
        kept[slot] = adopt(item, earlier)
    return kept, replaced, problems


def _at(location: Location) -> str:
    return f"{location.file}:{location.line}"
