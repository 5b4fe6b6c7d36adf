"""Build an analysis from YAML text (on top of the istio.io example layout by default)."""

from __future__ import annotations

import datetime

from trustmesh.analyze.context import AnalysisContext, build_context
from trustmesh.analyze.engine import AnalysisResult, analyze
from trustmesh.analyze.findings import Finding
from trustmesh.api.loader import load_sources
from trustmesh.api.snapshot import build_snapshot
from trustmesh.api.validation import validate_snapshot
from trustmesh.api.yamldoc import parse_yaml
from trustmesh.policy.compose import compile_mesh

from ..unit.meshutil import BASE


def context_from(
    text: str = "",
    *,
    base: bool = True,
    mesh: str = "",
    version: str | None = None,
    today: datetime.date | None = None,
    now: datetime.datetime | None = None,
) -> AnalysisContext:
    sources = ([("workloads.yaml", BASE)] if base else []) + [("config.yaml", text.encode())]
    loaded = load_sources(sources)
    mesh_docs = tuple(parse_yaml(mesh, "mesh.yaml")[0]) if mesh else ()
    snapshot = build_snapshot(loaded, mesh_docs)
    errors = [d for d in loaded.diagnostics + validate_snapshot(snapshot) if d.is_error]
    assert not errors, "\n".join(map(str, errors))
    return build_context(
        snapshot, compile_mesh(snapshot), loaded.helm_values, version, loaded.unknown, today, now
    )


def run(text: str = "", *, rules: list[str] | None = None, **kwargs: object) -> AnalysisResult:
    return analyze(context_from(text, **kwargs), rules)  # type: ignore[arg-type]


def findings(text: str = "", rule: str = "", **kwargs: object) -> list[Finding]:
    """Findings of one rule for the given config."""
    return list(run(text, rules=[rule], **kwargs).findings)
