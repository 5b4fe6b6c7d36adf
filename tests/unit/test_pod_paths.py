"""A sandboxed pod's runtime paths and its proxy group: unique per pod and per mesh."""

from __future__ import annotations

from trustmesh.runtime.layout import PodPaths
from trustmesh.runtime.plan import MAX_PODS


def test_each_pod_of_each_mesh_has_its_own_proxy_group() -> None:
    meshes = ["a1b2c3", "a1b2c4", "000000", "ffffff"]
    groups = {PodPaths.of(mesh, k).group for mesh in meshes for k in range(MAX_PODS)}
    assert len(groups) == len(meshes) * MAX_PODS
    assert all(0x20000000 <= g < 2**31 - 1 for g in groups)  # a valid gid, no system range


def test_a_pods_files_are_under_its_mesh_and_number() -> None:
    paths = PodPaths.of("a1b2c3", 7)
    assert str(paths.sds_socket) == "/run/trustmesh/a1b2c3/7/sds/sds.sock"
    assert str(paths.proxy) == "/run/trustmesh/a1b2c3/7/proxy"
    assert str(paths.hosts) == "/run/trustmesh/a1b2c3/7/hosts"
