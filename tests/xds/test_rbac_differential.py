"""Differential test: real Envoy running our RBAC translation vs the offline evaluator.

ONE Envoy serves a plaintext listener per (policy set, path-normalization mode), each on
its own loopback address and on the destination workload's own target port (8000 for
foo/httpbin, 9000-9002 for foo/tcp-echo), so ``ports`` / ``destination.port`` rules see
the same port on both sides. HTTP chains are what a sidecar runs: the HCM with Istio's
path-normalization fields for the mode and trustmesh's Host handling, the request guards,
our CUSTOM stand-in and RBAC filters, then a router answering 200 itself. TCP chains:
network RBAC, then tcp_proxy to an echo server.

Every request of a grid (paths that normalization rewrites or rejects, methods, headers
present / absent / empty / repeated, Host with and without port, two client addresses,
X-Forwarded-For, JWTs, request-smuggling attacks: repeated header lines, several Host
lines, trailing dots, userinfo, absolute-form targets) is sent raw and must get the same
answer as ``evaluate()`` gives for a plaintext client (the destinations are PERMISSIVE):
the same status, the same deciding
policy (Envoy logs it in the response code details of a 403 and in its RBAC dynamic
metadata on a 200) and the same dry-run (shadow) results. TCP likewise: echoed or
closed, the denying policy from the connection termination details, the allowing one
from a copy of the ALLOW rules as shadow rules (``rbac_rig.allow_observer``: Envoy's
network RBAC names no allowing policy itself), and the dry-run results.

End-user JWT rules are exercised too: listeners whose mesh has a RequestAuthentication get
translate()'s jwt_authn filter (Istio's shape) before RBAC, and requests carry the scenario
tokens — and, in the ``jwt-extraction`` sets (jwt_cases.py), tokens in every place and
form Envoy might or might not take one from, with one or two providers.
Without TLS, peer-identity rules (principals, namespaces, service accounts) cannot be: the
golden tests pin their shape and ``envoy --mode validate`` checks it.

The policy sets and request grids are in rbac_cases.py; the Envoy config and the
run in rbac_rig.py.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.xds import jwt_cases
from tests.xds.rbac_cases import HTTP_PORT, TCP_PORTS, http_cases, tcp_cases
from tests.xds.rbac_rig import Answer, Outcome, free_addresses, run_envoy
from trustmesh.policy.headers import HOST_GUARD_POLICY

Headers = tuple[tuple[str, str], ...]


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    http, tcp = http_cases(), tcp_cases()
    http_addresses = free_addresses(len(http), (HTTP_PORT,), frozenset())
    for case, address in zip(http, http_addresses, strict=True):
        case.address = address
    tcp_sets = sorted({case.name.rpartition("/")[0] for case in tcp})
    tcp_addresses = free_addresses(len(tcp_sets), TCP_PORTS, frozenset(http_addresses))
    for case in tcp:
        case.address = tcp_addresses[tcp_sets.index(case.name.rpartition("/")[0])]
    workdir = tmp_path_factory.mktemp("envoy")
    return asyncio.run(asyncio.wait_for(run_envoy(http, tcp, workdir), timeout=60))


# --- tests ---------------------------------------------------------------------------


def test_envoy_and_the_evaluator_agree(outcome: Outcome) -> None:
    sent = len(outcome.results)
    print(f"\n{sent} requests/connections through one Envoy in {outcome.seconds:.2f}s")
    assert sent > 500
    disagreements = outcome.disagreements()
    assert not disagreements, f"{len(disagreements)} of {sent} disagree:\n" + "\n".join(
        disagreements
    )


def test_every_outcome_is_exercised(outcome: Outcome) -> None:
    """The grid is not vacuous: allows, denies by DENY / ALLOW / CUSTOM, rejections, dry
    runs that match, JWT rejections and both TCP outcomes all occur."""
    seen = {(got.status, got.rule.split("-policy[")[0]) for _, _, got, _ in outcome.results}
    assert {(200, "ns[foo]"), (403, "ns[foo]"), (403, "none"), (400, "-"), (401, "-")} <= seen
    # TCP: closed by a DENY rule and for want of an ALLOW match, echoed by an ALLOW rule
    # and with no ALLOW policy; each side names the deciding rule.
    tcp = {
        (got.status, got.rule.split("-policy[")[0])
        for c, _, got, _ in outcome.results
        if c.destination == "foo/tcp-echo"
    }
    assert {(0, "ns[foo]"), (0, "none"), (200, "ns[foo]"), (200, "-")} <= tcp, tcp
    assert any("ext" in got.rule for _, _, got, _ in outcome.results)
    shadows = {v for _, _, got, _ in outcome.results for _, v in got.shadow}
    assert {"allowed", "denied", "ns[foo]-policy[shadow-deny]-rule[0]"} <= shadows


def test_smuggling_attacks_are_refused_through_envoy(outcome: Outcome) -> None:
    """The attacks of trustmesh.policy.headers, as real Envoy answers them (the evaluator
    agrees: see above). Under FORWARD the repeated-header ones pass, as in Istio."""

    def answer(case: str, method: str, path: str, host: str, headers: Headers) -> Answer:
        (found,) = [
            got
            for c, p, got, _ in outcome.results
            if (c.name, p.method, p.path, p.host, p.headers) == (case, method, path, host, headers)
        ]
        return found

    plain = "httpbin.foo:8000"
    ops_then_mallory = (("x-user", "ops"), ("x-user", "mallory"))
    for case, expected in (("smuggling", 400), ("smuggling/FORWARD", 200)):
        # DENY writes unless x-user is ops (notValues), differing case, ALLOW with values
        # on /admin, DENY with values: each repeated header is refused with 400 by default.
        for method, path, headers in (
            ("POST", "/get", ops_then_mallory),
            ("POST", "/get", (("X-User", "ops"), ("x-user", "mallory"))),
            ("GET", "/admin", (("x-role", "guest"), ("x-role", "admin"))),
            ("GET", "/get", (("x-blocked", "ops"), ("x-blocked", "mallory"))),
        ):
            got = answer(case, method, path, plain, headers)
            if case == "smuggling/FORWARD" and headers[0][0] == "x-blocked":
                expected = 403  # DENY with values: one matching line is enough for Envoy
            assert got.status == expected, (case, headers, got)
    # Host: a trailing dot no longer escapes hosts: ["internal.foo"]; a second Host line,
    # userinfo or a second dot is refused by the host guard.
    deny_hosts = "ns[foo]-policy[no-mallory]-rule[3]"
    assert answer("smuggling", "GET", "/get", "internal.foo.", ()).rule == deny_hosts
    assert answer("smuggling", "GET", "/get", "internal.foo", ()).rule == deny_hosts
    for host, extra in (
        ("httpbin.foo:8000", (("Host", "internal.foo"),)),
        ("user@internal.foo", ()),
        ("internal.foo..", ()),
    ):
        got = answer("smuggling", "GET", "/get", host, extra)
        assert (got.status, got.rule) == (403, HOST_GUARD_POLICY), (host, extra, got)
    # A header Envoy joins itself stays one value: no 400, matched on the joined value.
    joined = (("user-agent", "bad-bot/1"), ("user-agent", "ok"))
    assert answer("smuggling", "GET", "/get", plain, joined).rule == (
        "ns[foo]-policy[no-mallory]-rule[1]"
    )


def test_jwt_tokens_are_found_where_envoy_finds_them(outcome: Outcome) -> None:
    """Envoy's own answers for the token placements of jwt_cases (the evaluator agrees:
    see above): on ``/who`` rule[0] is alice, rule[1] alice2, rule[4] no identity."""
    t = jwt_cases.make_tokens()

    def who(case: str, headers: Headers, query: str = "", method: str = "GET") -> Answer:
        (found,) = [
            got
            for c, p, got, _ in outcome.results
            if (c.name, p.method, p.path, p.headers)
            == (f"jwt-extraction/{case}", method, f"/who{query}", headers)
        ]
        return found

    alice, nobody = "ns[foo]-policy[who]-rule[0]", "ns[foo]-policy[who]-rule[4]"
    auth = "authorization"
    # The prefix is found anywhere in the value, case-sensitively; the token runs from the
    # next base64url character to the end of the value (whitespace inside is skipped).
    for value in (f"x Bearer {t.alice}", f"xBearer {t.alice}", f"Basic abc, Bearer {t.alice}"):
        assert who("default", ((auth, value),)).rule == alice, value
    assert who("default", ((auth, f"Bearer {t.alice} x"),)).rule == alice
    assert who("default", ((auth, f"Bearer {t.alice},junk"),)).status == 401
    assert who("default", ((auth, f"bearer {t.alice}"),)).rule == nobody
    assert who("default", ((auth, f"BEARER {t.forged}"),)).rule == nobody
    # Two Authorization lines are joined into one value: one token that does not parse.
    two = ((auth, f"Bearer {t.alice}"), (auth, f"Bearer {t.alice2}"))
    assert who("default", two).status == 401
    # A query parameter: its first value only.
    assert who("default", (), f"?access_token={t.alice}&access_token={t.forged}").rule == alice
    assert who("default", (), f"?access_token={t.forged}&access_token={t.alice}").status == 401
    # Headers Envoy keeps line by line give one token per line; every one must verify.
    assert who("custom", (("x-jwt", t.alice), ("x-jwt", t.forged))).status == 401
    assert who("custom", (("cookie", f"session={t.alice}; session={t.forged}"),)).rule == alice
    # Two providers at the same location: the one that accepts a token removes it before
    # the next one looks, so a token of each is accepted.
    both = who("two-default", ((auth, f"Bearer {t.alice}"),), f"?access_token={t.bob}")
    assert both.rule == alice
    # A CORS preflight is not authenticated at all.
    preflight = (
        ("origin", "https://app.example"),
        ("access-control-request-method", "GET"),
        (auth, f"Bearer {t.forged}"),
    )
    assert who("default", preflight, method="OPTIONS").rule == nobody


def test_hop_by_hop_and_internal_headers_never_reach_rbac(outcome: Outcome) -> None:
    """Envoy's own answers for headers it drops or rewrites before any filter (the
    evaluator agrees: see above)."""

    def answer(method: str, path: str, headers: Headers) -> Answer:
        (found,) = [
            got
            for c, p, got, _ in outcome.results
            if (c.name, p.method, p.path, p.headers) == ("hop-by-hop", method, path, headers)
        ]
        return found

    deny_writes = "ns[foo]-policy[hop-deny]-rule[0]"
    assert answer("POST", "/get", (("x-user", "ops"),)).status == 200
    # Connection nominates x-user: it is removed, so "unless x-user is ops" denies.
    assert answer("POST", "/get", (("connection", "x-user"), ("x-user", "ops"))).rule == deny_writes
    assert answer("POST", "/get", (("x-user", "  ops\t"),)).status == 200  # trimmed
    assert answer("GET", "/admin", (("connection", "x-role"), ("x-role", "admin"))).status == 403
    assert answer("GET", "/admin", (("x-role", " admin "),)).status == 200
    # Internal x-envoy-* and keep-alive are gone, TE is kept only as "trailers".
    for headers in (
        (("x-envoy-retry-on", "5xx"),),
        (("te", "gzip"),),
        (("keep-alive", "timeout=5"),),
    ):
        assert answer("GET", "/get", headers).status == 200, headers
    # Envoy sets what the client did not: a request id, x-forwarded-proto; it replaces xfcc.
    assert answer("GET", "/rid", ()).status == 200
    assert answer("GET", "/proto", ()).status == 200
    assert answer("GET", "/xfcc", (("x-forwarded-client-cert", "URI=spiffe://x"),)).status == 403
    # Upgrades: websocket reaches RBAC with its headers, any other is refused before it.
    assert answer("GET", "/ws", (("connection", "upgrade"), ("upgrade", "websocket"))).status == 200
    refused = answer("GET", "/ws", (("connection", "upgrade"), ("upgrade", "foo")))
    assert (refused.status, refused.rule) == (403, "-")  # no policy decided it
    assert answer("GET", "/expect", (("expect", "100-continue"),)).status == 200
    assert (
        answer("GET", "/get", (("connection", "x-forwarded-for"), ("x-role", "admin"))).status
        == 400
    )
