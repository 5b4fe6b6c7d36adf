"""The trace is a tuple of frozen events, rendered to text by one renderer and listed
as JSON objects by ``authz check -o json``."""

from __future__ import annotations

import dataclasses
import json

import pytest

from trustmesh.policy.decision import Verdict
from trustmesh.policy.request import Source
from trustmesh.policy.trace import (
    AllowPhase,
    PeerAuthentication,
    PeerPrincipal,
    RuleEvaluated,
    ShadowEvaluated,
    TlsChoice,
    event_json,
    render,
    render_trace,
)

from .meshutil import compile_text, http, policy, tcp
from .test_cli import MESH, invoke

ALLOW = policy(
    "allow-admin",
    "foo",
    """
selector: {matchLabels: {app: httpbin}}
rules:
- from: [{source: {principals: [cluster.local/ns/foo/sa/admin]}}]
  to: [{operation: {paths: [/admin]}}]
- to: [{operation: {methods: [GET]}}]
""",
)
DRY_DENY = policy(
    "deny-post",
    "foo",
    """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules:
- to: [{operation: {methods: [POST]}}]
""",
    extra_meta='  annotations: {istio.io/dry-run: "true"}\n',
)


def test_the_trace_is_events_in_the_order_the_filters_run() -> None:
    d = http(compile_text(ALLOW + DRY_DENY), "/admin")
    assert (d.verdict, d.rule) == (Verdict.ALLOW, "ns[foo]-policy[allow-admin]-rule[1]")
    kinds = [type(e) for e in d.trace]
    order = [PeerAuthentication, TlsChoice, PeerPrincipal, RuleEvaluated, ShadowEvaluated]
    assert [k for k in kinds if k in order][:5] == order
    rules = [e for e in d.trace if isinstance(e, RuleEvaluated)]
    assert [(e.phase, e.outcome.rule.name, e.outcome.matched) for e in rules] == [
        ("dry-run DENY", "ns[foo]-policy[deny-post]-rule[0]", False),
        ("ALLOW", "ns[foo]-policy[allow-admin]-rule[0]", False),
        ("ALLOW", "ns[foo]-policy[allow-admin]-rule[1]", True),
    ]
    assert PeerPrincipal("cluster.local/ns/foo/sa/sleep") in d.trace
    for event in d.trace:  # values: frozen, comparable
        assert dataclasses.is_dataclass(event)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(event, dataclasses.fields(event)[0].name, None)


def test_one_renderer_gives_the_trace_text() -> None:
    d = http(compile_text(ALLOW + DRY_DENY), "/admin")
    assert render_trace(d.trace)[2:] == (
        "destination foo/httpbin port 8000: PeerAuthentication PERMISSIVE (default)",
        "auto mTLS: destination has a sidecar, mTLS as cluster.local/ns/foo/sa/sleep",
        "peer principal cluster.local/ns/foo/sa/sleep",
        "dry-run DENY ns[foo]-policy[deny-post]-rule[0]: no match: to[0].methods",
        "shadow allowed",
        "ALLOW ns[foo]-policy[allow-admin]-rule[0]: no match: from[0].principals",
        "ALLOW ns[foo]-policy[allow-admin]-rule[1]: matched",
    )
    assert render(AllowPhase("no-match", "TCP", "ztunnel")) == (
        "no ALLOW rule matched at ztunnel: denied"
    )
    assert render(AllowPhase("no-rule-for-protocol", "TCP")) == (
        "ALLOW policies apply but none has a rule for TCP: denied"
    )


def test_the_allow_phase_says_how_it_ended() -> None:
    mesh = compile_text(ALLOW)
    denied = http(mesh, "/x", method="POST", source=Source.plaintext())
    assert AllowPhase("no-match", "HTTP") in denied.trace
    assert AllowPhase("no-rule-for-protocol", "TCP") not in denied.trace
    assert AllowPhase("none-apply", "TCP") in tcp(mesh, 9000).trace


def test_a_trace_off_decision_records_nothing() -> None:
    from trustmesh.policy.evaluate import evaluate
    from trustmesh.policy.request import HttpRequest, Request

    from .meshutil import NOW

    mesh = compile_text(ALLOW)
    request = Request(Source.workload("foo/sleep"), "foo/httpbin", 8000, HttpRequest("GET", "/"))
    assert evaluate(mesh, request, now=NOW).trace == ()


def test_events_as_json_name_their_kind_fields_and_text() -> None:
    d = http(compile_text(ALLOW + DRY_DENY), "/admin")
    events = [event_json(e) for e in d.trace]
    json.dumps(events)  # every field is JSON
    assert events[2] == {
        "event": "peer-authentication",
        "workload": "foo/httpbin",
        "port": 8000,
        "mode": "PERMISSIVE",
        "scope": None,
        "policy": None,
        "text": "destination foo/httpbin port 8000: PeerAuthentication PERMISSIVE (default)",
    }
    assert {
        "event": "rule",
        "phase": "ALLOW",
        "rule": "ns[foo]-policy[allow-admin]-rule[0]",
        "policy": "foo/allow-admin",
        "matched": False,
        "misses": ["from[0].principals"],
        "text": "ALLOW ns[foo]-policy[allow-admin]-rule[0]: no match: from[0].principals",
    } in events
    assert {k: v for k, v in events[6].items() if k != "text"} == {
        "event": "dry-run",
        "action": "DENY",
        "result": "allowed",
        "rule": None,
    }


def test_authz_check_json_lists_the_events(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "policy.yaml"
    config.write_text(ALLOW)
    args = ["authz", "check", "-f", MESH, "-f", str(config), "--from", "foo/sleep"]
    result = invoke(
        *args, "--to", "foo/httpbin", "--port", "8000", "--path", "/admin", "-o", "json"
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["trace"] == [e["text"] for e in body["events"]]
    (matched,) = [e for e in body["events"] if e["event"] == "rule" and e["matched"]]
    assert matched["rule"] == body["rule"] == "ns[foo]-policy[allow-admin]-rule[1]"
