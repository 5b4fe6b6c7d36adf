"""A pod that is not ready (its app exited) has no endpoint in any proxy's configuration
until it is ready again; the change is pushed without reading the files again, also while
they have errors."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from tests.envoy.conftest import run
from tests.xds.controlplane_rig import BAD_YAML, _plane
from trustmesh.xds import controlplane
from trustmesh.xds.cache import TYPE_CLUSTER
from trustmesh.xds.controlplane import ProxyRegistration

HTTPBIN_CLUSTER = "outbound|8000||httpbin.foo.svc.cluster.local"


def _endpoints(plane: Any, node_id: str) -> list[str]:
    snapshot = plane.cache.get(node_id)
    cluster = snapshot.get(TYPE_CLUSTER)[HTTPBIN_CLUSTER]
    return [
        e["metadata"]["filter_metadata"]["trustmesh"]["workload"]
        for group in cluster.get("load_assignment", {}).get("endpoints", [])
        for e in group["lb_endpoints"]
    ]


def test_not_ready_pods_leave_every_proxys_endpoints_until_ready_again(tmp_path: Path) -> None:
    config, plane = _plane(tmp_path, workload_addresses={"foo/httpbin": "127.0.0.20"})
    sleep = ProxyRegistration.sidecar("foo/sleep", "127.0.0.21")
    plane.register(sleep)

    async def scenario() -> None:
        assert await plane.reload() == []
        reloads = plane.reloads
        assert _endpoints(plane, sleep.node_id) == ["foo/httpbin"]
        config.write_policy(BAD_YAML)  # the files are broken meanwhile: readiness still moves
        assert await plane.set_not_ready(["foo/httpbin"])
        assert _endpoints(plane, sleep.node_id) == []
        assert plane.not_ready == {"foo/httpbin"} and plane.reloads == reloads
        assert not await plane.set_not_ready(["foo/httpbin"])  # unchanged: nothing to do
        assert await plane.set_not_ready([])
        assert _endpoints(plane, sleep.node_id) == ["foo/httpbin"]
        # A proxy registered while a pod is not ready never sees its endpoint.
        await plane.set_not_ready(["foo/httpbin"])
        late = ProxyRegistration.sidecar("bar/sleep", "127.0.0.22")
        plane.register(late)
        assert _endpoints(plane, late.node_id) == []

    run(scenario())


def test_syncz_reports_a_readiness_change_only_once_it_is_published(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """`not_ready` beside "every proxy synced" must describe the configuration those proxies
    acknowledged: while the new one is still being translated, the old set is reported
    (a test waiting for "not_ready == [] and all synced" otherwise ran before the push)."""
    _config, plane = _plane(tmp_path, workload_addresses={"foo/httpbin": "127.0.0.20"})
    sleep = ProxyRegistration.sidecar("foo/sleep", "127.0.0.21")
    plane.register(sleep)
    translating, release = threading.Event(), threading.Event()
    translate = controlplane._translate_all

    def held_translation(*args: Any) -> Any:
        translating.set()
        release.wait(timeout=10)
        return translate(*args)

    async def scenario() -> None:
        assert await plane.reload() == []
        monkeypatch.setattr(controlplane, "_translate_all", held_translation)
        change = asyncio.ensure_future(plane.set_not_ready(["foo/httpbin"]))
        await asyncio.to_thread(translating.wait, 10)
        assert plane.not_ready == frozenset()  # not published yet
        assert _endpoints(plane, sleep.node_id) == ["foo/httpbin"]
        release.set()
        assert await change
        assert plane.not_ready == {"foo/httpbin"}
        assert _endpoints(plane, sleep.node_id) == []

    run(scenario())
