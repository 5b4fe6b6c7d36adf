"""The acceptance scenarios of istio-semantics.md §7, run as PolicyTest suites.

Each directory ``examples/scenarios/NN-slug/`` (``NNa``/``NNb`` for a before/after
pair) holds the Istio resources a user writes following the istio.io task
(``config.yaml``), an optional MeshConfig (``mesh.yaml``) and the expected decisions
(``test.yaml``). They load on top of the istio.io layout in ``examples/mesh``.
Expectations come from the §7 table, which was checked against real Istio/Envoy:
when a case fails, fix the evaluator, not the case.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trustmesh.config import load_config
from trustmesh.policy.testing import CaseResult, run_case
from trustmesh.policy.trace import render_trace

ROOT = Path(__file__).resolve().parents[2]
MESH_DIR = ROOT / "examples" / "mesh"
SCENARIOS_DIR = ROOT / "examples" / "scenarios"
NOW = 1_790_000_000.0  # 2026-09: JWT clock for cases without their own ``now``
SCENARIO_COUNT = 20
_NUMBER = re.compile(r"^(\d+)[a-z]?-")


def scenario_dirs() -> list[Path]:
    return sorted(p.parent for p in SCENARIOS_DIR.glob("*/test.yaml"))


def scenario_number(directory: Path) -> int:
    found = _NUMBER.match(directory.name)
    assert found, f"{directory.name}: scenario directories are named NN-slug or NNa-slug"
    return int(found.group(1))


def run_scenario(directory: Path) -> list[CaseResult]:
    mesh_config = directory / "mesh.yaml"
    loaded = load_config(
        [str(MESH_DIR), str(directory / "config.yaml")],
        mesh_config=[str(mesh_config)] if mesh_config.exists() else [],
        test_paths=[str(directory / "test.yaml")],
    )
    assert not loaded.errors, "\n".join(map(str, loaded.errors))
    assert loaded.mesh is not None
    assert loaded.tests, f"{directory.name}: test.yaml holds no PolicyTest"
    return [
        run_case(loaded.mesh, suite.name, where, case, now=NOW)
        for suite in loaded.tests
        for where, case in suite.located_cases()
    ]


def _report(result: CaseResult) -> str:
    lines = [f"{result.suite} / {result.case} ({result.location})"]
    lines += [f"  {failure}" for failure in result.failures]
    if result.decision is not None:
        lines += [f"    · {step}" for step in render_trace(result.decision.trace)]
    return "\n".join(lines)


@pytest.mark.parametrize("directory", scenario_dirs(), ids=lambda p: p.name)
def test_scenario(directory: Path) -> None:
    results = run_scenario(directory)
    assert results, f"{directory.name} has no cases"
    failed = [r for r in results if not r.passed]
    assert not failed, f"{len(failed)} of {len(results)} cases failed:\n" + "\n".join(
        map(_report, failed)
    )


def test_scenarios_cover_the_acceptance_table() -> None:
    numbers = {scenario_number(d) for d in scenario_dirs()}
    assert numbers == set(range(1, SCENARIO_COUNT + 1))
