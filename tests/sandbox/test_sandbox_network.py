"""Real namespaces from the example mesh's plan: capture, the proxy's exemption, kube-proxy
DNAT, names, an app's missing privileges, and a teardown that leaves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sandbox.conftest import requires_root
from tests.sandbox.hoststate import host_state
from tests.unit.meshutil import ROOT
from trustmesh.config import load_config
from trustmesh.runtime.capture import PROXY_UID
from trustmesh.runtime.interpreter import SandboxPython, sandbox_python
from trustmesh.runtime.plan import Isolation, MeshPlan, PodPlan, plan_mesh
from trustmesh.runtime.podexec import podexec_argv
from trustmesh.runtime.sandbox import Sandbox, mesh_id

pytestmark = requires_root
PROBE = str(Path(__file__).with_name("probe.py"))
_PYTHON = sandbox_python()
PYTHON = _PYTHON if not isinstance(_PYTHON, str) else SandboxPython(sys.executable)
ENV = {**os.environ, **PYTHON.env}


@dataclass
class Net:
    plan: MeshPlan
    sandbox: Sandbox
    processes: list[subprocess.Popen[str]]

    def pod(self, ref: str) -> PodPlan:
        pod = self.plan.pod(ref)
        assert pod is not None
        return pod

    def argv(self, ref: str, *command: str, uid: int | None = None) -> list[str]:
        pod = self.pod(ref)
        assert pod.netns is not None
        return podexec_argv(
            sys.executable,
            pod.netns,
            list(command),
            uid=pod.uid if uid is None else uid,
            hosts=str(self.sandbox.hosts(pod)),
            resolv=str(self.sandbox.resolv(pod)),
        )

    def start(self, ref: str, *ports: int, uid: int | None = None) -> None:
        argv = self.argv(ref, PYTHON.executable, PROBE, "listen", *map(str, ports), uid=uid)
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=ENV)
        self.processes.append(process)
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"

    def run(
        self, ref: str, *command: str, uid: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(ref, *command, uid=uid)
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=20, check=False, env=ENV
        )

    def connect(self, ref: str, host: str, port: int, uid: int | None = None) -> dict[str, str]:
        done = self.run(ref, PYTHON.executable, PROBE, "connect", host, str(port), uid=uid)
        assert done.returncode == 0, done.stderr
        answer: dict[str, str] = json.loads(done.stdout)
        return answer


def _plan(state: Path) -> MeshPlan:
    loaded = load_config([str(ROOT / "examples" / "mesh")])
    plan, problems = plan_mesh(loaded.snapshot, isolation=Isolation.NETNS, mesh_id=mesh_id(state))
    assert plan is not None, problems
    return plan


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    state = tmp_path_factory.mktemp("sandbox-state")
    plan = _plan(state)
    sandbox = Sandbox(plan, state)
    running = Net(plan, sandbox, [])
    try:
        sandbox.build()
        # Fake sidecars (uid 1337 on the capture ports) and an app on httpbin's port.
        for ref in ("foo/httpbin", "foo/sleep", "bar/httpbin"):
            running.start(ref, 15001, 15006, uid=PROXY_UID)
        running.start("foo/httpbin", 8000)
        yield running
    finally:
        for process in running.processes:
            process.kill()
            process.wait()
        assert sandbox.teardown() == []


def test_inbound_traffic_is_redirected_to_the_sidecar(net: Net) -> None:
    httpbin = net.pod("foo/httpbin")
    answer = net.connect("legacy/sleep", httpbin.pod_ip, 8000)
    # Envoy's inbound port took it, not the app listening on 8000
    assert answer["port"] == 15006
    assert answer["original"] == f"{httpbin.pod_ip}:8000"
    assert answer["peer"].startswith(net.pod("legacy/sleep").pod_ip + ":")


def test_an_apps_outbound_traffic_goes_to_its_own_sidecar(net: Net) -> None:
    cluster_ip = net.plan.cluster_ips["httpbin.foo.svc.cluster.local"]
    answer = net.connect("foo/sleep", "httpbin", 8000)  # a short name, as the app writes it
    assert answer["port"] == 15001
    assert answer["original"] == f"{cluster_ip}:8000"
    # also to an address no Service has: still the sidecar (REGISTRY_ONLY decides there)
    answer = net.connect("foo/sleep", "10.88.250.99", 7000)
    assert answer["port"] == 15001 and answer["original"] == "10.88.250.99:7000"


def test_the_proxy_uid_is_not_captured_on_the_way_out(net: Net) -> None:
    httpbin = net.pod("foo/httpbin")
    answer = net.connect("foo/sleep", httpbin.pod_ip, 8000, uid=PROXY_UID)
    # straight to httpbin's pod, whose inbound capture takes it: not foo/sleep's 15001
    assert answer["port"] == 15006
    assert answer["peer"].startswith(net.pod("foo/sleep").pod_ip + ":")


def test_a_pod_without_sidecar_reaches_a_service_through_kube_proxy_dnat(net: Net) -> None:
    httpbin = net.pod("foo/httpbin")
    answer = net.connect("legacy/sleep", "httpbin.foo.svc.cluster.local", 8000)
    assert answer["port"] == 15006
    assert answer["original"] == f"{httpbin.pod_ip}:8000"


def test_names_resolve_as_in_a_cluster(net: Net) -> None:
    ips = net.plan.cluster_ips
    foo, bar = ips["httpbin.foo.svc.cluster.local"], ips["httpbin.bar.svc.cluster.local"]
    for ref, name, expected in [
        ("foo/sleep", "httpbin", foo),
        ("foo/sleep", "httpbin.bar", bar),
        ("foo/sleep", "httpbin.bar.svc", bar),
        ("bar/sleep", "httpbin", bar),
        ("legacy/sleep", "httpbin.foo.svc.cluster.local", foo),
    ]:
        done = net.run(ref, PYTHON.executable, PROBE, "resolve", name)
        assert done.stdout.strip() == expected, (ref, name, done.stdout, done.stderr)
    # a short name is the pod's own namespace's Service; an unknown name fails at once
    legacy = ips["httpbin.legacy.svc.cluster.local"]
    done = net.run("legacy/sleep", PYTHON.executable, PROBE, "resolve", "httpbin")
    assert done.stdout.strip() == legacy != foo
    done = net.run("legacy/sleep", PYTHON.executable, PROBE, "resolve", "nothing.example")
    assert done.stdout.startswith("error"), done.stdout


def test_an_app_cannot_change_its_namespaces_rules(net: Net) -> None:
    pod = net.pod("foo/sleep")
    for command in (["nft", "add", "table", "ip", "evil"], ["nft", "flush", "ruleset"]):
        done = net.run("foo/sleep", *command)
        assert done.returncode != 0
        assert "Operation not permitted" in done.stderr, done.stderr
    assert pod.netns is not None
    listed = subprocess.run(
        ["ip", "netns", "exec", pod.netns, "nft", "list", "tables"], capture_output=True, text=True
    )
    assert listed.stdout.split() == ["table", "ip", "trustmesh"]
    # and it runs as its own user, without capabilities, with no_new_privs
    status = net.run("foo/sleep", "cat", "/proc/self/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == str(pod.uid) and pod.uid != 0
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"


def test_teardown_leaves_nothing_also_after_a_crash(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    plan = _plan(state)
    before = host_state(plan.mesh_id)
    sandbox = Sandbox(plan, state)
    try:
        sandbox.build()
        during = host_state(plan.mesh_id)
        assert len(during["netns"]) == len(plan.pods) + 1  # type: ignore[arg-type]
        assert during["run_dir"]
        # A crash: the object is lost; a new one over the same state finds the ledger.
        del sandbox
        assert Sandbox(plan, state).teardown() == []
        assert host_state(plan.mesh_id) == before
        assert not (state / "ledger.jsonl").exists()
        # idempotent: nothing listed, nothing to do
        assert Sandbox(plan, state).teardown() == []
    finally:
        Sandbox(plan, state).teardown()
