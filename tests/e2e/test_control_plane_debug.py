"""The running mesh's control plane keeps its debug data and its CA to its own user.

Its debug endpoint is a 0600 Unix socket in a 0700 directory — no TCP listener of the
control plane serves it — and another local user's connect is refused (EACCES), while
``trustmesh status`` (its owner) still reads every proxy's sync state through it. The CA
directory and keys are its user's alone, and a kept CA that others could read or replace
stops ``up`` with a clear reason.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from tests.e2e.mesh import LiveMesh, trustmesh
from tests.unit.localaccess import as_other_user, listening_ports, requires_root
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.runtime import debug_client
from trustmesh.runtime.layout import read_json

pytestmark = pytest.mark.envoy


def _plain_http_answer(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /debug/syncz HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return answer


def test_no_tcp_listener_of_the_control_plane_serves_debug(mesh: LiveMesh) -> None:
    info = read_json(mesh.state / "control-plane.json")
    ports = info["ports"]
    assert "debug" not in ports
    listening = listening_ports(info["pid"])
    # Exactly the mTLS services the agents use (ADS and the CA's two ports) and the
    # plain-HTTP metrics, which carry no pod address, node id or sync detail.
    assert listening == {ports["xds"], ports["ca"], ports["ca_renewal"], ports["metrics"]}
    for port in listening:  # and none of them hands out the debug data in plain HTTP
        assert b'"proxies"' not in _plain_http_answer(port)


def test_debug_socket_is_0600_in_a_0700_directory_and_its_owner_reads_syncz(
    mesh: LiveMesh,
) -> None:
    mesh.apply(None)
    info = read_json(mesh.state / "control-plane.json")
    path = mesh.state / "control-plane" / "debug.sock"
    assert info["debug_socket"] == str(path)
    owner = int(Path(f"/proc/{info['pid']}/status").read_text().split("Uid:")[1].split()[1])
    sock, folder = path.lstat(), path.parent.lstat()
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    assert stat.S_ISDIR(folder.st_mode) and stat.S_IMODE(folder.st_mode) == 0o700
    assert sock.st_uid == folder.st_uid == owner
    sync = debug_client.get(mesh.state)
    assert sync is not None and len(sync["proxies"]) == 5
    assert all(p["synced"] for p in sync["proxies"].values())
    status = json.loads(trustmesh("status", "-o", "json", state=mesh.state).stdout)
    assert status["sync"]["proxies"].keys() == sync["proxies"].keys()


def _connect_as_other_user(address: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(address)
        except PermissionError:
            return "EACCES"
        except OSError as exc:
            return f"errno {exc.errno}"
        return "connected"


def _read_as_other_user(address: str) -> str:
    try:
        with open(address, "rb"):
            return "read"
    except PermissionError:
        return "EACCES"


@requires_root
def test_another_local_user_cannot_connect_or_read_the_ca(mesh: LiveMesh) -> None:
    path = mesh.state / "control-plane" / "debug.sock"
    key = next((mesh.state / "ca").glob("slots/*/ca-key.pem"))
    # Descriptors opened as root reach past the (private) state directory, so each
    # refusal below is the socket's, its directory's or the key's own mode at work.
    fds = [
        os.open(path.parent, os.O_PATH | os.O_DIRECTORY),
        os.open(path, os.O_PATH),
        os.open(key, os.O_PATH),
    ]
    try:
        seen = as_other_user(
            lambda: [
                _connect_as_other_user(str(path)),
                _connect_as_other_user(f"/proc/self/fd/{fds[0]}/{path.name}"),
                _connect_as_other_user(f"/proc/self/fd/{fds[1]}"),
                _read_as_other_user(f"/proc/self/fd/{fds[2]}"),
            ]
        )
    finally:
        for fd in fds:
            os.close(fd)
    assert seen == ["EACCES"] * 4
    assert debug_client.get(mesh.state) is not None  # its owner still reads it


def test_ca_state_is_its_users_alone(mesh: LiveMesh) -> None:
    ca = mesh.state / "ca"
    owner = os.geteuid()
    folders = [mesh.state, ca, *[p for p in ca.rglob("*") if p.is_dir()]]
    for folder in folders:
        info = folder.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, owner), folder
    keys = [ca / "token-key.pem", *ca.glob("slots/*/ca-key.pem")]
    assert len(keys) >= 2
    for key in keys:
        info = key.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, owner), key


def test_a_kept_ca_whose_key_others_can_read_stops_up(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: idle, namespace: default}
spec:
  template:
    spec:
      containers:
      - name: idle
        command: [trustmesh, sample, sleep]
"""
    )
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    kept = CertificateAuthority.init(state / "ca", CaConfig(), dt.datetime.now(dt.UTC))
    key = next(kept.store.root.glob("slots/*/ca-key.pem"))
    os.chmod(key, 0o644)
    started = trustmesh("up", str(config), "--base", "127.52.0.0", "-d", state=state, timeout=120)
    try:
        assert started.returncode == 1
        assert f"the mesh CA is refused: {key} is mode 644; CA keys must be 0600" in started.stderr
        assert "Traceback" not in started.stderr
    finally:
        trustmesh("down", state=state)
