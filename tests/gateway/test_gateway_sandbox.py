"""The ingress gateway in the pod sandbox (``up --isolation netns``): the gateway pod's
address exists only inside the mesh's namespaces, so the runtime publishes the gateway
Service's ports on a host loopback address, and a client outside the mesh reaches
httpbin through it with TLS; the gateway calls httpbin with its own identity."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.e2e.mesh import trustmesh
from tests.gateway.rig import GATEWAY, GatewayMesh, Pki, gateway_mesh, https_get, tls_context
from tests.gateway.test_secure_gateway import config
from tests.sandbox.conftest import requires_root

pytestmark = requires_root


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[GatewayMesh]:
    root = tmp_path_factory.mktemp("gateway-sandbox")
    with gateway_mesh(
        root, base="127.81.0.0", config=config(pki, "MUTUAL"), sandboxed=True
    ) as running:
        yield running


def test_the_published_gateway_port_reaches_httpbin_over_mutual_tls(
    mesh: GatewayMesh, pki: Pki
) -> None:
    status = json.loads(trustmesh("status", "-o", "json", state=mesh.state).stdout)
    published = status["gateways"][GATEWAY]
    pod_ip = mesh.running.plan.pod(GATEWAY).pod_ip  # type: ignore[union-attr]
    assert published == [f"127.81.0.1:80 → {pod_ip}:8080", f"127.81.0.1:443 → {pod_ip}:8443"]
    context = tls_context(pki, "client.example.com")
    answer = https_get("127.81.0.1", 443, "/status/418", context)
    assert answer.status == 418 and answer.peer_organization == "httpbin organization"
    with pytest.raises(OSError):  # MUTUAL: no client certificate, no request
        https_get("127.81.0.1", 443, "/status/200", tls_context(pki))
