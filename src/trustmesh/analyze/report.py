"""Rendering analysis results: text for people, JSON / YAML for scripts, SARIF for CI."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import version as dist_version
from typing import Any

import yaml

from trustmesh.analyze import anchors
from trustmesh.analyze.engine import AnalysisResult
from trustmesh.analyze.findings import Finding, RuleInfo, Severity
from trustmesh.analyze.registry import all_rules
from trustmesh.api.diagnostics import Diagnostic

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_SARIF_LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
# GitHub code scanning orders security alerts by this 0-10 score.
_SECURITY_SEVERITY = {Severity.ERROR: "8.0", Severity.WARNING: "5.0", Severity.INFO: "2.0"}


def summary(result: AnalysisResult) -> dict[str, int]:
    counts = Counter(f.severity.label for f in result.findings)
    return {
        "error": counts["error"],
        "warning": counts["warning"],
        "info": counts["info"],
        "suppressed": len(result.suppressed),
    }


def as_document(result: AnalysisResult) -> dict[str, Any]:
    return {
        "valid": True,
        "findings": [f.as_dict() for f in result.findings],
        "summary": summary(result),
        "rules_run": list(result.rules_run),
        "notes": list(result.notes),
    }


def invalid_input_document(diagnostics: Sequence[Diagnostic]) -> dict[str, Any]:
    """What ``-o json|yaml`` prints when the input is invalid: nothing was analyzed."""
    errors = [d for d in diagnostics if d.is_error]
    return {
        "valid": False,
        "findings": [],
        "input_errors": [d.as_dict() for d in errors],
        "diagnostics": [d.as_dict() for d in diagnostics],
        "summary": {
            "error": 0,
            "warning": 0,
            "info": 0,
            "suppressed": 0,
            "input_errors": len(errors),
        },
        "rules_run": [],
    }


def to_json(result: AnalysisResult) -> str:
    return json.dumps(as_document(result), indent=2) + "\n"


def to_yaml(result: AnalysisResult) -> str:
    return yaml.safe_dump(as_document(result), sort_keys=False, allow_unicode=True)


def to_sarif(result: AnalysisResult, base_dir: str | None = None) -> dict[str, Any]:
    """A SARIF 2.1.0 log; file paths relative to ``base_dir`` (default: cwd) for CI.

    Every result has a physical location (GitHub code scanning rejects the whole file
    otherwise): findings about something missing point at their nearest file.
    """
    base = base_dir or os.getcwd()
    rules = [r for r in all_rules() if r.id in set(result.rules_run)]
    index = {r.id: i for i, r in enumerate(rules)}
    results = [_sarif_result(f, index[f.rule.id], base) for f in result.findings]
    return _sarif_log([_sarif_rule(r) for r in rules], results, successful=True, notes=result.notes)


INPUT_RULE = RuleInfo(
    "TM-INPUT-001",
    "Input that Istio or Kubernetes would refuse",
    Severity.ERROR,
    "input",
    "The configuration has errors (YAML syntax, unknown fields or kinds, values Istio's "
    "admission checks reject): nothing was analyzed, since any answer about a configuration "
    "that cannot be applied would be a guess.",
)


def invalid_input_sarif(
    diagnostics: Sequence[Diagnostic], base_dir: str | None = None
) -> dict[str, Any]:
    """A SARIF 2.1.0 log for invalid input: each problem a result of :data:`INPUT_RULE`."""
    base = base_dir or os.getcwd()
    results = []
    for d in diagnostics:
        level = "error" if d.is_error else "warning"
        physical: dict[str, Any] = {
            "artifactLocation": {"uri": _uri(d.location.file, base)},
            "region": {"startLine": max(d.location.line, 1)},
        }
        location: dict[str, Any] = {"physicalLocation": physical}
        if d.location.field:
            location["message"] = {"text": d.location.field}
        results.append(
            {
                "ruleId": INPUT_RULE.id,
                "ruleIndex": 0,
                "level": level,
                "message": {"text": f"{d.message} ({level}[{d.code}])"},
                "locations": [location],
                "partialFingerprints": {
                    "trustmeshInput/v1": hashlib.sha256(
                        "\x1f".join((d.code, d.location.field, d.message)).encode()
                    ).hexdigest()[:32]
                },
                "properties": {"code": d.code},
            }
        )
    return _sarif_log([_sarif_rule(INPUT_RULE)], results, successful=False)


def _sarif_log(
    rules: list[dict[str, Any]],
    results: list[dict[str, Any]],
    *,
    successful: bool,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "trustmesh",
                        "version": dist_version("trustmesh"),
                        "rules": rules,
                    }
                },
                "invocations": [{"executionSuccessful": successful}],
                "results": results,
                "columnKind": "unicodeCodePoints",
                "properties": {"notes": list(notes)},
            }
        ],
    }


def _sarif_rule(rule: RuleInfo) -> dict[str, Any]:
    return {
        "id": rule.id,
        "name": "".join(word.capitalize() for word in rule.title.replace("-", " ").split()[:8]),
        "shortDescription": {"text": rule.title},
        "fullDescription": {"text": rule.rationale},
        "help": {"text": f"{rule.title}. {rule.rationale}"},
        "defaultConfiguration": {"level": _SARIF_LEVEL[rule.severity]},
        "properties": {
            "tags": ["security", "istio", rule.family],
            "security-severity": _SECURITY_SEVERITY[rule.severity],
        },
    }


def _sarif_result(finding: Finding, rule_index: int, base: str) -> dict[str, Any]:
    issue = finding.issue
    text = issue.message
    if issue.fix:
        text += "\n\nFix:\n" + issue.fix
    result: dict[str, Any] = {
        "ruleId": finding.rule.id,
        "ruleIndex": rule_index,
        "level": _SARIF_LEVEL[finding.severity],
        "message": {"text": text},
        "partialFingerprints": {"trustmeshFinding/v1": _fingerprint(finding)},
        "properties": {"workloads": list(issue.workloads)},
    }
    own = issue.location if anchors.usable(issue.location) else None
    where = own or finding.anchor
    physical: dict[str, Any] = {
        "artifactLocation": {"uri": _uri(where.file if where else "<stdin>", base)},
    }
    # GitHub wants a region on every result; a file-level place is its first line.
    physical["region"] = {"startLine": max(where.line, 1) if where is not None else 1}
    entry: dict[str, Any] = {"physicalLocation": physical}
    if issue.resource:
        entry["logicalLocations"] = [{"fullyQualifiedName": issue.resource, "kind": "resource"}]
    if own is not None and own.field:
        entry["message"] = {"text": own.field}
    elif own is None:
        # Something is missing: shown where a person would add it, and said so.
        entry["message"] = {"text": "nearest file: the finding is about something missing"}
        result["properties"]["nearest"] = True
    result["locations"] = [entry]
    return result


def _uri(path: str, base: str) -> str:
    if path.startswith("<"):
        return "stdin"  # read from `-f -`: there is no file to point at
    absolute = os.path.abspath(path)
    try:
        relative = os.path.relpath(absolute, base)
    except ValueError:
        relative = absolute
    if relative.startswith(".."):
        return "file://" + absolute
    return relative.replace(os.sep, "/")


def _fingerprint(finding: Finding) -> str:
    # Stable across runs and line moves: rule, resource, field and workloads, not lines.
    loc = finding.issue.location
    parts = [
        finding.rule.id,
        finding.issue.resource,
        loc.field if loc else "",
        ",".join(finding.issue.workloads),
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
