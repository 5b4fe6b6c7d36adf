"""Every acceptance scenario of istio-semantics.md §7 LIVE in the pod sandbox, and source
addresses sent from namespaces that hold them.

One ``trustmesh up --isolation netns`` of the istio.io layout (foo, bar with sidecars;
legacy without) runs for the module — every pod a network namespace with capture rules,
Envoy as uid 1337 — and each scenario's YAML is written into the directory its control
plane watches. Every case is sent as ``trustmesh test --live`` sends it in the sandbox: a
workload's from inside its pod as its app's uid (capture → its Envoy → mesh mTLS), a
plaintext one from a source namespace on the mesh bridge; the live outcome must meet the
expectation AND equal the offline verdict, as in process mode (tests/e2e). The
trust-domain scenarios need a mesh whose CA issues in ``new-td``: a second mesh.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.mesh import (
    EXAMPLES,
    SCENARIOS,
    START_TIMEOUT,
    LiveMesh,
    mesh_config_of,
    report,
    trustmesh,
)
from tests.sandbox.conftest import requires_root
from trustmesh.runtime.live import LiveCaseResult
from trustmesh.runtime.netns import NETNS_DIR

pytestmark = [pytest.mark.envoy, pytest.mark.sandbox, requires_root]

# Cases no mesh can send for real, with why (reported as "not run", never passed).
NOT_LIVE = {
    # A workload of the *old* trust domain: only the mesh CA could issue that identity,
    # and it issues in the mesh's trust domain only.
    ("16b-trust-domain-alias", "a peer still presenting old-td/ns/sleep-allow/sa/sleep is 200"),
}
MAIN = sorted(
    p.parent.name for p in SCENARIOS.glob("*/test.yaml") if not p.parent.name.startswith("16")
)
TRUST_DOMAIN = ["16a-trust-domain-migrated", "16b-trust-domain-alias"]


@contextmanager
def sandboxed_mesh(root: Path, scenario: Path | None = None) -> Iterator[LiveMesh]:
    """The example mesh (with ``scenario``'s config) up in the sandbox; down afterwards,
    checking that nothing of it — pods' or source namespaces — is left."""
    config_dir, state = root / "config", root / "state"
    config_dir.mkdir(parents=True)
    (config_dir / "workloads.yaml").write_text((EXAMPLES / "mesh" / "workloads.yaml").read_text())
    seed = (scenario / "config.yaml").read_text() if scenario is not None else ""
    (config_dir / "scenario.yaml").write_text(seed)
    mesh_file = root / "mesh.yaml"
    mesh_file.write_text(mesh_config_of(scenario))
    args = ("up", str(config_dir), "--mesh-config", str(mesh_file), "--isolation", "netns")
    started = trustmesh(*args, "--detach", state=state, timeout=START_TIMEOUT)
    mesh_id = ""
    try:
        assert started.returncode == 0, f"up failed:\n{started.stderr}\n{started.stdout}"
        running = LiveMesh(root, state, config_dir, mesh_file)
        mesh_id = running.running.plan.mesh_id
        yield running
    finally:
        stopped = trustmesh("down", state=state)
        assert stopped.returncode == 0, stopped.stderr
        if mesh_id:
            left = sorted(p.name for p in NETNS_DIR.glob(f"tm-{mesh_id}-*"))
            assert not left, f"namespaces left after down: {left}"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMesh]:
    with sandboxed_mesh(tmp_path_factory.mktemp("sandbox-live")) as running:
        yield running


@pytest.fixture(scope="module")
def new_td_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMesh]:
    first = SCENARIOS / TRUST_DOMAIN[0]  # the CA issues in new-td from the start
    with sandboxed_mesh(tmp_path_factory.mktemp("sandbox-td"), first) as running:
        yield running


def _passed(name: str, results: list[LiveCaseResult]) -> None:
    assert results, f"{name} has no cases"
    not_run = {(name, r.case) for r in results if r.not_run}
    assert not_run <= NOT_LIVE, f"cases not sent live: {not_run - NOT_LIVE}\n" + report(results)
    failed = [r for r in results if not r.passed and not r.not_run]
    assert not failed, f"{len(failed)} of {len(results)} failed live:\n" + report(failed)


def _run(mesh: LiveMesh, name: str) -> list[LiveCaseResult]:
    scenario = SCENARIOS / name
    loaded = mesh.apply(scenario)
    results = mesh.run_cases(loaded, scenario / "test.yaml")
    _passed(name, results)
    return results


@pytest.mark.parametrize("name", MAIN)
def test_scenario_live_in_the_sandbox(mesh: LiveMesh, name: str) -> None:
    results = _run(mesh, name)
    # sent as the sandbox sends them: from a pod's namespace or a source namespace
    for result in results:
        if result.live is not None:
            assert " via " in result.detail, result.detail


@pytest.mark.parametrize("name", TRUST_DOMAIN)
def test_trust_domain_scenario_live_in_the_sandbox(new_td_mesh: LiveMesh, name: str) -> None:
    _run(new_td_mesh, name)


IP_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: from-addresses, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{ipBlocks: ["10.88.7.7", "192.168.7.0/24", "{bar_sleep}/32"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-one, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: DENY
  rules:
  - from: [{{source: {{ipBlocks: ["192.168.7.66"]}}}}]
"""
IP_CASES = """
apiVersion: trustmesh.dev/v1alpha1
kind: PolicyTest
metadata: {{name: source-addresses}}
spec:
  cases:
  - name: plaintext from 10.88.7.7 is allowed
    from: {{plaintext: true, ip: 10.88.7.7}}
    to: {{workload: foo/httpbin, port: 8000}}
    request: {{method: GET, path: /ip}}
    expect: {{verdict: allow, status: 200, rule: "ns[foo]-policy[from-addresses]-rule[0]"}}
  - name: plaintext from 10.88.7.8 is denied
    from: {{plaintext: true, ip: 10.88.7.8}}
    to: {{workload: foo/httpbin, port: 8000}}
    request: {{method: GET, path: /ip}}
    expect: {{verdict: deny, status: 403}}
  - name: plaintext from 192.168.7.9, outside the pod network, is allowed
    from: {{plaintext: true, ip: 192.168.7.9}}
    to: {{workload: foo/httpbin, port: 8000}}
    request: {{method: GET, path: /ip}}
    expect: allow
  - name: plaintext from 192.168.7.66 is denied by the DENY policy
    from: {{plaintext: true, ip: 192.168.7.66}}
    to: {{workload: foo/httpbin, port: 8000}}
    request: {{method: GET, path: /ip}}
    expect: {{verdict: deny, status: 403, rule: "ns[foo]-policy[deny-one]-rule[0]"}}
  - name: a POST from 192.168.8.1 is denied too
    from: {{plaintext: true, ip: 192.168.8.1}}
    to: {{workload: foo/httpbin, port: 8000}}
    request: {{method: POST, path: /post}}
    expect: {{verdict: deny, status: 403}}
  - name: bar/sleep from its own pod IP, over mTLS, is allowed
    from: {{workload: bar/sleep, ip: {bar_sleep}}}
    to: {{workload: foo/httpbin, port: 8000}}
    request: {{method: GET, path: /ip}}
    expect: allow
  - name: foo/sleep's pod IP is not in the blocks
    from: {{workload: foo/sleep}}
    to: {{workload: foo/httpbin, port: 8000}}
    request: {{method: GET, path: /ip}}
    expect: {{verdict: deny, status: 403}}
"""


def test_ip_blocks_decide_by_the_address_the_request_comes_from(
    mesh: LiveMesh, tmp_path: Path
) -> None:
    """``ipBlocks`` live: the same request to foo/httpbin is allowed from 10.88.7.7,
    192.168.7.9 (a source namespace whose address is routed by the node) and bar/sleep's
    pod IP, and denied from 10.88.7.8, 192.168.7.66 (a DENY on it) and foo/sleep — each
    sent from a namespace holding that address, and each agreeing with the offline
    verdict for it. The source namespaces are the mesh's: ``down`` removes them."""
    bar_sleep = mesh.running.plan.pod("bar/sleep")
    assert bar_sleep is not None
    scenario = tmp_path / "ip-blocks"
    scenario.mkdir()
    (scenario / "config.yaml").write_text(IP_POLICY.format(bar_sleep=bar_sleep.pod_ip))
    (scenario / "test.yaml").write_text(IP_CASES.format(bar_sleep=bar_sleep.pod_ip))
    loaded = mesh.apply(scenario)
    results = mesh.run_cases(loaded, scenario / "test.yaml")
    _passed("ip-blocks", results)
    verdicts = [r.live.verdict if r.live else None for r in results]
    assert verdicts == ["allow", "deny", "allow", "deny", "deny", "allow", "deny"]
    # one namespace per source address, recorded for the mesh's `down`
    known = json.loads((mesh.state / "live-sources.json").read_text())
    addresses = {"10.88.7.7", "10.88.7.8", "192.168.7.9", "192.168.7.66", "192.168.8.1"}
    assert addresses <= set(known), known
    mesh_id = mesh.running.plan.mesh_id
    for address in addresses:
        assert (NETNS_DIR / f"tm-{mesh_id}-s{known[address]}").exists(), address


def test_cli_test_live_sends_source_addresses_in_the_sandbox(
    mesh: LiveMesh, tmp_path: Path
) -> None:
    """``trustmesh test --live`` itself against the sandboxed mesh: the ipBlocks cases
    pass (exit 0); a wrong expectation for the case from 10.88.7.8 fails naming it."""
    bar_sleep = mesh.running.plan.pod("bar/sleep")
    assert bar_sleep is not None
    scenario = tmp_path / "ip-blocks"
    scenario.mkdir()
    (scenario / "config.yaml").write_text(IP_POLICY.format(bar_sleep=bar_sleep.pod_ip))
    cases = scenario / "test.yaml"
    cases.write_text(IP_CASES.format(bar_sleep=bar_sleep.pod_ip))
    mesh.apply(scenario)
    files = ["-f", str(mesh.config_dir), "--mesh-config", str(mesh.mesh_config)]
    ok = trustmesh("test", *files, str(cases), "--live", state=mesh.state)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 failed" in ok.stdout
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        cases.read_text().replace(
            "    expect: {verdict: deny, status: 403}\n", "    expect: allow\n", 1
        )
    )
    bad = trustmesh("test", *files, str(wrong), "--live", state=mesh.state)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "plaintext from 10.88.7.8 is denied" in bad.stdout
    assert "expected allow, got deny" in bad.stdout
