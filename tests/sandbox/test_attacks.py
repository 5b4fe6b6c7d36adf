"""Issue 10's attacks against a real sandboxed mesh (``up --isolation netns``, real Envoy):
each one refused, and the refusal observed.

The mesh (attack_mesh/): foo/httpbin with a sidecar and a DENY on /admin, foo/sleep with
a sidecar, legacy/sleep without one, legacy/unregistered (a TCP echo no Service names),
REGISTRY_ONLY. One mesh for the whole module: each ``up`` costs seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sandbox.conftest import requires_root
from tests.sandbox.meshrun import PYTHON, SandboxedMesh, sandboxed_mesh, trustmesh
from tests.unit.localaccess import listening_ports
from trustmesh.runtime.capture import PROXY_UID
from trustmesh.runtime.debug_endpoint import debug_socket

pytestmark = requires_root
HERE = Path(__file__).parent
CONFIG = HERE / "attack_mesh" / "workloads.yaml"
MESH_CONFIG = HERE / "attack_mesh" / "mesh.yaml"
PROBE = str(HERE / "probe.py")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxedMesh]:
    state = tmp_path_factory.mktemp("attacks") / "state"
    with sandboxed_mesh(state, [CONFIG], [MESH_CONFIG]) as running:
        yield running


def _connect(mesh: SandboxedMesh, ref: str | None, host: str, port: int, **kw: object) -> str:
    """Send a line over TCP from ``ref``; what came back, or the error."""
    code = (
        "import socket,sys\n"
        "try:\n"
        f"    s = socket.create_connection(({host!r}, {port}), timeout=5)\n"
        "    s.sendall(b'GET /ready HTTP/1.0\\r\\n\\r\\n')\n"
        "    print(repr(s.recv(4096)))\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    done = mesh.run(ref, PYTHON.executable, "-c", code, **kw)  # type: ignore[arg-type]
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# ------------------------------------------------------------- (a) the app behind its sidecar


def test_plaintext_to_the_apps_own_address_goes_through_its_sidecar(mesh: SandboxedMesh) -> None:
    """Another pod connects straight to httpbin's pod IP and port, in plaintext: capture
    takes it to httpbin's Envoy, and the DENY on /admin holds — never the app's 200."""
    httpbin = mesh.pod("foo/httpbin")
    direct = f"http://{httpbin.pod_ip}:8000"
    for path in ("/admin", "/admin/x"):
        status, _ = mesh.http("legacy/sleep", f"{direct}{path}")
        assert status == 403, path
    # the pod answers what the policy allows: the refusal is the policy's
    status, body = mesh.http("legacy/sleep", f"{direct}/get")
    assert status == 200 and '"url"' in body, body
    # by Service name, from a pod with a sidecar (mTLS): the same answers
    status, _ = mesh.http("foo/sleep", "http://httpbin.foo:8000/admin")
    assert status == 403
    status, _ = mesh.http("foo/sleep", "http://httpbin:8000/get")
    assert status == 200
    # an app with a sidecar dialling the pod IP is captured by its own sidecar, which
    # under REGISTRY_ONLY has no route for an address (Istio's 502 BlackHole): never 200
    for path in ("/admin", "/get"):
        status, _ = mesh.http("foo/sleep", f"{direct}{path}")
        assert status == 502, path


def test_a_pod_reaches_another_pods_app_only_through_that_pods_envoy(
    mesh: SandboxedMesh,
) -> None:
    """Whoever dials httpbin's pod IP — another pod's app, its root user, the node — the
    app sees the connection come from its own Envoy (127.0.0.6, Istio's inbound source),
    and the DENY holds for each."""
    httpbin = mesh.pod("foo/httpbin")
    for ref, options in (
        ("legacy/sleep", {}),
        ("legacy/sleep", {"uid": 0, "gid": 0}),
        (None, {"netns": mesh.plan.node_netns}),
    ):
        seen = mesh.python(ref, "http_probe.py", httpbin.pod_ip, "8000", "/ip", "/admin", **options)
        assert seen["/ip"][0] == "HTTP/1.1 200 OK", (ref, options, seen)
        assert json.loads(seen["/ip"][1]) == {"origin": "127.0.0.6"}, (ref, options, seen)
        assert seen["/admin"][0] == "HTTP/1.1 403 Forbidden", (ref, options, seen)


# --------------------------------------------------------------------- (b) SDS sockets


def test_no_app_can_open_any_pods_sds_socket(mesh: SandboxedMesh) -> None:
    for target in ("foo/httpbin", "foo/sleep"):
        socket_path = str(mesh.paths(target).sds_socket)
        for attacker in ("foo/sleep", "foo/httpbin", "legacy/sleep"):
            answer = mesh.python(attacker, "sds_probe.py", socket_path)
            assert answer == {"connect": "EACCES"}, (attacker, target, answer)
    # nor its own pod's proxy files (bootstrap token, the gate's upstream socket)
    for ref in ("foo/httpbin", "foo/sleep"):
        for private in (mesh.paths(ref).proxy, mesh.paths(ref).sds_dir):
            done = mesh.run(ref, "ls", str(private))
            assert done.returncode != 0 and "Permission denied" in done.stderr, (ref, private)


def test_another_pods_proxy_uid_is_refused_by_the_peer_gate(mesh: SandboxedMesh) -> None:
    """Every pod's Envoy is uid 1337: a 1337 process of foo/sleep (its group, too) can
    open httpbin's SDS socket file, but the agent serves only its own Envoy's pid."""
    target = mesh.paths("foo/httpbin")
    attacker = mesh.paths("foo/sleep")
    as_proxy = {"uid": PROXY_UID, "gid": attacker.group}
    answer = mesh.python("foo/sleep", "sds_probe.py", str(target.sds_socket), **as_proxy)
    assert answer == {"grpc": "UNAVAILABLE"}, answer
    # and its gRPC socket behind the gate is in a directory only httpbin's group opens
    done = mesh.run("foo/sleep", "ls", str(target.proxy), **as_proxy)  # type: ignore[arg-type]
    assert done.returncode != 0 and "Permission denied" in done.stderr
    agent_log = (mesh.state / "logs" / "foo_httpbin.agent.log").read_text()
    assert "refused a connection" in agent_log and f"(uid {PROXY_UID})" in agent_log
    # the gate lets the right one through: httpbin's Envoy has its certificate
    secrets = json.loads(
        mesh.running.envoy_get("foo/httpbin", "/config_dump?resource=dynamic_active_secrets")
    )
    names = {entry["name"] for entry in secrets["configs"]}
    assert {"default", "ROOTCA"} <= names


# ----------------------------------------------------------------------- (c) Envoy admin


def test_envoy_admin_answers_only_on_its_own_pods_loopback(mesh: SandboxedMesh) -> None:
    httpbin = mesh.pod("foo/httpbin")
    record = mesh.record("foo/httpbin")
    assert record["admin"] == "127.0.0.1:15000"
    for ref, options in (
        ("legacy/sleep", {}),
        ("foo/sleep", {}),
        (None, {"netns": mesh.plan.node_netns}),
    ):
        answer = _connect(mesh, ref, httpbin.pod_ip, 15000, **options)
        # captured to Envoy's inbound passthrough, which finds nothing on the pod IP
        assert "LIVE" not in answer and "200 OK" not in answer, (ref, answer)
    # another pod's 127.0.0.1:15000 is its own Envoy's, never httpbin's
    other = mesh.run("foo/sleep", "curl", "-s", "-m", "5", "http://127.0.0.1:15000/server_info")
    assert "sleep.foo" in other.stdout and "httpbin.foo" not in other.stdout, other.stdout
    # only httpbin's own loopback reaches it
    inside = mesh.run("foo/httpbin", "curl", "-s", "-m", "5", "http://127.0.0.1:15000/ready")
    assert inside.stdout.strip() == "LIVE"


# --------------------------------------------------------- (e) straight to an unknown IP


def test_an_app_cannot_bypass_its_sidecar_to_an_unregistered_address(
    mesh: SandboxedMesh,
) -> None:
    target = mesh.pod("legacy/unregistered")
    # without a sidecar the address answers (it exists and echoes) ...
    echoed = _connect(mesh, "legacy/sleep", target.pod_ip, 9000)
    assert "GET /ready" in echoed, echoed
    # ... but an app with a sidecar is captured, and REGISTRY_ONLY black-holes it
    refused = _connect(mesh, "foo/sleep", target.pod_ip, 9000)
    assert refused in ("ConnectionResetError", "b''"), refused
    # the same through `trustmesh request --tcp`, sent from inside each pod as its app
    address = f"{target.pod_ip}:9000"
    plain = trustmesh(
        "request", "--from", "legacy/sleep", "--tcp", address, "-d", "hi", state=mesh.state
    )
    assert plain.returncode == 0 and plain.stdout.strip().endswith("hi"), plain
    captured = trustmesh(
        "request", "--from", "foo/sleep", "--tcp", address, "-d", "hi", state=mesh.state
    )
    assert captured.returncode == 56 and captured.stderr.startswith("reset"), captured


def test_an_app_cannot_change_its_pods_rules(mesh: SandboxedMesh) -> None:
    for command in (["nft", "flush", "ruleset"], ["nft", "add", "table", "ip", "evil"]):
        done = mesh.run("foo/sleep", *command)
        assert done.returncode != 0 and "Operation not permitted" in done.stderr, done.stderr
    # the capture is still in place: the black hole still holds
    target = mesh.pod("legacy/unregistered")
    assert _connect(mesh, "foo/sleep", target.pod_ip, 9000) in ("ConnectionResetError", "b''")


# ------------------------------------------------------------------- users and privileges


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_each_process_runs_as_its_own_user_without_privileges(mesh: SandboxedMesh) -> None:
    for ref in ("foo/httpbin", "foo/sleep"):
        pod, record, paths = mesh.pod(ref), mesh.record(ref), mesh.paths(ref)
        app = _status(record["app_pid"])
        assert app["Uid"].split() == [str(pod.uid)] * 4 and pod.uid not in (0, PROXY_UID)
        assert app["Groups"].strip() == ""
        assert int(app["CapEff"], 16) == int(app["CapPrm"], 16) == int(app["CapBnd"], 16) == 0
        assert app["NoNewPrivs"].strip() == "1"
        for kind in ("sidecar_pid", "envoy_pid"):
            proxy = _status(record[kind])
            assert proxy["Uid"].split() == [str(PROXY_UID)] * 4, kind
            assert proxy["Gid"].split()[0] == str(paths.group), kind  # this pod's group only
            assert int(proxy["CapEff"], 16) == 0 and proxy["NoNewPrivs"].strip() == "1"
        # the app's host name is its pod's, as in a pod
        named = subprocess.run(
            ["nsenter", "--target", str(record["app_pid"]), "--uts", "hostname"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert named.stdout.strip() == pod.name
        # every process is in the pod's namespace, not the host's
        host = os.readlink("/proc/self/ns/net")
        for kind in ("app_pid", "sidecar_pid", "envoy_pid"):
            assert os.readlink(f"/proc/{record[kind]}/ns/net") != host


# ------------------------------------------------------------- (d) control plane debug


def test_the_control_plane_has_no_tcp_debug_port(mesh: SandboxedMesh) -> None:
    """In the node namespace the control plane listens on TCP only for what the pods need
    (xDS and the CA, both mTLS / token) and its metrics (counts under pod names: no
    address, no node id); its debug endpoint is the 0600 Unix socket, which no pod's user
    can open."""
    record = mesh.running.record["control_plane"]
    ports = record["ports"]
    expected = {ports["xds"], ports["ca"], ports["ca_renewal"], ports["metrics"]}
    assert listening_ports(record["pid"]) == expected
    socket_path = str(debug_socket(mesh.state))
    for ref, options in (("foo/sleep", {}), ("foo/sleep", {"uid": PROXY_UID})):
        answer = mesh.python(ref, "sds_probe.py", socket_path, **options)
        assert answer == {"connect": "EACCES"}, (ref, options, answer)
