"""Where ``test --live`` sends each case in a sandboxed mesh (pure: no namespace needed).

The routes a cluster's clients take: a sidecar client dials the Service's ClusterIP (its
capture and Envoy do the rest), a client without a sidecar — a pod without one, a
plaintext source — reaches the named workload's endpoint as kube-proxy would, an external
host is dialled at an address nobody holds; plaintext source addresses a pod, the node
or a Service holds are refused with why.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.unit.meshutil import compile_text
from trustmesh.api.policytest import Case
from trustmesh.policy.compose import MeshPolicy
from trustmesh.runtime.client import outside_pod
from trustmesh.runtime.layout import Layout
from trustmesh.runtime.live import EXTERNAL_ADDRESS, LiveRunner
from trustmesh.runtime.livenet import OUTSIDE_ADDRESS, resolve, source_problem
from trustmesh.runtime.plan import Isolation, MeshPlan, PodPlan, plan_mesh


@pytest.fixture(scope="module")
def mesh() -> MeshPolicy:
    return compile_text()


@pytest.fixture(scope="module")
def plan(mesh: MeshPolicy) -> MeshPlan:
    planned, problems = plan_mesh(mesh.snapshot, isolation=Isolation.NETNS, mesh_id="ab12")
    assert planned is not None, problems
    return planned


def _pod(plan: MeshPlan, ref: str) -> PodPlan:
    pod = plan.pod(ref)
    assert pod is not None
    return pod


def _case(source: dict[str, object], to: dict[str, object], **more: object) -> Case:
    data = {"name": "c", "from": source, "to": to, "expect": "allow", **more}
    if "request" not in data and "tcp" not in data:
        data["request"] = {"method": "GET", "path": "/"}
    return Case.model_validate(data)


def test_names_resolve_as_in_the_pod(plan: MeshPlan) -> None:
    foo_sleep, bar_httpbin = _pod(plan, "foo/sleep"), _pod(plan, "bar/httpbin")
    foo_ip = plan.cluster_ips["httpbin.foo.svc.cluster.local"]
    bar_ip = plan.cluster_ips["httpbin.bar.svc.cluster.local"]
    assert foo_ip != bar_ip
    assert resolve(plan, foo_sleep, "httpbin") == foo_ip  # short name: own namespace
    assert resolve(plan, bar_httpbin, "httpbin") == bar_ip
    assert resolve(plan, foo_sleep, "HTTPBIN.bar") == bar_ip
    assert resolve(plan, foo_sleep, "httpbin.bar.svc.cluster.local.") == bar_ip
    assert resolve(plan, None, "httpbin") is None  # outside every pod: no search path
    assert resolve(plan, foo_sleep, "httpbin.org") is None
    assert resolve(plan, foo_sleep, "10.1.2.3") == "10.1.2.3"


def test_source_addresses_no_pod_node_or_service_holds(plan: MeshPlan) -> None:
    pod_ip = _pod(plan, "foo/sleep").pod_ip
    assert source_problem(plan, "10.88.7.7") is None
    assert source_problem(plan, "192.168.5.5") is None
    assert source_problem(plan, OUTSIDE_ADDRESS) is None
    assert "pod IP of foo/sleep" in (source_problem(plan, pod_ip) or "")
    assert "node" in (source_problem(plan, "10.88.0.1") or "")
    assert "ClusterIP range" in (source_problem(plan, "10.96.0.10") or "")
    assert "IPv4 only" in (source_problem(plan, "2001:db8::1") or "")
    assert "cannot be a peer" in (source_problem(plan, "127.0.0.1") or "")
    assert "kept for the runtime" in (source_problem(plan, "10.88.250.11") or "")


def test_routes_follow_what_each_client_dials(
    mesh: MeshPolicy, plan: MeshPlan, tmp_path: Path
) -> None:
    runner = LiveRunner(plan, Layout(tmp_path))
    assert runner.sandboxed
    httpbin = _pod(plan, "foo/httpbin")
    to_httpbin = {"workload": "foo/httpbin", "port": 8000}
    request = {"request": {"method": "GET", "path": "/get"}}

    def route(source: PodPlan, case: Case):  # type: ignore[no-untyped-def]
        return runner._sandbox_route(mesh, case, source, lambda: None)  # type: ignore[arg-type,return-value]

    # a sidecar client: the Service's ClusterIP, its Envoy decides; httpbin's log tells
    sleep = _pod(plan, "foo/sleep")
    via_sidecar = route(sleep, _case({"workload": "foo/sleep"}, to_httpbin, **request))
    assert via_sidecar.direct == (plan.cluster_ips["httpbin.foo.svc.cluster.local"], 8000)
    assert via_sidecar.destination == httpbin
    # without a sidecar: the workload's own endpoint (kube-proxy's pick)
    legacy = _pod(plan, "legacy/sleep")
    direct = route(legacy, _case({"workload": "legacy/sleep"}, to_httpbin, **request))
    assert direct.direct == (httpbin.pod_ip, 8000)
    outside = route(
        outside_pod("10.88.7.7"), _case({"plaintext": True, "ip": "10.88.7.7"}, to_httpbin)
    )
    assert outside.direct == (httpbin.pod_ip, 8000)
    # a port no Service covers: the pod IP, through the client's capture
    undeclared = route(sleep, _case({"workload": "foo/sleep"}, {**to_httpbin, "port": 9999}))
    assert undeclared.direct == (httpbin.pod_ip, 9999)
    # egress: a mesh Service by name, an external host at an address nobody holds
    egress = {"host": "httpbin.org", "port": 80}
    assert route(sleep, _case({"workload": "foo/sleep"}, egress)).direct == (EXTERNAL_ADDRESS, 80)
    service = {"host": "httpbin.bar.svc.cluster.local", "port": 8000}
    assert route(sleep, _case({"workload": "foo/sleep"}, service)).direct == (
        plan.cluster_ips["httpbin.bar.svc.cluster.local"],
        8000,
    )


def test_sources_a_cluster_cannot_have_are_not_run(
    plan: MeshPlan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("trustmesh.runtime.live.os.geteuid", lambda: 0)  # decided before
    runner = LiveRunner(plan, Layout(tmp_path))
    sleep_ip = _pod(plan, "foo/sleep").pod_ip
    to = {"workload": "foo/httpbin", "port": 8000}

    def client(case: Case) -> tuple[PodPlan | None, object, str]:
        return asyncio.run(runner._sandbox_source(case))

    elsewhere = client(_case({"workload": "foo/sleep", "ip": "10.88.9.9"}, to))
    assert elsewhere[0] is None and f"has the address {sleep_ip}" in elsewhere[2]
    taken = client(_case({"plaintext": True, "ip": sleep_ip}, to))
    assert taken[0] is None and "pod IP of foo/sleep" in taken[2]
    peer = client(_case({"principal": "cluster.local/ns/x/sa/y"}, to))
    assert peer[0] is None and "only the mesh CA could issue it" in peer[2]
    own = client(_case({"workload": "foo/sleep", "ip": sleep_ip}, to))
    assert own[0] is not None and own[0].ref == "foo/sleep"


def test_without_root_a_sandboxed_case_is_not_run(
    plan: MeshPlan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("trustmesh.runtime.live.os.geteuid", lambda: 1000)
    runner = LiveRunner(plan, Layout(tmp_path))
    to = {"workload": "foo/httpbin", "port": 8000}
    case = _case({"workload": "foo/sleep"}, to)
    source, _, why = asyncio.run(runner._sandbox_source(case))
    assert source is None and "needs root" in why
