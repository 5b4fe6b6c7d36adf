"""Duplicates: one object per kind/namespace/name, the last applied, with a warning."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from trustmesh.api.loader import load_sources
from trustmesh.api.snapshot import build_snapshot
from trustmesh.cli.main import app
from trustmesh.config import load_config
from trustmesh.policy.decision import Verdict

from .meshutil import BASE, ROOT, compile_text, diagnostics_of, http, policy

DENY = policy("reviews-viewer", "foo", "action: DENY\nrules: [{}]")
ALLOW = policy("reviews-viewer", "foo", "action: ALLOW\nrules: [{}]")


def test_same_name_deny_then_allow_keeps_the_last_one_with_a_warning() -> None:
    text = DENY + ALLOW
    decision = http(compile_text(text))
    assert decision.verdict is Verdict.ALLOW
    assert decision.rule == "ns[foo]-policy[reviews-viewer]-rule[0]"
    [warning] = [d for d in diagnostics_of(text) if d.code == "duplicate-resource"]
    assert not warning.is_error
    assert (warning.location.file, warning.location.line) == ("policy.yaml", 10)
    assert "policy.yaml:1 and at policy.yaml:10" in warning.message
    assert "AuthorizationPolicy foo/reviews-viewer" in warning.message
    assert http(compile_text(ALLOW + DENY)).verdict is Verdict.DENY


def test_across_files_the_later_file_wins_and_both_files_are_named() -> None:
    loaded = load_sources([("a.yaml", DENY.encode()), ("b.yaml", ALLOW.encode())])
    [kept] = [r for r in loaded.resources if r.name == "reviews-viewer"]
    assert kept.file == "b.yaml"
    assert kept.spec.action.value == "ALLOW"
    [warning] = loaded.diagnostics
    assert "a.yaml:1 and at b.yaml:1" in warning.message
    assert [r.file for r in loaded.replaced] == ["a.yaml"]


def test_an_explicit_default_namespace_is_the_same_object_as_an_implied_one() -> None:
    implied = ALLOW.replace("  namespace: foo\n", "")
    explicit = DENY.replace("namespace: foo", "namespace: default")
    loaded = load_sources([("x.yaml", (implied + explicit).encode())])
    assert len(loaded.resources) == 1
    assert loaded.resources[0].spec.action.value == "DENY"


def test_cluster_scoped_namespaces_dedupe_by_name_and_the_last_labels_apply() -> None:
    namespace = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: foo\n  labels: {{{}}}\n---\n"
    text = namespace.format("istio-injection: disabled")
    loaded = load_sources([("workloads.yaml", BASE), ("ns.yaml", text.encode())])
    snapshot = build_snapshot(loaded)
    assert snapshot.namespace_labels["foo"] == {"istio-injection": "disabled"}
    assert [r.name for r in snapshot.of_kind("Namespace")].count("foo") == 1
    httpbin = snapshot.workload("foo/httpbin")
    assert httpbin is not None and not httpbin.has_sidecar


def test_different_kinds_or_namespaces_with_one_name_are_different_objects() -> None:
    peer = policy("reviews-viewer", "foo", "mtls: {mode: STRICT}", kind="PeerAuthentication")
    other_ns = ALLOW.replace("namespace: foo", "namespace: bar")
    loaded = load_sources([("x.yaml", (DENY + peer + other_ns).encode())])
    assert len(loaded.resources) == 3
    assert loaded.diagnostics == []


def test_the_object_keeps_its_first_position_for_oldest_wins() -> None:
    """kubectl apply updates an object in place: it stays as old as its first apply."""
    a1 = policy("a", "foo", "mtls: {mode: STRICT}", kind="PeerAuthentication")
    b = policy("b", "foo", "mtls: {mode: DISABLE}", kind="PeerAuthentication")
    a2 = policy("a", "foo", "mtls: {mode: PERMISSIVE}", kind="PeerAuthentication")
    mesh = compile_text(a1 + b + a2)
    workload = mesh.for_workload("foo/httpbin")
    assert workload is not None
    assert workload.mtls.workload.mode.value == "PERMISSIVE"
    assert workload.mtls.workload.policy == "foo/a"


def test_a_replaced_document_is_still_validated() -> None:
    broken = policy("reviews-viewer", "foo", "action: DENY")  # DENY without rules
    problems = diagnostics_of(broken + ALLOW)
    assert [d.code for d in problems if d.is_error] == ["rules-required"]


def test_unread_kinds_are_deduplicated_too() -> None:
    envoy_filter = (
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        "metadata: {{name: ef, namespace: foo}}\nspec: {{priority: {}}}\n---\n"
    )
    text = envoy_filter.format(1) + envoy_filter.format(2)
    loaded = load_sources([("x.yaml", text.encode())])
    [kept] = loaded.unknown
    assert kept.body["spec"]["priority"] == 2
    assert [d.code for d in loaded.diagnostics] == ["duplicate-resource"]


def test_every_consumer_sees_one_resource(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(DENY)
    (tmp_path / "b.yaml").write_text(ALLOW)
    config = load_config([str(ROOT / "examples" / "mesh"), str(tmp_path)])
    assert [r.key for r in config.snapshot.of_kind("AuthorizationPolicy")] == [
        "AuthorizationPolicy/foo/reviews-viewer"
    ]
    runner = CliRunner()
    files = ["-f", str(ROOT / "examples" / "mesh"), "-f", str(tmp_path)]
    request = ["--from", "foo/sleep", "--to", "foo/httpbin", "--port", "8000"]
    checked = runner.invoke(app, ["authz", "check", *files, *request])
    assert checked.exit_code == 0, checked.output
    validated = runner.invoke(app, ["validate", "-f", str(tmp_path)])
    assert validated.exit_code == 0
    assert f"{tmp_path / 'a.yaml'}:1 and at {tmp_path / 'b.yaml'}:1" in validated.output
