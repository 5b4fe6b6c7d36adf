"""impact and generate on the istio.io layout (foo, bar with sidecars; legacy without)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import orjson
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from tests.unit.meshutil import BASE, NOW, compile_text
from trustmesh.api.loader import load_sources
from trustmesh.api.snapshot import build_snapshot
from trustmesh.cli.main import app
from trustmesh.cli.render import StepProgress
from trustmesh.insight.generate import ProofFailed, compile_with, generate_policies
from trustmesh.insight.records import Protocol, TrafficRecord
from trustmesh.insight.replay import decide, impact
from trustmesh.insight.traffic import TrafficSet

SLEEP = "cluster.local/ns/foo/sa/sleep"
BAR_SLEEP = "cluster.local/ns/bar/sa/sleep"


def _http(method: str, path: str, principal: str | None = SLEEP, **kw: object) -> TrafficRecord:
    return TrafficRecord(
        "foo/httpbin",
        8000,
        Protocol.HTTP,
        principal is not None,
        source_principal=principal,
        method=method,
        path=path,
        verdict="allow",
        **kw,  # type: ignore[arg-type]
    )


def _traffic(*records: TrafficRecord) -> TrafficSet:
    traffic = TrafficSet()
    for i, record in enumerate(records):
        traffic.add_entry(record.as_dict(), "t.jsonl", i + 1)
    return traffic


def _snapshot(text: str = ""):  # type: ignore[no-untyped-def]
    return build_snapshot(load_sources([("workloads.yaml", BASE), ("p.yaml", text.encode())]))


DENY_POST = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-post, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules: [{to: [{operation: {methods: [POST]}}]}]
"""


def test_impact_lists_what_flips_grouped_by_rule() -> None:
    traffic = _traffic(
        _http("GET", "/get", time="1"),
        _http("GET", "/get", time="2"),
        _http("POST", "/post", time="3"),
        _http("POST", "/post", time="4"),
        _http("POST", "/post", BAR_SLEEP),
    )
    report = impact(traffic.distinct, compile_text(), compile_text(DENY_POST), now=NOW)
    assert (report.records, report.distinct) == (5, 3)
    groups = report.groups()
    assert [(g.direction, g.source, g.rule_after, g.records) for g in groups] == [
        ("allow→deny", BAR_SLEEP, "ns[foo]-policy[deny-post]-rule[0]", 1),
        ("allow→deny", SLEEP, "ns[foo]-policy[deny-post]-rule[0]", 2),
    ]
    back = impact(traffic.distinct, compile_text(DENY_POST), compile_text(), now=NOW)
    assert {g.direction for g in back.groups()} == {"deny→allow"}


def test_generate_allows_exactly_what_was_seen() -> None:
    records = [
        _http("GET", "/status/200"),
        _http("GET", "/status/418"),
        _http("POST", "/anything/x"),
        _http("GET", "/headers", BAR_SLEEP),
    ]
    snapshot = _snapshot()
    generated = generate_policies(snapshot, compile_text(), _traffic(*records).distinct, now=NOW)
    policy, nothing = generated.documents
    assert nothing == {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-nothing", "namespace": "foo"},
        "spec": {},
    }
    assert policy["spec"]["selector"] == {"matchLabels": {"app": "httpbin", "version": "v1"}}
    assert policy["spec"]["rules"] == [
        {
            "from": [{"source": {"principals": [BAR_SLEEP]}}],
            "to": [{"operation": {"ports": ["8000"], "methods": ["GET"], "paths": ["/headers"]}}],
        },
        {
            "from": [{"source": {"principals": [SLEEP]}}],
            "to": [
                {"operation": {"ports": ["8000"], "methods": ["POST"], "paths": ["/anything/x"]}},
                {"operation": {"ports": ["8000"], "methods": ["GET"], "paths": ["/status/{*}"]}},
            ],
        },
    ]
    mesh = compile_with(snapshot, generated.documents)
    assert decide(mesh, _http("GET", "/status/503"), NOW).allowed  # same shape
    assert not decide(mesh, _http("POST", "/status/200"), NOW).allowed  # no cross product
    assert not decide(mesh, _http("GET", "/anything/x"), NOW).allowed
    assert not decide(mesh, _http("GET", "/status/1/x"), NOW).allowed
    assert not decide(mesh, _http("GET", "/status/200", BAR_SLEEP), NOW).allowed
    assert "all 4 distinct recorded request(s)" in generated.proof[0]
    assert "nothing reaches them: foo/sleep" in generated.comments[1][1]
    text = generated.render()
    assert [d for d in yaml.safe_load_all(text) if d] == generated.documents


def test_plaintext_callers_are_allowed_by_address_only() -> None:
    tcp = TrafficRecord(
        "foo/httpbin", 8000, Protocol.TCP, False, source_ip="10.9.0.4", verdict="allow"
    )
    generated = generate_policies(_snapshot(), compile_text(), _traffic(tcp).distinct, now=NOW)
    rules = generated.documents[0]["spec"]["rules"]
    assert rules == [
        {
            "from": [{"source": {"ipBlocks": ["10.9.0.4/32"]}}],
            "to": [{"operation": {"ports": ["8000"]}}],
        }
    ]
    assert any("no identity" in line for line in generated.comments[0])
    no_ip = TrafficRecord("foo/httpbin", 8000, Protocol.TCP, False, verdict="allow")
    with pytest.raises(ProofFailed, match="without a source address"):
        generate_policies(_snapshot(), compile_text(), _traffic(no_ip).distinct, now=NOW)


ALLOW_ALL = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{}]
"""


def test_the_proof_fails_when_an_existing_policy_lets_strangers_in() -> None:
    snapshot = _snapshot(ALLOW_ALL)
    with pytest.raises(ProofFailed) as failed:
        generate_policies(
            snapshot, compile_text(ALLOW_ALL), _traffic(_http("GET", "/get")).distinct, now=NOW
        )
    assert any("unrecorded source ALLOWED" in f and "allow-all" in f for f in failed.value.failures)


def test_the_proof_fails_when_a_deny_keeps_a_recorded_request_out() -> None:
    snapshot = _snapshot(DENY_POST)
    with pytest.raises(ProofFailed, match="recorded request NOT allowed"):
        generate_policies(
            snapshot, compile_text(DENY_POST), _traffic(_http("POST", "/p")).distinct, now=NOW
        )


def test_denied_records_are_not_generated_from() -> None:
    denied = _http("DELETE", "/x")
    denied = TrafficRecord(
        **{**{f: getattr(denied, f) for f in denied.__slots__}, "verdict": "deny"}
    )  # type: ignore[arg-type]
    generated = generate_policies(
        _snapshot(), compile_text(), _traffic(_http("GET", "/get"), denied).distinct, now=NOW
    )
    assert generated.excluded == {"deny": 1}
    assert generated.used == 1


def _write(path: Path, *records: TrafficRecord) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r.as_dict()) + b"\n" for r in records))
    return path


def test_cli_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "w.yaml").write_bytes(BASE)
    change = tmp_path / "deny.yaml"
    change.write_text(DENY_POST)
    traffic = _write(tmp_path / "t.jsonl", _http("GET", "/get"), _http("POST", "/post"))
    runner = CliRunner()
    base = ["impact", "--traffic", str(traffic), "-f", str(tmp_path / "w.yaml")]
    same = runner.invoke(app, [*base, "--change", str(tmp_path / "w.yaml")])
    assert same.exit_code == 0, same.output
    table = runner.invoke(app, [*base, "--change", str(change)])
    assert table.exit_code == 1
    assert "rule after: ns[foo]-policy[deny-post]-rule[0]" in table.stdout
    assert "POST /post ×1" in table.stdout
    flips = runner.invoke(app, [*base, "--change", str(change), "-o", "json"])
    assert flips.exit_code == 1, flips.output
    report = json.loads(flips.stdout)
    assert report["flipped_records"] == 1 and report["groups"][0]["requests"][0]["path"] == "/post"
    (tmp_path / "bad.jsonl").write_text('{"schema": "trustmesh.dev/traffic/v1"}\n')
    bad = runner.invoke(
        app,
        [*base[:1], "--traffic", str(tmp_path / "bad.jsonl"), *base[3:], "--change", str(change)],
    )
    assert bad.exit_code == 2 and "bad.jsonl:1 destination" in bad.output
    unknown = _write(
        tmp_path / "u.jsonl", TrafficRecord("foo/nope", 80, Protocol.TCP, False, verdict="allow")
    )
    gone = runner.invoke(
        app,
        [
            "impact",
            "--traffic",
            str(unknown),
            "-f",
            str(tmp_path / "w.yaml"),
            "--change",
            str(change),
        ],
    )
    assert gone.exit_code == 2 and "foo/nope" in gone.output
    removed = runner.invoke(
        app, [*base, "--change", str(change), "--remove", "AuthorizationPolicy/foo/deny-post"]
    )
    assert removed.exit_code == 0, removed.output
    generated = runner.invoke(
        app, ["generate", "--traffic", str(traffic), "-f", str(tmp_path / "w.yaml")]
    )
    assert generated.exit_code == 0 and "foo-observed" not in generated.stdout
    assert "httpbin-observed" in generated.stdout
    refused = runner.invoke(
        app,
        ["generate", "--traffic", str(traffic), "-f", str(tmp_path / "w.yaml"), "-f", str(change)],
    )
    assert refused.exit_code == 1 and "no policy written" in refused.output
    assert "apiVersion" not in refused.stdout


def test_progress_only_on_a_terminal_and_only_after_a_second() -> None:
    now = [0.0]
    quiet = Console(file=io.StringIO(), force_terminal=False)
    with StepProgress("x", console=quiet, clock=lambda: now[0]) as progress:
        now[0] = 5.0
        progress(1, 2)
        assert not progress.shown
    terminal = Console(file=io.StringIO(), force_terminal=True)
    now[0] = 0.0
    with StepProgress("x", console=terminal, clock=lambda: now[0]) as progress:
        progress(1, 2)
        assert not progress.shown  # fast: nothing drawn
        now[0] = 1.5
        progress(1, 2)
        assert progress.shown


def test_export_without_a_mesh_is_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    done = CliRunner().invoke(
        app, ["traffic", "export", "--state", str(tmp_path / "none"), "-o", str(out)]
    )
    assert done.exit_code == 2 and "no mesh was started" in done.output
    assert not out.exists()


def test_export_of_istio_logs_reports_lines_without_identity(tmp_path: Path) -> None:
    from tests.insight.test_records import ISTIO

    log = tmp_path / "ratings.log"
    lines = [
        "2026-12-06T04:00:00Z info envoy starting",  # Envoy's own line: not a record
        orjson.dumps(
            {**ISTIO, "downstream_peer_uri_san": "spiffe://cluster.local/ns/default/sa/r"}
        ),
        orjson.dumps(ISTIO),  # mTLS, no identity
    ]
    log.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    out = tmp_path / "t.jsonl"
    done = CliRunner().invoke(
        app, ["traffic", "export", "--envoy-log", f"default/ratings-v1={log}", "-o", str(out)]
    )
    assert done.exit_code == 1, done.output
    assert f"{log}:3 downstream_peer_uri_san" in done.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["destination"], r["source_principal"], r["origin"]) for r in records] == [
        ("default/ratings-v1", "cluster.local/ns/default/sa/r", f"{log}:2")
    ]


def test_a_stranger_let_in_on_one_path_only_fails_the_proof() -> None:
    health = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: health-for-all, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{to: [{operation: {paths: [/status/200]}}]}]
"""
    traffic = _traffic(_http("GET", "/get"), _http("GET", "/status/200"))
    with pytest.raises(ProofFailed) as failed:
        generate_policies(_snapshot(health), compile_text(health), traffic.distinct, now=NOW)
    assert any("health-for-all" in f and "/status/200" in f for f in failed.value.failures)


def test_requests_trustmesh_cannot_decide_exactly_are_listed_not_passed(tmp_path: Path) -> None:
    from tests.unit.test_cli_dataplane import AMBIENT

    (tmp_path / "amb.yaml").write_text(AMBIENT)
    change = tmp_path / "change.yaml"
    change.write_text(AMBIENT.split("---")[-1].replace("DENY", "ALLOW"))
    record = TrafficRecord(
        "amb/httpbin",
        8080,
        Protocol.HTTP,
        True,
        source_principal="cluster.local/ns/amb/sa/curl",
        method="GET",
        path="/",
        verdict="allow",
    )
    traffic = _write(tmp_path / "t.jsonl", record)
    done = CliRunner().invoke(
        app,
        ["impact", "--traffic", str(traffic), "-f", str(tmp_path / "amb.yaml"), "--change",
         str(change), "-o", "json"],
    )  # fmt: skip
    assert done.exit_code == 1, done.output
    report = json.loads(done.stdout)
    assert report["flipped_requests"] == 0
    assert report["undecidable"][0]["before"]["verdict"] == "unsupported"


def test_generate_from_refused_records_only_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "w.yaml").write_bytes(BASE)
    refused = TrafficRecord(
        "foo/httpbin", 8000, Protocol.HTTP, False, method="GET", path="/", verdict="deny"
    )
    traffic = _write(tmp_path / "t.jsonl", refused)
    done = CliRunner().invoke(
        app, ["generate", "--traffic", str(traffic), "-f", str(tmp_path / "w.yaml")]
    )
    assert done.exit_code == 2 and "accessLogFile" in done.output
    assert "apiVersion" not in done.stdout


STRICT_FOO = """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: foo}
spec: {mtls: {mode: STRICT}}
"""
ALLOW_BAR_ONLY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bar-only, namespace: istio-system}
spec:
  rules: [{from: [{source: {namespaces: [bar]}}]}]
"""


@pytest.mark.parametrize("change", [DENY_POST, STRICT_FOO, ALLOW_BAR_ONLY, ""])
def test_skipping_unchanged_sidecars_gives_the_same_report(change: str) -> None:
    records = [
        _http("GET", "/get"),
        _http("POST", "/post"),
        _http("GET", "/get", BAR_SLEEP),
        _http("GET", "/ip", None, source_ip="10.0.0.9"),
        TrafficRecord(
            "bar/httpbin", 8000, Protocol.HTTP, True, source_principal=SLEEP, method="POST",
            path="/post", verdict="allow",
        ),
        TrafficRecord(
            "legacy/httpbin", 8000, Protocol.HTTP, False, source_ip="10.0.0.9", method="GET",
            path="/", verdict="allow",
        ),
    ]  # fmt: skip
    traffic = _traffic(*records).distinct
    before, after = compile_text(), compile_text(change)
    fast = impact(traffic, before, after, now=NOW)
    slow = impact(traffic, before, after, now=NOW, skip_unchanged=False)
    assert [(f.observed.record, f.before, f.after) for f in fast.flips] == [
        (f.observed.record, f.before, f.after) for f in slow.flips
    ]
    assert bool(fast.flips) == bool(change)


def test_unchanged_sidecars_are_not_decided() -> None:
    from trustmesh.insight.replay import UnchangedSidecars

    unchanged = UnchangedSidecars(compile_text(), compile_text(DENY_POST))
    assert unchanged("bar/httpbin") and not unchanged("foo/httpbin")
    assert not unchanged("legacy/httpbin")  # no sidecar: always decided
    assert not unchanged("foo/nope")


POD_DUMP = """apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9c-x2k9z
  namespace: foo
  labels: {app: web, pod-template-hash: 7d4b9c, security.istio.io/tlsMode: istio}
spec:
  serviceAccountName: web
  containers: [{name: web, ports: [{containerPort: 8080}]}]
"""


def test_selectors_leave_out_labels_a_rollout_changes() -> None:
    snapshot = _snapshot(POD_DUMP)
    record = TrafficRecord(
        "foo/web-7d4b9c-x2k9z", 8080, Protocol.HTTP, True, source_principal=SLEEP,
        method="GET", path="/", verdict="allow",
    )  # fmt: skip
    generated = generate_policies(
        snapshot, compile_text(POD_DUMP), _traffic(record).distinct, now=NOW
    )
    assert generated.documents[0]["spec"]["selector"] == {
        "matchLabels": {"app": "web", "security.istio.io/tlsMode": "istio"}
    }


def test_impact_notes_requests_the_current_files_decide_otherwise_than_recorded() -> None:
    refused = TrafficRecord(
        "foo/httpbin", 8000, Protocol.HTTP, True, source_principal=SLEEP, method="POST",
        path="/post", verdict="deny",
    )  # fmt: skip
    traffic = _traffic(_http("GET", "/get"), refused)
    report = impact(traffic.distinct, compile_text(), compile_text(DENY_POST), now=NOW)
    assert [(i.record.path, o.verdict) for i, o in report.mismatched] == [("/post", "allow")]


@pytest.mark.parametrize(
    "record",
    [
        _http("GET", "/get", "*"),
        _http("GET", "/get", "cluster.local/ns/foo/sa/*"),
        _http("*", "/get"),
    ],
)
def test_recorded_wildcards_are_never_written_as_wildcards(record: TrafficRecord) -> None:
    with pytest.raises(ProofFailed, match="wildcard"):
        generate_policies(_snapshot(), compile_text(), _traffic(record).distinct, now=NOW)
