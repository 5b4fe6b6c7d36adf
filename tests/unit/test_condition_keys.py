"""The one table of ``when`` keys (``trustmesh.api.conditions``): validation, the
evaluator and the Envoy RBAC translation all read it, so they agree on which keys exist,
which side of Envoy's RBAC policy each lands on, and which need an HTTP request."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.meshutil import diagnostics_of, policy
from trustmesh.api import models as m
from trustmesh.api.conditions import KeyKind, Side, condition_key
from trustmesh.api.loader import load_sources
from trustmesh.api.resources import Resource
from trustmesh.policy.authz import TrustBundle, compile_policy
from trustmesh.xds.rbac import policy_rules

# One example of every kind of key, with a value valid for it.
EXAMPLES = {
    "source.ip": "10.0.0.0/8",
    "remote.ip": "10.1.2.3",
    "source.namespace": "foo",
    "source.principal": "cluster.local/ns/foo/sa/sleep",
    "source.serviceAccount": "sleep",
    "source.trustDomain": "cluster.local",
    "request.auth.principal": "https://issuer.example/alice",
    "request.auth.audiences": "api",
    "request.auth.presenter": "web",
    "destination.ip": "10.2.0.0/16",
    "destination.port": "8000",
    "connection.sni": "httpbin.foo.svc.cluster.local",
    "request.headers[X-User]": "alice",
    "request.auth.claims[groups][0]": "admin",
    "experimental.envoy.filters.network.mysql_proxy[db.table]": "[update]",
}


def _resource(key: str, value: str, action: str = "ALLOW") -> Resource[Any]:
    text = policy(
        "p",
        "foo",
        f"action: {action}\nrules:\n- when:\n  - key: {json.dumps(key)}\n"
        f"    values: [{json.dumps(value)}]",
    )
    [resource] = load_sources([("p.yaml", text.encode())]).resources
    return resource


def test_every_kind_has_an_example() -> None:
    kinds = {k.kind for k in map(condition_key, EXAMPLES) if k is not None}
    assert kinds == set(KeyKind)


@pytest.mark.parametrize(("key", "value"), EXAMPLES.items())
def test_validation_evaluator_and_translation_accept_every_key(key: str, value: str) -> None:
    known = condition_key(key)
    assert known is not None
    problems = diagnostics_of(
        policy(
            "p",
            "foo",
            f"rules:\n- when:\n  - {{key: {json.dumps(key)}, values: [{json.dumps(value)}]}}",
        )
    )
    assert not [d for d in problems if d.code == "unknown-condition-key"], problems

    resource = _resource(key, value)
    [rule] = policy_rules(resource, TrustBundle(), m.Action.ALLOW, for_tcp=False).values()
    principal_side, permission_side = (
        json.dumps(rule["principals"]),
        json.dumps(rule["permissions"]),
    )
    # The side the table names carries the matcher; the other is Envoy's "any".
    if known.side is Side.PERMISSION:
        assert principal_side.count('"any": true') == 1 and '"any"' not in permission_side
    else:
        assert permission_side.count('"any": true') == 1 and '"any"' not in principal_side

    # The evaluator reads every key except filter metadata, which it cannot know offline.
    [compiled] = compile_policy(resource, TrustBundle(), for_tcp=False)
    labels = [check.label for check in compiled.conditions]
    assert labels
    offline = known.kind is not KeyKind.ENVOY_FILTER_METADATA
    assert all(("not evaluated offline" not in label) == offline for label in labels), labels


@pytest.mark.parametrize(("key", "value"), EXAMPLES.items())
def test_http_only_keys_drop_allow_rules_on_tcp_ports(key: str, value: str) -> None:
    known = condition_key(key)
    assert known is not None
    tcp_rules = policy_rules(_resource(key, value), TrustBundle(), m.Action.ALLOW, for_tcp=True)
    assert (not tcp_rules) == known.http_only


@pytest.mark.parametrize(
    "key", ["source.user", "request.header[x]", "request.headersX", "connection.sni2"]
)
def test_unknown_keys_are_refused_and_their_rules_never_match(key: str) -> None:
    assert condition_key(key) is None
    problems = diagnostics_of(
        policy("p", "foo", f"rules:\n- when:\n  - {{key: {json.dumps(key)}, values: [x]}}")
    )
    assert [d.location.field for d in problems if d.code == "unknown-condition-key"]
    assert policy_rules(_resource(key, "x"), TrustBundle(), m.Action.ALLOW, for_tcp=False) == {}


def test_keyed_names() -> None:
    assert condition_key("request.headers[X-User]").names == ("X-User",)  # type: ignore[union-attr]
    claims = condition_key("request.auth.claims[groups][0]")
    assert claims is not None and claims.names == ("groups", "0")
    assert condition_key("request.auth.claims[]") is None
