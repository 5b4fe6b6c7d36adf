"""Rules and findings: stable IDs, severities, locations, concrete fixes."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api.diagnostics import Location


class Severity(enum.IntEnum):
    INFO = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"severity must be info, warning or error, got {text!r}") from None


@dataclass(frozen=True, slots=True)
class RuleInfo:
    """What a rule checks, once, for listings and SARIF ``rules``."""

    id: str  # e.g. TM-MTLS-001: stable, never reused
    title: str  # one line
    severity: Severity
    family: str  # mtls | authz | authn | edge | install | version
    rationale: str  # why it matters
    fixable: bool = False  # `trustmesh harden` writes a fix for it


@dataclass(frozen=True, slots=True)
class Issue:
    """What a check reports; the engine adds the rule and decides suppression."""

    message: str  # specific: which workloads / ports and why, in a sentence or two
    location: Location | None  # file:line + field path; None for a mesh-wide default
    resource: str = ""  # Kind/namespace/name of the resource at fault ("" = mesh default)
    workloads: tuple[str, ...] = ()  # NS/NAME of the workloads exposed
    fix: str = ""  # concrete, usually YAML to apply
    severity: Severity | None = None  # overrides the rule's default for this finding
    properties: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Finding:
    rule: RuleInfo
    issue: Issue
    # Where a CI tool shows it: the issue's own location, or for a finding about something
    # missing the nearest file a person would fix it in (see analyze.anchors).
    anchor: Location | None = None

    @property
    def severity(self) -> Severity:
        return self.issue.severity or self.rule.severity

    def sort_key(self) -> tuple[int, str, int, str, str]:
        loc = self.issue.location
        return (
            -self.severity,
            loc.file if loc else "",
            loc.line if loc else 0,
            self.rule.id,
            self.issue.message,
        )

    def as_dict(self) -> dict[str, Any]:
        loc = self.issue.location
        return {
            "rule": self.rule.id,
            "title": self.rule.title,
            "severity": self.severity.label,
            "message": self.issue.message,
            "file": loc.file if loc else None,
            "line": loc.line if loc else None,
            "field": loc.field if loc else None,
            "resource": self.issue.resource or None,
            "workloads": list(self.issue.workloads),
            "why": self.rule.rationale,
            "fix": self.issue.fix or None,
            **({"properties": dict(self.issue.properties)} if self.issue.properties else {}),
            **(
                {"nearest": {"file": self.anchor.file, "line": self.anchor.line}}
                if loc is None and self.anchor is not None
                else {}
            ),
        }
