"""Must show 2: bookinfo with the istio.io "authorization for HTTP traffic" policies
(examples/bookinfo-authz-http) under mesh-wide STRICT mTLS, read from `graph -o json`."""

from __future__ import annotations

import json
import time
from importlib.resources import files

import jsonschema

from trustmesh.config import load_config
from trustmesh.graph.build import build_graph
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source

from .graphutil import BOOKINFO, FIXTURES, MESH, edges_by_pair, graph_json

SCHEMA = files("trustmesh.graph") / "schema.json"
REVIEWS = ("default/reviews-v1", "default/reviews-v2", "default/reviews-v3")


def test_productpage_may_call_reviews_with_get_by_the_reviews_viewer_rule() -> None:
    edges = edges_by_pair(graph_json(*BOOKINFO))
    for reviews in REVIEWS:
        edge = edges[("default/productpage-v1", reviews, 9080)]
        # The task's rule admits GET only: the plain GET is allowed, a POST is not.
        assert edge["verdict"] == "conditional", edge
        assert edge["outcome"] == "allow"
        assert edge["rules"] == ["ns[default]-policy[reviews-viewer]-rule[0]"]
        assert edge["service"] == "default/reviews" and edge["service_port"] == 9080
        assert edge["protocol"] == "http"
        assert edge["mtls"] is True and edge["mtls_mode"] == "STRICT"
        (clause,) = edge["conditions"]["allow_when"]
        assert [(a["attribute"], a["values"], a["negated"]) for a in clause["atoms"]] == [
            ("method", ["GET"], False)
        ]
        assert edge["conditions"]["deny_when"] == []
        examples = {e["request"]: e["verdict"] for e in edge["conditions"]["examples"]}
        assert examples["GET /"] == "allow"
        assert "deny" in examples.values()


def test_calls_the_task_does_not_grant_are_denied() -> None:
    edges = edges_by_pair(graph_json(*BOOKINFO))
    for reviews in REVIEWS:
        edge = edges[("default/ratings-v1", reviews, 9080)]
        assert (edge["verdict"], edge["outcome"], edge["rules"]) == ("denied", "deny", [])
        assert edge["mtls"] is True
        assert "allow-nothing" in edge["reason"]
    assert edges[("default/productpage-v1", "default/ratings-v1", 9080)]["verdict"] == "denied"
    assert edges[("default/details-v1", "default/reviews-v1", 9080)]["verdict"] == "denied"
    ratings = edges[("default/reviews-v2", "default/ratings-v1", 9080)]
    assert ratings["verdict"] == "conditional"
    assert ratings["rules"] == ["ns[default]-policy[ratings-viewer]-rule[0]"]


def test_plaintext_clients_are_reset_under_strict() -> None:
    body = graph_json(*BOOKINFO)
    outside = [e for e in body["edges"] if e["src"] == "external"]
    assert {e["dst"] for e in outside} == {
        "default/details-v1",
        "default/productpage-v1",
        "default/ratings-v1",
        *REVIEWS,
    }
    for edge in outside:
        assert (edge["verdict"], edge["outcome"], edge["mtls"]) == ("denied", "reset", False)
        assert "STRICT" in edge["reason"]


def test_nodes_carry_namespace_workload_and_service_account() -> None:
    body = graph_json(*BOOKINFO)
    nodes = {n["id"]: n for n in body["nodes"]}
    page = nodes["default/productpage-v1"]
    assert (page["namespace"], page["workload"], page["sa"]) == (
        "default",
        "productpage-v1",
        "bookinfo-productpage",
    )
    assert page["principal"] == "cluster.local/ns/default/sa/bookinfo-productpage"
    assert page["services"] == ["default/productpage"]
    assert nodes["default/*"]["kind"] == "namespace"
    assert nodes["external"]["kind"] == "external"
    assert body["schema"] == "trustmesh.graph/v1"
    assert sum(body["summary"].values()) == len(body["edges"])


def test_every_edge_outcome_is_the_evaluators_answer() -> None:
    loaded = load_config(BOOKINFO)
    assert loaded.mesh is not None
    graph = build_graph(loaded.mesh, now=time.time(), extra_sources=False)
    assert len(graph.edges) == 6 * 5  # six workloads, each to the five others
    for edge in graph.edges:
        http = HttpRequest("GET", "/", f"{edge.service.split('/')[1]}.default:9080")
        request = Request(Source.workload(edge.source), edge.destination, edge.port, http)
        assert evaluate(loaded.mesh, request, now=time.time()).verdict.value == edge.outcome


def test_show_allowed_drops_denied_edges() -> None:
    body = graph_json(*BOOKINFO, extra=("--show", "allowed"))
    assert body["edges"] and all(e["verdict"] != "denied" for e in body["edges"])
    denied = graph_json(*BOOKINFO, extra=("--show", "denied"))
    assert denied["edges"] and all(e["verdict"] == "denied" for e in denied["edges"])


def test_json_follows_the_published_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    for inputs in (BOOKINFO, [MESH, str(FIXTURES / "conditional.yaml")]):
        jsonschema.validate(graph_json(*inputs), schema)
