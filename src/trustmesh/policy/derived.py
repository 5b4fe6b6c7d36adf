"""Lookups derived from one compiled mesh, computed on first use.

A :class:`~trustmesh.policy.compose.MeshPolicy` is an immutable value: whatever is
computed purely from it (an index of DestinationRules, the client TLS choice for a
source/destination/port, the Envoy RBAC of one policy) stays true for as long as that
mesh exists. Each module that needs such a lookup owns one :class:`Derived`, typed by
its key and value, next to the code that computes it; the table for a mesh goes away
with the mesh (a weak reference), and a new mesh — even one equal to the last — starts
empty. Nothing is stored in the mesh itself, so equal meshes stay equal and a compiled
mesh stays a pure value.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Derived"]

K = TypeVar("K")
V = TypeVar("V")
M = TypeVar("M")


class Derived(Generic[M, K, V]):
    """``compute(mesh, key)`` remembered per mesh object and key.

    Example: ``_HTTP_PORTS = Derived("http ports", _http_ports)`` then
    ``_HTTP_PORTS.get(mesh, None)``. Without ``compute``, callers fill :meth:`table`
    themselves. ``name`` is for debugging only."""

    __slots__ = ("_compute", "_tables", "name")

    def __init__(self, name: str, compute: Callable[[M, K], V] | None = None) -> None:
        self.name = name
        self._compute = compute
        self._tables: dict[int, dict[K, V]] = {}

    def table(self, mesh: M) -> dict[K, V]:
        """The mesh's own table, for lookups that decide themselves what to remember."""
        table = self._tables.get(id(mesh))
        if table is None:
            table = self._tables[id(mesh)] = {}
            # The id is reused once the mesh is gone: drop its table right then.
            weakref.finalize(mesh, self._tables.pop, id(mesh), None)
        return table

    def get(self, mesh: M, key: K) -> V:
        table = self._tables.get(id(mesh))
        if table is None:
            table = self.table(mesh)
        try:
            return table[key]
        except KeyError:
            if self._compute is None:
                raise
            value = table[key] = self._compute(mesh, key)
            return value

    def tables(self) -> int:
        """How many meshes have a table now (for tests: they must not pile up)."""
        return len(self._tables)
