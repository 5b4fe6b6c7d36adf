"""Headers Envoy drops or rewrites before any filter: the evaluator decides on what RBAC
really reads (measured in tests/xds/test_request_headers.py, compared request by request
in the hop-by-hop cases of tests/xds/test_rbac_differential.py)."""

from __future__ import annotations

from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import Verdict
from trustmesh.policy.request import Source
from trustmesh.policy.trace import render_trace

from .meshutil import compile_text, http, policy

PLAIN = Source.plaintext("10.0.0.9")

DENY = policy(
    "deny",
    "foo",
    """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules:
- to: [{operation: {methods: [POST]}}]
  when: [{key: "request.headers[x-user]", notValues: [ops]}]
- when: [{key: "request.headers[x-envoy-retry-on]", values: ["*"]}]
- when: [{key: "request.headers[te]", values: ["gzip"]}]
""",
)
ALLOW = policy(
    "allow",
    "foo",
    """
selector: {matchLabels: {app: httpbin}}
rules:
- to: [{operation: {paths: [/admin]}}]
  when: [{key: "request.headers[x-role]", values: [admin]}]
- to: [{operation: {paths: [/ws]}}]
  when: [{key: "request.headers[upgrade]", values: [websocket]}]
- to: [{operation: {paths: [/rid]}}]
  when: [{key: "request.headers[x-request-id]", values: ["*"]}]
- to: [{operation: {paths: [/xfcc]}}]
  when: [{key: "request.headers[x-forwarded-client-cert]", values: ["*"]}]
- to: [{operation: {notPaths: [/admin, /ws, /rid, /xfcc]}}]
""",
)

DENY_INTERNAL_HOST = policy(
    "deny-internal",
    "foo",
    """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules:
- to: [{operation: {hosts: [internal.foo, "internal.foo:*"]}}]
""",
)


def test_a_header_connection_nominates_is_gone_before_rbac() -> None:
    mesh = compile_text(DENY + ALLOW)
    ops = ("x-user", "ops")
    assert http(mesh, method="POST", headers=(ops,)).verdict is Verdict.ALLOW
    # The client names x-user hop-by-hop: Envoy removes it, "unless x-user is ops" denies.
    for connection in ("x-user", "close, X-User"):
        nominated = http(mesh, method="POST", headers=(("connection", connection), ops))
        assert nominated.rule == "ns[foo]-policy[deny]-rule[0]", connection
    role = ("x-role", "admin")
    assert http(mesh, "/admin", headers=(role,)).verdict is Verdict.ALLOW
    assert http(mesh, "/admin", headers=(("connection", "x-role"), role)).verdict is Verdict.DENY
    refused = http(mesh, headers=(("connection", "x-forwarded-for"),))
    assert (refused.verdict, refused.status) == (Verdict.BAD_REQUEST, 400)


def test_internal_and_hop_by_hop_headers_never_reach_rbac() -> None:
    mesh = compile_text(DENY + ALLOW)
    for headers in ((("x-envoy-retry-on", "5xx"),), (("te", "gzip"),)):
        assert http(mesh, headers=headers).verdict is Verdict.ALLOW, headers


def test_values_are_trimmed_and_bad_lines_refused_by_the_codec() -> None:
    mesh = compile_text(DENY + ALLOW)
    assert http(mesh, "/admin", headers=(("x-role", " admin\t"),)).verdict is Verdict.ALLOW
    assert http(mesh, method="POST", headers=(("x-user", "  ops "),)).verdict is Verdict.ALLOW
    for bad in (("x role", "admin"), ("x-role", "ad\x01min")):
        assert http(mesh, "/admin", headers=(bad,)).status == 400, bad


def test_websocket_upgrades_reach_rbac_and_other_upgrades_do_not() -> None:
    mesh = compile_text(DENY + ALLOW)
    websocket = (("connection", "Upgrade"), ("upgrade", "websocket"))
    assert http(mesh, "/ws", headers=websocket, source=PLAIN).verdict is Verdict.ALLOW
    # Any other upgrade is refused before RBAC, even where every request is allowed.
    foo = (("connection", "upgrade"), ("upgrade", "foo"))
    other = http(mesh, "/get", headers=foo, source=PLAIN)
    assert (other.verdict, other.status, other.rule) == (Verdict.DENY, 403, None)
    h2c = (("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c"), ("http2-settings", ""))
    assert http(mesh, "/get", headers=h2c).verdict is Verdict.ALLOW  # dropped, not refused
    # Envoy refuses the upgrade only after path normalization and its authority check.
    assert http(mesh, "/xyz/.%00../abc", headers=foo, source=PLAIN).status == 400
    assert http(mesh, "/get", host="a b", headers=foo, source=PLAIN).status == 400


def test_a_sidecar_client_meets_its_own_sidecar_first() -> None:
    """trustmesh's outbound listeners configure no upgrade and no proxy_100_continue
    (Istio's do): the client's sidecar refuses a websocket upgrade itself, before the
    destination's path checks, and answers Expect: 100-continue itself, removing it."""
    mesh = compile_text(DENY + ALLOW)
    websocket = (("connection", "Upgrade"), ("upgrade", "websocket"))
    refused = http(mesh, "/ws", headers=websocket)
    assert (refused.verdict, refused.status, refused.rule) == (Verdict.DENY, 403, None)
    assert any("refused by the client's sidecar" in line for line in render_trace(refused.trace))
    assert http(mesh, "/xyz/.%00../abc", headers=websocket).status == 403
    expect = policy(
        "expect",
        "foo",
        """
selector: {matchLabels: {app: httpbin}}
rules:
- when: [{key: "request.headers[expect]", values: ["100-continue", "100-Continue"]}]
""",
    )
    expecting = compile_text(expect)
    for value in ("100-continue", "100-Continue"):
        sent = (("expect", value),)
        assert http(expecting, headers=sent, source=PLAIN).verdict is Verdict.ALLOW, value
        assert http(expecting, headers=sent).verdict is Verdict.DENY, value


def test_envoy_sets_what_the_client_did_not_send() -> None:
    mesh = compile_text(DENY + ALLOW)
    assert http(mesh, "/rid").verdict is Verdict.ALLOW  # x-request-id is generated
    # A plaintext client's own x-forwarded-client-cert is dropped (SANITIZE_SET) ...
    sent = (("x-forwarded-client-cert", "URI=spiffe://cluster.local/ns/foo/sa/admin"),)
    assert http(mesh, "/xfcc", headers=sent, source=PLAIN).verdict is Verdict.DENY
    # ... and over mTLS Envoy writes its own: By=<server>;Hash=<client cert>;Subject="";URI=…
    assert http(mesh, "/xfcc", headers=sent).verdict is Verdict.ALLOW


def test_a_condition_on_the_client_certificate_hash_is_not_guessed() -> None:
    pinned = "a" * 64
    mesh = compile_text(
        policy(
            "xfcc",
            "foo",
            """
selector: {matchLabels: {app: httpbin}}
rules:
- to: [{operation: {paths: [/by]}}]
  when: [{key: "request.headers[X-Forwarded-Client-Cert]", values: ["By=spiffe://*"]}]
- to: [{operation: {paths: [/uri]}}]
  when:
  - key: "request.headers[x-forwarded-client-cert]"
    values: ['*;Subject="";URI=spiffe://cluster.local/ns/foo/sa/sleep']
""",
        )
    )
    assert http(mesh, "/by").verdict is Verdict.ALLOW
    assert http(mesh, "/uri").verdict is Verdict.ALLOW
    assert http(mesh, "/uri", src="bar/sleep").verdict is Verdict.DENY
    by = "By=spiffe://cluster.local/ns/foo/sa/httpbin;Hash="
    exact = f'{by}{pinned};Subject="";URI=spiffe://cluster.local/ns/foo/sa/sleep'
    suffix = f'*{pinned[:8]};Subject="";URI=spiffe://cluster.local/ns/foo/sa/sleep'
    for value in (exact, f"{by}aaaa*", suffix):
        pinning = _pin(value)
        decision = http(pinning)
        assert decision.verdict is Verdict.UNSUPPORTED and "SHA-256" in decision.reason, value
        assert http(pinning, source=PLAIN).verdict is Verdict.DENY  # no xfcc at all
    # A pattern that cannot match whatever the hash is, is decided.
    assert http(_pin(f"{by}xyz*")).verdict is Verdict.DENY


def _pin(value: str) -> MeshPolicy:
    quoted = value.replace("'", "''")
    return compile_text(
        policy(
            "xfcc",
            "foo",
            f"""
selector: {{matchLabels: {{app: httpbin}}}}
rules:
- when: [{{key: "request.headers[x-forwarded-client-cert]", values: ['{quoted}']}}]
""",
        )
    )


def test_a_token_header_connection_nominates_is_never_authenticated() -> None:
    authn = policy(
        "jwt",
        "foo",
        """
selector: {matchLabels: {app: httpbin}}
jwtRules:
- issuer: testing@secure.istio.io
  jwks: '{"keys":[]}'
""",
        kind="RequestAuthentication",
    )
    mesh = compile_text(ALLOW + authn)
    bad = ("authorization", "Bearer not-a-token")
    assert http(mesh, headers=(bad,)).status == 401
    assert http(mesh, headers=(("connection", "authorization"), bad)).verdict is Verdict.ALLOW


def test_the_codec_refuses_what_it_cannot_frame_or_hold() -> None:
    mesh = compile_text(DENY + ALLOW)
    for headers, status in (
        ((("content-length", "abc"),), 400),
        ((("content-length", "0"), ("content-length", "0")), 400),
        ((("transfer-encoding", "gzip"),), 501),
        ((("transfer-encoding", "chunked"), ("content-length", "0")), 400),
    ):
        decision = http(mesh, headers=headers)
        assert (decision.verdict, decision.status) == (Verdict.BAD_REQUEST, status), headers
    assert http(mesh, headers=(("transfer-encoding", " Chunked "),)).verdict is Verdict.ALLOW
    # A client without a sidecar: 100 headers, the Host curl sends included; an inline
    # header's lines count once.
    numbered = tuple((f"x-h{i}", "v") for i in range(99))
    assert http(mesh, headers=numbered, source=PLAIN).verdict is Verdict.ALLOW
    assert http(mesh, headers=(*numbered, ("x-h", "v")), source=PLAIN).status == 431
    agents = (("user-agent", "a"), ("user-agent", "b"))
    assert http(mesh, headers=(*numbered[:98], *agents), source=PLAIN).verdict is Verdict.ALLOW
    # 60 KiB from "GET /get HTTP/1.1" to the empty line (Host: httpbin.foo:8000 sent).
    assert http(mesh, headers=(("x-big", "a" * 61386),), source=PLAIN).verdict is Verdict.ALLOW
    assert http(mesh, headers=(("x-big", "a" * 61387),), source=PLAIN).status == 431
    # Too big is found before a bad line; a bad line before too many headers.
    assert http(mesh, headers=(("x y", "1"), ("x-big", "a" * 62000))).status == 431
    assert http(mesh, headers=(("x y", "1"), *numbered, ("x-h", "v"))).status == 400
    # Through the client's sidecar the destination also counts the x-forwarded-proto and
    # x-request-id that sidecar adds (when the client sent none).
    assert http(mesh, headers=numbered[:97]).verdict is Verdict.ALLOW
    assert http(mesh, headers=numbered[:98]).status == 431
    assert http(mesh, headers=(*numbered[:97], ("x-request-id", "a"))).verdict is Verdict.ALLOW
    assert http(mesh, headers=(("x-big", "a" * 61309),)).verdict is Verdict.ALLOW
    assert http(mesh, headers=(("x-big", "a" * 61310),)).status == 431


def test_hop_by_hop_lines_are_joined_before_envoy_reads_them() -> None:
    trailers = policy(
        "te",
        "foo",
        """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules:
- when: [{key: "request.headers[te]", values: [trailers]}]
""",
    )
    # TE lines gzip + trailers make one "gzip,trailers", which Envoy keeps as "trailers".
    decision = http(compile_text(trailers), headers=(("te", "gzip"), ("te", "trailers")))
    assert decision.rule == "ns[foo]-policy[te]-rule[0]"
    mesh = compile_text(DENY + ALLOW)
    two = (("connection", "upgrade"), ("upgrade", "websocket"), ("upgrade", "foo"))
    assert http(mesh, "/ws", headers=two).status == 403  # "websocket,foo" is no websocket


def test_the_trace_says_what_envoy_removed_and_set() -> None:
    mesh = compile_text(DENY + ALLOW)
    nominated = http(mesh, method="POST", headers=(("connection", "x-user"), ("x-user", "ops")))
    assert any(
        "removes connection, x-user before any filter" in s for s in render_trace(nominated.trace)
    )
    sent = (("x-forwarded-client-cert", "URI=spiffe://cluster.local/ns/foo/sa/admin"),)
    replaced = http(mesh, "/xfcc", headers=sent)
    (line,) = [
        s
        for s in render_trace(replaced.trace)
        if "replaces the client's x-forwarded-client-cert" in s
    ]
    assert "Hash=<SHA-256 of the client certificate>" in line, line
    assert "URI=spiffe://cluster.local/ns/foo/sa/sleep" in line
    # Only headers a policy names are shown as set (x-request-id is, x-forwarded-proto not).
    plain = render_trace(http(mesh, "/rid").trace)
    assert any(s.startswith("Envoy sets x-request-id") for s in plain)
    assert not any("x-forwarded-proto" in s for s in plain)


def test_x_forwarded_proto_is_what_the_client_sidecar_sets() -> None:
    proto = policy(
        "proto",
        "foo",
        """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules:
- when: [{key: "request.headers[x-forwarded-proto]", notValues: [https]}]
""",
    )
    mesh = compile_text(proto)
    # The app speaks plaintext to its own sidecar, which says so, although the hop to the
    # destination is mesh mTLS: "DENY unless https" denies every sidecar client.
    assert http(mesh).rule == "ns[foo]-policy[proto]-rule[0]"
    assert http(mesh, source=PLAIN).rule == "ns[foo]-policy[proto]-rule[0]"
    assert http(mesh, headers=(("x-forwarded-proto", "https"),)).verdict is Verdict.ALLOW


GATEWAY = """apiVersion: apps/v1
kind: Deployment
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  template:
    metadata:
      labels: {app: istio-ingressgateway, istio: ingressgateway}
      annotations: {sidecar.istio.io/inject: "false"}
    spec:
      containers:
      - name: istio-proxy
        args: [proxy, router, --domain, $(POD_NAMESPACE).svc.cluster.local]
        ports: [{containerPort: 8080}]
---
"""


def test_an_istio_gateway_client_forwards_upgrades_and_expect() -> None:
    mesh = compile_text(GATEWAY + DENY + ALLOW)
    gateway = "istio-system/istio-ingressgateway"
    websocket = (("connection", "Upgrade"), ("upgrade", "websocket"))
    assert http(mesh, "/ws", src=gateway, headers=websocket).verdict is Verdict.ALLOW
    assert http(mesh, "/ws", headers=websocket).status == 403  # a trustmesh sidecar client
    expect = policy(
        "expect",
        "foo",
        """
selector: {matchLabels: {app: httpbin}}
rules:
- when: [{key: "request.headers[expect]", values: ["100-continue"]}]
""",
    )
    expecting = compile_text(GATEWAY + expect)
    sent = (("expect", "100-continue"),)
    assert http(expecting, src=gateway, headers=sent).verdict is Verdict.ALLOW
    assert http(expecting, headers=sent).verdict is Verdict.DENY


def test_line_breaks_in_values_are_read_as_envoy_reads_the_wire() -> None:
    mesh = compile_text(DENY + ALLOW)
    # A carriage return is dropped: "ad\rmin" is admin to Envoy.
    assert http(mesh, "/admin", headers=(("x-role", "ad\rmin"),)).verdict is Verdict.ALLOW
    # A continuation line (obs-fold) joins the value.
    folded = http(mesh, "/admin", headers=(("x-role", "guest\r\n admin"),))
    assert folded.verdict is Verdict.DENY
    # "name: value" after a line break is a header of its own — Host included.
    injected = (("x-a", "1\r\nx-role: admin"),)
    assert http(mesh, "/admin", headers=injected).verdict is Verdict.ALLOW
    smuggled = (("x-a", "1\nHost: internal.foo"),)  # Host: httpbin.foo:8000,internal.foo
    # No policy here reads Host: the joined value cannot change a decision and passes on.
    assert http(mesh, headers=smuggled).rule == "ns[foo]-policy[allow]-rule[4]"
    reads_host = compile_text(DENY + ALLOW + DENY_INTERNAL_HOST)
    assert http(reads_host, headers=smuggled).rule == "trustmesh-ambiguous-host"
    assert http(reads_host).verdict is Verdict.ALLOW
    # An empty line ends the head: what follows is not a header of this request.
    cut = (("x-a", "1\r\n\r\nx-role: admin"),)
    assert http(mesh, "/admin", headers=cut).verdict is Verdict.DENY
    assert http(mesh, headers=(("x-a", "1\nno colon"),)).status == 400
