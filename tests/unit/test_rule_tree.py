"""One compiler for AuthorizationPolicy rules (``trustmesh.policy.rule_tree``): the tree
of matcher values, Istio's rule-dropping decided there once (and said), the evaluator's
reading of every matcher type and the Envoy translation's mapping of every one."""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import typing
from pathlib import Path
from typing import Any

import pytest

from tests.unit.meshutil import policy
from trustmesh.api import models as m
from trustmesh.api.conditions import Side
from trustmesh.api.loader import load_sources
from trustmesh.api.resources import Resource
from trustmesh.policy import rule_tree as rt
from trustmesh.policy.authz import compile_policy, predicate
from trustmesh.policy.request import Attributes
from trustmesh.policy.rule_tree import StringPattern, TextKind, TrustBundle, compile_rules
from trustmesh.xds import rbac_matchers

SRC = Path(__file__).resolve().parents[2] / "src" / "trustmesh"
BUNDLE = TrustBundle(("cluster.local", "old.example"))


def _resource(spec: str) -> Resource[Any]:
    [resource] = load_sources([("p.yaml", policy("p", "foo", spec).encode())]).resources
    return resource


def test_a_rule_compiles_to_fields_of_matcher_values() -> None:
    compiled = compile_rules(
        _resource(
            """rules:
- from: [{source: {principals: [cluster.local/ns/bar/sa/sleep], notNamespaces: [legacy]}}]
  to: [{operation: {methods: [GET, "*"], paths: ["/api/*", "/x/{*}"]}}]
  when: [{key: "request.headers[X-User]", values: [alice]}, {key: destination.port, values: ["80"]}]
"""
        ),
        BUNDLE,
        for_tcp=False,
    )
    [tree] = compiled.rules
    assert tree.name == "ns[foo]-policy[p]-rule[0]" and not compiled.dropped
    assert tree.sources == (
        (
            rt.Field(
                "principals",
                Side.PRINCIPAL,
                rt.Or(
                    tuple(
                        rt.Principal(StringPattern(TextKind.EXACT, f"{td}/ns/bar/sa/sleep"))
                        for td in BUNDLE.domains  # trust-domain aliases, expanded once
                    )
                ),
            ),
            rt.Field(
                "notNamespaces", Side.PRINCIPAL, rt.Not(rt.Or((rt.SourceNamespace("legacy"),)))
            ),
        ),
    )
    assert tree.operations == (
        (
            rt.Field(
                "methods",
                Side.PERMISSION,
                rt.Or(
                    (
                        rt.Method(StringPattern(TextKind.EXACT, "GET")),
                        rt.Method(StringPattern(TextKind.PRESENT)),
                    )
                ),
            ),
            rt.Field(
                "paths",
                Side.PERMISSION,
                rt.Or(
                    (rt.Path(StringPattern(TextKind.PREFIX, "/api/")), rt.PathTemplate("/x/{*}"))
                ),
            ),
        ),
    )
    header, port = tree.when
    assert (header.side, port.side) == (Side.PRINCIPAL, Side.PERMISSION)
    # Envoy's placement: each side's conditions ANDed into every entry of that side.
    [principal] = tree.principals()
    assert principal.items[-1] == header.matcher
    [permission] = tree.permissions()
    assert permission.items[-1] == port.matcher


def test_http_only_fields_drop_an_allow_rule_on_tcp_and_only_the_field_from_a_deny_rule() -> None:
    resource = _resource(
        "rules:\n- to: [{operation: {methods: [GET], ports: ['9000']}}]\n"
        "- to: [{operation: {ports: ['9001']}}]\n"
    )
    allow = compile_rules(resource, BUNDLE, for_tcp=True)
    assert [t.name for t in allow.rules] == ["ns[foo]-policy[p]-rule[1]"]
    assert allow.dropped == (rt.Dropped("ns[foo]-policy[p]-rule[0]", "'methods' is HTTP only"),)

    deny = compile_rules(resource, BUNDLE, for_tcp=True, action=m.Action.DENY)
    assert [t.name for t in deny.rules] == [
        "ns[foo]-policy[p]-rule[0]",
        "ns[foo]-policy[p]-rule[1]",
    ]
    assert [f.label for f in (deny.rules[0].operations or ((),))[0]] == ["ports"]
    assert deny.dropped == (
        rt.Dropped("ns[foo]-policy[p]-rule[0]", "'methods' is HTTP only", "methods"),
    )
    # The evaluator reads the same trees: the DENY rule matches any method on 9000.
    text = "action: DENY\nrules:\n- to: [{operation: {methods: [GET], ports: ['9000']}}]\n"
    [rule] = compile_policy(_resource(text), BUNDLE, for_tcp=True)
    assert [[c.label for c in clause] for clause in rule.operations or ()] == [["ports"]]
    assert rule.matches(Attributes(destination_port=9000)) and rule.tree is not None


def test_unknown_keys_drop_rules_and_a_policy_without_rules_never_matches() -> None:
    resource = _resource("rules:\n- when: [{key: request.foo, values: [x]}]\n- {}\n")
    for action in m.Action:
        compiled = compile_rules(resource, BUNDLE, for_tcp=False, action=action)
        assert [t.index for t in compiled.rules] == [1], action
        assert compiled.dropped == (
            rt.Dropped("ns[foo]-policy[p]-rule[0]", "unknown condition key 'request.foo'"),
        )
    empty = compile_rules(_resource("action: ALLOW"), BUNDLE, for_tcp=False)
    assert empty.rules == () and empty.match_never == "ns[foo]-policy[p]-rule[0]"


def test_unknown_addresses_fail_closed_under_negation_too() -> None:
    spec = "action: {}\nrules:\n- from: [{{source: {{{}: ['10.0.0.0/8']}}}}]\n"
    nowhere = Attributes(principal=None, source_ip=None, destination_port=80, is_http=False)
    inside = Attributes(
        principal=None,
        source_ip=ipaddress.ip_address("10.1.2.3"),
        destination_port=80,
        is_http=False,
    )
    for field, known in (("ipBlocks", True), ("notIpBlocks", False)):
        [allow] = compile_policy(_resource(spec.format("ALLOW", field)), BUNDLE, for_tcp=True)
        [deny] = compile_policy(_resource(spec.format("DENY", field)), BUNDLE, for_tcp=True)
        assert (allow.matches(nowhere), deny.matches(nowhere)) == (False, True), field
        assert allow.matches(inside) is known and deny.matches(inside) is known, field


def _leaf_types() -> list[type]:
    return [t for t in typing.get_args(rt.Leaf)]


def _example(kind: type) -> Any:
    values: dict[str, Any] = {
        "pattern": StringPattern(TextKind.EXACT, "x"),
        "issuer": StringPattern(TextKind.EXACT, "iss"),
        "subject": StringPattern(TextKind.NON_EMPTY),
        "value": "x",
        "namespace": "ns",
        "account": "sa",
        "cidr": rt.Cidr("10.0.0.0", 8),
        "port": 80,
        "template": "/a/{*}",
        "name": "x-user",
        "claims": ("groups",),
        "values": (StringPattern(TextKind.EXACT, "a"),),
        "filter": "envoy.filters.network.mysql_proxy",
        "key": "db.table",
        "offline": True,
    }
    if kind is rt.FilterMetadata:
        values["values"] = ((StringPattern(TextKind.EXACT, "a"), True),)
    return kind(
        **{f.name: values[f.name] for f in dataclasses.fields(kind) if f.init and f.name in values}
    )


@pytest.mark.parametrize("kind", _leaf_types(), ids=lambda k: k.__name__)
def test_every_matcher_type_has_an_evaluator_and_an_envoy_message(kind: type) -> None:
    leaf = _example(kind)
    assert callable(predicate(leaf))
    assert callable(predicate(rt.Not(rt.Or((leaf, leaf)))))
    for message in (rbac_matchers.principal(leaf), rbac_matchers.permission(leaf)):
        assert isinstance(message, dict) and len(message) == 1, message


def test_the_translation_holds_no_policy_semantics() -> None:
    """Must-show 1 of issue 13: xds/rbac*.py map matcher types to Envoy messages and read
    no raw rule, source, operation or condition, and drop nothing themselves."""
    raw = ("m.Rule", "m.Source", "m.Operation", "m.Condition", ".spec.rules", ".when")
    semantics = ("Unsupported", "condition_key", "is_http_only", ".expand(", "strict")
    for name in ("rbac.py", "rbac_matchers.py"):
        text = (SRC / "xds" / name).read_text()
        for word in (*raw, *semantics):
            assert word not in text, (name, word)
    source = inspect.getsource(rbac_matchers)
    assert "TrustBundle" not in source and "Action" not in source


def test_each_policy_is_compiled_once_for_evaluator_and_translator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.unit.meshutil import compile_text
    from trustmesh.policy import compose, rule_trees
    from trustmesh.policy.compose import compile_mesh
    from trustmesh.xds import rbac

    compiled: list[tuple[str, bool, m.Action | None]] = []

    def counting(p: Resource[Any], bundle: TrustBundle, **kw: Any) -> rt.CompiledRules:
        compiled.append((p.name, kw["for_tcp"], kw.get("action")))
        return compile_rules(p, bundle, **kw)

    text = policy("allow", "foo", "selector: {matchLabels: {app: httpbin}}\nrules:\n- {}")
    text += policy("deny", "foo", "action: DENY\nrules:\n- to: [{operation: {ports: ['1']}}]")
    mesh = compile_mesh(compile_text(text).snapshot)
    for module in (compose, rule_trees, rbac):
        monkeypatch.setattr(module, "compile_rules", counting)
    mesh = compile_mesh(mesh.snapshot)
    per_mesh = sorted(compiled, key=str)
    assert per_mesh == sorted(
        [(n, tcp, None) for n in ("allow", "deny") for tcp in (False, True)], key=str
    )
    httpbin = mesh.workloads["foo/httpbin"]
    http = rbac.http_rbac_filters(httpbin, mesh)
    tcp = rbac.network_rbac_filters(httpbin, mesh, 8000)
    assert len(http) == len(tcp) == 2  # DENY then ALLOW, from the trees compiled above
    assert sorted(compiled, key=str) == per_mesh  # the translator compiled nothing again


def test_the_header_guards_read_the_tree() -> None:
    from trustmesh.policy.authz import condition_header_names, reads_host

    resource = _resource(
        """rules:
- to: [{operation: {notHosts: [internal.foo]}}]
  when: [{key: "request.headers[X-User]", notValues: [ops]}]
- when: [{key: "request.headers[:authority]", values: ["*"]}, {key: source.ip, values: [10.0.0.1]}]
"""
    )
    trees = compile_rules(resource, BUNDLE, for_tcp=False).rules
    assert condition_header_names(trees) == {"x-user", ":authority"}
    assert reads_host(resource, trees[:1]) and reads_host(resource, trees[1:])
    assert not reads_host(resource, ()) and condition_header_names(()) == frozenset()
