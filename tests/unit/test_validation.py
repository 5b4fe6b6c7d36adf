"""Istio's admission checks: each rejected shape is an error at its field."""

from __future__ import annotations

import pytest

from .meshutil import diagnostics_of, policy


def codes(text: str) -> list[tuple[str, str]]:
    return [(d.code, d.location.field) for d in diagnostics_of(text, base=False) if d.is_error]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("action: DENY", ("rules-required", "spec.rules")),
        ("action: CUSTOM\nprovider: {name: x}", ("rules-required", "spec.rules")),
        ("action: CUSTOM\nrules: [{}]", ("custom-without-provider", "spec.provider")),
        ("provider: {name: x}\nrules: [{}]", ("provider-without-custom", "spec.provider")),
        (
            "rules:\n- from: [{source: {serviceAccounts: [a], principals: [b]}}]",
            ("service-accounts-with-principals", "spec.rules[0].from[0].source.serviceAccounts"),
        ),
        (
            "rules:\n- when: [{key: request.nope, values: [a]}]",
            ("unknown-condition-key", "spec.rules[0].when[0].key"),
        ),
        (
            "rules:\n- when: [{key: source.ip, values: [a]}]",
            ("invalid-cidr", "spec.rules[0].when[0].values[0]"),
        ),
        (
            "rules:\n- when: [{key: source.ip}]",
            ("empty-condition", "spec.rules[0].when[0]"),
        ),
        (
            "selector: {matchLabels: {app: a}}\ntargetRefs: [{kind: Service, name: a}]",
            ("selector-with-target-ref", "spec.selector"),
        ),
        (
            "rules:\n- from: [{source: {ipBlocks: [10.0.0.0/33]}}]",
            ("invalid-cidr", "spec.rules[0].from[0].source.ipBlocks[0]"),
        ),
        (
            'rules:\n- to: [{operation: {ports: ["70000"]}}]',
            ("invalid-port", "spec.rules[0].to[0].operation.ports[0]"),
        ),
        (
            'rules:\n- to: [{operation: {paths: [""]}}]',
            ("empty-value", "spec.rules[0].to[0].operation.paths[0]"),
        ),
        (
            "action: CUSTOM\nprovider: {name: x}\nrules:\n- from: [{source: {principals: [a]}}]",
            ("custom-identity-field", "spec.rules[0].from[0].source.principals"),
        ),
        (
            "rules:\n- from: [{source: {}}]",
            ("empty-source", "spec.rules[0].from[0].source"),
        ),
    ],
)
def test_authorization_policy_errors(spec: str, expected: tuple[str, str]) -> None:
    assert expected in codes(policy("p", "foo", spec))


def test_valid_policies_have_no_errors() -> None:
    text = policy(
        "p",
        "foo",
        """
rules:
- from: [{source: {principals: ["cluster.local/ns/a/sa/b"], ipBlocks: ["10.0.0.1"]}}]
  to: [{operation: {methods: [GET], paths: ["/api/*"], ports: ["8000"]}}]
  when:
  - {key: "request.headers[x-id]", values: ["*"]}
  - {key: "request.auth.claims[a][b]", values: [x]}
""",
    )
    assert codes(text) == []


def test_peer_authentication_port_level_needs_selector() -> None:
    text = policy("p", "foo", "portLevelMtls:\n  8000: {mode: STRICT}", kind="PeerAuthentication")
    assert ("port-level-without-selector", "spec.portLevelMtls") in codes(text)


def test_request_authentication_errors() -> None:
    text = policy(
        "p",
        "foo",
        """
jwtRules:
- issuer: a
  jwks: '{"keys": []}'
  jwksUri: https://x/jwks
- jwksUri: ftp://x
""",
        kind="RequestAuthentication",
    )
    found = codes(text)
    assert ("jwks-and-uri", "spec.jwtRules[0].jwks") in found
    assert ("missing-field", "spec.jwtRules[1].issuer") in found
    assert ("invalid-jwks-uri", "spec.jwtRules[1].jwksUri") in found


def test_warnings_do_not_block() -> None:
    text = policy(
        "p", "foo", "rules:\n- from: [{source: {principals: [spiffe://cluster.local/ns/a/sa/b]}}]"
    )
    found = diagnostics_of(text, base=False)
    assert [d.code for d in found] == ["principal-with-scheme"]
    assert not found[0].is_error
