"""Runs the selected rules, applies suppressions, sorts findings."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from trustmesh.analyze.anchors import nearest
from trustmesh.analyze.context import SUPPRESS_ANNOTATION, AnalysisContext
from trustmesh.analyze.findings import Finding
from trustmesh.analyze.registry import RULES, all_rules


@dataclass(frozen=True, slots=True)
class Suppression:
    """``RULE`` or ``RULE=RESOURCE_GLOB`` (glob over ``Kind/namespace/name``)."""

    rule: str
    resource_glob: str = "*"

    @classmethod
    def parse(cls, text: str) -> Suppression:
        rule, _, glob = text.partition("=")
        if not rule:
            raise ValueError(f"--suppress needs RULE or RULE=RESOURCE_GLOB, got {text!r}")
        return cls(rule.strip(), glob.strip() or "*")

    def matches(self, finding: Finding) -> bool:
        return fnmatch.fnmatchcase(finding.rule.id, self.rule) and fnmatch.fnmatchcase(
            finding.issue.resource or "", self.resource_glob
        )


@dataclass(frozen=True, slots=True)
class AnalysisResult:
    findings: tuple[Finding, ...]
    suppressed: tuple[Finding, ...]
    rules_run: tuple[str, ...]
    # What the findings rest on that the input does not show (e.g. sidecar injection of
    # workloads whose namespace is not among the inputs).
    notes: tuple[str, ...] = ()


def select_rules(selection: Sequence[str] | None) -> list[str]:
    """Rule IDs to run: all, or those matching IDs / globs / family names given."""
    known = all_rules()
    if not selection:
        return [r.id for r in known]
    chosen = [
        r.id for r in known if any(fnmatch.fnmatchcase(r.id, s) or s == r.family for s in selection)
    ]
    unknown = [
        s
        for s in selection
        if not any(fnmatch.fnmatchcase(r.id, s) or s == r.family for r in known)
    ]
    if unknown:
        raise ValueError(f"no rule matches {', '.join(unknown)}")
    return chosen


def analyze(
    context: AnalysisContext,
    rules: Sequence[str] | None = None,
    suppressions: Iterable[Suppression] = (),
) -> AnalysisResult:
    chosen = select_rules(rules)
    suppress = list(suppressions)
    annotated = _annotation_suppressions(context)
    kept: list[Finding] = []
    dropped: list[Finding] = []
    for rule_id in chosen:
        info, check = RULES[rule_id]
        for issue in check(context):
            finding = Finding(info, issue, nearest(context, info, issue))
            by_annotation = any(
                _rule_matches(pattern, rule_id) for pattern in annotated.get(issue.resource, ())
            )
            if by_annotation or any(s.matches(finding) for s in suppress):
                dropped.append(finding)
            else:
                kept.append(finding)
    kept.sort(key=Finding.sort_key)
    return AnalysisResult(tuple(kept), tuple(dropped), tuple(chosen), context.dataplane_notes())


def _annotation_suppressions(context: AnalysisContext) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for resource in context.snapshot.resources:
        value = resource.annotations.get(SUPPRESS_ANNOTATION)
        if value:
            out[resource.key] = tuple(p.strip() for p in value.split(",") if p.strip())
    return out


def _rule_matches(pattern: str, rule_id: str) -> bool:
    return fnmatch.fnmatchcase(rule_id, pattern)
