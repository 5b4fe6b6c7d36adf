"""Istio's authorization builder cases for ALLOW, DENY, AUDIT and dry-run (the 17 of 29
that are not CUSTOM or trust domains): see test_ext_authz_builder.py for how they are
built and compared."""

# ruff: noqa: E501 - YAML policies and matcher values are kept on one line each

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.xds.test_ext_authz_builder import (
    ANY_ID,
    ANY_RULE,
    SELECT,
    Json,
    _path_rule,
    _policy,
    any_of_ids,
    any_of_rules,
    build,
    http_filters,
    ids,
    path,
    peer,
    policies,
    port,
    rbac_filter,
    rule,
    rules,
    tcp_filters,
)

# --- the other actions: small cases whole ---------------------------------------------------


def _one(name: str, value: Json, action: str | None = None, **extra: Any) -> list[Json]:
    return [rbac_filter({"rules": policies(action, {name: value})}, **extra)]


ALL = rule([ANY_RULE], [ANY_ID])
NEVER = {"permissions": [{"not_rule": {"any": True}}], "principals": [{"not_id": {"any": True}}]}
SMALL_HTTP_CASES: dict[str, tuple[str, Callable[[], list[Json]]]] = {
    "allow-empty-rule": (
        _policy("allow-all", SELECT + "rules: [{}]"),
        lambda: _one("ns[foo]-policy[allow-all]-rule[0]", ALL),
    ),
    "allow-nil-rule": (
        _policy("allow-none", SELECT),
        lambda: _one("ns[foo]-policy[allow-none]-rule[0]", NEVER),
    ),
    "audit-full-rule": (
        _policy("audit-all", "action: AUDIT\nrules: [{}]"),
        lambda: _one("ns[foo]-policy[audit-all]-rule[0]", ALL, "LOG"),
    ),
    "deny-empty-rule": (
        _policy("deny-all", SELECT + "action: DENY\nrules: [{}]"),
        lambda: _one("ns[foo]-policy[deny-all]-rule[0]", ALL, "DENY"),
    ),
    "deny-and-allow": (
        _policy("httpbin-deny", 'action: DENY\nrules: [{from: [{source: {principals: ["deny"]}}]}]')
        + _policy("httpbin-allow", 'rules: [{from: [{source: {principals: ["allow"]}}]}]'),
        lambda: [
            *_one(
                "ns[foo]-policy[httpbin-deny]-rule[0]",
                rule([ANY_RULE], [ids(any_of_ids(peer(exact="spiffe://deny")))]),
                "DENY",
            ),
            *_one(
                "ns[foo]-policy[httpbin-allow]-rule[0]",
                rule([ANY_RULE], [ids(any_of_ids(peer(exact="spiffe://allow")))]),
            ),
        ],
    ),
    "dry-run-allow": (
        _policy(
            "httpbin-1",
            SELECT + 'rules: [{to: [{operation: {paths: ["/exact"]}}]}]',
            annotations='{"istio.io/dry-run": "true"}',
        ),
        lambda: [
            rbac_filter(
                {
                    "shadow_rules": policies(
                        None, {"ns[foo]-policy[httpbin-1]-rule[0]": _path_rule("/exact")}
                    )
                }
            )
        ],
    ),
    "dry-run-allow-and-deny": (
        _policy(
            "httpbin-1",
            SELECT + 'action: ALLOW\nrules: [{to: [{operation: {paths: ["/allow"]}}]}]',
            annotations='{"istio.io/dry-run": "true"}',
        )
        + _policy(
            "httpbin-2",
            SELECT + 'action: DENY\nrules: [{to: [{operation: {paths: ["/deny"]}}]}]',
            annotations='{"istio.io/dry-run": "true"}',
        ),
        lambda: [
            rbac_filter(
                {
                    "shadow_rules": policies(
                        "DENY", {"ns[foo]-policy[httpbin-2]-rule[0]": _path_rule("/deny")}
                    )
                },
                prefix="istio_dry_run_deny_",
            ),
            rbac_filter(
                {
                    "shadow_rules": policies(
                        None, {"ns[foo]-policy[httpbin-1]-rule[0]": _path_rule("/allow")}
                    )
                }
            ),
        ],
    ),
    "dry-run-mix": (
        _policy(
            "httpbin-1",
            SELECT + 'action: ALLOW\nrules: [{to: [{operation: {paths: ["/allow"]}}]}]',
            annotations='{"istio.io/dry-run": "true"}',
        )
        + _policy(
            "httpbin-2",
            SELECT + 'action: ALLOW\nrules: [{to: [{operation: {paths: ["/another"]}}]}]',
            annotations='{"istio.io/dry-run": "false"}',
        ),
        lambda: [
            rbac_filter(
                {
                    "rules": policies(
                        None, {"ns[foo]-policy[httpbin-2]-rule[0]": _path_rule("/another")}
                    ),
                    "shadow_rules": policies(
                        None, {"ns[foo]-policy[httpbin-1]-rule[0]": _path_rule("/allow")}
                    ),
                }
            )
        ],
    ),
    "allow-path": (
        _policy(
            "httpbin-1",
            SELECT
            + """rules:
- to:
  - operation:
      paths: ["/exact", "/prefix/*", "*/suffix", "*", "/path/template/{*}", "/{**}/path/template"]
      notPaths: ["/not-exact", "/not-prefix/*", "*/not-suffix", "*", "/not-path/template/{*}", "/{**}/not-path/template"]
""",
        ),
        lambda: _one(
            "ns[foo]-policy[httpbin-1]-rule[0]",
            rule(
                [
                    rules(
                        any_of_rules(*_paths("")),
                        {"not_rule": any_of_rules(*_paths("not-"))},
                    )
                ],
                [ANY_ID],
            ),
        ),
    ),
}


def _template(pattern: str) -> Json:
    return {
        "uri_template": {
            "name": "uri-template",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3."
                "UriTemplateMatchConfig",
                "path_template": pattern,
            },
        }
    }


def _paths(no: str) -> list[Json]:
    return [
        path(exact=f"/{no}exact"),
        path(prefix=f"/{no}prefix/"),
        path(suffix=f"/{no}suffix"),
        path(safe_regex={"regex": ".+"}),
        _template(f"/{no}path/template/*"),
        _template(f"/**/{no}path/template"),
    ]


@pytest.mark.parametrize("case", SMALL_HTTP_CASES)
def test_small_http_case(case: str) -> None:
    policy_text, expected = SMALL_HTTP_CASES[case]
    assert http_filters(build(policy_text)) == expected()


SMALL_TCP_CASES: dict[str, tuple[str, Callable[[], list[Json]]]] = {
    "allow-both-http-tcp": (
        _policy(
            "httpbin-deny",
            """action: ALLOW
rules:
- from: [{source: {requestPrincipals: ["id-1"]}}]
  to: [{operation: {methods: ["GET"]}}]
- from: [{source: {namespaces: ["ns-1"]}}]
  to: [{operation: {ports: ["8080"], methods: ["GET"]}}]
- from: [{source: {namespaces: ["ns-2"], requestPrincipals: ["id-2"]}}]
  to: [{operation: {ports: ["9090"]}}]
- from: [{source: {namespaces: ["ns-1"]}}]
  to: [{operation: {ports: ["80"]}}]
""",
        ),
        lambda: _one(
            "ns[foo]-policy[httpbin-deny]-rule[3]",
            rule(
                [rules(any_of_rules(port(80)))],
                [ids(any_of_ids(peer(safe_regex={"regex": ".*/ns/ns-1/.*"})))],
            ),
            network=True,
        ),
    ),
    "allow-only-http": (
        _policy(
            "httpbin-deny",
            """action: ALLOW
rules:
- from: [{source: {requestPrincipals: ["id-1"]}}]
  to: [{operation: {methods: ["GET"]}}]
- from: [{source: {namespaces: ["ns-1"]}}]
  to: [{operation: {hosts: ["example.com"]}}]
""",
        ),
        lambda: [rbac_filter({"rules": {}}, network=True)],
    ),
    "dry-run-mix": (
        _policy(
            "httpbin-1",
            SELECT + 'action: ALLOW\nrules: [{to: [{operation: {ports: ["80"]}}]}]',
            annotations='{"istio.io/dry-run": "true"}',
        )
        + _policy(
            "httpbin-2",
            SELECT + 'action: ALLOW\nrules: [{to: [{operation: {ports: ["9000"]}}]}]',
            annotations='{"istio.io/dry-run": "false"}',
        ),
        lambda: [
            rbac_filter(
                {
                    "rules": policies(
                        None,
                        {
                            "ns[foo]-policy[httpbin-2]-rule[0]": rule(
                                [rules(any_of_rules(port(9000)))], [ANY_ID]
                            )
                        },
                    ),
                    "shadow_rules": policies(
                        None,
                        {
                            "ns[foo]-policy[httpbin-1]-rule[0]": rule(
                                [rules(any_of_rules(port(80)))], [ANY_ID]
                            )
                        },
                    ),
                },
                network=True,
            )
        ],
    ),
}


@pytest.mark.parametrize("case", SMALL_TCP_CASES)
def test_small_tcp_case(case: str) -> None:
    policy_text, expected = SMALL_TCP_CASES[case]
    assert tcp_filters(build(policy_text)) == expected()


# --- the other actions: large cases by their facts ---------------------------------------
#
# Each expectation counts, per Envoy policy, the matchers of each kind Istio's golden
# output holds (and_ids, or_rules, authenticated, header, metadata, ...): a matcher
# dropped, added or moved to another kind changes a count.

_KINDS = (
    "and_ids", "and_rules", "any", "authenticated", "destination_ip", "destination_port",
    "direct_remote_ip", "header", "metadata", "not_id", "not_rule", "or_ids", "or_rules",
    "remote_ip", "requested_server_name", "uri_template", "url_path",
)  # fmt: skip


def kinds(value: Any, counts: dict[str, int] | None = None) -> dict[str, int]:
    counts = {} if counts is None else counts
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in _KINDS:
                counts[key] = counts.get(key, 0) + 1
            kinds(inner, counts)
    elif isinstance(value, list):
        for inner in value:
            kinds(inner, counts)
    return counts


def counted(filters: list[Json]) -> tuple[str | None, dict[str, dict[str, int]]]:
    [only] = filters
    enforced = only["config"]["rules"]
    named = enforced.get("policies", {})
    return enforced.get("action"), {name: kinds(p) for name, p in named.items()}


def _wild(base: str, *, star: bool = True) -> str:
    """``[base, base-prefix-*, *-suffix-base, *]`` as a YAML flow list."""
    values = [base, f"{base}-prefix-*", f"*-suffix-{base}"] + (["*"] if star else [])
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def _not_wild(base: str) -> str:
    values = [f"not-{base}", f"not-{base}-prefix-*", f"*-not-suffix-{base}", "*"]
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


FULL_RULE = (
    SELECT
    + f"""rules:
- from:
  - source:
      serviceAccounts: ["my-ns/my-sa", "sa-only"]
      notServiceAccounts: ["my-ns/my-sa-not", "sa-not-only"]
- from:
  - source:
      principals: {_wild("principal")}
      requestPrincipals: {_wild("requestPrincipals")}
      namespaces: {_wild("ns")}
      ipBlocks: ["1.2.3.4", "5.6.0.0/16"]
      remoteIpBlocks: ["1.2.3.4", "5.6.0.0/16"]
      notPrincipals: {_not_wild("principal")}
      notRequestPrincipals: {_not_wild("requestPrincipals")}
      notNamespaces: {_not_wild("ns")}
      notIpBlocks: ["9.0.0.1", "9.2.0.0/16"]
      notRemoteIpBlocks: ["9.0.0.1", "9.2.0.0/16"]
  to:
  - operation:
      methods: {_wild("method")}
      hosts: ["exact.com", "*.suffix.com", "prefix.*", "*"]
      ports: ["80", "90"]
      paths: ["/exact", "/prefix/*", "*/suffix", "*", "/path/template/{{*}}", "/{{**}}/path/template"]
      notMethods: {_not_wild("method")}
      notHosts: ["not-exact.com", "*.not-suffix.com", "not-prefix.*", "*"]
      notPorts: ["8000", "9000"]
      notPaths: ["/not-exact", "/not-prefix/*", "*/not-suffix", "*", "/not-path/template/{{*}}", "/{{**}}/not-path/template"]
  when:
  - {{key: "request.headers[X-header]", values: {_wild("header")}, notValues: {_not_wild("header")}}}
  - {{key: source.ip, values: ["10.10.10.10", "192.168.10.0/24"], notValues: ["90.10.10.10", "90.168.10.0/24"]}}
  - {{key: remote.ip, values: ["10.10.10.10", "192.168.10.0/24"], notValues: ["90.10.10.10", "90.168.10.0/24"]}}
  - {{key: source.namespace, values: {_wild("ns")}, notValues: {_not_wild("ns")}}}
  - {{key: source.principal, values: {_wild("principal")}, notValues: {_not_wild("principal")}}}
  - key: request.auth.principal
    values: ["requestPrincipals", "requestPrincipals-prefix-*", "*-suffix-requestPrincipals", "*", "https://example.com/*"]
    notValues: {_not_wild("requestPrincipals")}
  - {{key: request.auth.audiences, values: {_wild("audiences")}, notValues: {_not_wild("audiences")}}}
  - {{key: request.auth.presenter, values: {_wild("presenter")}, notValues: {_not_wild("presenter")}}}
  - {{key: "request.auth.claims[iss]", values: {_wild("iss")}, notValues: {_not_wild("iss")}}}
  - {{key: "request.auth.claims[nested1][nested2]", values: {_wild("nested")}, notValues: {_not_wild("nested")}}}
  - {{key: destination.ip, values: ["10.10.10.10", "192.168.10.0/24"], notValues: ["90.10.10.10", "90.168.10.0/24"]}}
  - {{key: destination.port, values: ["91", "92"], notValues: ["9001", "9002"]}}
  - {{key: connection.sni, values: ["exact.com", "*.suffix.com", "prefix.*", "*"], notValues: ["not-exact.com", "*.not-suffix.com", "not-prefix.*", "*"]}}
  - {{key: "experimental.envoy.filters.a.b[c]", values: ["exact", "prefix-*", "*-suffix", "*"], notValues: ["not-exact", "not-prefix-*", "*-not-suffix", "*"]}}
"""
)


def test_allow_full_rule() -> None:
    filters = http_filters(build(_policy("httpbin-1", FULL_RULE)))
    action, found = counted(filters)
    assert action is None  # ALLOW, Envoy's default
    assert found == {
        "ns[foo]-policy[httpbin-1]-rule[0]": {
            "and_ids": 1, "and_rules": 1, "any": 1, "authenticated": 4, "not_id": 1,
            "or_ids": 2,
        },
        "ns[foo]-policy[httpbin-1]-rule[1]": {
            "and_ids": 18, "and_rules": 1, "authenticated": 32, "destination_ip": 4,
            "destination_port": 8, "direct_remote_ip": 8, "header": 24, "metadata": 44,
            "not_id": 15, "not_rule": 8, "or_ids": 22, "or_rules": 14, "remote_ip": 8,
            "requested_server_name": 8, "uri_template": 4, "url_path": 8,
        },
    }  # fmt: skip
    rule0 = filters[0]["config"]["rules"]["policies"]["ns[foo]-policy[httpbin-1]-rule[0]"]
    accounts = rule0["principals"][0]["and_ids"]["ids"][0]["or_ids"]["ids"]
    assert [a["authenticated"]["principal_name"]["safe_regex"]["regex"] for a in accounts] == [
        "spiffe://.+/ns/my-ns/(.+/|)sa/my-sa(/.+)?",
        "spiffe://.+/ns/foo/(.+/|)sa/sa-only(/.+)?",
    ]
    rule1 = filters[0]["config"]["rules"]["policies"]["ns[foo]-policy[httpbin-1]-rule[1]"]
    hosts = rule1["permissions"][0]["and_rules"]["rules"][0]["or_rules"]["rules"]
    assert [h["header"] for h in hosts] == [
        {"name": ":authority", "string_match": {"exact": "exact.com", "ignore_case": True}},
        {"name": ":authority", "string_match": {"suffix": ".suffix.com", "ignore_case": True}},
        {"name": ":authority", "string_match": {"prefix": "prefix.", "ignore_case": True}},
        {"name": ":authority", "present_match": True},
    ]


def _numbered(rule: int, side: str, index: int, field: str) -> str:
    return "[" + ", ".join(f'"rule[{rule}]-{side}[{index}]-{field}[{n}]"' for n in (1, 2)) + "]"


def _single_policy() -> str:
    text = SELECT + "rules:\n"
    for r, (ips, remotes, ports) in enumerate(
        (
            (
                (["10.0.0.1", "10.0.0.2"], ["10.0.1.1", "192.0.1.2"]),
                (["172.16.10.10"], ["172.17.8.0/24", "172.17.9.4"]),
                (("9001", "9002"), ("9011", "9012")),
            ),
            (
                (["10.1.0.1", "10.1.0.2"], ["10.1.1.1", "192.1.1.2"]),
                (["172.22.2.0/23", "172.21.234.254"], ["192.168.4.0/24", "192.168.7.8"]),
                (("9101", "9102"), ("9111", "9112")),
            ),
        )
    ):
        text += "- from:\n"
        for f in (0, 1):
            text += (
                "  - source:\n"
                f"      principals: {_numbered(r, 'from', f, 'principal')}\n"
                f"      requestPrincipals: {_numbered(r, 'from', f, 'requestPrincipal')}\n"
                f"      namespaces: {_numbered(r, 'from', f, 'ns')}\n"
                f"      ipBlocks: {ips[f]}\n"
                f"      remoteIpBlocks: {remotes[f]}\n"
            )
        text += "  to:\n"
        for t in (0, 1):
            text += (
                "  - operation:\n"
                f"      methods: {_numbered(r, 'to', t, 'method')}\n"
                f"      hosts: {_numbered(r, 'to', t, 'host')}\n"
                f"      ports: {list(ports[t])}\n"
                f"      paths: {_numbered(r, 'to', t, 'path')}\n"
            )
        if r == 0:
            text += """  when:
  - {key: "request.headers[X-header]", values: ["header", "header-prefix-*", "*-suffix-header", "*"]}
  - {key: destination.ip, values: ["10.10.10.10", "192.168.10.0/24"]}
  - {key: remote.ip, values: ["10.99.10.8", "10.80.64.0/18"]}
"""
    return text.replace("'", '"')


def test_single_policy() -> None:
    action, found = counted(http_filters(build(_policy("httpbin", _single_policy()))))
    assert action is None
    assert found == {
        "ns[foo]-policy[httpbin]-rule[0]": {
            "and_ids": 6, "and_rules": 2, "authenticated": 8, "destination_ip": 4,
            "destination_port": 4, "direct_remote_ip": 4, "header": 16, "metadata": 8,
            "or_ids": 14, "or_rules": 10, "remote_ip": 7, "url_path": 4,
        },
        "ns[foo]-policy[httpbin]-rule[1]": {
            "and_ids": 6, "and_rules": 2, "authenticated": 8, "destination_port": 4,
            "direct_remote_ip": 4, "header": 8, "metadata": 8, "or_ids": 10, "or_rules": 8,
            "remote_ip": 4, "url_path": 4,
        },
    }  # fmt: skip


MULTIPLE = (
    _policy("httpbin-1", SELECT + 'rules: [{to: [{operation: {methods: ["GET", "POST"]}}]}]')
    + _policy(
        "httpbin-2",
        'selector: {matchLabels: {app: httpbin}}\nrules: [{to: [{operation: {paths: ["/v1", "/v2"]}}]}]',
    )
    + _policy(
        "httpbin-3",
        "selector: {matchLabels: {version: v1}}\n"
        'rules: [{to: [{operation: {hosts: ["google.com", "httpbin.org"]}}]}]',
    )
    + _policy("httpbin-4", 'rules: [{to: [{operation: {ports: ["80", "90"]}}]}]')
    + _policy(
        "httpbin-5", 'rules: [{from: [{source: {principals: ["principals1", "principals2"]}}]}]'
    )
    + _policy(
        "httpbin-6",
        'rules: [{from: [{source: {requestPrincipals: ["requestPrincipals1", "requestPrincipals2"]}}]}]',
    )
    + _policy(
        "httpbin-7", 'rules: [{from: [{source: {namespaces: ["namespaces1", "namespaces2"]}}]}]'
    )
    + _policy("httpbin-8", 'rules: [{from: [{source: {ipBlocks: ["1.2.3.4", "5.6.7.0/24"]}}]}]')
    + _policy(
        "httpbin-9", 'rules: [{when: [{key: "request.headers[X-abc]", values: ["abc1", "abc2"]}]}]'
    )
)


def test_multiple_policies() -> None:
    action, found = counted(http_filters(build(MULTIPLE)))
    assert action is None
    base = {"and_ids": 1, "and_rules": 1, "any": 1}
    assert found == {
        "ns[foo]-policy[httpbin-1]-rule[0]": {**base, "header": 2, "or_rules": 1},
        "ns[foo]-policy[httpbin-2]-rule[0]": {**base, "or_rules": 1, "url_path": 2},
        "ns[foo]-policy[httpbin-3]-rule[0]": {**base, "header": 2, "or_rules": 1},
        "ns[foo]-policy[httpbin-4]-rule[0]": {**base, "destination_port": 2, "or_rules": 1},
        "ns[foo]-policy[httpbin-5]-rule[0]": {**base, "authenticated": 2, "or_ids": 1},
        "ns[foo]-policy[httpbin-6]-rule[0]": {**base, "and_ids": 3, "metadata": 4, "or_ids": 1},
        "ns[foo]-policy[httpbin-7]-rule[0]": {**base, "authenticated": 2, "or_ids": 1},
        "ns[foo]-policy[httpbin-8]-rule[0]": {**base, "direct_remote_ip": 2, "or_ids": 1},
        "ns[foo]-policy[httpbin-9]-rule[0]": {**base, "header": 2, "or_ids": 1},
    }


def _every_key(
    principals: str, not_principals: str, namespaces: str, not_namespaces: str, remotes: str
) -> str:
    """One rule using every source, operation and condition key (values in and not in)."""
    remote, not_remote, when_remote, when_not_remote = remotes.split()
    return f"""- from:
  - source:
      principals: {principals}
      requestPrincipals: ["requestPrincipals"]
      namespaces: {namespaces}
      ipBlocks: ["1.2.3.4"]
      remoteIpBlocks: ["{remote}"]
      notPrincipals: {not_principals}
      notRequestPrincipals: ["not-requestPrincipals"]
      notNamespaces: {not_namespaces}
      notIpBlocks: ["9.0.0.1"]
      notRemoteIpBlocks: ["{not_remote}"]
  to:
  - operation:
      methods: ["method"]
      hosts: ["exact.com"]
      ports: ["80"]
      paths: ["/exact"]
      notMethods: ["not-method"]
      notHosts: ["not-exact.com"]
      notPorts: ["8000"]
      notPaths: ["/not-exact"]
  when:
  - {{key: "request.headers[X-header]", values: ["header"], notValues: ["not-header"]}}
  - {{key: source.ip, values: ["10.10.10.10"], notValues: ["90.10.10.10"]}}
  - {{key: remote.ip, values: ["{when_remote}"], notValues: ["{when_not_remote}"]}}
  - {{key: source.namespace, values: {namespaces}, notValues: {not_namespaces}}}
  - {{key: source.principal, values: {principals}, notValues: {not_principals}}}
  - {{key: request.auth.principal, values: ["requestPrincipals"], notValues: ["not-requestPrincipals"]}}
  - {{key: request.auth.audiences, values: ["audiences"], notValues: ["not-audiences"]}}
  - {{key: request.auth.presenter, values: ["presenter"], notValues: ["not-presenter"]}}
  - {{key: "request.auth.claims[iss]", values: ["iss"], notValues: ["not-iss"]}}
  - {{key: destination.ip, values: ["10.10.10.10"], notValues: ["90.10.10.10"]}}
  - {{key: destination.port, values: ["91"], notValues: ["9001"]}}
  - {{key: connection.sni, values: ["exact.com"], notValues: ["not-exact.com"]}}
  - {{key: "experimental.envoy.filters.a.b[c]", values: ["exact"], notValues: ["not-exact"]}}
"""


EVERY_KEY_COUNTS = {
    "and_ids": 1, "and_rules": 1, "destination_ip": 2, "destination_port": 4,
    "direct_remote_ip": 4, "metadata": 2, "not_id": 8, "not_rule": 5, "or_ids": 16,
    "or_rules": 8, "remote_ip": 4, "requested_server_name": 2,
}  # fmt: skip


def test_audit_on_tcp_drops_only_http_keys() -> None:
    text = "action: AUDIT\nrules:\n" + _every_key(
        '["principal"]',
        '["not-principal"]',
        '["ns"]',
        '["not-ns"]',
        "10.250.90.4 10.133.154.65 192.168.7.7 192.168.10.9",
    )
    action, found = counted(tcp_filters(build(_policy("httpbin-audit", text))))
    assert action == "LOG"
    assert found == {
        "ns[foo]-policy[httpbin-audit]-rule[0]": {**EVERY_KEY_COUNTS, "authenticated": 8}
    }


def test_deny_on_tcp_drops_only_http_keys() -> None:
    wild = '["principal", "*principal-suffix", "principal-prefix*", "*"]'
    not_wild = '["not-principal", "*not-principal-suffix", "not-principal-prefix*", "*"]'
    text = """action: DENY
rules:
- from: [{source: {requestPrincipals: ["id-1"]}}]
  to: [{operation: {methods: ["GET"]}}]
- to: [{operation: {methods: ["GET"]}}]
- from: [{source: {requestPrincipals: ["id-1"]}}]
- from: [{source: {namespaces: ["ns-1"]}}]
  to: [{operation: {methods: ["GET"]}}]
- from: [{source: {requestPrincipals: ["id-1"]}}]
  to: [{operation: {ports: ["80"]}}]
- from: [{source: {requestPrincipals: ["id-1"]}}]
  to: [{operation: {ports: ["8080"], methods: ["GET"]}}]
- from: [{source: {namespaces: ["ns-2"], requestPrincipals: ["id-1"]}}]
  to: [{operation: {ports: ["8080"], methods: ["GET"]}}]
- from: [{source: {namespaces: ["ns-1"]}}]
  to: [{operation: {ports: ["80"]}}]
- when: [{key: "request.headers[:method]", values: ["GET"]}]
- when: [{key: destination.port, values: ["80"]}]
""" + _every_key(
        wild,
        not_wild,
        wild.replace("principal", "ns"),
        not_wild.replace("principal", "ns"),
        "172.18.4.0/22 192.168.244.139 192.168.3.3 172.19.31.3",
    )
    action, found = counted(tcp_filters(build(_policy("httpbin-deny", text))))
    assert action == "DENY"
    name = "ns[foo]-policy[httpbin-deny]-rule[{}]"
    anything = {"and_ids": 1, "and_rules": 1, "any": 2}
    on_port = {"and_ids": 1, "and_rules": 1, "any": 1, "destination_port": 1, "or_rules": 1}
    from_ns = {"and_ids": 1, "and_rules": 1, "authenticated": 1, "or_ids": 1}
    assert found == {
        name.format(0): anything,
        name.format(1): anything,
        name.format(2): anything,
        name.format(3): {**from_ns, "any": 1},
        name.format(4): on_port,
        name.format(5): on_port,
        name.format(6): {**from_ns, "destination_port": 1, "or_rules": 1},
        name.format(7): {**from_ns, "destination_port": 1, "or_rules": 1},
        name.format(8): anything,
        name.format(9): on_port,
        name.format(10): {**EVERY_KEY_COUNTS, "authenticated": 32},
    }
