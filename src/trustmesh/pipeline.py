"""Sources to a compiled mesh: the one pipeline the CLI, the control plane, the tests and
the benchmarks share.

Stages, in order (OPA-style, each named so a caller can time it): ``load`` (parse and
type every document), ``snapshot`` (resolve workloads, services and mesh config),
``validate`` (Istio's admission checks, then the traffic checks that need Envoy's protos),
``compile`` (only when nothing is an error). Input is bytes, never paths: reading files
is :mod:`trustmesh.config`'s job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from trustmesh.api.diagnostics import Diagnostic
from trustmesh.api.loader import LoadResult, Parse, SourceCache, load_sources
from trustmesh.api.snapshot import ConfigSnapshot, build_snapshot
from trustmesh.api.traffic import outlier_detection_warnings
from trustmesh.api.validation import validate_snapshot
from trustmesh.api.yamldoc import YamlDocument, decode_text, iter_yaml, parse_yaml
from trustmesh.policy.compose import MeshPolicy, compile_mesh

__all__ = ["STAGES", "Compiled", "compile_sources", "mesh_documents"]

STAGES = ("load", "snapshot", "validate", "compile")
Sources = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Compiled:
    """What the pipeline made of the sources: ``mesh`` is None when any diagnostic is an
    error (or compiling was not asked for); ``diagnostics`` are sorted by location."""

    loaded: LoadResult
    snapshot: ConfigSnapshot
    diagnostics: tuple[Diagnostic, ...]
    mesh: MeshPolicy | None

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]


def mesh_documents(mesh_config: Sources) -> tuple[tuple[YamlDocument, ...], list[Diagnostic]]:
    """The meshConfig documents of ``mesh_config`` sources, and what could not be read."""
    documents: list[YamlDocument] = []
    problems: list[Diagnostic] = []
    for name, data in mesh_config:
        text, decode_problems = decode_text(data, name)
        problems.extend(decode_problems)
        if text is not None:
            parsed, parse_problems = parse_yaml(text, name)
            documents.extend(parsed)
            problems.extend(parse_problems)
    return tuple(documents), problems


def compile_sources(
    sources: Sources,
    *,
    mesh_config: Sources = (),
    jwks: Mapping[str, str] | None = None,
    default_namespace: str = "default",
    assume_injected: bool = False,
    cache: SourceCache | None = None,
    parse: Parse = iter_yaml,
    progress: Callable[[int], None] | None = None,
    compile_policy: bool = True,
    timed: Callable[[str, float], None] | None = None,
) -> Compiled:
    """Run every stage over ``sources`` (``(name, bytes)``, in order). ``timed`` is told
    each stage's name and seconds; the other options are :func:`load_sources`' and
    :func:`build_snapshot`'s."""

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        if timed is not None:
            timed(name, time.perf_counter() - started)

    with stage("load"):
        loaded = load_sources(
            sources, default_namespace, cache=cache, parse=parse, progress=progress
        )
        documents, problems = mesh_documents(mesh_config)
    with stage("snapshot"):
        snapshot = build_snapshot(loaded, documents, assume_injected=assume_injected)
    with stage("validate"):
        diagnostics = [*problems, *loaded.diagnostics, *validate_snapshot(snapshot)]
        diagnostics += _traffic_problems(snapshot)
        diagnostics.sort(key=Diagnostic.sort_key)
    mesh = None
    if compile_policy and not any(d.is_error for d in diagnostics):
        with stage("compile"):
            mesh = compile_mesh(snapshot, dict(jwks or {}))
    return Compiled(loaded, snapshot, tuple(diagnostics), mesh)


def _traffic_problems(snapshot: ConfigSnapshot) -> list[Diagnostic]:
    """Traffic controls: DestinationRule fields Istio ignores, EnvoyFilter patches Envoy
    would reject (that check is imported only when there are any: it loads Envoy's protos)."""
    problems = [
        warning
        for rule in snapshot.of_kind("DestinationRule")
        for warning in outlier_detection_warnings(rule.spec, rule.location)
    ]
    if not any(True for _ in snapshot.of_kind("EnvoyFilter")):
        return problems
    from trustmesh.xds.envoyfilter import envoy_filter_diagnostics

    return problems + envoy_filter_diagnostics(snapshot)
