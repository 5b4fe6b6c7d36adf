"""Every acceptance scenario of istio-semantics.md §7, LIVE through real Envoy sidecars.

One ``trustmesh up`` of the istio.io layout (foo, bar with sidecars; legacy without) runs
for the module; each scenario's Istio YAML is written into the directory the control
plane watches, the test waits until every proxy ACKed it, then sends every case of the
scenario's test.yaml as a real request (``trustmesh test --live`` does the same) and
requires the live outcome to meet the expectation AND to equal the offline verdict.
The trust-domain scenarios need a mesh whose CA issues in ``new-td``: a second mesh.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.mesh import SCENARIOS, LiveMesh, live_mesh, report, trustmesh

pytestmark = pytest.mark.envoy

# Cases the mesh cannot send for real, with why (reported as "not run", never passed).
NOT_LIVE = {
    # A workload of the *old* trust domain: only the mesh CA could issue that identity,
    # and it issues in the mesh's trust domain only.
    ("16b-trust-domain-alias", "a peer still presenting old-td/ns/sleep-allow/sa/sleep is 200"),
}
MAIN = sorted(
    p.parent.name for p in SCENARIOS.glob("*/test.yaml") if not p.parent.name.startswith("16")
)
TRUST_DOMAIN = ["16a-trust-domain-migrated", "16b-trust-domain-alias"]


@pytest.fixture(scope="module")
def new_td_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMesh]:
    # The CA issues in new-td from the start; the scenario's workloads run too.
    first = SCENARIOS / TRUST_DOMAIN[0]
    with live_mesh(
        tmp_path_factory.mktemp("live-td"), base="127.40.0.0", scenario=first
    ) as running:
        yield running


def _run(mesh: LiveMesh, name: str) -> None:
    scenario = SCENARIOS / name
    loaded = mesh.apply(scenario)
    results = mesh.run_cases(loaded, scenario / "test.yaml")
    assert results, f"{name} has no cases"
    not_run = {(name, r.case) for r in results if r.not_run}
    assert not_run <= NOT_LIVE, f"cases not sent live: {not_run - NOT_LIVE}"
    failed = [r for r in results if not r.passed and not r.not_run]
    assert not failed, f"{len(failed)} of {len(results)} failed live:\n" + report(failed)


@pytest.mark.parametrize("name", MAIN)
def test_scenario_live(mesh: LiveMesh, name: str) -> None:
    _run(mesh, name)


@pytest.mark.parametrize("name", TRUST_DOMAIN)
def test_trust_domain_scenario_live(new_td_mesh: LiveMesh, name: str) -> None:
    _run(new_td_mesh, name)


def test_cli_test_live_reports_offline_and_live(mesh: LiveMesh, tmp_path: Path) -> None:
    """`trustmesh test --live` itself: exit 0 when all pass, 1 with the case named when
    the expectation is wrong."""
    scenario = SCENARIOS / "02-deny-get"
    mesh.apply(scenario)
    files = ["-f", str(mesh.config_dir), "--mesh-config", str(mesh.mesh_config)]
    ok = trustmesh("test", *files, str(scenario / "test.yaml"), "--live", state=mesh.state)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 failed" in ok.stdout
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        (scenario / "test.yaml")
        .read_text()
        .replace("{verdict: deny, status: 403", "{verdict: allow", 1)
    )
    bad = trustmesh("test", *files, str(wrong), "--live", state=mesh.state)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL" in bad.stdout and "expected allow, got deny" in bad.stdout
