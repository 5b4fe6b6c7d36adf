"""Issue 14, must show 1: recorded traffic → ``generate`` → applied → the same traffic
passes, an unexpected caller is denied, and ``impact`` of removing one generated rule
lists exactly the requests that rule allowed.

One mesh for the whole flow: Istio's bookinfo (examples/bookinfo: mesh-wide STRICT, no
AuthorizationPolicy) through ``trustmesh up --isolation process`` with real Envoy sidecars,
real mTLS and ``meshConfig.accessLogFile`` set, so every inbound request is logged.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.e2e.mesh import trustmesh, up_in_a_free_block
from tests.envoy.conftest import eventually
from tests.unit.meshutil import ROOT
from trustmesh.insight.files import mesh_log_records
from trustmesh.insight.records import TrafficRecord
from trustmesh.runtime.client import http_request
from trustmesh.runtime.running import RunningMesh

pytestmark = pytest.mark.envoy

BOOKINFO = ROOT / "examples" / "bookinfo"
SERVED_BY = re.compile(r"Reviews served by: (\S+?)<")
USER = "default/details-v1"  # the product page's caller (bookinfo has no client pod)
PAGE = "http://productpage:9080/productpage"


@dataclass
class Mesh:
    root: Path
    config: Path
    state: Path

    @property
    def running(self) -> RunningMesh:
        return RunningMesh.open(self.state)

    def get(self, source: str, url: str) -> tuple[int, str]:
        running = self.running
        answer = asyncio.run(http_request(running.plan, running.pod(source), url, timeout=15))
        assert not answer.reset, answer.why
        return answer.status, answer.body.decode(errors="replace")

    def records(self) -> list[TrafficRecord]:
        found = list(mesh_log_records(self.state))
        problems = [str(r) for r in found if not isinstance(r, TrafficRecord)]
        assert not problems, problems
        return [r for r in found if isinstance(r, TrafficRecord)]

    def wait_logged(self, before: set[str], pages: int, ratings: int) -> list[TrafficRecord]:
        """The records not among ``before`` (origins) once the ``pages`` pages' hops are
        all in the sidecars' logs (Envoy writes its access log asynchronously)."""
        wanted = Counter({"default/productpage-v1": pages, "default/details-v1": pages})
        wanted["default/ratings-v1"] = ratings
        fresh: list[TrafficRecord] = []

        async def logged() -> bool:
            nonlocal fresh
            fresh = [r for r in self.records() if r.origin not in before]
            seen = Counter(r.destination for r in fresh)
            reviews = sum(n for d, n in seen.items() if d.startswith("default/reviews-"))
            return reviews >= pages and all(seen[d] >= n for d, n in wanted.items())

        try:
            asyncio.run(eventually(logged, what="every hop logged", timeout=20))
        except AssertionError:
            seen = Counter(r.destination for r in fresh)
            raise AssertionError(f"{pages} pages, {ratings} rated: logged {seen}") from None
        return fresh

    def browse(self) -> tuple[int, int, set[str]]:
        """Product pages until each reviews version served one and at least 6 were
        fetched: (pages, pages with ratings, versions). Each page must be whole."""
        served: list[str] = []
        while len(set(served)) < 3 or len(served) < 6:
            assert len(served) < 40, served
            status, page = self.get(USER, PAGE)
            assert status == 200, page
            assert "Error fetching" not in page and "unavailable" not in page, page
            version = SERVED_BY.search(page)
            assert version is not None, page
            served.append(version.group(1))
        with_ratings = sum(1 for v in served if v in ("reviews-v2", "reviews-v3"))
        return len(served), with_ratings, set(served)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("insight-bookinfo")
    config, state = root / "config", root / "state"
    shutil.copytree(BOOKINFO, config)
    mesh_config = root / "mesh.yaml"
    mesh_config.write_text("accessLogFile: /dev/stdout\n")
    try:
        started = up_in_a_free_block(
            config, "--mesh-config", str(mesh_config), state=state, base="127.110.0.0"
        )
        assert started.returncode == 0, started.stderr
        yield Mesh(root, config, state)
    finally:
        trustmesh("down", state=state)


def test_generated_policies_keep_recorded_traffic_and_deny_the_rest(mesh: Mesh) -> None:
    # 1. Record: the app's own calls, with every inbound request logged.
    pages, rated, versions = mesh.browse()
    assert versions == {"reviews-v1", "reviews-v2", "reviews-v3"}
    recorded = mesh.wait_logged(set(), pages, rated)
    recorded_file = mesh.root / "recorded.jsonl"
    done = trustmesh("traffic", "export", "-o", str(recorded_file), state=mesh.state)
    assert done.returncode == 0, done.stderr
    exported = [json.loads(line) for line in recorded_file.read_text().splitlines()]
    assert len(exported) >= len(recorded)
    assert {r["source_principal"] for r in exported} == {
        f"cluster.local/ns/default/sa/bookinfo-{sa}" for sa in ("details", "productpage", "reviews")
    }
    assert all(r["verdict"] == "allow" and r["mtls"] for r in exported)

    # 2. Generate: proven before printed.
    generated = mesh.root / "generated.yaml"
    done = trustmesh(
        "generate", "--traffic", str(recorded_file), "-f", str(mesh.config), "-o",
        str(generated), state=mesh.state,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = generated.read_text()
    assert "proof (replayed" in text
    documents = [d for d in yaml.safe_load_all(text) if d]
    by_name = {d["metadata"]["name"]: d for d in documents}
    assert by_name["allow-nothing"]["spec"] == {}
    ratings_rules = by_name["ratings-v1-observed"]["spec"]["rules"]
    assert ratings_rules == [
        {
            "from": [{"source": {"principals": ["cluster.local/ns/default/sa/bookinfo-reviews"]}}],
            "to": [
                {"operation": {"ports": ["9080"], "methods": ["GET"], "paths": ["/ratings/{*}"]}}
            ],
        }
    ]
    check = trustmesh("validate", "-f", str(mesh.config), "-f", str(generated), state=mesh.state)
    assert check.returncode == 0, check.stdout + check.stderr

    # 3. Apply: the control plane watches the config directory.
    shutil.copy(generated, mesh.config / "generated.yaml")
    asyncio.run(mesh.running.wait_synced(timeout=30))

    # 4. The same traffic passes, every hop of it allowed by a generated rule.
    before = {r.origin for r in mesh.records()}
    pages, rated, versions = mesh.browse()
    replayed = mesh.wait_logged(before, pages, rated)
    assert all(r.verdict == "allow" and r.response_code == 200 for r in replayed), [
        r.as_dict() for r in replayed if r.verdict != "allow"
    ]
    deciding = {r.rule for r in replayed}  # Envoy's RBAC metadata: the rule that allowed
    assert deciding == {
        f"ns[default]-policy[{name}]-rule[0]" for name in by_name if name.endswith("-observed")
    }

    # 5. A caller the recording never saw is refused by the sidecar.
    status, body = mesh.get("default/ratings-v1", "http://reviews:9080/reviews/0")
    assert status == 403 and body.startswith("RBAC: access denied"), (status, body)
    status, body = mesh.get("default/productpage-v1", "http://ratings:9080/ratings/0")
    assert status == 403, (status, body)

    # 6. impact of removing the generated rule of ratings: exactly what it allowed flips.
    changed = dict(by_name["ratings-v1-observed"])
    changed["spec"] = {k: v for k, v in changed["spec"].items() if k != "rules"}
    change_file = mesh.root / "change.yaml"
    change_file.write_text(yaml.safe_dump(changed))
    done = trustmesh(
        "impact", "--traffic", str(recorded_file), "-f", str(mesh.config), "--change",
        str(change_file), "-o", "json", state=mesh.state,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    rule = "ns[default]-policy[ratings-v1-observed]-rule[0]"
    flipped = Counter(
        (g["source"], g["destination"], req["method"], req["path"])
        for g in report["groups"]
        for req in g["requests"]
        for _ in range(req["records"])
    )
    to_ratings = Counter(
        (r["source_principal"], f"{r['destination']}:{r['port']}", r["method"], r["path"])
        for r in exported
        if r["destination"] == "default/ratings-v1"
    )
    assert to_ratings and flipped == to_ratings
    assert {(g["direction"], g["rule_before"]) for g in report["groups"]} == {("allow→deny", rule)}
    assert report["flipped_records"] == sum(to_ratings.values())
