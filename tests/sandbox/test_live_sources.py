"""Source namespaces of ``test --live`` on a real sandbox (no Envoy needed): a plaintext
case at ``ip: X`` is sent from a namespace on the mesh bridge holding X — inside the pod
network or outside it (then routed by the node) — and a workload's case from its own pod;
the app sees exactly that address. Namespaces are reused across runs and the mesh's
teardown removes them with everything else."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.sandbox.conftest import requires_root
from tests.unit.meshutil import compile_text
from trustmesh.api.policytest import Case
from trustmesh.policy.compose import MeshPolicy
from trustmesh.runtime import netns
from trustmesh.runtime.layout import Layout
from trustmesh.runtime.live import LiveCaseResult, LiveRunner
from trustmesh.runtime.plan import Isolation, MeshPlan, plan_mesh
from trustmesh.runtime.sandbox import Sandbox

pytestmark = [pytest.mark.sandbox, requires_root]


@pytest.fixture
def built() -> Iterator[tuple[MeshPolicy, MeshPlan, Path]]:
    mesh = compile_text()
    plan, problems = plan_mesh(
        mesh.snapshot, isolation=Isolation.NETNS, mesh_id=secrets.token_hex(3)
    )
    assert plan is not None, problems
    state = Path(tempfile.mkdtemp(prefix="tmls-"))
    sandbox = Sandbox(plan, state)
    try:
        sandbox.build()
        yield mesh, plan, state
    finally:
        problems = sandbox.teardown()
        left = sorted(p.name for p in netns.NETNS_DIR.glob(f"tm-{plan.mesh_id}-*"))
        assert not problems and not left, (problems, left)


@asynccontextmanager
async def echo_peer(namespace: str, port: int) -> AsyncIterator[list[str]]:
    """An HTTP app on ``0.0.0.0:port`` in ``namespace`` answering with the peer's address."""
    peers: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        peer = writer.get_extra_info("peername")[0]
        peers.append(peer)
        body = json.dumps({"origin": peer}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    sock = netns.netns_socket(namespace)
    sock.bind(("0.0.0.0", port))
    sock.listen(16)
    server = await asyncio.start_server(serve, sock=sock)
    try:
        yield peers
    finally:
        server.close()
        await server.wait_closed()


def _bridge_mac(plan: MeshPlan) -> str:
    shown = subprocess.run(
        ["ip", "-n", plan.node_netns, "-j", "link", "show", netns.BRIDGE],
        capture_output=True,
        text=True,
        check=True,
    )
    address: str = json.loads(shown.stdout)[0]["address"]
    return address


def _case(source: dict[str, object]) -> Case:
    return Case.model_validate(
        {
            "name": "c",
            "from": source,
            "to": {"workload": "legacy/httpbin", "port": 8000},
            "request": {"method": "GET", "path": "/ip"},
            "expect": "allow",
        }
    )


def test_cases_leave_from_namespaces_holding_their_address(
    built: tuple[MeshPolicy, MeshPlan, Path],
) -> None:
    mesh, plan, state = built
    legacy_httpbin, legacy_sleep = plan.pod("legacy/httpbin"), plan.pod("legacy/sleep")
    assert legacy_httpbin is not None and legacy_httpbin.netns is not None
    assert legacy_sleep is not None
    sources = [{"plaintext": True, "ip": "10.88.7.7"}, {"plaintext": True, "ip": "192.168.7.9"}]
    cases = [
        *sources,
        {"plaintext": True},
        {"workload": "legacy/sleep"},
        sources[1],  # again: the namespace is reused
    ]

    async def scenario() -> tuple[list[LiveCaseResult], list[str]]:
        runner = LiveRunner(plan, Layout(state))
        async with echo_peer(legacy_httpbin.netns, 8000) as peers:
            results = [await runner.run_case(mesh, "s", "here", _case(c)) for c in cases]
        return results, peers

    gateway_mac = _bridge_mac(plan)
    results, peers = asyncio.run(scenario())
    # new ports on the bridge must not move the pods' gateway (their ARP entries for it)
    assert _bridge_mac(plan) == gateway_mac
    assert [r.live.verdict if r.live else r.not_run for r in results] == ["allow"] * 5
    assert all(r.passed for r in results), [r.as_dict() for r in results]
    expected = ["10.88.7.7", "192.168.7.9", "10.88.250.10", legacy_sleep.pod_ip, "192.168.7.9"]
    assert peers == expected
    made = sorted(p.name for p in netns.NETNS_DIR.glob(f"tm-{plan.mesh_id}-s*"))
    assert len(made) == 3, made
    ledger = (state / "ledger.jsonl").read_text()
    assert all(f'"{name}"' in ledger for name in made)  # recorded, so teardown finds them


def test_an_address_a_pod_holds_is_not_a_source(
    built: tuple[MeshPolicy, MeshPlan, Path],
) -> None:
    mesh, plan, state = built
    sleep = plan.pod("foo/sleep")
    assert sleep is not None
    runner = LiveRunner(plan, Layout(state))
    result = asyncio.run(
        runner.run_case(mesh, "s", "here", _case({"plaintext": True, "ip": sleep.pod_ip}))
    )
    assert result.live is None and "pod IP of foo/sleep" in result.not_run
    assert not list(netns.NETNS_DIR.glob(f"tm-{plan.mesh_id}-s*"))
