"""trustmesh analyze on inputs in the style of `istioctl analyze`'s own tests.

``reference.yaml`` lists, per Istio test case, Istio's security-relevant expected messages
and the trustmesh finding that covers each; every case runs the rules that answer for that
Istio analyzer on inputs written for trustmesh (``inputs/``) and must report exactly the
findings listed. The coverage figure (covered messages / security-relevant messages) is
measured here and must stay at or above 90 %.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from trustmesh.analyze.context import build_context
from trustmesh.analyze.engine import analyze
from trustmesh.analyze.findings import Finding
from trustmesh.config import load_config

HERE = Path(__file__).parent
REFERENCE: dict[str, Any] = yaml.safe_load((HERE / "reference.yaml").read_text())
CASES: list[dict[str, Any]] = REFERENCE["cases"]
TARGET = 0.90


@dataclass(frozen=True)
class Expected:
    """``RULE RESOURCE [@FIELD-PREFIX]`` from the reference file."""

    rule: str
    resource: str
    field: str = ""

    @classmethod
    def parse(cls, text: str) -> Expected:
        rule, resource, *rest = text.split()
        return cls(rule, resource, rest[0].removeprefix("@") if rest else "")

    def matches(self, finding: Finding) -> bool:
        loc = finding.issue.location
        field = loc.field if loc else ""
        return (
            finding.rule.id == self.rule
            and finding.issue.resource == self.resource
            and field.startswith(self.field)
        )


def run_case(case: dict[str, Any]) -> list[Finding]:
    paths = [str(HERE / "inputs" / name) for name in case["inputs"]]
    loaded = load_config(paths)
    assert loaded.mesh is not None, "\n".join(map(str, loaded.errors))
    context = build_context(loaded.snapshot, loaded.mesh, loaded.helm_values, None, loaded.unknown)
    return list(analyze(context, case["rules"]).findings)


def covered(case: dict[str, Any], findings: list[Finding]) -> list[bool]:
    """For each of Istio's messages, whether a distinct finding covers it."""
    free = list(findings)
    out = []
    for message in case["messages"]:
        target = message.get("covered_by")
        hit = next((f for f in free if target and Expected.parse(target).matches(f)), None)
        if hit is not None:
            free.remove(hit)
        out.append(hit is not None)
    return out


@pytest.fixture(scope="module")
def results() -> dict[str, list[Finding]]:
    return {case["name"]: run_case(case) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_reports_exactly_the_expected_findings(
    case: dict[str, Any], results: dict[str, list[Finding]]
) -> None:
    findings = results[case["name"]]
    got = Counter(f"{f.rule.id} {f.issue.resource}" for f in findings)
    want = Counter(case["findings"] or [])
    assert got == want, "\n".join(
        f"{f.rule.id} {f.issue.location}: {f.issue.message}" for f in findings
    )
    inputs = {str(HERE / "inputs" / name) for name in case["inputs"]}
    for finding in findings:  # every finding points at a line of the inputs
        loc = finding.issue.location
        assert loc is not None and loc.file in inputs and loc.line > 0, finding
    for message, hit in zip(case["messages"], covered(case, findings), strict=True):
        if "gap" in message:
            assert not hit and "covered_by" not in message, message
        else:
            assert hit, f"{message['type']} on {message['istio_resource']}: {message['covered_by']}"


def test_reference_accounts_for_every_istio_message() -> None:
    counted = sum(len(case["messages"]) for case in CASES)
    excluded = sum(item["messages"] for item in REFERENCE["excluded"])
    assert counted + excluded == REFERENCE["source"]["total_messages"]
    for case in CASES:
        for message in case["messages"]:
            assert message["code"].startswith("IST0") and message["means"], message
            assert ("covered_by" in message) != ("gap" in message), message


def test_coverage_of_security_messages(results: dict[str, list[Finding]]) -> None:
    hits = [hit for case in CASES for hit in covered(case, results[case["name"]])]
    ratio = sum(hits) / len(hits)
    print(f"istioctl analyze security messages covered: {sum(hits)} of {len(hits)} ({ratio:.1%})")
    assert len(hits) == 68
    assert ratio >= TARGET, f"{sum(hits)} of {len(hits)}"
