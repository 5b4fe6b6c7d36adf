"""Where to show a finding about something that is *missing*.

A finding like "no mesh-wide STRICT PeerAuthentication" has no line of its own, yet CI
tools need a file for every result (GitHub code scanning rejects a whole SARIF file when
one result has no location). Such a finding is anchored at the nearest place a person
would fix it:

1. the resource the finding names, when it has no field to point at;
2. where the fix goes: when it is a PeerAuthentication, the namespace's PeerAuthentication
   (the root namespace's for mesh-wide findings); for other mesh defaults, the install
   (an IstioOperator, the mesh config, Helm values); for other mTLS findings, the
   PeerAuthentication of the namespace concerned;
4. the Namespace resource, then the first named workload, then the first resource of the
   namespace concerned;
5. else the first resource of the first input file.

The anchor is shown as "nearest" only: the finding's own location stays ``None``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, RuleInfo
from trustmesh.api.diagnostics import Location
from trustmesh.api.resources import Resource


def usable(location: Location | None) -> bool:
    """A location a CI tool can show: a real file (not ``<stdin>``)."""
    return location is not None and bool(location.file) and not location.file.startswith("<")


def nearest(ctx: AnalysisContext, rule: RuleInfo, issue: Issue) -> Location | None:
    """The anchor for ``issue`` (its own location when it has a usable one)."""
    if usable(issue.location):
        return issue.location
    for candidate in _candidates(ctx, rule, issue):
        if usable(candidate):
            return candidate
    return issue.location


def _namespace(issue: Issue) -> str | None:
    """The one namespace a finding is about, if there is one."""
    parts = issue.resource.split("/")
    if len(parts) == 3 and parts[1]:
        return parts[1]
    namespaces = {ref.split("/", 1)[0] for ref in issue.workloads if "/" in ref}
    return namespaces.pop() if len(namespaces) == 1 else None


def _candidates(ctx: AnalysisContext, rule: RuleInfo, issue: Issue) -> Iterator[Location | None]:
    if issue.resource:
        for r in ctx.snapshot.resources:
            if r.key == issue.resource:
                yield r.meta_location("name")
    namespace = _namespace(issue)
    root = ctx.root_namespace
    # Nearest = where the fix goes: a PeerAuthentication next to the namespace's one, a
    # mesh default into the install (IstioOperator, mesh config, Helm values).
    peer_first = "kind: PeerAuthentication" in issue.fix
    mesh_wide = not issue.resource
    if peer_first:
        yield from _peer_authentication(ctx, namespace or root)
    if mesh_wide:
        yield from _install(ctx)
    if rule.family == "mtls" and not peer_first:
        yield from _peer_authentication(ctx, namespace or root)
    if rule.family == "mtls" and namespace is not None:
        yield from _peer_authentication(ctx, root)
    yield from _in_namespace(ctx, namespace or root, issue)
    if not mesh_wide:
        yield from _install(ctx)
    yield from _first_input(ctx)


def _peer_authentication(ctx: AnalysisContext, namespace: str) -> Iterator[Location | None]:
    found = [r for r in ctx.resources("PeerAuthentication") if r.namespace == namespace]
    wide = [r for r in found if r.spec.selector is None or not r.spec.selector.match_labels]
    for r in sorted(wide, key=Resource.age_key) + found:
        yield _mtls_mode(r)


def _mtls_mode(r: Resource[Any]) -> Location:
    if r.spec.mtls is not None:
        return r.location("mtls", "mode")
    return r.meta_location("name")


def _install(ctx: AnalysisContext) -> Iterator[Location | None]:
    for layer in reversed(ctx.snapshot.mesh_layers):
        yield layer.document.location(layer.path)
    for source in reversed(ctx.install.sources):
        yield source.document.location(source.base)


def _in_namespace(ctx: AnalysisContext, namespace: str, issue: Issue) -> Iterator[Location | None]:
    for r in ctx.resources("Namespace"):
        if r.name == namespace:
            yield r.meta_location("name")
    for ref in issue.workloads:
        workload = ctx.snapshot.workload(ref)
        if workload is not None and workload.namespace == namespace:
            yield workload.resource.meta_location("name")
    for r in sorted(ctx.snapshot.resources, key=lambda r: r.order):
        if r.namespace == namespace:
            yield r.meta_location("name")


def _first_input(ctx: AnalysisContext) -> Iterator[Location | None]:
    for r in sorted(ctx.snapshot.resources, key=lambda r: r.order):
        yield Location(r.file, r.line)
