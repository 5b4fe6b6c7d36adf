"""Istio's "Request Routing" task on bookinfo as published (examples/bookinfo: images, no
commands, destination-rule-all-mtls.yaml), through ``trustmesh up`` with real sidecars,
in both isolation modes (the local-process proxy, and captured pods in network namespaces
where productpage dials ``reviews:9080`` itself and the captured connection's route
decides).

1. ``virtual-service-all-v1.yaml``: every product page is served by reviews-v1 (no stars);
2. ``virtual-service-reviews-test-v2.yaml``: logged in as ``jason`` (productpage sends
   ``end-user: jason``) the page comes from reviews-v2 with black stars; anyone else
   still gets v1;
3. ``authz check`` names the route and decides only at the version it reaches.

The VirtualServices are written from the task (samples/bookinfo/networking).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.mesh import START_TIMEOUT, trustmesh, up_in_a_free_block
from tests.unit.meshutil import ROOT
from trustmesh.runtime.plan import HTTP_PROXY_PORT
from trustmesh.runtime.running import RunningMesh

BOOKINFO = ROOT / "examples" / "bookinfo"
SERVED_BY = re.compile(r"Reviews served by: (\S+?)<")
STARS = re.compile(r'<div class="stars text-(\w+)-500"')

ALL_V1 = {
    name: f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
spec:
  hosts:
  - {name}
  http:
  - route:
    - destination:
        host: {name}
        subset: v1
"""
    for name in ("productpage", "reviews", "ratings", "details")
}

REVIEWS_TEST_V2 = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
"""


def session(user: str) -> str:
    """productpage's session cookie after ``POST /login`` as ``user``."""
    payload = base64.urlsafe_b64encode(json.dumps({"user": user}).encode()).decode()
    return f"session={payload.rstrip('=')}"


@dataclass
class Bookinfo:
    config: Path
    state: Path

    def apply(self, name: str, text: str) -> None:
        """Write ``name``.yaml and wait until every sidecar has it."""
        partial = self.config / f"{name}.partial"
        partial.write_text(text)
        os.replace(partial, self.config / f"{name}.yaml")
        asyncio.run(RunningMesh.open(self.state).wait_synced(timeout=30))

    def page(self, user: str | None = None) -> tuple[str, list[str]]:
        """The product page as a browser gets it: (reviews pod, star colours)."""
        headers = {"cookie": session(user)} if user else {}
        running = RunningMesh.open(self.state)
        pod = running.plan.pod("default/details-v1")
        assert pod is not None
        if running.plan.sandboxed:  # only `trustmesh request` gets into the pod
            flags = [x for k, v in headers.items() for x in ("-H", f"{k}: {v}")]
            done = trustmesh(
                "request", "--from", pod.ref, *flags, "http://productpage:9080/productpage",
                state=self.state,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            status, text = int(done.stdout.split()[1]), done.stdout
        else:  # as details' app: through its sidecar's proxy, from its address
            assert pod.outbound_ip is not None
            connection = http.client.HTTPConnection(
                pod.outbound_ip, HTTP_PROXY_PORT, timeout=10, source_address=(pod.app_ip, 0)
            )
            try:
                connection.request(
                    "GET",
                    "http://productpage:9080/productpage",
                    headers={"Host": "productpage:9080", **headers},
                )
                response = connection.getresponse()
                status, text = response.status, response.read().decode()
            finally:
                connection.close()
        assert status == 200, text[:300]
        served = SERVED_BY.search(text)
        assert served is not None, text[-2000:]
        return served.group(1), sorted(set(STARS.findall(text)))


ISOLATIONS = [
    pytest.param("process", id="process"),
    pytest.param(
        "netns",
        id="netns",
        marks=pytest.mark.skipif(
            os.geteuid() != 0 or shutil.which("nft") is None,
            reason="network namespaces and nftables need root and the nft command",
        ),
    ),
]


@pytest.fixture(scope="module", params=ISOLATIONS)
def bookinfo(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bookinfo]:
    isolation: str = request.param
    root = tmp_path_factory.mktemp(f"routing-{isolation}")
    config = root / "config"
    shutil.copytree(BOOKINFO, config)
    state = root / "state"
    try:
        if isolation == "netns":
            started = trustmesh(
                *("up", str(config), "-d", "--isolation", "netns", "--base", "127.150.0.0"),
                state=state,
                timeout=START_TIMEOUT,
            )
        else:
            started = up_in_a_free_block(config, state=state, base="127.150.0.0")
        assert started.returncode == 0, started.stderr
        yield Bookinfo(config, state)
    finally:
        trustmesh("down", state=state)


def test_request_routing_task(bookinfo: Bookinfo) -> None:
    seen = {bookinfo.page()[0] for _ in range(18)}
    assert seen == {"reviews-v1", "reviews-v2", "reviews-v3"}  # round robin, no routes

    bookinfo.apply("routes", "---\n".join(ALL_V1.values()))
    for _ in range(12):
        assert bookinfo.page() == ("reviews-v1", [])  # v1 shows no stars

    # `kubectl apply -f virtual-service-reviews-test-v2.yaml` replaces reviews in place.
    bookinfo.apply("routes", "---\n".join({**ALL_V1, "reviews": REVIEWS_TEST_V2}.values()))
    for _ in range(4):
        assert bookinfo.page("jason") == ("reviews-v2", ["black"])
        assert bookinfo.page("someone") == ("reviews-v1", [])
        assert bookinfo.page() == ("reviews-v1", [])

    done = trustmesh(
        "authz", "check", "-f", str(bookinfo.config), "--from", "default/productpage-v1",
        "--to", "default/reviews", "--port", "9080", "--path", "/reviews/0",
        "--header", "end-user=jason", "-o", "json", state=bookinfo.state,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert [w["workload"] for w in answer["workloads"]] == ["default/reviews-v2"]
    assert answer["route"]["virtual_service"] == "default/reviews"
