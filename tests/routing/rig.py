"""A live bookinfo-like mesh (``workloads.yaml``) for VirtualService routing at sidecars.

Requests are sent as productpage's (or sleep's) app sends them: from the pod's app
address to its sidecar's HTTP proxy (``$OUTBOUND_IP:15001``), absolute-form, so the
client sidecar's outbound routes decide where each goes.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.mesh import trustmesh, up_in_a_free_block
from trustmesh.runtime.plan import HTTP_PROXY_PORT
from trustmesh.runtime.running import RunningMesh

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Reply:
    status: int
    body: str
    headers: dict[str, str]


@dataclass
class RoutingMesh:
    root: Path
    state: Path
    config_dir: Path

    @property
    def running(self) -> RunningMesh:
        return RunningMesh.open(self.state)

    def apply(self, text: str) -> None:
        """Make ``text`` the mesh's routing configuration and wait until every proxy has
        it (the control plane watches the file)."""
        path = self.config_dir / "routes.yaml"
        partial = path.with_suffix(".partial")
        partial.write_text(text)
        os.replace(partial, path)
        asyncio.run(self.running.wait_synced(timeout=30))

    def get(
        self,
        url: str,
        *,
        client: str = "default/productpage-v1",
        headers: dict[str, str] | None = None,
        timeout: float = 10,
    ) -> Reply:
        """``GET url`` as ``client``'s app, on a new connection to its sidecar's proxy."""
        pod = self.running.plan.pod(client)
        assert pod is not None and pod.outbound_ip is not None
        authority = url.split("/", 3)[2]
        connection = http.client.HTTPConnection(
            pod.outbound_ip, HTTP_PROXY_PORT, timeout=timeout, source_address=(pod.app_ip, 0)
        )
        try:
            connection.request("GET", url, headers={"Host": authority, **(headers or {})})
            response = connection.getresponse()
            body = response.read().decode(errors="replace")
            return Reply(response.status, body, {k.lower(): v for k, v in response.getheaders()})
        finally:
            connection.close()


@contextmanager
def routing_mesh(
    root: Path, *, base: str, workloads: Path = HERE / "workloads.yaml"
) -> Iterator[RoutingMesh]:
    config_dir, state = root / "config", root / "state"
    config_dir.mkdir(parents=True)
    shutil.copy(workloads, config_dir / "workloads.yaml")
    (config_dir / "routes.yaml").write_text("")
    mesh_file = root / "mesh.yaml"
    mesh_file.write_text("{}\n")
    started = up_in_a_free_block(
        config_dir, "--mesh-config", str(mesh_file), state=state, base=base
    )
    try:
        assert started.returncode == 0, f"trustmesh up failed:\n{started.stderr}\n{started.stdout}"
        yield RoutingMesh(root, state, config_dir)
    finally:
        stopped = trustmesh("down", state=state)
        assert stopped.returncode == 0, stopped.stderr
