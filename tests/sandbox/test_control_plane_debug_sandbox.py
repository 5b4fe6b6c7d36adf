"""The control plane in the sandbox's node namespace (as root, as the runtime starts it):
its debug endpoint is the same 0600 Unix socket, read from the host's namespace by its
owner, and neither a pod's app nor its proxy reaches it — no TCP port of the control plane
serves it, and the socket refuses their users."""

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
from tests.unit.localaccess import listening_ports
from tests.unit.meshutil import ROOT
from trustmesh.config import load_config
from trustmesh.runtime import debug_client
from trustmesh.runtime.capture import PROXY_UID
from trustmesh.runtime.control_plane import ARGS_FILE
from trustmesh.runtime.interpreter import SandboxPython, sandbox_python
from trustmesh.runtime.layout import Layout, write_json
from trustmesh.runtime.plan import Isolation, MeshPlan, plan_mesh
from trustmesh.runtime.podexec import podexec_argv
from trustmesh.runtime.sandbox import Sandbox, mesh_id

pytestmark = requires_root
_PYTHON = sandbox_python()
PYTHON = _PYTHON if not isinstance(_PYTHON, str) else SandboxPython(sys.executable)
ENV = {**os.environ, **PYTHON.env}
# What a process in a pod observes connecting to a Unix socket path, or a TCP address.
CONNECT = """
import json, socket, sys
kind, target = sys.argv[1], sys.argv[2]
family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
address = target if kind == "unix" else (target.rpartition(":")[0], int(target.rpartition(":")[2]))
with socket.socket(family, socket.SOCK_STREAM) as sock:
    sock.settimeout(5)
    try:
        sock.connect(address)
    except OSError as exc:
        print(json.dumps({"errno": exc.errno}))
    else:
        sock.sendall(b"GET /debug/syncz HTTP/1.1\\r\\nhost: x\\r\\n\\r\\n")
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            pass
        print(json.dumps({"answer": answer.decode("latin-1")}))
"""


@dataclass
class Node:
    plan: MeshPlan
    sandbox: Sandbox
    state: Path
    control_plane: dict[str, object]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    state = tmp_path_factory.mktemp("cp-debug-state")
    loaded = load_config([str(ROOT / "examples" / "mesh")])
    plan, problems = plan_mesh(loaded.snapshot, isolation=Isolation.NETNS, mesh_id=mesh_id(state))
    assert plan is not None, problems
    layout = Layout(state)
    layout.create()
    write_json(layout.plan, plan.to_json())
    write_json(
        state / ARGS_FILE,
        {"config": [str(ROOT / "examples" / "mesh")], "mesh_config": [], "ports": {}},
    )
    sandbox = Sandbox(plan, state)
    process: subprocess.Popen[str] | None = None
    try:
        sandbox.build()
        command = [sys.executable, "-m", "trustmesh.runtime.control_plane", str(state)]
        process = subprocess.Popen(
            podexec_argv(sys.executable, plan.node_netns, command),
            stdout=subprocess.PIPE,
            stderr=(state / "logs" / "control-plane.log").open("wb"),
            text=True,
        )
        assert process.stdout is not None
        info = json.loads(process.stdout.readline() or '{"ready": false}')
        log = (state / "logs" / "control-plane.log").read_text
        assert info.get("ready"), f"{info}\n{log()}"
        yield Node(plan, sandbox, state, info)
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        assert sandbox.teardown() == []


def _in_pod(node: Node, ref: str, uid: int, kind: str, target: str) -> dict[str, object]:
    pod = node.plan.pod(ref)
    assert pod is not None and pod.netns is not None
    argv = podexec_argv(
        sys.executable,
        pod.netns,
        [PYTHON.executable, "-c", CONNECT, kind, target],
        uid=uid,
        hosts=str(node.sandbox.hosts(pod)),
        resolv=str(node.sandbox.resolv(pod)),
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, env=ENV)
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def test_its_owner_reads_syncz_from_the_hosts_namespace(node: Node) -> None:
    sync = debug_client.get(node.state)
    assert sync is not None
    sidecars = {pod.ref for pod in node.plan.pods if pod.sidecar}
    assert {p["workload"] for p in sync["proxies"].values()} == sidecars
    assert node.control_plane["debug_socket"] == str(node.state / "control-plane" / "debug.sock")


def test_no_tcp_port_of_the_control_plane_serves_debug_in_the_node_namespace(node: Node) -> None:
    pid = node.control_plane["pid"]
    ports = node.control_plane["ports"]
    assert isinstance(pid, int) and isinstance(ports, dict) and "debug" not in ports
    expected = {ports["xds"], ports["ca"], ports["ca_renewal"], ports["metrics"]}
    assert listening_ports(pid) == expected


def test_a_pods_app_and_proxy_cannot_open_the_debug_socket(node: Node) -> None:
    socket_path = str(node.state / "control-plane" / "debug.sock")
    app = node.plan.pod("foo/sleep")
    assert app is not None and app.uid not in (None, 0)
    for uid in (app.uid, PROXY_UID):
        answer = _in_pod(node, "foo/sleep", uid, "unix", socket_path)
        assert answer == {"errno": 13}, (uid, answer)  # EACCES
