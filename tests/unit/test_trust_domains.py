"""AuthorizationPolicy ``source.trustDomains`` / ``notTrustDomains`` and the
``source.trustDomain`` condition: validation, the evaluator and the Envoy RBAC translation
agree with Istio (``srcTrustDomainGenerator``, ``ExpandTrustDomainAliases``)."""

from __future__ import annotations

import pytest

from tests.unit.meshutil import compile_text, diagnostics_of, http, policy, tcp
from trustmesh.api import models as m
from trustmesh.api.loader import load_sources
from trustmesh.policy.authz import TrustBundle
from trustmesh.policy.decision import Verdict
from trustmesh.policy.request import Source
from trustmesh.xds.rbac import policy_rules

# Istio's own builder testdata (pilot/pkg/security/authz/builder/testdata/http/trust-domains-in)
ISTIO_TESTDATA = policy(
    "httpbin",
    "foo",
    """
selector: {matchLabels: {app: httpbin}}
rules:
- from:
  - source: {trustDomains: ["cluster.local", "another.local"]}
  - source: {notTrustDomains: ["bad*", "untrusted"]}
""",
)


def verdict(text: str, principal: str | None, *, mesh: str = "") -> Verdict:
    source = Source.plaintext() if principal is None else Source.principal(principal)
    return http(compile_text(text, mesh=mesh), source=source).verdict


@pytest.mark.parametrize(
    ("principal", "expected"),
    [
        ("cluster.local/ns/bar/sa/sleep", Verdict.ALLOW),
        ("another.local/ns/bar/sa/sleep", Verdict.ALLOW),
        ("other.td/ns/bar/sa/sleep", Verdict.ALLOW),  # passes notTrustDomains
        ("bad/ns/bar/sa/sleep", Verdict.DENY),
        ("bad-actor.io/ns/bar/sa/sleep", Verdict.DENY),
        ("untrusted/ns/bar/sa/sleep", Verdict.DENY),
        ("untrusted.io/ns/bar/sa/sleep", Verdict.ALLOW),  # exact, not a prefix of the name
        (None, Verdict.ALLOW),  # plaintext: NOT(authenticated …) holds, as in Envoy
    ],
)
def test_istio_testdata_policy_decides_by_the_peer_trust_domain(
    principal: str | None, expected: Verdict
) -> None:
    assert verdict(ISTIO_TESTDATA, principal) is expected


@pytest.mark.parametrize(
    ("values", "principal", "allowed"),
    [
        (["cluster.local"], "cluster.local/ns/a/sa/b", True),
        (["cluster.local"], "cluster.local.evil/ns/a/sa/b", False),
        (["cluster.local"], "x.cluster.local/ns/a/sa/b", False),
        (["*"], "anything/ns/a/sa/b", True),
        (["*"], None, False),  # needs a peer identity
        (["*.corp"], "eu.corp/ns/a/sa/b", True),
        (["*.corp"], "eu.corp.evil/ns/a/sa/b", False),
        (["*.corp"], "corp/ns/a/sa/b", False),
        (["prod-*"], "prod-eu/ns/a/sa/b", True),
        (["prod-*"], "prod/ns/a/sa/b", False),
        (["prod-*"], "staging/ns/prod-x/sa/b", False),  # the wildcard stays in the domain
        (["Cluster.local"], "cluster.local/ns/a/sa/b", False),  # case-sensitive
    ],
)
def test_value_forms_match_only_the_trust_domain_part(
    values: list[str], principal: str | None, allowed: bool
) -> None:
    text = policy(
        "td",
        "foo",
        f"selector: {{matchLabels: {{app: httpbin}}}}\n"
        f"rules: [{{from: [{{source: {{trustDomains: {values}}}}}]}}]",
    )
    assert (verdict(text, principal) is Verdict.ALLOW) is allowed


def test_a_bundle_domain_stands_for_all_of_its_aliases() -> None:
    mesh = "trustDomain: new-td\ntrustDomainAliases: [old-td]\n"
    text = policy(
        "td",
        "foo",
        "selector: {matchLabels: {app: httpbin}}\n"
        "rules: [{from: [{source: {trustDomains: [old-td]}}]}]",
    )
    assert verdict(text, "new-td/ns/bar/sa/sleep", mesh=mesh) is Verdict.ALLOW
    assert verdict(text, "old-td/ns/bar/sa/sleep", mesh=mesh) is Verdict.ALLOW
    assert verdict(text, "cluster.local/ns/bar/sa/sleep", mesh=mesh) is Verdict.DENY
    assert TrustBundle(("new-td", "old-td")).expand_domains(["old-td", "x", "new-td"]) == [
        "new-td",
        "old-td",
        "x",
    ]


def test_the_when_condition_is_evaluated_not_skipped() -> None:
    text = policy(
        "td",
        "foo",
        "action: DENY\nselector: {matchLabels: {app: httpbin}}\n"
        "rules: [{when: [{key: source.trustDomain, notValues: [cluster.local]}]}]",
    )
    assert verdict(text, "cluster.local/ns/bar/sa/sleep") is Verdict.ALLOW
    assert verdict(text, "partner.example/ns/bar/sa/sleep") is Verdict.DENY
    assert verdict(text, None) is Verdict.DENY


def test_trust_domains_apply_on_tcp_ports_too() -> None:
    mesh = compile_text(
        policy(
            "td",
            "foo",
            "selector: {matchLabels: {app: tcp-echo}}\n"
            "rules: [{from: [{source: {trustDomains: [cluster.local]}}]}]",
        )
    )
    assert tcp(mesh, 9000, source=Source.principal("cluster.local/ns/a/sa/b")).verdict is (
        Verdict.ALLOW
    )
    assert tcp(mesh, 9000, source=Source.principal("evil.td/ns/a/sa/b")).verdict is Verdict.DENY


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("trustDomains: ['a*b']", "invalid-wildcard"),
        ("trustDomains: ['*a*']", "invalid-wildcard"),
        ("notTrustDomains: ['cluster.local/ns/foo']", "invalid-trust-domain"),
        ("trustDomains: ['']", "empty-value"),
    ],
)
def test_invalid_values_are_refused_like_istio_does(source: str, code: str) -> None:
    text = policy("td", "foo", f"rules: [{{from: [{{source: {{{source}}}}}]}}]")
    errors = [d for d in diagnostics_of(text) if d.is_error]
    assert [d.code for d in errors] == [code]
    assert errors[0].location.field.startswith("spec.rules[0].from[0].source.")


def test_custom_policies_may_not_use_trust_domains() -> None:
    text = policy(
        "ext",
        "foo",
        "action: CUSTOM\nprovider: {name: opa}\nrules:\n"
        "- from: [{source: {trustDomains: [cluster.local]}}]\n"
        "- when: [{key: source.trustDomain, values: [cluster.local]}]",
    )
    errors = [d for d in diagnostics_of(text) if d.is_error and d.code == "custom-identity-field"]
    assert len(errors) == 2


def test_rbac_translation_is_istios() -> None:
    [resource] = load_sources([("p.yaml", ISTIO_TESTDATA.encode())]).resources
    rules = policy_rules(resource, TrustBundle(), m.Action.ALLOW, for_tcp=False)
    principals = rules["ns[foo]-policy[httpbin]-rule[0]"]["principals"]
    assert principals == [
        {
            "and_ids": {
                "ids": [
                    {
                        "or_ids": {
                            "ids": [
                                {"authenticated": {"principal_name": {"prefix": prefix}}}
                                for prefix in ("spiffe://cluster.local/", "spiffe://another.local/")
                            ]
                        }
                    }
                ]
            }
        },
        {
            "and_ids": {
                "ids": [
                    {
                        "not_id": {
                            "or_ids": {
                                "ids": [
                                    {
                                        "authenticated": {
                                            "principal_name": {
                                                "safe_regex": {"regex": "spiffe://bad[^/]*/.*"}
                                            }
                                        }
                                    },
                                    {
                                        "authenticated": {
                                            "principal_name": {"prefix": "spiffe://untrusted/"}
                                        }
                                    },
                                ]
                            }
                        }
                    }
                ]
            }
        },
    ]
