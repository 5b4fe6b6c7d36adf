"""The seeds' hardening advice end to end: examples/insecure → findings → harden → clean."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
from typer.testing import CliRunner

from trustmesh.analyze import report
from trustmesh.analyze.context import build_context
from trustmesh.analyze.engine import AnalysisResult, analyze
from trustmesh.analyze.harden import plan
from trustmesh.cli.main import app
from trustmesh.config import load_config

ROOT = Path(__file__).resolve().parents[2]
INSECURE = str(ROOT / "examples" / "insecure")
SCHEMA = Path(sys.prefix) / "share" / "sarif-schema-2.1.0.json"


def _analyze(*paths: str) -> AnalysisResult:
    loaded = load_config(list(paths))
    assert loaded.mesh is not None, loaded.errors
    context = build_context(loaded.snapshot, loaded.mesh, loaded.helm_values, None, loaded.unknown)
    return analyze(context)


def test_insecure_install_yields_findings_from_every_family() -> None:
    result = _analyze(INSECURE)
    families = {f.rule.family for f in result.findings}
    assert families >= {"mtls", "authz", "authn", "edge", "install"}
    rules = {f.rule.id for f in result.findings}
    assert {"TM-MTLS-001", "TM-AUTHZ-001", "TM-AUTHZ-004", "TM-AUTHN-001", "TM-EDGE-001"} <= rules
    for finding in result.findings:
        if finding.issue.location is not None:
            assert finding.issue.location.file.startswith(INSECURE)


def test_insecure_sarif_validates() -> None:
    sarif = report.to_sarif(_analyze(INSECURE), base_dir=str(ROOT))
    jsonschema.Draft4Validator(json.loads(SCHEMA.read_text())).validate(sarif)
    uris = {
        loc["physicalLocation"]["artifactLocation"]["uri"]
        for result in sarif["runs"][0]["results"]
        for loc in result.get("locations", ())
    }
    assert "examples/insecure/policies.yaml" in uris


def test_harden_output_removes_every_fixable_finding(tmp_path: Path) -> None:
    before = _analyze(INSECURE)
    fixable = {f.rule.id for f in before.findings if f.rule.fixable}
    assert {"TM-MTLS-001", "TM-AUTHZ-001", "TM-AUTHZ-004", "TM-EDGE-001"} <= fixable
    hardened = tmp_path / "hardened.yaml"
    result = CliRunner().invoke(app, ["harden", "-f", INSECURE, "-o", str(hardened)])
    assert result.exit_code == 0, result.output
    assert hardened.read_text() == plan(before.findings).render()
    after = _analyze(INSECURE, str(hardened))
    still = sorted({f.rule.id for f in after.findings if f.rule.fixable})
    assert still == [], [f.issue.message for f in after.findings if f.rule.fixable]
