"""Issue 14, must show 4: a running mesh's metrics count exactly the requests sent.

``trustmesh up`` (process mode, and the netns sandbox when root) with httpbin behind a
DENY-GET policy and sleep as the client, both with real Envoy sidecars. Between two
scrapes of the control plane's ``/metrics`` — parsed with prometheus_client's parser —
sleep sends N allowed POSTs and M denied GETs: httpbin's re-exported RBAC counters move
by exactly N and M. The control plane's own counters show pushes and ACKs, one
certificate per workload, every proxy connected, and a policy change's convergence time;
the text names no pod address and no node id. ``trustmesh top --once -o json`` reports
the same counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.mesh import trustmesh, up_in_a_free_block
from tests.metrics.promtext import Series, series, value
from trustmesh.metrics.top import fetch_metrics
from trustmesh.runtime.client import HttpResult, http_request
from trustmesh.runtime.layout import read_json
from trustmesh.runtime.plan import NODE_IP
from trustmesh.runtime.running import RunningMesh

pytestmark = pytest.mark.envoy

MESH = Path(__file__).with_name("mesh") / "mesh.yaml"
ALLOWED, DENIED = 4, 3  # POSTs httpbin allows, GETs its DENY policy refuses
HTTPBIN = {"namespace": "foo", "pod": "httpbin"}
SLEEP = {"namespace": "foo", "pod": "sleep"}
START_TIMEOUT = 180


@contextmanager
def _mesh(root: Path, isolation: str) -> Iterator[RunningMesh]:
    state, manifests = root / "state", root / "config" / "mesh.yaml"
    manifests.parent.mkdir()
    shutil.copy(MESH, manifests)
    if isolation == "process":
        started = up_in_a_free_block(manifests.parent, state=state, base="127.70.0.0")
    else:
        started = trustmesh(
            *("up", "--isolation", isolation, "-d", str(manifests.parent)),
            state=state,
            timeout=START_TIMEOUT,
        )
    try:
        assert started is not None and started.returncode == 0, (
            f"up failed:\n{started.stderr if started else ''}"
        )
        running = RunningMesh.open(state)
        asyncio.run(running.wait_synced(timeout=30))
        yield running
    finally:
        stopped = trustmesh("down", state=state)
        assert stopped.returncode == 0, stopped.stderr


def _send(running: RunningMesh, method: str) -> int:
    """One request from sleep to httpbin, as sleep's app sends it; the status."""
    url = "http://httpbin.foo:8000/anything"
    pod = running.pod("foo/sleep")
    if running.plan.sandboxed:
        from trustmesh.runtime.podclient import request_in_pod

        request = {"kind": "http", "url": url, "method": method, "headers": [], "body": ""}
        answer = request_in_pod(running.plan, pod, {**request, "timeout": 10.0})
    else:
        answer = asyncio.run(http_request(running.plan, pod, url, method=method))
    assert isinstance(answer, HttpResult)
    return answer.status


def _scrape(running: RunningMesh) -> tuple[str, Series]:
    text = fetch_metrics(running)
    return text, series(text)


def _rbac(parsed: Series, pod: dict[str, str], result: str) -> float:
    return value(parsed, "trustmesh_sidecar_rbac", **pod, protocol="http", result=result)


ISOLATIONS = [
    "process",
    pytest.param(
        "netns",
        marks=pytest.mark.skipif(
            os.geteuid() != 0 or shutil.which("nft") is None,
            reason="network namespaces and nftables need root and the nft command",
        ),
    ),
]


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_metrics_count_exactly_the_requests_sent(tmp_path: Path, isolation: str) -> None:
    with _mesh(tmp_path, isolation) as running:
        info = read_json(running.layout.control_plane)
        host = info["metrics"].rpartition(":")[0]
        assert host == (NODE_IP if isolation == "netns" else "127.0.0.1")
        _, before = _scrape(running)
        statuses = [_send(running, "POST") for _ in range(ALLOWED)]
        statuses += [_send(running, "GET") for _ in range(DENIED)]
        assert statuses == [200] * ALLOWED + [403] * DENIED
        text, after = _scrape(running)

        def moved(pod: dict[str, str], result: str) -> float:
            return _rbac(after, pod, result) - _rbac(before, pod, result)

        assert moved(HTTPBIN, "allowed") == ALLOWED
        assert moved(HTTPBIN, "denied") == DENIED
        assert moved(HTTPBIN, "shadow_denied") == 0
        assert moved(SLEEP, "allowed") == moved(SLEEP, "denied") == 0  # nothing inbound
        for pod in (HTTPBIN, SLEEP):
            assert value(after, "trustmesh_sidecar_up", **pod) == 1
        # the control plane's own counters
        assert value(after, "pilot_xds") == 2
        for kind in ("cds", "lds", "ecds"):
            assert value(after, "pilot_xds_pushes", type=kind) > 0
            assert value(after, "trustmesh_xds_acks", type=kind) > 0
        assert value(after, "citadel_server_success_cert_issuance_count") == 2
        assert value(after, "citadel_server_csr_count") == 2
        identities = {
            dict(labels)["identity"]
            for name, labels in after
            if name == "trustmesh_workload_cert_expiry_seconds"
        }
        assert identities == {
            "spiffe://cluster.local/ns/foo/sa/httpbin",
            "spiffe://cluster.local/ns/foo/sa/sleep",
        }
        # what any local caller reads: no pod address, no node id
        for pod in running.plan.pods:
            assert pod.pod_ip not in text and (pod.app_ip or pod.pod_ip) not in text
        assert "sidecar~" not in text
        # a policy change reaches httpbin: its convergence time is observed
        config = running.layout.root.parent / "config" / "mesh.yaml"
        partial = config.with_suffix(".partial")
        partial.write_text(config.read_text().replace('["GET"]', '["GET", "DELETE"]'))
        os.replace(partial, config)
        asyncio.run(running.wait_synced(timeout=30))
        _, changed = _scrape(running)
        assert value(changed, "pilot_proxy_convergence_time_count") >= 1
        assert 0 < value(changed, "pilot_proxy_convergence_time_sum") < 30
        assert value(changed, "pilot_xds_pushes", type="ecds") > value(
            after, "pilot_xds_pushes", type="ecds"
        )
        # and `trustmesh top` shows the same totals
        done = trustmesh("top", "--once", "-o", "json", state=running.layout.root)
        assert done.returncode == 0, done.stderr
        shown = {pod["pod"]: pod for pod in json.loads(done.stdout)["pods"]}
        assert shown["foo/httpbin"]["rbac"]["denied"] == _rbac(after, HTTPBIN, "denied")
        assert shown["foo/httpbin"]["rbac"]["allowed"] == _rbac(after, HTTPBIN, "allowed")
        assert shown["foo/httpbin"]["xds"]["synced"] is True
        assert shown["foo/httpbin"]["sidecar_up"] is True
        assert json.loads(done.stdout)["control_plane"]["certs_issued"] == 2
