"""The graph against the evaluator, request by request: for every edge, a grid of requests
(methods, paths, a header, JWTs with and without the claim) is decided by the evaluator
and compared with what the edge says — allowed edges allow all of them, denied edges none,
and a conditional edge exactly those its clauses admit (only if an ALLOW clause holds and
no DENY clause does)."""

from __future__ import annotations

import itertools
import json

from trustmesh.config import load_config
from trustmesh.graph.build import build_graph
from trustmesh.graph.model import Clause, Edge, EdgeVerdict
from trustmesh.graph.witness import Examples, Token, _place, _sign
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import Verdict
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.pathnorm import normalize_path
from trustmesh.policy.request import Attributes, HttpRequest, Request, Source

from .graphutil import BOOKINFO, FIXTURES, MESH

NOW = 1_790_000_000.0
ISSUER = "testing@secure.istio.io"
METHODS = ("GET", "POST", "DELETE")
PATHS = ("/", "/api/x", "/api/admin", "/api/admin/x", "/x/../api/y", "/admin", "/x/../admin")
TOKENS: tuple[Token | None, ...] = (
    None,
    Token(ISSUER, ISSUER, json.dumps({"groups": ["group1"]})),
    Token(ISSUER, ISSUER, json.dumps({"groups": ["group2"]})),
    Token(ISSUER, "someone-else", json.dumps({"groups": ["group1"]})),
)
HEADERS = (None, "admin", "guest")


def _holds(clause: Clause, attrs: Attributes) -> bool:
    return all(atom.test(attrs) for atom in clause.atoms)


def _predicted(edge: Edge, attrs: Attributes) -> bool:
    if edge.verdict is EdgeVerdict.ALLOWED:
        return True
    if edge.verdict is EdgeVerdict.DENIED:
        return False
    conditions = edge.conditions
    assert conditions is not None and not conditions.external
    admitted = not conditions.allow_when or any(_holds(c, attrs) for c in conditions.allow_when)
    return admitted and not any(_holds(c, attrs) for c in conditions.deny_when)


def _source(edge: Edge, mesh: MeshPolicy) -> Source:
    if edge.source == "external":
        return Source.plaintext()
    if edge.source.endswith("/*"):
        return Source.principal(f"cluster.local/ns/{edge.source[:-2]}/sa/trustmesh-graph-other")
    return Source.workload(edge.source)


def _check_mesh(files: list[str]) -> int:
    loaded = load_config(files)
    assert loaded.mesh is not None
    mesh = loaded.mesh
    probe = Examples(mesh, NOW).probe_mesh()
    graph = build_graph(mesh, now=NOW)
    checked = 0
    for edge in graph.edges:
        if edge.protocol != "http" or edge.verdict is EdgeVerdict.UNSUPPORTED:
            continue
        target = mesh.for_workload(edge.destination)
        assert target is not None and edge.service is not None
        host = f"{edge.service.split('/')[1]}.{target.workload.namespace}:{edge.service_port}"
        grid = itertools.product(METHODS, PATHS, HEADERS, TOKENS)
        for method, path, header, token in grid:
            headers: list[tuple[str, str]] = [("x-token", header)] if header else []
            sent_path = path
            if token is not None:
                provider = next((p for p in target.jwt_providers if p.issuer == token.issuer), None)
                if provider is None:
                    continue  # an unknown token is a 401 before any rule: not a condition
                headers, sent_path = _place(provider, _sign(token), headers, path)
            http = HttpRequest(method, sent_path, host, tuple(headers))
            request = Request(_source(edge, mesh), edge.destination, edge.port, http)
            decision = evaluate(probe if token else mesh, request, now=NOW)
            attrs = Attributes(
                destination_port=edge.port,
                is_http=True,
                method=method,
                path=normalize_path(path, mesh.path_normalization).path,
                host=host,
                headers={"x-token": (header,)} if header else {},
            )
            if token is not None:
                claims = json.loads(token.claims_json)
                attrs.issuer, attrs.subject, attrs.claims = token.issuer, token.subject, claims
            expected = _predicted(edge, attrs)
            assert (decision.verdict is Verdict.ALLOW) == expected, (
                edge.source,
                edge.destination,
                edge.verdict,
                edge.conditions.describe() if edge.conditions else "",
                http,
                decision.verdict,
                decision.reason,
            )
            checked += 1
    return checked


def test_conditional_mesh_edges_predict_the_evaluator() -> None:
    assert _check_mesh([MESH, str(FIXTURES / "conditional.yaml")]) > 2000


def test_fail_closed_edges_predict_the_evaluator() -> None:
    assert _check_mesh([MESH, str(FIXTURES / "fail-closed.yaml")]) > 1000


def test_bookinfo_edges_predict_the_evaluator() -> None:
    assert _check_mesh(BOOKINFO) > 1000
