"""Rendering analysis results: text for people, JSON / YAML for scripts, SARIF for CI."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from importlib.metadata import version as dist_version
from typing import Any

import yaml

from trustmesh.analyze.engine import AnalysisResult
from trustmesh.analyze.findings import Finding, RuleInfo, Severity
from trustmesh.analyze.registry import all_rules

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
        "findings": [f.as_dict() for f in result.findings],
        "summary": summary(result),
        "rules_run": list(result.rules_run),
        "notes": list(result.notes),
    }


def to_json(result: AnalysisResult) -> str:
    return json.dumps(as_document(result), indent=2) + "\n"


def to_yaml(result: AnalysisResult) -> str:
    return yaml.safe_dump(as_document(result), sort_keys=False, allow_unicode=True)


def to_sarif(result: AnalysisResult, base_dir: str | None = None) -> dict[str, Any]:
    """A SARIF 2.1.0 log; file paths relative to ``base_dir`` (default: cwd) for CI."""
    base = base_dir or os.getcwd()
    rules = [r for r in all_rules() if r.id in set(result.rules_run)]
    index = {r.id: i for i, r in enumerate(rules)}
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "trustmesh",
                        "version": dist_version("trustmesh"),
                        "rules": [_sarif_rule(r) for r in rules],
                    }
                },
                "results": [_sarif_result(f, index[f.rule.id], base) for f in result.findings],
                "columnKind": "unicodeCodePoints",
                "properties": {"notes": list(result.notes)},
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
    location = issue.location
    locations: list[dict[str, Any]] = []
    if location is not None and location.file and not location.file.startswith("<"):
        physical: dict[str, Any] = {
            "artifactLocation": {"uri": _uri(location.file, base)},
        }
        if location.line > 0:
            physical["region"] = {"startLine": location.line}
        entry: dict[str, Any] = {"physicalLocation": physical}
        if issue.resource:
            entry["logicalLocations"] = [{"fullyQualifiedName": issue.resource, "kind": "resource"}]
        if location.field:
            entry["message"] = {"text": location.field}
        locations.append(entry)
    if locations:
        result["locations"] = locations
    return result


def _uri(path: str, base: str) -> str:
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
