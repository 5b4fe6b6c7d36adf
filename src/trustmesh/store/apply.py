"""Writing resources to a store as ``kubectl apply`` does: every object in one commit,
each compared with what the store holds (created / configured / unchanged), concurrent
writers never losing each other's changes (resourceVersion compare-and-swap)."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

from trustmesh.api.resources import Resource
from trustmesh.store.base import ResourceStore
from trustmesh.store.model import Conflict, ResourceKey, ResourceWrite

__all__ = ["RETRIES", "apply_resources", "resource_key", "resource_manifest"]

RETRIES = 5  # an apply without resourceVersion re-reads and retries after a conflict


async def apply_resources(
    store: ResourceStore, resources: Sequence[Resource[Any]]
) -> list[tuple[ResourceKey, str]]:
    """Write every object in one commit; (key, created|configured|unchanged) per object.

    An object that names a resourceVersion must still be at it (else :class:`Conflict`);
    one that does not is compared with what the store holds, and the commit retried
    if someone else wrote in between."""
    wanted = [(resource_key(r), *resource_manifest(r)) for r in resources]
    for attempt in range(RETRIES):
        outcome: list[tuple[ResourceKey, str]] = []
        writes: list[ResourceWrite] = []
        for key, body, named_version in wanted:
            current = await store.get(key)
            found = 0 if current is None else current.resource_version
            expected = named_version or found
            manifest = _canonical(body)
            if current is not None and _canonical(json.loads(current.manifest)) == manifest:
                if named_version and named_version != found:
                    raise Conflict(key, named_version, found)
                outcome.append((key, "unchanged"))
                continue
            outcome.append((key, "created" if current is None else "configured"))
            writes.append(ResourceWrite(key, manifest, expected))
        if not writes:
            return outcome
        try:
            await store.commit(writes)
            return outcome
        except Conflict as conflict:
            named = {k for k, _, v in wanted if v}
            if conflict.key in named or attempt == RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def resource_manifest(resource: Resource[Any]) -> tuple[dict[str, Any], int]:
    """The object as written (namespace filled in) and the resourceVersion it names (0: none)."""
    body: Any = resource.document.body
    for part in resource.base_path:
        body = body[part]
    value: dict[str, Any] = copy.deepcopy(body)
    metadata = value.setdefault("metadata", {})
    if resource.namespace:
        metadata["namespace"] = resource.namespace
    version = metadata.pop("resourceVersion", None)
    for generated in ("uid", "generation", "managedFields"):
        metadata.pop(generated, None)
    return value, int(version) if str(version or "").isdigit() else 0


def resource_key(resource: Resource[Any]) -> ResourceKey:
    return ResourceKey(resource.group, resource.kind, resource.namespace, resource.name)


def _canonical(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
