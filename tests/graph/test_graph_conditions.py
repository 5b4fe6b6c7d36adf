"""Conditional edges: the conditions reported are the rules' own (paths, methods, a
header, a JWT with a claim), and the evaluator confirms them with example requests."""

from __future__ import annotations

from typing import Any

from .graphutil import FIXTURES, MESH, edges_by_pair, graph_json

CONDITIONAL = str(FIXTURES / "conditional.yaml")


def _atoms(clause: dict[str, Any]) -> set[tuple[str, tuple[str, ...], bool]]:
    return {(a["attribute"], tuple(a["values"]), a["negated"]) for a in clause["atoms"]}


def _examples(edge: dict[str, Any]) -> dict[str, str]:
    return {e["request"]: e["verdict"] for e in edge["conditions"]["examples"]}


def test_path_and_method_with_a_deny_carve_out() -> None:
    edges = edges_by_pair(graph_json(MESH, CONDITIONAL))
    edge = edges[("foo/sleep", "bar/httpbin", 8000)]
    assert edge["verdict"] == "conditional"
    assert edge["outcome"] == "deny"  # GET / is not under /api/
    (allow,) = edge["conditions"]["allow_when"]
    assert allow["rule"] == "ns[bar]-policy[api-readers]-rule[0]"
    assert _atoms(allow) == {("method", ("GET",), False), ("path", ("/api/*",), False)}
    (deny,) = edge["conditions"]["deny_when"]
    assert deny["rule"] == "ns[bar]-policy[no-admin]-rule[0]"
    assert _atoms(deny) == {("path", ("/api/admin*",), False)}
    assert edge["rules"] == [
        "ns[bar]-policy[api-readers]-rule[0]",
        "ns[bar]-policy[no-admin]-rule[0]",
    ]
    examples = _examples(edge)
    assert examples["GET /api/"] == "allow"
    assert examples["GET /api/admin"] == "deny"
    assert examples["POST /"] == "deny"
    text = edge["conditions"]["text"]
    assert text == "only if (method GET and path /api/*); unless (path /api/admin*)"


def test_a_header_condition_for_one_principal_only() -> None:
    edges = edges_by_pair(graph_json(MESH, CONDITIONAL))
    edge = edges[("bar/sleep", "bar/httpbin", 8000)]
    assert edge["verdict"] == "conditional"
    (allow,) = edge["conditions"]["allow_when"]  # the namespace-foo rule drops out
    assert allow["rule"] == "ns[bar]-policy[api-readers]-rule[1]"
    assert _atoms(allow) == {("header x-token", ("admin",), False)}
    assert _examples(edge)["GET /, x-token: admin"] == "allow"
    # bar/httpbin's own namespace-mates other than bar/sleep match neither ALLOW rule.
    other = edges[("bar/*", "bar/httpbin", 8000)]
    assert other["verdict"] == "denied" and other["conditions"] is None


def test_jwt_principal_and_group_claim() -> None:
    edges = edges_by_pair(graph_json(MESH, CONDITIONAL))
    for source in ("foo/sleep", "bar/sleep", "legacy/sleep", "external"):
        edge = edges[(source, "foo/httpbin", 8000)]
        assert edge["verdict"] == "conditional", source
        assert edge["rules"] == [
            "ns[foo]-policy[require-jwt]-rule[0]",
            "ns[foo]-policy[delete-needs-admin]-rule[0]",
        ]
        (allow,) = edge["conditions"]["allow_when"]
        assert _atoms(allow) == {
            (
                "request principal (JWT iss/sub)",
                ("testing@secure.istio.io/testing@secure.istio.io",),
                False,
            ),
            ("JWT claim groups", ("group1",), False),
        }
        allowed = [k for k, v in _examples(edge).items() if v == "allow"]
        assert allowed and "groups=['group1']" in allowed[0]
        # A missing x-token header is "not admin": the DENY matches DELETE without it.
        (deny,) = edge["conditions"]["deny_when"]
        assert _atoms(deny) == {
            ("method", ("DELETE",), False),
            ("path", ("/api/*",), True),
            ("header x-token", ("admin",), True),
        }
        assert _examples(edge)["DELETE /"] == "deny"
    assert edges[("legacy/sleep", "foo/httpbin", 8000)]["mtls"] is False


def test_port_rule_allows_unconditionally_by_name() -> None:
    edges = edges_by_pair(graph_json(MESH, CONDITIONAL))
    edge = edges[("foo/sleep", "foo/tcp-echo", 9000)]
    assert (edge["verdict"], edge["protocol"]) == ("allowed", "tcp")
    assert edge["rules"] == ["ns[foo]-policy[echo-9000]-rule[0]"]
    assert edge["conditions"] is None
    assert edges[("foo/sleep", "foo/tcp-echo", 9001)]["verdict"] == "denied"
    assert edges[("bar/sleep", "foo/tcp-echo", 9000)]["verdict"] == "denied"


def test_no_policy_means_allowed_and_no_sidecar_means_plaintext() -> None:
    edges = edges_by_pair(graph_json(MESH, CONDITIONAL))
    edge = edges[("foo/sleep", "legacy/httpbin", 8000)]
    assert (edge["verdict"], edge["rules"], edge["mtls"]) == ("allowed", [], False)
    permissive = edges[("legacy/sleep", "bar/httpbin", 8000)]
    assert permissive["mtls"] is False and permissive["mtls_mode"] == "PERMISSIVE"
    assert permissive["verdict"] == "denied"  # no peer principal: neither rule admits it


def test_tcp_port_conditional_on_a_source_address_the_inputs_do_not_give() -> None:
    # Deployments have no pod IP: whether 10.1.0.0/16 matches depends on where they run.
    edges = edges_by_pair(graph_json(MESH, CONDITIONAL))
    edge = edges[("bar/sleep", "foo/tcp-echo", 9002)]
    assert (edge["verdict"], edge["protocol"], edge["outcome"]) == ("conditional", "tcp", "deny")
    (allow,) = edge["conditions"]["allow_when"]
    assert allow["rule"] == "ns[foo]-policy[echo-9000]-rule[1]"
    assert _atoms(allow) == {("source ip", ("10.1.0.0/16",), False)}
    assert _examples(edge)["TCP connection from 10.1.0.1"] == "allow"


def test_rules_that_fail_closed() -> None:
    edges = edges_by_pair(graph_json(MESH, str(FIXTURES / "fail-closed.yaml")))
    # No RequestAuthentication: no token is ever validated, so alice is never seen.
    for source in ("foo/sleep", "bar/sleep", "external"):
        edge = edges[(source, "bar/httpbin", 8000)]
        assert (edge["verdict"], edge["conditions"]) == ("denied", None), source
        assert "bar/alice-only" in edge["reason"]
    # CUSTOM for a provider the mesh config lacks: a DENY on /admin*.
    edge = edges[("foo/sleep", "foo/httpbin", 8000)]
    assert (edge["verdict"], edge["outcome"]) == ("conditional", "allow")
    name = "istio-ext-authz-opa-ns[foo]-policy[ext-admin]-rule[0]-deny-due-to-bad-CUSTOM-action"
    assert edge["rules"] == [name]
    assert edge["conditions"]["external"] == []
    (deny,) = edge["conditions"]["deny_when"]
    assert deny["rule"] == name
    assert _atoms(deny) == {("path", ("/admin*",), False)}
    assert _examples(edge)["GET /admin"] == "deny"
