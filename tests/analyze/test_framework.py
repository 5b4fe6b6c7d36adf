"""Engine, suppressions, reporters (SARIF validated against the 2.1.0 schema), harden."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from trustmesh.analyze import report
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.engine import Suppression, analyze
from trustmesh.analyze.findings import Issue, RuleInfo, Severity
from trustmesh.analyze.harden import plan
from trustmesh.analyze.registry import RULES
from trustmesh.cli.main import app

from ..unit.meshutil import BASE
from .util import context_from

SCHEMA = Path(sys.prefix) / "share" / "sarif-schema-2.1.0.json"

POLICY = """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
  annotations: {%s}
spec:
  mtls: {mode: PERMISSIVE}
"""


def _probe(ctx: AnalysisContext) -> Iterator[Issue]:
    """A test rule: one finding per PeerAuthentication, one for a mesh default."""
    for resource in ctx.resources("PeerAuthentication"):
        yield Issue(
            message=f"{resource.key} is PERMISSIVE",
            location=resource.location("mtls", "mode"),
            resource=resource.key,
            workloads=("foo/httpbin",),
            fix="apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
            "metadata: {name: default, namespace: foo}\nspec: {mtls: {mode: STRICT}}\n",
        )
    yield Issue(
        message="mesh default",
        location=None,
        fix="meshConfig:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
    )


@pytest.fixture
def probe_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    info = RuleInfo("TM-TEST-001", "Probe", Severity.WARNING, "test", "Because.", fixable=True)
    monkeypatch.setitem(RULES, info.id, (info, _probe))


def test_findings_sarif_validates_against_the_schema(probe_rules: None) -> None:
    result = analyze(context_from(POLICY % ""), ["TM-TEST-*"])
    assert sorted(f.issue.message for f in result.findings) == [
        "PeerAuthentication/foo/default is PERMISSIVE",
        "mesh default",
    ]
    sarif = report.to_sarif(result, base_dir=str(Path.cwd()))
    jsonschema.Draft4Validator(json.loads(SCHEMA.read_text())).validate(sarif)
    run = sarif["runs"][0]
    assert run["tool"]["driver"]["rules"][0]["id"] == "TM-TEST-001"
    by_message = {r["message"]["text"].split("\n")[0]: r for r in run["results"]}
    located = by_message["PeerAuthentication/foo/default is PERMISSIVE"]
    region = located["locations"][0]["physicalLocation"]
    assert region["artifactLocation"]["uri"] == "config.yaml"
    assert region["region"]["startLine"] == 8
    assert located["level"] == "warning"
    # A mesh default has no line of its own: it is shown at the root namespace.
    nearest = by_message["mesh default"]["locations"][0]
    assert nearest["physicalLocation"]["artifactLocation"]["uri"] == "workloads.yaml"
    root_line = BASE.decode().splitlines().index("  name: istio-system") + 1
    assert nearest["physicalLocation"]["region"]["startLine"] == root_line
    assert nearest["message"]["text"].startswith("nearest file")


def test_suppression_by_flag_glob_and_annotation(probe_rules: None) -> None:
    context = context_from(POLICY % "")
    assert len(analyze(context, ["TM-TEST-001"]).findings) == 2
    by_resource = analyze(
        context, ["TM-TEST-001"], [Suppression.parse("TM-TEST-*=PeerAuthentication/foo/*")]
    )
    assert [f.issue.message for f in by_resource.findings] == ["mesh default"]
    assert len(by_resource.suppressed) == 1
    annotated = context_from(POLICY % '"trustmesh.dev/suppress": "TM-TEST-001"')
    assert [f.issue.message for f in analyze(annotated, ["TM-TEST-001"]).findings] == [
        "mesh default"
    ]


def test_unknown_rule_selection_is_an_error() -> None:
    with pytest.raises(ValueError, match="no rule matches"):
        analyze(context_from(""), ["TM-NOPE-999"])


def test_json_and_yaml_documents_agree(probe_rules: None) -> None:
    result = analyze(context_from(POLICY % ""), ["TM-TEST-001"])
    as_json = json.loads(report.to_json(result))
    assert as_json == yaml.safe_load(report.to_yaml(result))
    first = next(f for f in as_json["findings"] if f["file"])
    assert (first["file"], first["line"], first["field"]) == ("config.yaml", 8, "spec.mtls.mode")
    assert as_json["summary"] == {"error": 0, "warning": 2, "info": 0, "suppressed": 0}


def test_harden_plan_deduplicates_and_merges_mesh_fragments(probe_rules: None) -> None:
    result = analyze(context_from(POLICY % ""), ["TM-TEST-001"])
    fixes = plan(list(result.findings) * 2)
    documents = list(yaml.safe_load_all(fixes.render()))
    kinds = [d["kind"] for d in documents]
    assert kinds == ["PeerAuthentication", "IstioOperator"]
    assert documents[1]["spec"]["meshConfig"] == {
        "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}
    }


def test_cli_fail_on_and_outputs(probe_rules: None, tmp_path: Path) -> None:
    config = tmp_path / "pa.yaml"
    config.write_text(POLICY % "")
    runner = CliRunner()
    warn = runner.invoke(app, ["analyze", "-f", str(config), "--rules", "TM-TEST-001"])
    assert warn.exit_code == 0, warn.output  # default --fail-on error
    assert "TM-TEST-001" in warn.stdout and "fix:" in warn.stdout
    strict = runner.invoke(
        app,
        [
            "analyze",
            "-f",
            str(config),
            "--rules",
            "TM-TEST-001",
            "--fail-on",
            "warning",
            "-o",
            "sarif",
        ],
    )
    assert strict.exit_code == 1
    assert json.loads(strict.stdout)["version"] == "2.1.0"
    bad = runner.invoke(app, ["analyze", "-f", str(config), "--fail-on", "sometimes"])
    assert bad.exit_code == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [\n")
    invalid = runner.invoke(app, ["analyze", "-f", str(broken)])
    assert invalid.exit_code == 3 and "broken.yaml:1" in invalid.stdout
