"""Istio's capture annotations and pods without a sidecar, through a real sandboxed mesh
(``up --isolation netns``, real Envoy): what each annotation leaves out of the capture is
seen in real traffic — the app sees the client's own address instead of its Envoy's
127.0.0.6, a policy does not apply, REGISTRY_ONLY does not refuse — and what it keeps in
still goes through the sidecar.

The mesh (annotation_mesh/, REGISTRY_ONLY, all in the injected namespace foo):
httpbin (excludeInboundPorts 9000, a DENY on /admin), included (includeInboundPorts 8000,
STRICT), plain (``sidecar.istio.io/inject: "false"``, answering on 9000 and 9001, an
address no Service names), client-ports (excludeOutboundPorts 9001, excludeOutboundIPRanges
included's address), client-services (includeOutboundIPRanges the ClusterIP range) and
hostnet (``hostNetwork: true``). The servers are httpbin stand-ins on several ports; /ip
shows the peer the app saw. One mesh for the whole module: each ``up`` costs seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox.conftest import requires_root
from tests.sandbox.meshrun import PYTHON, SandboxedMesh, sandboxed_mesh
from trustmesh.runtime.plan import NODE_IP, SERVICE_CIDR

pytestmark = requires_root
HERE = Path(__file__).parent
TEMPLATE = HERE / "annotation_mesh" / "workloads.yaml"
MESH_CONFIG = HERE / "annotation_mesh" / "mesh.yaml"
SERVER = HERE / "multiport_httpbin.py"
PROBE = str(HERE / "probe.py")
ENVOY_SOURCE = "127.0.0.6"  # where a captured inbound connection reaches the app from
# The address client-ports' excludeOutboundIPRanges names (annotation_mesh/workloads.yaml).
INCLUDED_IP = "10.88.1.11"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxedMesh]:
    root = tmp_path_factory.mktemp("annotations")
    config = root / "workloads.yaml"
    text = TEMPLATE.read_text().replace("@PYTHON@", PYTHON.executable)
    config.write_text(text.replace("@SERVER@", str(SERVER)))
    with sandboxed_mesh(root / "state", [config], [MESH_CONFIG]) as running:
        assert running.pod("foo/included").pod_ip == INCLUDED_IP
        yield running


def _origin(mesh: SandboxedMesh, ref: str, url: str) -> str:
    """The peer address httpbin's /ip reports for a GET from ``ref`` (its app)."""
    status, body = mesh.http(ref, url)
    assert status == 200, (ref, url, status, body)
    origin: str = json.loads(body)["origin"]
    return origin


def _get(mesh: SandboxedMesh, ref: str, host: str, port: int, *paths: str) -> dict[str, Any]:
    """``{path: [status line or error, body]}`` for raw GETs sent from inside ``ref`` as its
    app, one process for all (cheaper than a ``trustmesh request`` each)."""
    return mesh.python(ref, "http_probe.py", host, str(port), *paths)


def _assert_reset(mesh: SandboxedMesh, ref: str, url: str) -> None:
    """A GET from ``ref`` is refused with a TCP reset (no HTTP answer at all)."""
    done = mesh.request(ref, url)
    assert done.returncode == 56 and done.stderr.startswith("reset"), (ref, url, done)


# ----------------------------------------------------------------------------- inbound


def test_an_excluded_inbound_port_reaches_the_app_without_its_envoy(mesh: SandboxedMesh) -> None:
    """httpbin excludes 9000: a plaintext client reaches the app there directly (the app
    sees the client's address, and the DENY on /admin does not apply: the app's own 404),
    while 8000 of the same pod still goes through its Envoy (127.0.0.6, the DENY's 403)."""
    httpbin = mesh.pod("foo/httpbin").pod_ip
    for ref, address in (("foo/plain", mesh.pod("foo/plain").pod_ip), ("foo/hostnet", NODE_IP)):
        excluded = _get(mesh, ref, httpbin, 9000, "/ip", "/admin")
        assert excluded["/ip"][0] == "HTTP/1.1 200 OK", (ref, excluded)
        assert json.loads(excluded["/ip"][1]) == {"origin": address}, (ref, excluded)
        assert excluded["/admin"][0] == "HTTP/1.1 404 Not Found", (ref, excluded)
        captured = _get(mesh, ref, httpbin, 8000, "/ip", "/admin")
        assert captured["/ip"][0] == "HTTP/1.1 200 OK", (ref, captured)
        assert json.loads(captured["/ip"][1]) == {"origin": ENVOY_SOURCE}, (ref, captured)
        assert captured["/admin"] == ["HTTP/1.1 403 Forbidden", "RBAC: access denied"], ref


def test_include_inbound_ports_captures_only_the_ports_listed(mesh: SandboxedMesh) -> None:
    """included lists only 8000 and is STRICT: a plaintext client is reset on 8000 (its
    Envoy demands mTLS) but reaches the app on 9000, which nothing captures — as in Istio,
    an uncaptured port is outside mTLS and policy."""
    plain = mesh.pod("foo/plain").pod_ip
    assert _origin(mesh, "foo/plain", f"http://{INCLUDED_IP}:9000/ip") == plain
    _assert_reset(mesh, "foo/plain", f"http://{INCLUDED_IP}:8000/ip")
    # a client with a sidecar reaches 8000 over mTLS, through included's Envoy
    assert _origin(mesh, "foo/client-services", "http://included.foo:8000/ip") == ENVOY_SOURCE


# ---------------------------------------------------------------------------- outbound


def test_excluded_outbound_ports_and_ranges_leave_without_the_sidecar(
    mesh: SandboxedMesh,
) -> None:
    """client-ports excludes port 9001 and included's address: under REGISTRY_ONLY its
    sidecar resets a connection to plain's unregistered 9000, but 9001 of the same address
    and 9000 of included's leave plaintext from the pod's own address."""
    client = mesh.pod("foo/client-ports").pod_ip
    plain = mesh.pod("foo/plain").pod_ip
    _assert_reset(mesh, "foo/client-ports", f"http://{plain}:9000/ip")
    assert _origin(mesh, "foo/client-ports", f"http://{plain}:9001/ip") == client
    assert _origin(mesh, "foo/client-ports", f"http://{INCLUDED_IP}:9000/ip") == client
    # a Service is still reached through the sidecar: mTLS, its identity in XFCC
    status, body = mesh.http("foo/client-ports", "http://httpbin.foo:8000/headers")
    assert status == 200, body
    assert "spiffe://cluster.local/ns/foo/sa/default" in json.loads(body)["headers"].get(
        "X-Forwarded-Client-Cert", ""
    )


def test_include_outbound_ranges_leaves_pod_addresses_uncaptured(mesh: SandboxedMesh) -> None:
    """client-services captures only the ClusterIP range: plain's unregistered 9000 (reset
    for client-ports, whose sidecar sees it) is reached straight from the pod, while a
    Service's ClusterIP still goes through the sidecar (the STRICT included answers)."""
    capture = mesh.pod("foo/client-services").capture
    assert capture is not None and capture.outbound_ip_ranges == (SERVICE_CIDR,)
    client = mesh.pod("foo/client-services").pod_ip
    plain = mesh.pod("foo/plain").pod_ip
    assert _origin(mesh, "foo/client-services", f"http://{plain}:9000/ip") == client
    assert _origin(mesh, "foo/client-services", "http://included.foo:8000/ip") == ENVOY_SOURCE


# ------------------------------------------------------------------- without a sidecar


@pytest.mark.parametrize("ref", ["foo/plain", "foo/hostnet"])
def test_a_pod_without_a_sidecar_reaches_services_through_kube_proxy(
    mesh: SandboxedMesh, ref: str
) -> None:
    """``inject: "false"`` in an injected namespace, and ``hostNetwork``: no sidecar, so
    a Service name resolves to its ClusterIP and the runtime's kube-proxy DNAT takes the
    connection to an endpoint — in plaintext: PERMISSIVE httpbin answers (through its
    Envoy, which enforces the DENY; no client certificate), STRICT included resets."""
    pod = mesh.pod(ref)
    assert not pod.sidecar and "envoy_pid" not in mesh.record(ref)
    cluster_ip = mesh.plan.cluster_ips["httpbin.foo.svc.cluster.local"]
    for name in ("httpbin", "httpbin.foo", "httpbin.foo.svc.cluster.local"):
        done = mesh.run(ref, PYTHON.executable, PROBE, "resolve", name)
        assert done.stdout.strip() == cluster_ip, (name, done.stdout, done.stderr)
    seen = _get(mesh, ref, "httpbin.foo", 8000, "/headers", "/admin")
    assert seen["/headers"][0] == "HTTP/1.1 200 OK", seen
    assert "X-Forwarded-Client-Cert" not in json.loads(seen["/headers"][1])["headers"], seen
    assert seen["/admin"][0] == "HTTP/1.1 403 Forbidden", seen
    # `trustmesh request` from the pod, by the short name: the same path
    assert _origin(mesh, ref, "http://httpbin:8000/ip") == ENVOY_SOURCE
    _assert_reset(mesh, ref, "http://included.foo:8000/ip")
