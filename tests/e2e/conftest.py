"""One running example mesh shared by the end-to-end tests of a session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.hosts_rig import hosts_cluster  # noqa: F401 (the multi-host mesh, shared)
from tests.e2e.mesh import LiveMesh, live_mesh


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMesh]:
    """The istio.io layout (foo, bar with sidecars; legacy without), started once; each
    test applies the configuration it needs with ``mesh.apply``."""
    with live_mesh(tmp_path_factory.mktemp("live"), base="127.30.0.0") as running:
        yield running
