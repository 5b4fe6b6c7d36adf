"""Request-smuggling bypasses, offline: each attack's old wrong verdict is gone.

Before: two ``x-user`` lines passed "DENY writes unless x-user is ops" (the evaluator, like
Envoy, matched a condition when any line matched); a trailing-dot Host escaped a DENY on
``hosts``; a second Host line was ignored offline while Envoy joined it; an absolute-form
target was a 404 offline while Envoy authorized its authority. Real Envoy agrees with
every answer below (tests/xds/test_smuggling.py, test_rbac_differential.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trustmesh.cli.main import app
from trustmesh.policy.decision import Decision, Verdict
from trustmesh.policy.headers import (
    HOST_GUARD_POLICY,
    authority_problem,
    header_view,
    split_absolute_form,
    strip_trailing_host_dot,
)
from trustmesh.policy.pathnorm import PathRejected
from trustmesh.policy.trace import render_trace
from trustmesh.xds.guards import LUA_TYPE, _lua_string, header_guard_config, request_guard_filters
from trustmesh.xds.translate import translate

from .meshutil import ROOT, compile_text, diagnostics_of, http

Lines = tuple[tuple[str, str], ...]

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: writes-need-ops, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to: [{operation: {methods: ["POST", "PUT", "DELETE"]}}]
    when: [{key: "request.headers[X-User]", notValues: ["ops"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-mallory, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - when: [{key: "request.headers[x-blocked]", values: ["mallory"]}]
  - when: [{key: "request.headers[user-agent]", values: ["bad-bot*"]}]
  - to: [{operation: {hosts: ["internal.foo"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admin-needs-role, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
    when: [{key: "request.headers[x-role]", values: ["admin"]}]
  - to: [{operation: {notPaths: ["/admin*"]}}]
"""
REJECT = compile_text(POLICIES)
FORWARD = compile_text(POLICIES, mesh="repeatedPolicyHeaders: FORWARD\n")
WRITES_NEED_OPS = "ns[foo]-policy[writes-need-ops]-rule[0]"
DENY_HOSTS = "ns[foo]-policy[no-mallory]-rule[2]"


def _verdict(decision: Decision) -> tuple[str, int | None, str | None]:
    return decision.verdict.value, decision.status, decision.rule


# --- repeated header lines ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "lines"),
    [
        # DENY writes unless x-user is ops (notValues): was allowed.
        ("POST", "/post", (("x-user", "ops"), ("x-user", "mallory"))),
        ("POST", "/post", (("x-user", "mallory"), ("x-user", "ops"))),
        # The same header in two spellings: Envoy lowercases both.
        ("POST", "/post", (("X-User", "ops"), ("x-user", "mallory"))),
        # ALLOW /admin with values (x-role admin): was allowed.
        ("GET", "/admin", (("x-role", "guest"), ("x-role", "admin"))),
        ("GET", "/admin", (("X-ROLE", "admin"), ("x-role", "guest"))),
        # DENY with values (x-blocked mallory): was denied, ambiguous all the same.
        ("GET", "/get", (("x-blocked", "ops"), ("x-blocked", "mallory"))),
        # Even two equal lines: nothing is guessed about which one the app reads.
        ("POST", "/post", (("x-user", "ops"), ("x-user", "ops"))),
    ],
)
def test_a_repeated_policy_header_is_refused_before_any_policy(
    method: str, path: str, lines: Lines
) -> None:
    decision = http(REJECT, path, method=method, headers=lines)
    assert _verdict(decision) == ("bad-request", 400, None)
    name = lines[0][0].lower()
    assert f"repeated header {name} (2 lines)" in decision.reason
    assert "repeatedPolicyHeaders: REJECT" in decision.reason


def test_one_line_of_each_is_decided_by_the_policies() -> None:
    assert http(REJECT, "/post", method="POST", headers=(("x-user", "ops"),)).verdict is (
        Verdict.ALLOW
    )
    mallory = http(REJECT, "/post", method="POST", headers=(("x-user", "mallory"),))
    assert _verdict(mallory) == ("deny", 403, WRITES_NEED_OPS)
    # One line holding a comma is one value, as Envoy sees it: not "ops".
    joined = http(REJECT, "/post", method="POST", headers=(("x-user", "ops,mallory"),))
    assert _verdict(joined) == ("deny", 403, WRITES_NEED_OPS)


def test_headers_no_condition_names_may_repeat() -> None:
    lines = (("x-other", "a"), ("x-other", "b"), ("cookie", "a=1"), ("cookie", "b=2"))
    assert http(REJECT, "/get", headers=lines).verdict is Verdict.ALLOW


def test_only_policies_applying_to_the_workload_count() -> None:
    other = POLICIES.replace("app: httpbin", "app: other")
    mesh = compile_text(other)
    lines = (("x-user", "ops"), ("x-user", "mallory"))
    assert http(mesh, "/post", method="POST", headers=lines).verdict is Verdict.ALLOW
    root = POLICIES.replace("namespace: foo", "namespace: istio-system").replace(
        "  selector: {matchLabels: {app: httpbin}}\n", ""
    )
    mesh = compile_text(root)  # root namespace, no selector: every workload
    assert http(mesh, "/post", method="POST", headers=lines).status == 400


def test_a_header_envoy_joins_is_one_value_and_never_refused() -> None:
    """user-agent lines arrive joined (``ok,bad-bot``): matched as one value, no 400."""
    first_ok = http(REJECT, "/get", headers=(("user-agent", "ok"), ("user-agent", "bad-bot")))
    assert first_ok.verdict is Verdict.ALLOW  # "ok,bad-bot" does not start with bad-bot
    first_bad = http(REJECT, "/get", headers=(("User-Agent", "bad-bot"), ("user-agent", "ok")))
    assert _verdict(first_bad) == ("deny", 403, "ns[foo]-policy[no-mallory]-rule[1]")


def test_forward_keeps_istios_any_line_semantics() -> None:
    """The opt-out: a condition matches when any line matches, as in Istio."""
    lines = (("x-user", "ops"), ("x-user", "mallory"))
    decision = http(FORWARD, "/post", method="POST", headers=lines)
    assert decision.verdict is Verdict.ALLOW
    assert any("repeatedPolicyHeaders: FORWARD" in step for step in render_trace(decision.trace))
    role = (("x-role", "guest"), ("x-role", "admin"))
    assert http(FORWARD, "/admin", headers=role).verdict is Verdict.ALLOW
    blocked = (("x-blocked", "ops"), ("x-blocked", "mallory"))
    assert http(FORWARD, "/get", headers=blocked).verdict is Verdict.DENY


def test_the_mesh_config_field_is_checked() -> None:
    problems = diagnostics_of("", mesh="repeatedPolicyHeaders: DROP\n")
    assert [(p.location.line, p.location.field) for p in problems if p.is_error] == [
        (1, "repeatedPolicyHeaders")
    ]
    assert not [
        p for p in diagnostics_of("", mesh="repeatedPolicyHeaders: FORWARD\n") if p.is_error
    ]


# --- Host -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "lines", "expected"),
    [
        ("internal.foo", (), ("deny", 403, DENY_HOSTS)),
        # One trailing dot is stripped before RBAC (was allowed).
        ("internal.foo.", (), ("deny", 403, DENY_HOSTS)),
        ("INTERNAL.FOO.", (), ("deny", 403, DENY_HOSTS)),
        # ... also before a port; Istio's exact host still does not match host:port.
        ("internal.foo.:8000", (), ("allow", 200, "ns[foo]-policy[admin-needs-role]-rule[1]")),
        # Only one dot goes: the second is refused by the host guard.
        ("internal.foo..", (), ("deny", 403, HOST_GUARD_POLICY)),
        # A second Host line: Envoy joins them (was decided on the first line alone).
        ("internal.foo", (("Host", "httpbin.foo:8000"),), ("deny", 403, HOST_GUARD_POLICY)),
        ("httpbin.foo:8000", (("host", "internal.foo"),), ("deny", 403, HOST_GUARD_POLICY)),
        ("user@internal.foo", (), ("deny", 403, HOST_GUARD_POLICY)),
        ("internal%2Efoo", (), ("deny", 403, HOST_GUARD_POLICY)),
        # Characters Envoy's codec refuses itself.
        ("internal.foo x", (), ("bad-request", 400, None)),
        ("a{b}", (), ("bad-request", 400, None)),
        # Plain forms pass the guard.
        ("", (), ("allow", 200, "ns[foo]-policy[admin-needs-role]-rule[1]")),
        ("[::1]:8000", (), ("allow", 200, "ns[foo]-policy[admin-needs-role]-rule[1]")),
    ],
)
def test_host_attacks(host: str, lines: Lines, expected: tuple[str, int, str | None]) -> None:
    assert _verdict(http(REJECT, "/get", host=host, headers=lines)) == expected


def test_host_header_lines_alone_set_the_authority() -> None:
    decision = http(REJECT, "/get", headers=(("Host", "internal.foo."),))
    assert _verdict(decision) == ("deny", 403, DENY_HOSTS)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # Envoy authorizes the absolute-form target's authority, not Host (was a 404).
        ("http://internal.foo/get", ("deny", 403, DENY_HOSTS)),
        ("HTTPS://user:pw@internal.foo./get", ("deny", 403, DENY_HOSTS)),
        ("http://internal.foo", ("deny", 403, DENY_HOSTS)),
        ("http://httpbin.foo:8000/get", ("allow", 200, "ns[foo]-policy[admin-needs-role]-rule[1]")),
        ("http://internal.foo?x=1", ("bad-request", 404, None)),
        ("ftp://internal.foo/get", ("bad-request", 400, None)),
        ("http://a@b@internal.foo/get", ("bad-request", 400, None)),
    ],
)
def test_absolute_form_targets(target: str, expected: tuple[str, int, str | None]) -> None:
    assert _verdict(http(REJECT, target, host="httpbin.foo:8000")) == expected


# --- the pieces ---------------------------------------------------------------------------


def test_strip_trailing_host_dot_looks_at_the_last_dot_only() -> None:
    cases = {
        "a.b.": "a.b", "a.b.:80": "a.b:80", "a.b..": "a.b.", "a.b": "a.b", "a.,b": "a.,b",
        "[::1]:80": "[::1]:80", "": "", ".": "",
    }  # fmt: skip
    assert {host: strip_trailing_host_dot(host) for host in cases} == cases


def test_split_absolute_form() -> None:
    assert split_absolute_form("/a?b") == (None, "/a?b")
    assert split_absolute_form("//h/a") == (None, "//h/a")
    assert split_absolute_form("Http://u@h:1/a?b") == ("h:1", "/a?b")
    with pytest.raises(PathRejected) as rejected:
        split_absolute_form("http:///a")
    assert rejected.value.status == 400


def test_header_view_joins_what_envoy_joins() -> None:
    view = header_view(
        [("User-Agent", ""), ("user-agent", "a"), ("USER-AGENT", "b"), ("X-A", "1"), ("x-a", "")]
    )
    assert view == {"user-agent": ("a,b",), "x-a": ("1", "")}


def test_authority_problem_says_what_is_wrong() -> None:
    assert authority_problem("h:8000") is None
    assert authority_problem("a,b") == "it joins several Host values"
    assert authority_problem("u@h") == "it carries userinfo"
    assert authority_problem("h.") == "it ends in a second dot"


def test_lua_guard_lists_the_names_safely() -> None:
    assert _lua_string('x-a"]\n1') == '"x-a\\034\\093\\0101"'
    wp = REJECT.for_workload("foo/httpbin")
    assert wp is not None
    config = header_guard_config(wp, REJECT)
    assert config["@type"] == LUA_TYPE
    assert (
        'local names = {"user-agent", "x-blocked", "x-role", "x-user"}'
        in (config["default_source_code"]["inline_string"])
    )
    forward = FORWARD.for_workload("foo/httpbin")
    assert forward is not None
    assert header_guard_config(forward, FORWARD) == {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
    }
    assert [f["name"] for f in request_guard_filters(forward, FORWARD)] == ["trustmesh.guard.host"]


def test_the_host_guard_stands_where_a_policy_reads_host() -> None:
    """A policy with ``hosts`` (here no-mallory), a Host condition or CUSTOM puts the guard
    in front; where none does, an ambiguous Host cannot change a decision: no guard, in the
    evaluator as in the translation (inline: no filter; ECDS: its slot switched off)."""
    guarded = REJECT.for_workload("foo/httpbin")
    assert guarded is not None and guarded.authz.reads_host
    assert request_guard_filters(guarded, REJECT)[0]["name"] == "trustmesh.guard.host"
    joined = (("host", "httpbin.foo:8000"), ("host", "internal.foo"))
    assert http(REJECT, headers=joined).rule == HOST_GUARD_POLICY

    plain = compile_text(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: writes-need-ops, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to: [{operation: {methods: ["POST"], paths: ["/admin*"]}}]
"""
    )
    wp = plain.for_workload("foo/httpbin")
    assert wp is not None and not wp.authz.reads_host
    assert request_guard_filters(wp, plain) == []
    assert http(plain, headers=joined).verdict is Verdict.ALLOW
    resources = translate(plain, "foo/httpbin", inbound_address="127.0.0.20")
    slots = {e["name"]: e["typed_config"] for e in resources.extension_configs}
    assert len(slots["trustmesh.guard.host"]) == 1  # the bare pass-through
    (route,) = [r for r in resources.routes if r["name"] == "inbound|8000||"]
    enabled = set(route["virtual_hosts"][0]["typed_per_filter_config"])
    assert enabled == {"trustmesh.authz.deny"}
    guarded_resources = translate(REJECT, "foo/httpbin", inbound_address="127.0.0.20")
    (route,) = [r for r in guarded_resources.routes if r["name"] == "inbound|8000||"]
    assert "trustmesh.guard.host" in route["virtual_hosts"][0]["typed_per_filter_config"]


# --- the command line and PolicyTest -----------------------------------------------------


def test_authz_check_keeps_repeated_header_options(tmp_path: Path) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(POLICIES)
    mesh = str(ROOT / "examples" / "mesh")
    args = ["authz", "check", "-f", mesh, "-f", str(policies), "--from", "foo/sleep"]
    args += ["--to", "foo/httpbin", "--port", "8000", "--method", "POST", "--path", "/post"]
    result = CliRunner().invoke(
        app, [*args, "--header", "x-user=ops", "--header", "X-User=mallory", "-o", "json"]
    )
    assert result.exit_code == 3, result.output
    body = json.loads(result.stdout)
    assert (body["verdict"], body["status"]) == ("bad-request", 400)


def test_policy_test_cases_can_repeat_a_header(tmp_path: Path) -> None:
    (tmp_path / "policies.yaml").write_text(POLICIES)
    (tmp_path / "test.yaml").write_text(
        """apiVersion: trustmesh.dev/v1alpha1
kind: PolicyTest
metadata: {name: smuggling}
spec:
  cases:
  - name: two x-user lines are refused
    from: {workload: foo/sleep}
    to: {workload: foo/httpbin, port: 8000}
    request: {method: POST, path: /post, headers: {x-user: [ops, mallory]}}
    expect: {verdict: bad-request, status: 400}
  - name: a trailing dot does not escape the DENY on hosts
    from: {workload: foo/sleep}
    to: {workload: foo/httpbin, port: 8000}
    request: {path: /get, host: internal.foo.}
    expect: {verdict: deny, rule: "ns[foo]-policy[no-mallory]-rule[2]"}
"""
    )
    mesh = str(ROOT / "examples" / "mesh")
    args = ["test", "-f", mesh, "-f", str(tmp_path / "policies.yaml"), str(tmp_path / "test.yaml")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
