"""A VirtualService change does not cut requests in flight, through real Envoys.

The sidecar's HTTP proxy fetches its routes over RDS (``http_proxy``), so a route change
updates the route configuration in place and leaves the listener alone. Were the routes
inline, the change would replace the listener: Envoy drains the old one and closes its
connections after the drain time (``--drain-time-s 1``), so a request longer than that
would fail — what this test saw with inline routes (``RemoteDisconnected`` on the held
request, ``listener_modified`` counting the change).

``lazy`` (``lazy_workloads.yaml``) holds each request for the seconds its path names; a
client holds one keep-alive connection to its sidecar's proxy with a request to v1 in
flight while the VirtualService moves ``lazy`` to v2: that request is answered by v1,
the next one on the same connection goes to v2.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator

import pytest

from tests.e2e.mesh import trustmesh
from tests.routing.rig import HERE, RoutingMesh, routing_mesh
from trustmesh.runtime.plan import HTTP_PROXY_PORT

pytestmark = pytest.mark.envoy

CLIENT = "default/sleep"
LAZY = "lazy.default.svc.cluster.local"
DRAIN_TIME_S = 1.0  # the sidecars' --drain-time-s
HOLD_S = 4.0  # how long lazy holds the request in flight: well past sync + drain time

SUBSETS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: lazy, namespace: default}
spec:
  host: lazy
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def to(subset: str) -> str:
    return (
        SUBSETS
        + f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: lazy, namespace: default}}
spec:
  hosts: [lazy]
  http:
  - route:
    - destination: {{host: lazy, subset: {subset}}}
"""
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoutingMesh]:
    root = tmp_path_factory.mktemp("route-change")
    with routing_mesh(root, base="127.160.0.0", workloads=HERE / "lazy_workloads.yaml") as running:
        yield running


def stats(mesh: RoutingMesh, *names: str) -> dict[str, int]:
    """Counters and gauges of the client's Envoy, by exact name (absent: 0)."""
    text = mesh.running.envoy_get(CLIENT, "/stats").decode()
    found = dict(line.rsplit(": ", 1) for line in text.splitlines() if ": " in line)
    return {name: int(found.get(name, "0")) for name in names}


def wait_until_in_flight(mesh: RoutingMesh, cluster: str, timeout: float = 10.0) -> None:
    """Until the client's Envoy has a request on ``cluster`` (polled: another process)."""
    active = f"cluster.{cluster}.upstream_rq_active"
    deadline = time.monotonic() + timeout
    while stats(mesh, active)[active] < 1:
        assert time.monotonic() < deadline, f"no request in flight on {cluster}"
        time.sleep(0.02)


def test_a_route_change_keeps_the_request_in_flight_and_moves_the_next(
    mesh: RoutingMesh,
) -> None:
    mesh.apply(to("v1"))
    listener_changes = ("listener_manager.listener_modified", "listener_manager.lds.update_success")
    reloads = "http.outbound_http.rds.http_proxy.config_reload"
    before = stats(mesh, *listener_changes, reloads)
    pod = mesh.running.plan.pod(CLIENT)
    assert pod is not None and pod.outbound_ip is not None
    connection = http.client.HTTPConnection(
        pod.outbound_ip, HTTP_PROXY_PORT, timeout=20, source_address=(pod.app_ip, 0)
    )
    try:
        sent = time.monotonic()
        connection.request("GET", f"http://lazy:8000/hold/{HOLD_S}", headers={"Host": "lazy:8000"})
        wait_until_in_flight(mesh, f"outbound|8000|v1|{LAZY}")
        held = connection.sock
        mesh.apply(to("v2"))  # returns when every proxy ACKed the new routes
        synced = time.monotonic() - sent
        # The held request must outlive the change by the drain time, or this proves nothing.
        assert synced + DRAIN_TIME_S + 0.5 < HOLD_S, f"the change took {synced:.1f}s: too slow"
        first = connection.getresponse()
        assert (first.status, first.read()) == (200, b"lazy v1\n")
        assert first.getheader("connection") != "close"  # not drained either
        assert time.monotonic() - sent >= HOLD_S  # it was in flight all along
        connection.request("GET", "http://lazy:8000/hold/0", headers={"Host": "lazy:8000"})
        assert connection.sock is held  # the same keep-alive connection
        second = connection.getresponse()
        assert (second.status, second.read()) == (200, b"lazy v2\n")
    finally:
        connection.close()
    after = stats(mesh, *listener_changes, reloads)
    # The routes changed over RDS; no listener was touched.
    assert after[reloads] > before[reloads]
    for name in listener_changes:
        assert after[name] == before[name], name


def test_proxy_config_shows_the_proxys_routes_and_a_listener_without_them(
    mesh: RoutingMesh,
) -> None:
    mesh.apply(to("v2"))
    shown = trustmesh("proxy-config", CLIENT, "routes", state=mesh.state)
    assert shown.returncode == 0, shown.stderr
    dynamic = json.loads(shown.stdout)["dynamic_route_configs"]
    (proxy,) = [r["route_config"] for r in dynamic if r["route_config"]["name"] == "http_proxy"]
    (lazy,) = [v for v in proxy["virtual_hosts"] if v["name"] == f"{LAZY}:8000"]
    routed = [r for r in lazy["routes"] if not r["name"].startswith("workload ")]
    assert [r["route"]["cluster"] for r in routed] == [f"outbound|8000|v2|{LAZY}"]
    shown = trustmesh("proxy-config", CLIENT, "listeners", state=mesh.state)
    assert shown.returncode == 0, shown.stderr
    assert "outbound_http" in shown.stdout and '"route_config"' not in shown.stdout
