"""The sandbox's pure parts: addresses, users, capture rules as istio-init writes them,
kube-proxy DNAT, per-pod names, the ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.meshutil import BASE
from trustmesh.api.diagnostics import Location
from trustmesh.api.loader import load_sources
from trustmesh.api.snapshot import build_snapshot
from trustmesh.runtime import netns
from trustmesh.runtime import sandbox as sandbox_module
from trustmesh.runtime.capture import (
    CaptureSpec,
    ServiceDnat,
    capture_spec,
    pod_ruleset,
)
from trustmesh.runtime.ledger import Entry, Ledger
from trustmesh.runtime.names import hosts_file, resolv_conf
from trustmesh.runtime.plan import SERVICE_CIDR, Isolation, MeshPlan, plan_mesh
from trustmesh.runtime.sandbox import Sandbox, service_dnat


def _plan(extra: str = "") -> tuple[MeshPlan | None, list[str]]:
    loaded = load_sources([("workloads.yaml", BASE), ("extra.yaml", extra.encode())])
    snapshot = build_snapshot(loaded, ())
    plan, problems = plan_mesh(snapshot, isolation=Isolation.NETNS, mesh_id="ab12cd")
    return plan, [str(p) for p in problems]


def _where(name: str) -> Location:
    return Location("pod.yaml", 3, f"metadata.annotations[{name}]")


def _rules(text: str, chain: str) -> list[str]:
    body = text.split(f"chain {chain} {{\n", 1)[1].split("\n  }", 1)[0]
    return [line.strip() for line in body.splitlines() if "type nat" not in line]


# ---------------------------------------------------------------------------- plan


def test_each_pod_gets_a_namespace_an_address_and_a_user() -> None:
    plan, problems = _plan()
    assert plan is not None, problems
    assert plan.isolation is Isolation.NETNS
    ips = [p.pod_ip for p in plan.pods]
    assert len(set(ips)) == len(ips) and all(ip.startswith("10.88.") for ip in ips)
    assert [p.netns for p in plan.pods] == [f"tm-ab12cd-{i}" for i in range(len(plan.pods))]
    assert [p.uid for p in plan.pods] == [20000 + i for i in range(len(plan.pods))]
    httpbin = plan.pod("foo/httpbin")
    assert httpbin is not None and httpbin.sidecar and httpbin.capture == CaptureSpec()
    # apps listen on every address of their pod and get no proxy variable
    assert httpbin.env["HOST"] == "0.0.0.0" and "HTTP_PROXY" not in httpbin.env
    legacy = plan.pod("legacy/sleep")
    assert legacy is not None and legacy.capture is None
    # one ClusterIP per Service, stable
    assert plan.cluster_ips["httpbin.foo.svc.cluster.local"].startswith("10.96.")
    assert len(set(plan.cluster_ips.values())) == len(plan.cluster_ips)
    assert MeshPlan.from_json(plan.to_json()) == plan


def test_the_plan_is_the_same_for_the_same_input() -> None:
    first, _ = _plan()
    second, _ = _plan()
    assert first == second


RUN_AS = """
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: foo, labels: {{app: web}}}}
spec:
  securityContext: {{runAsUser: {pod}}}
  containers:
  - name: web
    command: [trustmesh, sample, httpbin]
    {container}
"""


def test_run_as_user_comes_from_the_container_then_the_pod() -> None:
    plan, _ = _plan(RUN_AS.format(pod=4000, container=""))
    assert plan is not None and plan.pod("foo/web").uid == 4000  # type: ignore[union-attr]
    text = RUN_AS.format(pod=4000, container="securityContext: {runAsUser: 4001, runAsGroup: 7}")
    plan, _ = _plan(text)
    web = plan.pod("foo/web") if plan else None
    assert web is not None and (web.uid, web.gid) == (4001, 7)


@pytest.mark.parametrize("uid", [0, 1337])
def test_root_and_the_proxy_uid_are_refused_with_where(uid: int) -> None:
    plan, problems = _plan(RUN_AS.format(pod=uid, container=""))
    assert plan is None
    assert len(problems) == 1
    assert "extra.yaml:" in problems[0] and "spec.securityContext.runAsUser" in problems[0]
    assert str(uid) in problems[0]


def test_a_bad_capture_annotation_is_an_error_naming_it() -> None:
    text = """
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: foo
  annotations: {traffic.sidecar.istio.io/excludeInboundPorts: "80,http"}
spec:
  containers: [{name: web, command: [trustmesh, sample, httpbin]}]
"""
    plan, problems = _plan(text)
    assert plan is None
    assert "traffic.sidecar.istio.io/excludeInboundPorts" in problems[0]
    assert "'http' is not a port" in problems[0] and "extra.yaml:" in problems[0]


# ---------------------------------------------------------------------------- capture


def test_default_capture_is_istio_inits() -> None:
    text = pod_ruleset(CaptureSpec())
    assert _rules(text, "prerouting") == ["meta l4proto tcp jump istio_inbound"]
    assert _rules(text, "istio_inbound") == [
        "tcp dport 15008 return",
        "tcp dport 15090 return",
        "tcp dport 15021 return",
        "tcp dport 15020 return",
        "meta l4proto tcp jump istio_in_redirect",
    ]
    assert _rules(text, "istio_in_redirect") == ["meta l4proto tcp redirect to :15006"]
    assert _rules(text, "istio_redirect") == ["meta l4proto tcp redirect to :15001"]
    assert _rules(text, "istio_output") == [
        'oifname "lo" ip saddr 127.0.0.6 return',
        'oifname "lo" ip daddr != 127.0.0.1 tcp dport != 15008 meta skuid 1337 '
        "jump istio_in_redirect",
        'oifname "lo" meta skuid != 1337 return',
        "meta skuid 1337 return",
        'oifname "lo" ip daddr != 127.0.0.1 tcp dport != 15008 meta skgid 1337 '
        "jump istio_in_redirect",
        'oifname "lo" meta skgid != 1337 return',
        "meta skgid 1337 return",
        "ip daddr 127.0.0.1 return",
        "jump istio_redirect",
    ]


def test_annotations_change_the_rules_as_istio_iptables_flags_do() -> None:
    annotations = {
        "traffic.sidecar.istio.io/includeInboundPorts": "8000, 9000",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.96.0.0/16,10.88.0.0/16",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.99/32",
        "traffic.sidecar.istio.io/includeOutboundPorts": "443",
    }
    spec, problems = capture_spec(annotations, _where)
    assert spec is not None and not problems
    text = pod_ruleset(spec)
    assert _rules(text, "istio_inbound") == [
        "tcp dport 15008 return",
        "tcp dport 8000 jump istio_in_redirect",
        "tcp dport 9000 jump istio_in_redirect",
    ]
    output = _rules(text, "istio_output")
    assert output[:2] == ["tcp dport 5432 return", "udp dport 5432 return"]  # before all
    assert output[-5:] == [
        "ip daddr 127.0.0.1 return",
        "ip daddr 10.96.0.99/32 return",  # exclusions before inclusions
        "tcp dport 443 jump istio_redirect",
        "ip daddr 10.96.0.0/16 jump istio_redirect",
        "ip daddr 10.88.0.0/16 jump istio_redirect",
    ]
    assert "jump istio_redirect" not in output  # no catch-all


def test_excluded_inbound_ports_add_to_envoys_own() -> None:
    spec, _ = capture_spec({"traffic.sidecar.istio.io/excludeInboundPorts": "8080"}, _where)
    assert spec is not None
    assert spec.excluded_inbound_ports == (15090, 15021, 15020, 8080)
    assert "tcp dport 8080 return" in _rules(pod_ruleset(spec), "istio_inbound")


def test_empty_include_lists_capture_nothing() -> None:
    spec, _ = capture_spec(
        {
            "traffic.sidecar.istio.io/includeInboundPorts": "",
            "traffic.sidecar.istio.io/includeOutboundIPRanges": "",
        },
        _where,
    )
    assert spec is not None
    text = pod_ruleset(spec)
    assert "chain prerouting" not in text  # istio-init adds no PREROUTING jump
    assert not any("istio_redirect" in r for r in _rules(text, "istio_output"))


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("includeInboundPorts", "80,99999", "'99999' is not a port"),
        ("excludeOutboundIPRanges", "*", "'*' is not allowed here"),
        ("includeOutboundIPRanges", "10.0.0.0/33", "'10.0.0.0/33' is not an IP range"),
    ],
)
def test_bad_annotation_values(name: str, value: str, why: str) -> None:
    annotation = f"traffic.sidecar.istio.io/{name}"
    spec, problems = capture_spec({annotation: value}, _where)
    assert spec is None
    assert len(problems) == 1 and why in problems[0].message and annotation in problems[0].message
    assert problems[0].location.file == "pod.yaml"


def test_services_are_dnated_to_their_endpoints() -> None:
    text = pod_ruleset(
        None,
        [
            ServiceDnat("10.96.0.11", 9080, (("10.88.1.12", 9080), ("10.88.1.11", 9081))),
            ServiceDnat("10.96.0.10", 8000, (("10.88.1.10", 8080),)),
            ServiceDnat("10.96.0.12", 80, ()),
        ],
    )
    assert "istio" not in text  # no sidecar: no capture
    assert _rules(text, "services") == [
        "ip daddr 10.96.0.10 tcp dport 8000 dnat to 10.88.1.10:8080",
        "ip daddr 10.96.0.11 tcp dport 9080 dnat to numgen random mod 2 map "
        "{ 0 : 10.88.1.11 . 9081, 1 : 10.88.1.12 . 9080 }",
        "ip daddr 10.96.0.12 tcp dport 80 reject with tcp reset",
    ]
    # after the capture's priority: a redirected connection is not DNATed again
    assert "type nat hook output priority -90" in text


def test_the_plan_gives_kube_proxy_every_service_port_once() -> None:
    plan, _ = _plan()
    assert plan is not None
    entries = service_dnat(plan)
    httpbin = plan.pod("foo/httpbin")
    assert httpbin is not None
    foo = plan.cluster_ips["httpbin.foo.svc.cluster.local"]
    assert ServiceDnat(foo, 8000, ((httpbin.pod_ip, 8000),)) in entries
    assert len({(e.cluster_ip, e.port) for e in entries}) == len(entries)


# ---------------------------------------------------------------------------- names


def test_hosts_file_names_services_as_cluster_dns_would() -> None:
    plan, _ = _plan()
    assert plan is not None
    sleep = plan.pod("foo/sleep")
    assert sleep is not None
    lines = hosts_file(plan, sleep).splitlines()
    foo = plan.cluster_ips["httpbin.foo.svc.cluster.local"]
    bar = plan.cluster_ips["httpbin.bar.svc.cluster.local"]
    assert f"{foo}\thttpbin.foo.svc.cluster.local httpbin.foo.svc httpbin.foo httpbin" in lines
    # another namespace's Service: no short name
    assert f"{bar}\thttpbin.bar.svc.cluster.local httpbin.bar.svc httpbin.bar" in lines
    assert f"{sleep.pod_ip}\tsleep" in lines
    assert "search foo.svc.cluster.local svc.cluster.local cluster.local" in resolv_conf(sleep)
    assert "nameserver" not in resolv_conf(sleep)


# ---------------------------------------------------------------------------- ledger


def test_the_ledger_undoes_newest_first_and_only_what_it_lists(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record("dir", "/run/x")
    ledger.record("netns", "tm-1-node")
    ledger.record("link", "br0", "tm-1-node")
    with (tmp_path / "ledger.jsonl").open("a") as out:
        out.write('{"kind": "netns", "na')  # torn by a crash: never created
    removed: list[Entry] = []
    assert ledger.undo(removed.append) == []
    assert removed == [
        Entry("link", "br0", "tm-1-node"),
        Entry("netns", "tm-1-node"),
        Entry("dir", "/run/x"),
    ]
    assert not (tmp_path / "ledger.jsonl").exists()
    assert ledger.undo(removed.append) == [] and len(removed) == 3


def test_the_ledger_is_kept_until_everything_is_gone(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record("netns", "tm-1-0")

    def busy(entry: Entry) -> None:
        raise PermissionError(16, "Device or resource busy")

    assert ledger.undo(busy) == ["netns tm-1-0: Device or resource busy"]
    assert ledger.entries() == [Entry("netns", "tm-1-0")]
    with pytest.raises(ValueError, match="unknown ledger kind"):
        ledger.record("user", "x")


HOST_NETWORK_POD = """
apiVersion: v1
kind: Pod
metadata:
  name: node-agent
  namespace: foo
spec:
  hostNetwork: true
  containers:
  - name: agent
    command: ["trustmesh", "sample", "sleep"]
"""


def test_a_host_network_pod_gets_the_nodes_dnat_and_a_route_to_cluster_ips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node namespace has no default route: without one to the ClusterIP range a
    hostNetwork pod's connect() to a Service fails (ENETUNREACH) before kube-proxy's DNAT
    could apply. (tests/sandbox/test_capture_annotations.py sends the traffic.)"""
    plan, problems = _plan(HOST_NETWORK_POD)
    assert plan is not None, problems
    pod = plan.pod("foo/node-agent")
    assert pod is not None and not pod.sidecar and pod.netns == plan.node_netns
    calls: list[tuple[str, tuple[object, ...]]] = []

    def recorder(name: str) -> object:
        return lambda *args, **_: calls.append((name, args))

    for name in ("setup_node", "attach_pod", "apply_nft", "route_to"):
        monkeypatch.setattr(netns, name, recorder(name))
    monkeypatch.setattr(sandbox_module, "RUN_ROOT", tmp_path / "run")
    monkeypatch.setattr(Sandbox, "_files", lambda self, pod: None)
    Sandbox(plan, tmp_path).build()
    node = plan.node_netns
    assert ("route_to", (node, SERVICE_CIDR)) in calls
    node_tables = {
        args[2]: args[3] for name, args in calls if name == "apply_nft" and args[1] == node
    }
    # the node's Service DNAT (and, beside it, the pods' anti-spoofing on their bridge ports)
    assert set(node_tables) == {sandbox_module.TABLE, sandbox_module.ANTISPOOF_TABLE}
    assert "dnat to" in str(node_tables[sandbox_module.TABLE])
    assert not any(name == "attach_pod" and args[2] == node for name, args in calls)
