"""``policy.derived``: what is derived from a compiled mesh lives beside it, not in it."""

from __future__ import annotations

import dataclasses
import gc

from tests.unit.meshutil import compile_text
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.derived import Derived


def test_computed_once_per_mesh_and_key() -> None:
    calls: list[tuple[int, str]] = []

    def compute(mesh: MeshPolicy, key: str) -> int:
        calls.append((id(mesh), key))
        return len(mesh.workloads) + len(key)

    derived: Derived[MeshPolicy, str, int] = Derived("test", compute)
    mesh = compile_text()
    assert derived.get(mesh, "ab") == derived.get(mesh, "ab") == len(mesh.workloads) + 2
    derived.get(mesh, "c")
    assert len(calls) == 2
    # An equal but distinct mesh starts empty: nothing carries over between compilations.
    other = dataclasses.replace(mesh)
    assert other == mesh
    derived.get(other, "ab")
    assert len(calls) == 3 and derived.tables() == 2


def test_a_table_goes_with_its_mesh() -> None:
    derived: Derived[MeshPolicy, None, int] = Derived("test", lambda mesh, _: 1)
    mesh = compile_text()
    derived.get(mesh, None)
    assert derived.tables() == 1
    del mesh
    gc.collect()
    assert derived.tables() == 0
