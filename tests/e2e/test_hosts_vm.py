"""WorkloadGroup auto-registration across hosts (issue 11, Istio's VM onboarding), real
etcd and real Envoys: ``trustmesh node join --group foo/vm`` on host 2 runs a workload
from the group's template (identity ``vm``) and registers it; the replica writes Istio's
WorkloadEntry ``vm-<ip>`` into the store, and the sleep pods on host 1 call the Service
``vm.foo`` — whose only endpoint is that entry — allowed and denied exactly as ``authz
check`` decides offline with the entry as an input. Joins the replica must refuse (a
group the store does not hold, another host's node token, an identity not the group's)
fail with a clear error and write nothing; the entry leaves with its host's lease.

Process mode (the hosts' pods on loopback addresses): in netns mode the hosts' LAN routes
only the pod addresses planned at ``up``, and a VM's pod is not among them."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.mesh import EXAMPLES, trustmesh, up_in_a_free_block
from trustmesh.identity.ca import CertificateAuthority

VM_GROUP = EXAMPLES / "vm-group" / "vm.yaml"
CLIENTS = """\
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bar, labels: {istio-injection: enabled}}
""" + "".join(
    f"""---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: sleep, namespace: {ns}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: sleep, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: sleep}}}}
  template:
    metadata: {{labels: {{app: sleep}}}}
    spec:
      serviceAccountName: sleep
      containers: [{{name: sleep, command: [trustmesh, sample, sleep]}}]
"""
    for ns in ("foo", "bar")
)
CASES = ("foo/sleep", "bar/sleep")
JOIN_TIMEOUT = 120.0
ENFORCE_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """One host (the sleep pods) and one replica; the config directory and state."""
    root = tmp_path_factory.mktemp("vm")
    config = root / "config"
    config.mkdir()
    (config / "clients.yaml").write_text(CLIENTS)
    shutil.copy(VM_GROUP, config / "vm.yaml")
    state = root / "state"
    started = up_in_a_free_block(
        config, "--hosts", "1", "--replicas", "1", state=state, base="127.224.0.0"
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield config, state
    finally:
        stopped = trustmesh("down", state=state)
        assert stopped.returncode == 0, stopped.stderr


def _join(
    cluster: dict[str, object], state: Path, home: Path, name: str, token_for: str,
    *config: Path, group: str,
) -> subprocess.Popen[bytes]:  # fmt: skip
    """``trustmesh node join CONFIG… --group GROUP`` as host ``name`` with a node token
    of ``token_for``, in its own session (stopped by its PID)."""
    ca = CertificateAuthority.load(state / "ca")
    token = home / "node.token"
    home.mkdir(parents=True, exist_ok=True)
    token.write_text(ca.node_token(token_for, dt.datetime.now(dt.UTC)))
    command = [
        sys.executable, "-m", "trustmesh", "node", "join", *map(str, config),
        "--control-plane", str(cluster["control_plane"]), "--token", str(token),
        "--roots", str(state / "ca-roots.pem"), "--name", name, "--base", str(cluster["base"]),
        "--isolation", "process", "--lease-ttl", "5", "--group", group,
        "--state", str(home / "state"),
    ]  # fmt: skip
    with open(home / "join.log", "wb") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )


def _refused(process: subprocess.Popen[bytes], home: Path) -> str:
    """What a refused join said (it must exit 1 within the bound)."""
    try:
        code = process.wait(JOIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop(process)
        raise AssertionError("a join that must be refused kept running") from None
    said = (home / "join.log").read_text(errors="replace")
    assert code == 1, said
    return said


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the node agent and pods
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _entries(state: Path) -> dict[str, dict[str, object]]:
    shown = trustmesh("get", "workloadentry", "-n", "foo", "-o", "json", "--state", str(state),
                      state=state)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    return {e["metadata"]["name"]: e for e in json.loads(shown.stdout)["items"]}


def _live(state: Path, source: str) -> str:
    sent = trustmesh("request", "--from", source, "http://vm.foo:8000/get", state=state)
    if sent.returncode == 56:
        return "reset"
    return sent.stdout.split()[1] if sent.stdout.startswith("HTTP ") else f"rc {sent.returncode}"


def test_a_vm_auto_registered_on_host_2_is_the_service_endpoint_host_1_calls(
    mesh: tuple[Path, Path], tmp_path: Path
) -> None:
    config, state = mesh
    cluster = json.loads((state / "cluster.json").read_text())

    # Refused by the replica, each with a clear error, nothing written (three hosts that
    # try at once: the replica checks each on its own).
    ghost = tmp_path / "ghost.yaml"  # a group only this host knows: not in the store
    ghost.write_text(VM_GROUP.read_text().split("---")[1].replace("name: vm\n", "name: ghost\n", 1))
    impostor = tmp_path / "impostor"  # the same group, another identity in its template
    impostor.mkdir()
    (impostor / "clients.yaml").write_text(CLIENTS)
    other = VM_GROUP.read_text().replace("serviceAccount: vm", "serviceAccount: sleep")
    (impostor / "vm.yaml").write_text(other)
    attempts = {
        "workloadgroup-not-found: auto-registration of foo/ghost-": (
            "ghost",
            ("host-2", "host-2", config, ghost),
            "foo/ghost",
        ),
        "token-wrong-node": ("stolen", ("host-2", "host-1", config), "foo/vm"),
        "identity-not-group: WorkloadGroup foo/vm runs as service account 'vm', not 'sleep'": (
            "impostor-host",
            ("host-2", "host-2", impostor),
            "foo/vm",
        ),
    }
    started = {
        why: (tmp_path / home, _join(cluster, state, tmp_path / home, *args, group=group))  # type: ignore[arg-type]
        for why, (home, args, group) in attempts.items()
    }
    for why, (home, process) in started.items():
        said = _refused(process, home)
        assert why in said, said
    assert _entries(state) == {}

    home = tmp_path / "host-2"
    vm = _join(cluster, state, home, "host-2", "host-2", config, group="foo/vm")
    try:
        record = home / "state" / "mesh.json"
        deadline = time.monotonic() + JOIN_TIMEOUT
        ready = False
        while not ready and time.monotonic() < deadline and vm.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                ready = json.loads(record.read_text()).get("state") == "ready"
            time.sleep(0.2)  # another process's progress: no event crosses over
        assert ready, (home / "join.log").read_text(errors="replace")[-3000:]

        # Istio's name and annotations, owned by the group.
        entries = _entries(state)
        assert len(entries) == 1
        name, entry = next(iter(entries.items()))
        address = entry["spec"]["address"]  # type: ignore[index]
        assert name == f"vm-{address}"
        metadata = entry["metadata"]
        annotations = metadata["annotations"]  # type: ignore[index]
        assert annotations["istio.io/autoRegistrationGroup"] == "vm"
        assert annotations["istio.io/workloadController"] == "r1"
        assert "istio.io/connectedAt" in annotations
        assert metadata["ownerReferences"][0]["kind"] == "WorkloadGroup"  # type: ignore[index]
        assert entry["spec"]["serviceAccount"] == "vm"  # type: ignore[index]

        # Offline, with the entry as an input: foo/sleep allowed, bar/sleep denied.
        written = tmp_path / "entry.yaml"
        written.write_text(yaml.safe_dump(entry))
        expected = {}
        for source in CASES:
            offline = trustmesh(
                "authz", "check", "-f", str(config), "-f", str(written), "--from", source,
                "--to", f"foo/{name}", "--port", "8000", "--path", "/get", "-o", "json",
                state=state,
            )  # fmt: skip
            assert offline.stdout.startswith("{"), offline.stderr  # exit 3: denied
            verdict = json.loads(offline.stdout)
            expected[source] = "reset" if verdict["verdict"] == "reset" else str(verdict["status"])
        assert expected == {"foo/sleep": "200", "bar/sleep": "403"}
        deadline = time.monotonic() + ENFORCE_TIMEOUT
        got = {source: _live(state, source) for source in CASES}
        while got != expected and time.monotonic() < deadline:
            time.sleep(0.2)
            got = {source: _live(state, source) for source in CASES}
        assert got == expected, (home / "join.log").read_text(errors="replace")[-2000:]
        # The group's probe passed on host 2 and said so: the entry's Healthy condition
        # (a health-checked entry is no ready endpoint before it).
        assert annotations["proxy.istio.io/health-checks-enabled"] == "true"
        status = _entries(state)[name]["status"]
        healthy = [c["status"] for c in status["conditions"] if c["type"] == "Healthy"]  # type: ignore[index]
        assert healthy == ["True"]
    finally:
        _stop(vm)
        trustmesh("down", state=home / "state")

    # The host is gone: its entry leaves with its lease (5 s), and the endpoint with it.
    deadline = time.monotonic() + 20
    while _entries(state) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _entries(state) == {}
