"""The command line: exit codes, JSON shapes, and no traceback on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from trustmesh.cli.main import app

from .meshutil import ROOT

MESH = str(ROOT / "examples" / "mesh")
SCENARIOS = ROOT / "examples" / "scenarios"
runner = CliRunner()


def invoke(*args: str, stdin: str | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), input=stdin)


def test_authz_check_json_names_the_deciding_rule() -> None:
    config = str(SCENARIOS / "02-deny-get" / "config.yaml")
    result = invoke(
        "authz",
        "check",
        "-f",
        MESH,
        "-f",
        config,
        "--from",
        "foo/sleep",
        "--to",
        "foo/httpbin",
        "--port",
        "8000",
        "--path",
        "/get",
        "-o",
        "json",
    )
    assert result.exit_code == 3, result.output
    body = json.loads(result.stdout)
    assert {"verdict", "status", "rule", "dry_run", "trace"} <= body.keys()
    assert (body["verdict"], body["status"]) == ("deny", 403)
    assert body["rule"] == "ns[foo]-policy[deny-method-get]-rule[0]"
    allowed = invoke(
        "authz",
        "check",
        "-f",
        MESH,
        "-f",
        config,
        "--from",
        "foo/sleep",
        "--to",
        "foo/httpbin",
        "--method",
        "POST",
        "--path",
        "/post",
    )
    assert allowed.exit_code == 0
    assert allowed.stdout.startswith("ALLOW 200")


def test_authz_check_tcp_and_plaintext_and_stdin() -> None:
    policy = (SCENARIOS / "12-mesh-strict" / "config.yaml").read_text()
    result = invoke(
        "authz",
        "check",
        "-f",
        MESH,
        "-f",
        "-",
        "--plaintext",
        "--to",
        "foo/tcp-echo",
        "--port",
        "9000",
        "--tcp",
        "-o",
        "json",
        stdin=policy,
    )
    assert json.loads(result.stdout)["verdict"] == "reset"


def test_authz_check_usage_errors_exit_2() -> None:
    both = invoke(
        "authz", "check", "-f", MESH, "--plaintext", "--from", "foo/sleep", "--to", "foo/httpbin"
    )
    assert both.exit_code == 2
    unknown = invoke("authz", "check", "-f", MESH, "--plaintext", "--to", "foo/nope")
    assert unknown.exit_code == 2
    assert "no workload or Service foo/nope" in unknown.output


def test_test_command_passes_and_fails(tmp_path: Path) -> None:
    scenario = SCENARIOS / "02-deny-get"
    ok = invoke(
        "test", "-f", MESH, "-f", str(scenario / "config.yaml"), str(scenario / "test.yaml")
    )
    assert ok.exit_code == 0, ok.output
    assert "2 passed, 0 failed" in ok.output
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        (scenario / "test.yaml").read_text().replace("verdict: allow", "verdict: deny")
    )
    failed = invoke(
        "test", "-f", MESH, "-f", str(scenario / "config.yaml"), str(wrong), "-o", "json"
    )
    assert failed.exit_code == 1
    body = json.loads(failed.stdout)
    assert (body["passed"], body["failed"]) == (1, 1)
    bad_case = next(c for c in body["cases"] if not c["passed"])
    assert bad_case["failures"] == ["expected deny, got allow (no ALLOW policy applies)"]
    assert bad_case["decision"]["trace"]


def test_validate_reports_every_problem_with_location(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(
        b"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n"
        b"spec:\n  action: DENY\n---\nkey: [oops\n---\n"
        b"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: b}\n"
        b"spec:\n  mtls: {mode: STRICTER}\n"
    )
    result = invoke("validate", "-f", str(bad), "-o", "json")
    assert result.exit_code == 1
    found = {(d["line"], d["field"], d["code"]) for d in json.loads(result.stdout)["diagnostics"]}
    assert found == {
        (5, "spec.rules", "rules-required"),
        (7, "", "yaml-syntax"),
        (13, "spec.mtls.mode", "invalid-field"),
    }


def test_console_script_prints_no_traceback_on_garbage(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(b"\xff\xfe\x00apiVersion: [\n" + b"{" * 5000)
    proc = subprocess.run(
        [sys.executable, "-m", "trustmesh", "validate", "-f", str(garbage)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "garbage.yaml:1" in proc.stdout


def test_policy_tests_in_a_config_directory_run_once_and_each_case_has_its_line(
    tmp_path: Path,
) -> None:
    """`test -f dir dir` (config and tests side by side) runs each case once, located at
    its own line — also in the second document of a file."""
    scenario = SCENARIOS / "02-deny-get"
    folder = tmp_path / "mesh"
    folder.mkdir()
    (folder / "workloads.yaml").write_text((ROOT / "examples/mesh/workloads.yaml").read_text())
    (folder / "policy.yaml").write_text((scenario / "config.yaml").read_text())
    suite = (scenario / "test.yaml").read_text()
    (folder / "test.yaml").write_text(suite + "---\n" + suite.replace("deny-method-get}", "again}"))
    lines = (folder / "test.yaml").read_text().splitlines()
    expected = [
        f"{folder / 'test.yaml'}:{n} spec.cases[{i % 2}]"
        for i, n in enumerate(n + 1 for n, line in enumerate(lines) if line.startswith("  - name:"))
    ]
    assert len(expected) == 4
    for tests in (
        [str(folder)],
        [str(folder), str(folder / "test.yaml")],
        [str(folder / "test.yaml")],
    ):
        result = invoke("test", "-f", str(folder), *tests, "-o", "json")
        assert result.exit_code == 0, result.output
        body = json.loads(result.stdout)
        assert (body["passed"], body["failed"]) == (4, 0)
        assert [c["location"] for c in body["cases"]] == expected
    # a config document in a test path that is not configuration is still refused
    stray = tmp_path / "stray.yaml"
    stray.write_text((scenario / "config.yaml").read_text())
    refused = invoke("test", "-f", str(folder), str(stray))
    assert refused.exit_code == 1
    assert "AuthorizationPolicy in a test file: pass config with -f" in refused.output
