"""Build an analysis from YAML text (on top of the istio.io example layout by default)."""

from __future__ import annotations

import datetime

from trustmesh.analyze.context import AnalysisContext, build_context
from trustmesh.analyze.engine import AnalysisResult, analyze
from trustmesh.analyze.findings import Finding
from trustmesh.pipeline import compile_sources

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
    compiled = compile_sources(sources, mesh_config=[("mesh.yaml", mesh.encode())] if mesh else [])
    assert compiled.mesh is not None, "\n".join(map(str, compiled.errors))
    loaded = compiled.loaded
    return build_context(
        compiled.snapshot, compiled.mesh, loaded.helm_values, version, loaded.unknown, today, now
    )


def run(text: str = "", *, rules: list[str] | None = None, **kwargs: object) -> AnalysisResult:
    return analyze(context_from(text, **kwargs), rules)  # type: ignore[arg-type]


def findings(text: str = "", rule: str = "", **kwargs: object) -> list[Finding]:
    """Findings of one rule for the given config."""
    return list(run(text, rules=[rule], **kwargs).findings)
