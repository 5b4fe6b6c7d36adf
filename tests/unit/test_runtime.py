"""The local runtime's pure parts: the pod plan, outcome classification, PID safety, CLI
errors. (The processes themselves are exercised in tests/e2e.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trustmesh.api.policytest import Expectation
from trustmesh.cli.main import app
from trustmesh.config import load_config, load_sources
from trustmesh.policy.testing import Outcome, check
from trustmesh.runtime import live
from trustmesh.runtime.client import HttpResult
from trustmesh.runtime.layout import Layout, write_json
from trustmesh.runtime.plan import plan_mesh
from trustmesh.runtime.recorded import stop_recorded

from .meshutil import ROOT

MESH = ROOT / "examples" / "mesh"
runner = CliRunner()


def _plan(text: str = ""):  # type: ignore[no-untyped-def]
    loaded = load_config([str(MESH)]) if not text else None
    if loaded is None:
        from trustmesh.api.snapshot import build_snapshot

        return plan_mesh(build_snapshot(load_sources([("pods.yaml", text.encode())]), ()))
    return plan_mesh(loaded.snapshot)


# ---------------------------------------------------------------------------- plan


def test_each_pod_gets_its_addresses_command_and_environment() -> None:
    plan, problems = _plan()
    assert problems == [] and plan is not None
    httpbin, legacy = plan.pod("foo/httpbin"), plan.pod("legacy/httpbin")
    assert httpbin is not None and legacy is not None
    assert httpbin.sidecar and not legacy.sidecar
    # Three addresses with a sidecar (Envoy inbound, app, outbound listeners), one without.
    assert (httpbin.pod_ip, httpbin.app_ip, httpbin.outbound_ip) == (
        "127.10.0.1",
        "127.10.0.2",
        "127.10.0.3",
    )
    assert legacy.app_ip == legacy.pod_ip and legacy.outbound_ip is None
    assert httpbin.command == ("trustmesh", "sample", "httpbin")
    assert httpbin.env["HOST"] == "127.10.0.2" and httpbin.env["PORT"] == "8000"
    assert httpbin.env["HTTP_PROXY"] == "http://127.10.0.3:15001"
    assert "HTTP_PROXY" not in legacy.env and legacy.env["HOST"] == legacy.pod_ip
    # kube-proxy's part: every name of a service port reaches its endpoint's pod IP.
    for name in ("httpbin.foo", "httpbin.foo.svc", "httpbin.foo.svc.cluster.local"):
        (target,) = plan.services[f"{name}:8000"]
        assert (target.pod, target.address, target.port) == ("foo/httpbin", "127.10.0.1", 8000)
    assert plan.trust_domain == "cluster.local"


def test_container_env_overrides_the_defaults() -> None:
    plan, _ = _plan(
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        command: [./serve]
        args: [--verbose]
        env: [{name: PORT, value: "9999"}, {name: MODE, value: demo}]
        ports: [{containerPort: 8080}]
"""
    )
    assert plan is not None
    (pod,) = plan.pods
    assert pod.command == ("./serve", "--verbose")
    assert pod.env["PORT"] == "9999" and pod.env["MODE"] == "demo"


def test_an_unknown_image_without_a_command_is_an_error_at_its_image_line() -> None:
    plan, problems = _plan(
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  template:
    spec:
      containers:
      - name: web
        image: nginx
"""
    )
    assert plan is None
    (problem,) = problems
    assert problem.code == "unknown-image"
    assert problem.location.file == "pods.yaml" and problem.location.line == 10
    assert problem.location.field == "spec.template.spec.containers[0].image"
    assert "'nginx'" in problem.message and "--image IMAGE=COMMAND" in problem.message


def test_a_container_with_neither_command_nor_image_is_an_error_at_its_command() -> None:
    plan, problems = _plan(
        """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec:
  containers:
  - name: web
"""
    )
    assert plan is None
    (problem,) = problems
    assert problem.code == "no-command"
    assert problem.location.line == 7
    assert problem.location.field == "spec.containers[0].command"


def test_the_address_base_must_be_a_loopback_block() -> None:
    loaded = load_config([str(MESH)])
    for base in ("10.0.0.0", "127.10.0.5", "not-an-ip"):
        plan, problems = plan_mesh(loaded.snapshot, base=base)
        assert plan is None and problems[0].code == "bad-address-base"


# ---------------------------------------------------------------------------- outcomes


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (200, b"{}", "allow"),
        (404, b"not found", "allow"),  # the app's answer: the mesh let it through
        (401, b"Jwt verification fails", "unauthenticated"),
        (403, b"RBAC: access denied", "deny"),
        (400, b"Bad Request", "bad-request"),
        (502, b"", "deny"),  # REGISTRY_ONLY's answer for an unknown host
        (503, b"upstream connect error or disconnect/reset before headers", "reset"),
    ],
)
def test_http_answers_map_to_verdicts(status: int, body: bytes, verdict: str) -> None:
    assert live._http_outcome(HttpResult(status, "", (), body)).verdict == verdict


def test_a_reset_connection_is_a_reset() -> None:
    outcome = live._http_outcome(HttpResult(reset=True, why="ConnectionResetError"))
    assert outcome.verdict == "reset" and not outcome.rule_known


def test_the_access_log_names_the_denying_rule_and_dry_run_results() -> None:
    denied = live._http_outcome(HttpResult(403, "", (), b"RBAC: access denied"))
    entry = {
        "response_code_details": "rbac_access_denied_matched_policy[ns[foo]-policy[x]-rule[0]]",
        "rbac": {"istio_dry_run_deny_shadow_engine_result": "denied"},
    }
    logged = live._with_log(denied, entry)
    assert logged.rule == "ns[foo]-policy[x]-rule[0]" and logged.dry_run == {"denied"}
    allowed = live._with_log(
        live._http_outcome(HttpResult(200, "", (), b"{}")),
        {"response_code_details": "via_upstream", "rbac": '{"enforced_effective_policy_id":"p"}'},
    )
    assert allowed.rule == "p" and allowed.rule_known


def test_egress_the_host_cannot_complete_is_judged_by_the_client_sidecar() -> None:
    unreachable = Outcome("reset", None, None, None, None, "closed", rule_known=False)
    left = live._egress(
        unreachable, {"upstream_cluster": "outbound|443||www.google.com", "response_flags": "UF"}
    )
    assert left.verdict == "allow" and not left.status_known
    blocked = live._egress(
        unreachable, {"upstream_cluster": "BlackHoleCluster", "response_flags": "UH"}
    )
    assert blocked.verdict == "reset"
    assert live._egress(unreachable, None) == unreachable


def test_unobserved_fields_are_not_checked_but_offline_ones_are() -> None:
    expect = Expectation(verdict="allow", status=200, rule="r")
    unobserved = Outcome("allow", None, None, None, None, rule_known=False, status_known=False)
    assert check(unobserved, expect) == []
    offline_none = Outcome("allow", 200, None, frozenset(), {})  # offline: no rule decided
    assert check(offline_none, expect) == ["expected rule r, got None"]


# ---------------------------------------------------------------------------- PIDs, CLI


def test_stop_recorded_never_signals_a_process_the_mesh_did_not_start(tmp_path: Path) -> None:
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        layout = Layout(tmp_path / "state")
        record = {"pods": {"foo/x": {"app_pid": stranger.pid}}, "control_plane": {}}
        assert stop_recorded(record, layout) == 0
        assert stranger.poll() is None  # still running: its PID is not this mesh's
    finally:
        stranger.kill()
        stranger.wait()


def _sleeper(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A process with ``env`` that has exec'd (until then /proc shows its parent's
    environment): it says so before sleeping."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
        env=env,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stdout.readline() == b"up\n"
    return process


def test_stop_recorded_kills_its_own_processes(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "state")
    env = {"TRUSTMESH_MESH": str(layout.root), "PATH": "/usr/bin:/bin"}
    own = _sleeper(env)
    try:
        assert stop_recorded({"pods": {"foo/x": {"app_pid": own.pid}}}, layout) == 1
        assert own.wait(timeout=5) != 0
    finally:
        own.kill()


def test_commands_without_a_mesh_say_so(tmp_path: Path) -> None:
    state = str(tmp_path / "none")
    for args in (["status"], ["down"], ["logs", "foo/httpbin"], ["proxy-config", "foo/httpbin"]):
        result = runner.invoke(app, [*args, "--state", state])
        assert result.exit_code == 1, args
        assert "no mesh was started" in result.output and "Traceback" not in result.output


def test_up_refuses_invalid_configuration_with_locations(tmp_path: Path) -> None:
    bad = tmp_path / "mesh"
    bad.mkdir()
    (bad / "policy.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: foo}\nspec:\n  action: MAYBE\n"
    )
    result = runner.invoke(
        app, ["up", "--isolation", "process", str(bad), "--state", str(tmp_path / "state")]
    )
    assert result.exit_code == 1
    assert "policy.yaml:5" in result.output and "spec.action" in result.output
    assert "Traceback" not in result.output


def test_request_names_unknown_pods(tmp_path: Path) -> None:
    state = tmp_path / "state"
    layout = Layout(state)
    layout.create()
    plan, _ = _plan()
    assert plan is not None
    write_json(layout.plan, plan.to_json())
    write_json(layout.mesh, {"state": "ready", "pods": {}})
    result = runner.invoke(
        app, ["request", "--from", "foo/nope", "http://x", "--state", str(state)]
    )
    assert result.exit_code == 1 and "no pod 'foo/nope'" in result.output


def test_up_refuses_a_state_directory_inside_the_configuration(tmp_path: Path) -> None:
    config = tmp_path / "mesh"
    config.mkdir()
    (config / "workloads.yaml").write_text((MESH / "workloads.yaml").read_text())
    result = runner.invoke(
        app, ["up", "--isolation", "process", str(config), "--state", str(config / ".trustmesh")]
    )
    assert result.exit_code == 1
    assert "inside the configuration directory" in result.output
    assert not (config / ".trustmesh" / "mesh.json").exists()  # nothing was started


def test_a_live_case_that_does_not_fit_the_mesh_fails_with_why(tmp_path: Path) -> None:
    import asyncio

    from trustmesh.api.policytest import Case

    loaded = load_config([str(MESH)])
    plan, _ = plan_mesh(loaded.snapshot)
    assert plan is not None and loaded.mesh is not None
    case = Case.model_validate(
        {
            "name": "to a pod that is not running",
            "from": {"workload": "foo/sleep"},
            "to": {"workload": "foo/nope", "port": 8000},
            "request": {"path": "/"},
            "expect": "allow",
        }
    )
    runner_ = live.LiveRunner(plan, Layout(tmp_path))
    (result,) = asyncio.run(runner_.run(loaded.mesh, [("suite", [("t.yaml", case)])]))
    assert not result.passed and not result.not_run
    assert "cannot be sent in this mesh" in result.failures[0] and "foo/nope" in result.failures[0]


def test_status_shows_no_pid_of_a_process_that_is_not_running(tmp_path: Path) -> None:
    """After `down` (or a crash) the record keeps old PIDs: one that exited, one reused
    by another program. Neither is shown as this mesh's running process."""
    state = tmp_path / "state"
    layout = Layout(state)
    layout.create()
    plan, _ = _plan()
    assert plan is not None
    write_json(layout.plan, plan.to_json())
    exited = subprocess.Popen([sys.executable, "-c", "pass"], env={"TRUSTMESH_MESH": str(state)})
    exited.wait()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    own = _sleeper({"TRUSTMESH_MESH": str(state)})
    try:
        pods = {
            "foo/httpbin": {"status": "running", "app_pid": exited.pid, "envoy_pid": stranger.pid},
            "foo/sleep": {"status": "running", "app_pid": own.pid, "envoy_pid": stranger.pid},
        }
        record = {"state": "stopped", "supervisor_pid": exited.pid, "pods": pods}
        write_json(layout.mesh, record)
        table = runner.invoke(app, ["status", "--state", str(state)])
        assert table.exit_code == 0, table.output
        rows = {line.split()[0]: line for line in table.output.splitlines() if "/" in line}
        for pid in (exited.pid, stranger.pid):
            assert str(pid) not in table.output
        assert rows["foo/httpbin"].split()[-1] == "stopped"
        assert str(own.pid) in rows["foo/sleep"]  # still running: shown, and what is gone
        assert rows["foo/sleep"].endswith("not running: envoy")
        as_json = json.loads(
            runner.invoke(app, ["status", "--state", str(state), "-o", "json"]).stdout
        )
        assert as_json["running"]["foo/httpbin"] == {"app": None, "sidecar": None, "envoy": None}
        assert as_json["running"]["foo/sleep"]["app"] == own.pid
    finally:
        for process in (stranger, own):
            process.kill()
            process.wait()


def test_up_refuses_addresses_another_program_listens_on_before_starting_anything(
    tmp_path: Path,
) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.56.0.1", 8000))  # foo/httpbin's pod address in that block
        squatter.listen()
        state = tmp_path / "state"
        result = runner.invoke(
            app,
            [
                "up",
                "--isolation",
                "process",
                str(MESH),
                "--base",
                "127.56.0.0",
                "--state",
                str(state),
            ],
        )
    assert result.exit_code == 1
    assert "127.56.0.1:8000 is already in use by pid" in result.output
    assert "start this mesh with another --base" in result.output
    assert not (state / "plan.json").exists()  # nothing was started


@pytest.mark.parametrize(("method", "interim"), [("HEAD", False), ("GET", False), ("GET", True)])
def test_a_head_answer_has_no_body_whatever_its_content_length(method: str, interim: bool) -> None:
    """Envoy answers HEAD with the Content-Length a GET would get and keeps the
    connection open: the client must not wait for a body (that was a 'reset')."""
    import asyncio

    from trustmesh.runtime.client import http_request, outside_pod
    from trustmesh.runtime.plan import MeshPlan

    async def scenario() -> HttpResult:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await reader.readuntil(b"\r\n\r\n")
            body = b"" if request.startswith(b"HEAD ") else b"x" * 19
            writer.write(
                (b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b"")
                + b"HTTP/1.1 403 Forbidden\r\ncontent-length: 19\r\n\r\n"
                + body
            )
            await writer.drain()
            await asyncio.sleep(30)  # like a keep-alive proxy: the connection stays open

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await http_request(
                MeshPlan((), "cluster.local"),
                outside_pod(),
                f"http://127.0.0.1:{port}/status/403",
                method=method,
                timeout=3,
            )
        finally:
            server.close()

    result = asyncio.run(scenario())
    assert not result.reset, result.why
    assert (result.status, result.body) == (403, b"" if method == "HEAD" else b"x" * 19)
    assert live._http_outcome(result).verdict == "deny"


def test_ca_revoke_refuses_what_is_not_a_serial(tmp_path: Path) -> None:
    for serial in ("zz", "0", "12 34", "0x"):
        result = runner.invoke(app, ["ca", "revoke", serial, "--dir", str(tmp_path)])
        assert result.exit_code == 2, (serial, result.output)
        assert "is not a certificate serial" in result.output
        assert "Traceback" not in result.output


def test_an_address_block_is_claimed_once_and_freed_with_its_holder(tmp_path: Path) -> None:
    from trustmesh.runtime.addresses import AddressConflict, claim_block

    first = claim_block("127.60.0.0", tmp_path / "first", claims_dir=tmp_path / "claims")
    with pytest.raises(AddressConflict) as taken:
        claim_block("127.60.0.0", tmp_path / "second", claims_dir=tmp_path / "claims")
    assert str(taken.value).startswith(
        f"addresses 127.60.0.0/16 are used by the mesh running from {tmp_path / 'first'} (pid "
    )
    other = claim_block("127.61.0.0", tmp_path / "second", claims_dir=tmp_path / "claims")
    first.release()
    again = claim_block("127.60.0.0", tmp_path / "second", claims_dir=tmp_path / "claims")
    for claim in (other, again):
        claim.release()
