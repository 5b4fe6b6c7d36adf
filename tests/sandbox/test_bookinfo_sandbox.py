"""Istio's bookinfo as published, secured as Istio's "HTTP Traffic" authorization task
does it, through ``trustmesh up`` with real Envoy sidecars and real mTLS.

The mesh: examples/bookinfo (bookinfo.yaml unchanged — images, no commands — a Namespace
labelled for injection, destination-rule-all-mtls.yaml, mesh-wide STRICT) plus the task's
policies (examples/bookinfo-authz-http), written from its description: ``allow-nothing``
for the default namespace, GET on productpage from anyone, GET on details and on reviews
from productpage's service account, GET on ratings from reviews' service account.

Checked, for each isolation mode:

* ``trustmesh request --from default/productpage-v1 http://reviews:9080/reviews/0`` → 200;
* the product page shows the details, the reviews and each version's stars;
* every hop of the app — and hops the task leaves closed — gets, live, the answer the
  offline verdict (``trustmesh authz check``) gives for it: 200 where allowed, 403 where
  not (a refused call, a POST on productpage);
* after a DENY on ratings, the hop reviews → ratings is refused offline and live, and the
  product page shows Istio's "Ratings service is currently unavailable" text.
"""

from __future__ import annotations

import asyncio
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
from trustmesh.runtime.running import RunningMesh

BOOKINFO = ROOT / "examples" / "bookinfo"
SERVED_BY = re.compile(r"Reviews served by: (\S+?)<")
STARS = re.compile(r'<div class="stars text-(\w+)-500"[^>]*>(.*?)</div>')
UNAVAILABLE = "Ratings service is currently unavailable"
REVIEWS_SA = "cluster.local/ns/default/sa/bookinfo-reviews"


# Istio's "HTTP Traffic" task (security/authorization/authz-http), step by step: written
# from the task's description, shipped as an example next to bookinfo.
TASK_POLICIES = ROOT / "examples" / "bookinfo-authz-http" / "authz-http.yaml"

DENY_RATINGS = f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-ratings
  namespace: default
spec:
  selector:
    matchLabels:
      app: ratings
  action: DENY
  rules:
  - from:
    - source:
        principals: ["{REVIEWS_SA}"]
"""


@dataclass(frozen=True)
class Hop:
    """One call: from a pod to a Service, and what the task's policies say of it."""

    source: str  # namespace/pod
    service: str  # namespace/name
    path: str
    allowed: bool
    method: str = "GET"

    @property
    def url(self) -> str:
        return f"http://{self.service.split('/')[1]}:9080{self.path}"


# The app's own calls, then calls the task leaves closed.
HOPS = [
    Hop("default/details-v1", "default/productpage", "/productpage", True),
    Hop("default/productpage-v1", "default/details", "/details/0", True),
    Hop("default/productpage-v1", "default/reviews", "/reviews/0", True),
    Hop("default/reviews-v2", "default/ratings", "/ratings/0", True),
    Hop("default/reviews-v3", "default/ratings", "/ratings/0", True),
    Hop("default/productpage-v1", "default/ratings", "/ratings/0", False),
    Hop("default/ratings-v1", "default/reviews", "/reviews/0", False),
    Hop("default/details-v1", "default/details", "/details/0", False),
    Hop("default/details-v1", "default/productpage", "/productpage", False, "POST"),
]


@dataclass
class Bookinfo:
    config: Path
    state: Path

    def request(self, hop_source: str, url: str, method: str = "GET") -> tuple[int, str]:
        """``trustmesh request`` as a user runs it: (status, body)."""
        done = trustmesh("request", "--from", hop_source, "-X", method, url, state=self.state)
        assert done.returncode == 0, (hop_source, url, done.stderr)
        head, _, body = done.stdout.partition("\n\n")
        status = head.split("\n", 1)[0]
        assert status.startswith("HTTP "), done.stdout
        return int(status.split()[1]), body

    def offline(self, hop: Hop) -> tuple[bool, str]:
        """``trustmesh authz check`` for ``hop`` on the same files: (allowed, output)."""
        done = trustmesh(
            "authz", "check", "-f", str(self.config), "--from", hop.source, "--to", hop.service,
            "--port", "9080", "--method", hop.method, "--path", hop.path, state=self.state,
        )  # fmt: skip
        assert done.returncode in (0, 3), done.stdout + done.stderr
        return done.returncode == 0, done.stdout

    def synced(self) -> None:
        """Until every sidecar runs the configuration now on disk."""
        asyncio.run(RunningMesh.open(self.state).wait_synced(timeout=30))

    def pages_by_version(self, wanted: int = 3) -> dict[str, str]:
        """Product pages until each reviews version served one (round robin)."""
        pages: dict[str, str] = {}
        for _ in range(12 * wanted):
            status, page = self.request("default/details-v1", "http://productpage:9080/productpage")
            assert status == 200, page
            served = SERVED_BY.search(page)
            assert served is not None, page
            pages.setdefault(served.group(1), page)
            if len(pages) == wanted:
                break
        return pages


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
    root = tmp_path_factory.mktemp(f"bookinfo-{isolation}")
    config = root / "config"
    shutil.copytree(BOOKINFO, config)
    shutil.copy(TASK_POLICIES, config / "authz-http.yaml")
    state = root / "state"
    try:
        started = None
        if isolation == "netns":
            started = trustmesh(
                "up", str(config), "-d", "--isolation", "netns", state=state, timeout=START_TIMEOUT
            )
        else:
            started = up_in_a_free_block(config, state=state, base="127.70.0.0")
        assert started is not None and started.returncode == 0, started and started.stderr
        assert RunningMesh.open(state).plan.isolation.value == isolation
        yield Bookinfo(config, state)
    finally:
        trustmesh("down", state=state)


def test_reviews_answers_productpages_sidecar(bookinfo: Bookinfo) -> None:
    status, body = bookinfo.request("default/productpage-v1", "http://reviews:9080/reviews/0")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["reviews"][0]["reviewer"] == "Reviewer1"
    assert answer["podname"] in ("reviews-v1", "reviews-v2", "reviews-v3")


def test_the_product_page_shows_details_reviews_and_ratings(bookinfo: Bookinfo) -> None:
    pages = bookinfo.pages_by_version()
    assert set(pages) == {"reviews-v1", "reviews-v2", "reviews-v3"}
    for version, page in pages.items():
        assert "The Comedy of Errors" in page and "Book Details" in page, version
        assert "Book Reviews" in page and "An extremely entertaining play" in page, version
        assert "Error fetching" not in page and UNAVAILABLE not in page, version
    assert STARS.findall(pages["reviews-v1"]) == []  # v1 does not call ratings
    for version, color in (("reviews-v2", "black"), ("reviews-v3", "red")):
        stars = STARS.findall(pages[version])
        assert [(c, body.count('glyphicon-star"')) for c, body in stars] == [(color, 5), (color, 4)]


@pytest.mark.parametrize("hop", HOPS, ids=lambda h: f"{h.method}-{h.source}-{h.service}")
def test_every_hop_is_answered_live_as_the_offline_verdict_says(
    bookinfo: Bookinfo, hop: Hop
) -> None:
    allowed, verdict = bookinfo.offline(hop)
    assert allowed == hop.allowed, verdict
    status, body = bookinfo.request(hop.source, hop.url, hop.method)
    assert status == (200 if allowed else 403), (hop, status, body, verdict)
    if not allowed:
        assert body.startswith("RBAC: access denied"), body


def test_a_deny_on_ratings_shows_the_ratings_unavailable_text(bookinfo: Bookinfo) -> None:
    hop = Hop("default/reviews-v2", "default/ratings", "/ratings/0", False)
    policy = bookinfo.config / "deny-ratings.yaml"
    policy.write_text(DENY_RATINGS)
    try:
        bookinfo.synced()
        allowed, verdict = bookinfo.offline(hop)
        assert not allowed and "deny-ratings" in verdict, verdict
        status, body = bookinfo.request(hop.source, hop.url)
        assert status == 403, body
        pages = bookinfo.pages_by_version()
        for version in ("reviews-v2", "reviews-v3"):
            page = pages[version]
            assert page.count(UNAVAILABLE) == 2, page  # one per review
            assert "glyphicon-star" not in page and "Book Reviews" in page
        assert UNAVAILABLE not in pages["reviews-v1"]  # it never asks ratings
    finally:
        policy.unlink()
        bookinfo.synced()


def test_the_example_holds_the_tasks_five_policies() -> None:
    import yaml

    docs = [d for d in yaml.safe_load_all(TASK_POLICIES.read_text()) if d]
    names = {(d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs}
    assert names == {
        ("AuthorizationPolicy", "default", name)
        for name in (
            "allow-nothing",
            "productpage-viewer",
            "details-viewer",
            "reviews-viewer",
            "ratings-viewer",
        )
    }
    assert next(d for d in docs if d["metadata"]["name"] == "allow-nothing")["spec"] == {}
