"""Access-log lines → normalized records; bad lines are problems with file:line and field."""

from __future__ import annotations

import orjson

from trustmesh.insight.envoy_logs import from_istio_entry, from_trustmesh_entry
from trustmesh.insight.records import SCHEMA, Problem, Protocol, TrafficRecord, parse_record_line
from trustmesh.insight.traffic import TrafficSet

INBOUND = {
    "authority": "reviews:9080",
    "direction": "inbound",
    "downstream_local_address": "127.91.2.1:9080",
    "downstream_remote_address": "127.91.5.1:33908",
    "method": "GET",
    "path": "/reviews/0?x=1",
    "peer_principal": "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
    "port": "9080",
    "protocol": "HTTP/1.1",
    "rbac": {"enforced_engine_result": "allowed"},
    "request_principal_iss": None,
    "request_principal_sub": None,
    "requested_server_name": "outbound_.9080_._.reviews.default.svc.cluster.local",
    "response_code": 200,
    "response_code_details": "via_upstream",
    "response_flags": "-",
    "start_time": "2026-12-06T05:04:29.160Z",
    "workload": "default/reviews-v1",
}
IPS = {"127.91.5.1": "default/productpage-v1"}


def test_a_trustmesh_inbound_line_is_a_record() -> None:
    record = from_trustmesh_entry(INBOUND, "envoy.log:3", IPS)
    assert record == TrafficRecord(
        destination="default/reviews-v1",
        port=9080,
        protocol=Protocol.HTTP,
        mtls=True,
        source_principal="cluster.local/ns/default/sa/bookinfo-productpage",
        source_workload="default/productpage-v1",
        source_ip="127.91.5.1",
        method="GET",
        path="/reviews/0?x=1",
        host="reviews:9080",
        response_code=200,
        verdict="allow",
        time="2026-12-06T05:04:29.160Z",
        origin="envoy.log:3",
    )


def test_denied_lines_carry_the_deciding_rule() -> None:
    entry = {
        **INBOUND,
        "response_code": 403,
        "response_code_details": (
            "rbac_access_denied_matched_policy[ns[default]-policy[deny]-rule[0]]"
        ),
        "rbac": {"enforced_engine_result": "denied"},
    }
    record = from_trustmesh_entry(entry, "f:1", IPS)
    assert isinstance(record, TrafficRecord)
    assert (record.verdict, record.rule) == ("deny", "ns[default]-policy[deny]-rule[0]")
    none = {**entry, "response_code_details": "rbac_access_denied_matched_policy[none]"}
    record = from_trustmesh_entry(none, "f:1", IPS)
    assert isinstance(record, TrafficRecord) and (record.verdict, record.rule) == ("deny", None)


def test_tcp_and_outbound_and_plaintext_lines() -> None:
    tcp = {
        "direction": "inbound",
        "workload": "foo/db",
        "port": "5432",
        "downstream_remote_address": "10.0.0.9:4000",
        "peer_principal": None,
        "connection_termination_details": None,
        "rbac": {"enforced_engine_result": "allowed"},
    }
    record = from_trustmesh_entry(tcp, "f:2", {})
    assert isinstance(record, TrafficRecord)
    assert record.protocol is Protocol.TCP and record.method is None and record.path is None
    assert not record.mtls and record.source_principal is None and record.source_ip == "10.0.0.9"
    assert from_trustmesh_entry({**INBOUND, "direction": "outbound"}, "f:3", IPS) is None
    problem = from_trustmesh_entry({**INBOUND, "workload": None}, "f:4", IPS)
    assert isinstance(problem, Problem) and (problem.origin, problem.field) == ("f:4", "workload")
    problem = from_trustmesh_entry(
        {k: v for k, v in INBOUND.items() if k != "direction"}, "f:6", IPS
    )
    assert isinstance(problem, Problem) and problem.field == "direction"
    problem = from_trustmesh_entry({**INBOUND, "path": "-"}, "f:5", IPS)
    assert isinstance(problem, Problem) and problem.field == "path"


# Istio's default JSON access log format (EnvoyJSONLogFormatIstio), an inbound request.
ISTIO = {
    "start_time": "2026-12-06T04:00:00.000Z",
    "route_name": "default",
    "method": "GET",
    "path": "/ratings/0",
    "protocol": "HTTP/1.1",
    "response_code": 200,
    "response_flags": "-",
    "response_code_details": "via_upstream",
    "connection_termination_details": None,
    "upstream_transport_failure_reason": None,
    "bytes_received": 0,
    "bytes_sent": 48,
    "duration": 2,
    "upstream_service_time": "1",
    "x_forwarded_for": None,
    "user_agent": "curl/8",
    "request_id": "abc",
    "authority": "ratings:9080",
    "upstream_host": "10.1.0.7:9080",
    "upstream_cluster": "inbound|9080||",
    "upstream_local_address": "127.0.0.6:41223",
    "downstream_local_address": "10.1.0.7:9080",
    "downstream_remote_address": "10.1.0.5:51234",
    "requested_server_name": "outbound_.9080_._.ratings.default.svc.cluster.local",
}


def test_istio_default_json_needs_the_peer_identity_for_mtls() -> None:
    problem = from_istio_entry(ISTIO, "ratings.log:7", "default/ratings-v1")
    assert isinstance(problem, Problem)
    assert problem.origin == "ratings.log:7" and "DOWNSTREAM_PEER_URI_SAN" in problem.message


def test_istio_json_with_xfcc_or_peer_san_is_a_record() -> None:
    xfcc = (
        'By=spiffe://cluster.local/ns/default/sa/bookinfo-ratings;Hash=ab;Subject="";'
        "URI=spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    )
    for entry in (
        {**ISTIO, "x_forwarded_client_cert": xfcc},
        {
            **ISTIO,
            "downstream_peer_uri_san": "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
        },
    ):
        record = from_istio_entry(entry, "ratings.log:7", "default/ratings-v1")
        assert isinstance(record, TrafficRecord)
        assert record.source_principal == "cluster.local/ns/default/sa/bookinfo-reviews"
        assert (record.destination, record.port, record.source_ip) == (
            "default/ratings-v1",
            9080,
            "10.1.0.5",
        )
        assert record.verdict == "allow" and record.mtls


def test_istio_plaintext_tcp_and_outbound_lines() -> None:
    plain = {**ISTIO, "requested_server_name": None}
    record = from_istio_entry(plain, "l:1", "default/ratings-v1")
    assert isinstance(record, TrafficRecord) and not record.mtls and record.source_principal is None
    tcp = {**plain, "method": None, "path": None, "protocol": None, "response_code": 0}
    record = from_istio_entry(tcp, "l:2", "default/ratings-v1")
    assert isinstance(record, TrafficRecord) and record.protocol is Protocol.TCP
    outbound = {**ISTIO, "upstream_cluster": "outbound|9080||reviews.default.svc.cluster.local"}
    assert from_istio_entry(outbound, "l:3", "default/ratings-v1") is None
    problem = from_istio_entry({**ISTIO, "upstream_cluster": None}, "l:4", "default/ratings-v1")
    assert isinstance(problem, Problem) and problem.field == "upstream_cluster"


def _line(**changes: object) -> bytes:
    record = TrafficRecord("foo/httpbin", 8000, Protocol.HTTP, False, method="GET", path="/get")
    return orjson.dumps({**record.as_dict(), **changes})


def test_normalized_lines_round_trip_and_bad_fields_are_named() -> None:
    parsed = parse_record_line(_line(), "t.jsonl:1")
    assert isinstance(parsed, TrafficRecord) and parsed.path == "/get"
    for changes, field in (
        ({"schema": "v0"}, "schema"),
        ({"destination": None}, "destination"),
        ({"destination": "httpbin"}, "destination"),
        ({"port": "8000"}, "port"),
        ({"port": 70000}, "port"),
        ({"path": None}, "path"),
        ({"method": None}, "method"),
        ({"protocol": "udp"}, "protocol"),
        ({"mtls": True}, "source_principal"),  # mTLS without an identity
        ({"verdict": "maybe"}, "verdict"),
    ):
        problem = parse_record_line(_line(**changes), "t.jsonl:9")
        assert isinstance(problem, Problem), changes
        assert (problem.origin, problem.field) == ("t.jsonl:9", field), (changes, problem)
    assert SCHEMA == "trustmesh.dev/traffic/v1"


def test_traffic_set_deduplicates_and_reports_every_bad_line() -> None:
    traffic = TrafficSet()
    for number in range(1, 6):
        traffic.add_line(_line(time=f"t{number}"), "t.jsonl", number)
    traffic.add_line(_line(path="/other"), "t.jsonl", 6)
    traffic.add_line(_line(port=[1]), "t.jsonl", 7)  # unhashable: still a named problem
    traffic.add_line(_line(path=None), "t.jsonl", 8)
    traffic.add_line(_line(path=None), "t.jsonl", 9)
    traffic.add_line(b"{not json", "t.jsonl", 10)
    traffic.add_line(b"\n", "t.jsonl", 11)
    assert traffic.records == 6 and len(traffic.distinct) == 2
    assert traffic.distinct[0].count == 5
    assert [(p.origin, p.field) for p in traffic.problems] == [
        ("t.jsonl:7", "port"),
        ("t.jsonl:8", "path"),
        ("t.jsonl:9", "path"),
        ("t.jsonl:10", ""),
    ]


def test_a_forged_xfcc_on_plaintext_is_not_an_identity() -> None:
    forged = "URI=spiffe://cluster.local/ns/istio-system/sa/admin"
    entry = {**ISTIO, "requested_server_name": None, "x_forwarded_client_cert": forged}
    record = from_istio_entry(entry, "l:1", "default/ratings-v1")
    assert isinstance(record, TrafficRecord)
    assert not record.mtls and record.source_principal is None


def test_istio_passthrough_and_refused_lines_are_inbound() -> None:
    passthrough = {
        **ISTIO,
        "upstream_cluster": "InboundPassthroughCluster",
        "downstream_local_address": "10.1.0.7:7070",
        "downstream_peer_uri_san": "spiffe://cluster.local/ns/default/sa/x",
    }
    record = from_istio_entry(passthrough, "l:1", "default/ratings-v1")
    assert isinstance(record, TrafficRecord) and record.port == 7070
    refused = {
        **ISTIO,
        "upstream_cluster": None,
        "response_code": 403,
        "response_code_details": "rbac_access_denied_matched_policy[none]",
        "downstream_peer_uri_san": "spiffe://cluster.local/ns/default/sa/x",
    }
    record = from_istio_entry(refused, "l:2", "default/ratings-v1")
    assert isinstance(record, TrafficRecord)
    assert (record.verdict, record.port) == ("deny", 9080)


def test_a_file_mixing_schema_versions_names_the_lines_it_cannot_read() -> None:
    traffic = TrafficSet()
    traffic.add_line(_line(), "t.jsonl", 1)
    traffic.add_line(_line(schema="trustmesh.dev/traffic/v2"), "t.jsonl", 2)
    traffic.add_line(_line(time="later"), "t.jsonl", 3)
    assert traffic.records == 2
    assert [(p.origin, p.field) for p in traffic.problems] == [("t.jsonl:2", "schema")]
    assert "trustmesh.dev/traffic/v1" in traffic.problems[0].message


# A line a trustmesh sidecar wrote for a TCP connection (tcp-echo, through `trustmesh up`).
REAL_TCP_LINE = (
    b'{"bytes_received":3,"bytes_sent":3,"connection_termination_details":null,'
    b'"direction":"inbound","downstream_local_address":"127.92.6.1:9000",'
    b'"downstream_remote_address":"127.92.1.1:43934","duration_ms":2,'
    b'"peer_principal":"spiffe://cluster.local/ns/foo/sa/sleep","port":"9000","rbac":null,'
    b'"requested_server_name":"outbound_.9000_._.tcp-echo.foo.svc.cluster.local",'
    b'"response_flags":"-","start_time":"2026-12-06T05:34:38.322Z",'
    b'"upstream_host":"127.92.6.2:9000","workload":"foo/tcp-echo"}'
)


def test_a_real_tcp_connection_line() -> None:
    record = from_trustmesh_entry(
        orjson.loads(REAL_TCP_LINE), "envoy.log:2", {"127.92.1.1": "foo/sleep"}
    )
    assert isinstance(record, TrafficRecord)
    assert (record.protocol, record.port, record.source_workload) == (
        Protocol.TCP,
        9000,
        "foo/sleep",
    )
    assert (record.mtls, record.source_principal) == (True, "cluster.local/ns/foo/sa/sleep")
    assert (record.verdict, record.rule, record.method, record.path) == ("allow", None, None, None)


def test_a_source_address_must_be_an_address() -> None:
    problem = parse_record_line(_line(source_ip="0.0.0.0/0"), "t.jsonl:4")
    assert isinstance(problem, Problem) and problem.field == "source_ip"
