"""Helpers: build a compiled mesh from YAML text on top of the istio.io example layout."""

from __future__ import annotations

from pathlib import Path

from trustmesh.api.diagnostics import Diagnostic
from trustmesh.pipeline import compile_sources
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import Decision
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source

ROOT = Path(__file__).resolve().parents[2]
BASE = (ROOT / "examples" / "mesh" / "workloads.yaml").read_bytes()
NOW = 1_790_000_000.0


def _sources(text: str, base: bool) -> list[tuple[str, bytes]]:
    return ([("workloads.yaml", BASE)] if base else []) + [("policy.yaml", text.encode())]


def _mesh_config(mesh: str) -> list[tuple[str, bytes]]:
    return [("mesh.yaml", mesh.encode())] if mesh else []


def diagnostics_of(text: str, *, base: bool = True, mesh: str = "") -> list[Diagnostic]:
    compiled = compile_sources(
        _sources(text, base), mesh_config=_mesh_config(mesh), compile_policy=False
    )
    return list(compiled.diagnostics)


def compile_text(text: str = "", *, mesh: str = "", base: bool = True) -> MeshPolicy:
    compiled = compile_sources(_sources(text, base), mesh_config=_mesh_config(mesh))
    assert compiled.mesh is not None, "\n".join(map(str, compiled.errors))
    return compiled.mesh


def http(
    mesh: MeshPolicy,
    path: str = "/get",
    *,
    method: str = "GET",
    src: str = "foo/sleep",
    dst: str = "foo/httpbin",
    port: int = 8000,
    headers: tuple[tuple[str, str], ...] = (),
    host: str | None = None,
    jwt: str | None = None,
    source: Source | None = None,
    now: float = NOW,
) -> Decision:
    request = Request(
        source or Source.workload(src),
        dst,
        port,
        HttpRequest(method, path, host, headers, jwt),
    )
    return evaluate(mesh, request, now=now, trace=True)


def tcp(
    mesh: MeshPolicy,
    port: int,
    *,
    src: str = "foo/sleep",
    dst: str = "foo/tcp-echo",
    source: Source | None = None,
) -> Decision:
    request = Request(source or Source.workload(src), dst, port, None)
    return evaluate(mesh, request, now=NOW, trace=True)


def policy(
    name: str,
    namespace: str,
    spec: str,
    *,
    kind: str = "AuthorizationPolicy",
    extra_meta: str = "",
) -> str:
    """A resource document; ``spec`` is YAML indented by two spaces."""
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return (
        f"apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n"
        f"  name: {name}\n  namespace: {namespace}\n{extra_meta}spec:\n{body}\n---\n"
    )
