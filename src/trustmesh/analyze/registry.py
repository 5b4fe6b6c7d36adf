"""The rule registry: each check module registers its rules with :func:`rule`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from trustmesh.analyze.findings import Issue, RuleInfo, Severity

if TYPE_CHECKING:
    from trustmesh.analyze.context import AnalysisContext

Check = Callable[["AnalysisContext"], Iterable[Issue]]

RULES: dict[str, tuple[RuleInfo, Check]] = {}


def rule(
    rule_id: str,
    *,
    title: str,
    severity: Severity,
    family: str,
    rationale: str,
    fixable: bool = False,
) -> Callable[[Check], Check]:
    """Register ``check`` under a stable ID. IDs are never reused for another meaning."""

    def register(check: Check) -> Check:
        if rule_id in RULES:
            raise ValueError(f"rule {rule_id} registered twice")
        RULES[rule_id] = (RuleInfo(rule_id, title, severity, family, rationale, fixable), check)
        return check

    return register


def all_rules() -> list[RuleInfo]:
    from trustmesh.analyze import checks  # noqa: F401  (registers every rule)

    return sorted((info for info, _ in RULES.values()), key=lambda r: r.id)
