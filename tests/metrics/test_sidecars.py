"""Reading sidecars' counters: Envoy's stat names classified, and a scrape that stays
bounded whatever a sidecar does (refuses, never answers, answers garbage)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.metrics.promtext import series, value
from trustmesh.metrics.exposition import CounterFamily, render
from trustmesh.metrics.sidecars import SidecarTarget, classify, families, scrape

# Names as Envoy 1.40 reports them for trustmesh's inbound chains (seen on a live mesh).
ENVOY_STATS = {
    "http.inbound_8000.rbac.allowed": 5,
    "http.inbound_8000.rbac.denied": 3,
    "http.inbound_8000.rbac.istio_dry_run_allow_.shadow_allowed": 2,
    "http.inbound_8000.rbac.istio_dry_run_allow_.shadow_denied": 1,
    "http.inbound_8000.rbac.shadow_allowed": 0,
    "http.inbound_8000.rbac.trustmesh_guard_.allowed": 9,
    "http.inbound_8000.rbac.trustmesh_guard_.denied": 1,
    "http.inbound|9080||.rbac.allowed": 1,  # a stat prefix with odd characters
    "tcp.rbac.allowed": 4,
    "tcp.rbac.denied": 6,
    "tcp.rbac.istio_dry_run_deny_.shadow_denied": 7,
    "http.inbound_8000.rbac.istio_ext_authz_.shadow_allowed": 30,  # CUSTOM's selector
    "http.inbound_8000.ext_authz.ok": 11,
    "http.inbound_8000.ext_authz.denied": 12,
    "http.inbound_8000.ext_authz.error": 13,
    "http.inbound_8000.ext_authz.failure_mode_allowed": 14,
    "ext_authz.tcp_ext_authz.denied": 15,
    "ext_authz.tcp_ext_authz.total": 99,  # not a result
    "http.inbound_8000.downstream_rq_total": 100,  # not authorization
}


def test_envoy_stat_names_are_summed_per_protocol_and_result() -> None:
    rbac, ext_authz, guard = classify(ENVOY_STATS)
    assert rbac == {
        ("http", "allowed"): 6,
        ("http", "denied"): 3,
        ("http", "shadow_allowed"): 2,
        ("http", "shadow_denied"): 1,
        ("tcp", "allowed"): 4,
        ("tcp", "denied"): 6,
        ("tcp", "shadow_allowed"): 0,
        ("tcp", "shadow_denied"): 7,
    }
    assert ext_authz == {
        ("http", "ok"): 11,
        ("http", "denied"): 12,
        ("http", "error"): 13,
        ("http", "failure_mode_allowed"): 14,
        ("tcp", "denied"): 15,
    }
    assert guard == {"allowed": 9, "denied": 1}  # never mixed into the policy counts


def test_exact_counter_names_render_and_parse_back() -> None:
    counter = CounterFamily("citadel_server_csr_count", "CSRs.")
    counter.inc()
    labelled = CounterFamily("pilot_xds_pushes", "Pushes.", ("type",))
    labelled.inc(('we"ird\n',), 2)
    text = render([counter.collect(), labelled.collect()])
    assert "# TYPE citadel_server_csr_count counter\ncitadel_server_csr_count 1.0\n" in text
    parsed = series(text)
    assert value(parsed, "citadel_server_csr_count") == 1
    assert value(parsed, "pilot_xds_pushes", type='we"ird\n') == 2


class _Admin(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        assert self.path.startswith("/stats?format=json&filter=")
        body = json.dumps(
            {"stats": [{"name": n, "value": v} for n, v in ENVOY_STATS.items()]}
        ).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _admin() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Admin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def _silent() -> Iterator[str]:
    """Accepts connections (the kernel does) and never answers: a stopped Envoy."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def _closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"  # closed again when we return


def test_a_dead_or_hung_sidecar_is_down_and_the_scrape_stays_bounded() -> None:
    with _admin() as live, _silent() as hung:
        targets = [
            SidecarTarget("foo", "httpbin", live),
            SidecarTarget("foo", "hung", hung),
            SidecarTarget("foo", "gone", _closed_port()),
            SidecarTarget("foo", "starting", None),
        ]
        started = time.monotonic()
        results = scrape(targets, timeout=0.3)
        took = time.monotonic() - started
    assert took < 2.0, took  # the hung one cost one timeout, not forever
    assert [r.up for r in results] == [True, False, False, False]
    assert results[1].error == "timed out"
    parsed = series(render(families(results)))
    for pod, up in (("httpbin", 1), ("hung", 0), ("gone", 0), ("starting", 0)):
        assert value(parsed, "trustmesh_sidecar_up", namespace="foo", pod=pod) == up
    labels = {"namespace": "foo", "pod": "httpbin"}
    assert value(parsed, "trustmesh_sidecar_rbac", **labels, protocol="http", result="denied") == 3
    assert value(parsed, "trustmesh_sidecar_rbac", **labels, protocol="tcp", result="denied") == 6
    assert (
        value(parsed, "trustmesh_sidecar_ext_authz", **labels, protocol="http", result="ok") == 11
    )
    assert value(parsed, "trustmesh_sidecar_guard", **labels, result="denied") == 1
    # nothing but counts under the pods' names: no address of any sidecar
    assert not any(live.split(":")[1] in str(labels) for _, labels in parsed)
