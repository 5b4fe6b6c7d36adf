"""The WorkloadEntry istiod's auto-registration makes from a WorkloadGroup (pure), and the
group's validation (file:line and field, as every other kind)."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from pathlib import Path

import pytest

from trustmesh.api.workloadgroup import (
    GroupRefused,
    check_identity,
    entry_from_group,
    entry_name,
    owned_by,
    parse_group,
)
from trustmesh.config import load_config
from trustmesh.runtime.node_probe import Probe, ProbeError, keep_probing, parse_probe, probe_once

GROUP = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "WorkloadGroup",
    "metadata": {"name": "vm", "namespace": "foo", "uid": "u-1"},
    "spec": {
        "metadata": {"labels": {"app": "vm", "tier": "group"}, "annotations": {"a": "b"}},
        "template": {
            "serviceAccount": "vm",
            "ports": {"http": 8000},
            "labels": {"app": "template", "version": "v1", "tier": "template"},
            "network": "net-a",
            "locality": "us/east",
            "weight": 3,
        },
    },
}
AT = dt.datetime(2026, 12, 7, 2, 0, 1, 250000, tzinfo=dt.UTC)  # calendar: ok, only formatted


def test_the_entry_name_is_istios() -> None:
    assert entry_name("vm", "10.0.0.5") == "vm-10.0.0.5"
    assert entry_name("vm", "fd00::5") == "vm-fd00--5"  # IPv6 ':' → '-'
    assert entry_name("vm", "10.0.0.5", "net-b") == "vm-10.0.0.5-net-b"
    long = entry_name("g" * 250, "10.0.0.5")
    assert len(long) == 253 and long.endswith("-10.0.0.5")  # the last 253 characters


def test_the_entry_is_the_template_with_the_proxys_address_labels_and_network() -> None:
    entry = entry_from_group(
        GROUP, address="10.0.0.5", proxy_labels={"tier": "proxy"}, network="net-b",
        controller="r1", connected_at=AT,
    )  # fmt: skip
    labels = {"app": "vm", "version": "v1", "tier": "proxy"}  # template < group < proxy
    assert entry["metadata"] == {
        "name": "vm-10.0.0.5-net-b",
        "namespace": "foo",
        "labels": labels,
        "annotations": {
            "istio.io/autoRegistrationGroup": "vm",
            "a": "b",
            "istio.io/workloadController": "r1",
            "istio.io/connectedAt": "2026-12-07T02:00:01.25Z",  # Go's RFC3339Nano
        },
        "ownerReferences": [
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "WorkloadGroup",
                "name": "vm",
                "controller": True,
                "uid": "u-1",
            }
        ],
    }
    assert entry["spec"] == {
        "address": "10.0.0.5", "labels": labels, "ports": {"http": 8000},
        "serviceAccount": "vm", "network": "net-b", "locality": "us/east", "weight": 3,
    }  # fmt: skip
    assert owned_by(entry, "vm") and not owned_by(entry, "other")
    whole = AT.replace(microsecond=0)
    at = entry_from_group(GROUP, address="10.0.0.5", controller="r1", connected_at=whole)
    assert at["metadata"]["annotations"]["istio.io/connectedAt"] == "2026-12-07T02:00:01Z"
    assert at["spec"]["network"] == "net-a"  # the template's, when the proxy names none


def test_only_the_groups_identity_registers() -> None:
    spec = parse_group(GROUP)
    check_identity("foo/vm", spec, "vm")
    with pytest.raises(GroupRefused) as refused:
        check_identity("foo/vm", spec, "sleep")
    assert refused.value.code == "identity-not-group"
    no_account = parse_group({"spec": {"template": {"ports": {"http": 80}}}})
    check_identity("foo/vm", no_account, "default")
    with pytest.raises(GroupRefused):  # fail closed: the endpoint's identity is default
        check_identity("foo/vm", no_account, "vm")


def test_a_group_without_template_or_with_an_address_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\n"
        "metadata: {name: a, namespace: foo}\nspec:\n  template:\n    address: 10.0.0.1\n"
        "---\napiVersion: networking.istio.io/v1\nkind: WorkloadGroup\n"
        "metadata: {name: b, namespace: foo}\nspec:\n  metadata: {labels: {app: b}}\n"
    )
    loaded = load_config([str(bad)], compile_policy=False)
    found = sorted((d.location.line, d.code, d.message) for d in loaded.errors)
    assert found == [
        (5, "invalid-field",
         "template.address: a WorkloadGroup's template cannot set an address"),
        (12, "missing-field", "is required"),
    ]  # fmt: skip


def test_a_groups_probe_runs_on_the_host_as_kubernetes_defines_it() -> None:
    probe = parse_probe({"httpGet": {"path": "status/200", "port": "http"}}, {"http": 8000})
    assert probe == Probe("httpGet", 8000, "/status/200", 0.0, 10.0, 1.0, 1, 3)
    assert Probe.from_json(probe.to_json()) == probe
    tcp = parse_probe({"tcpSocket": {"port": 9}, "periodSeconds": 2, "failureThreshold": 1}, {})
    assert (tcp.kind, tcp.port, tcp.period, tcp.failure_threshold) == ("tcpSocket", 9, 2.0, 1)
    for bad, why in (
        ({"exec": {"command": ["true"]}}, "probe.exec: only httpGet and tcpSocket"),
        ({"httpGet": {"port": "grpc"}}, "probe.httpGet.port: a port number or a template"),
        ({"httpGet": {"port": 80, "scheme": "HTTPS"}}, "probe.httpGet.scheme: only HTTP"),
        ({"tcpSocket": {"port": 80}, "periodSeconds": 0}, "probe.periodSeconds: a number ≥ 1"),
        ({}, "probe: exactly one of"),
    ):
        with pytest.raises(ProbeError, match=re.escape(why)):
            parse_probe(bad, {"http": 8000})


def test_probes_report_each_transition_after_their_thresholds() -> None:
    async def main() -> list[tuple[bool, str]]:
        answer = {"code": 200}

        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(f"HTTP/1.1 {answer['code']} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(app, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        probe = Probe("httpGet", port, "/", period=1.0, failure_threshold=2)
        assert await probe_once(probe, "127.0.0.1") == (True, "")
        reports: list[tuple[bool, str]] = []
        changed = asyncio.Event()
        stop = asyncio.Event()

        async def report(healthy: bool, why: str) -> None:
            reports.append((healthy, why))
            changed.set()

        task = asyncio.create_task(keep_probing(probe, "127.0.0.1", report, stop))
        try:
            await asyncio.wait_for(changed.wait(), 10)
            changed.clear()
            answer["code"] = 503  # two failures in a row, then one report
            await asyncio.wait_for(changed.wait(), 10)
            changed.clear()
            server.close()
            await server.wait_closed()
            refused = await probe_once(probe, "127.0.0.1")
            assert not refused[0] and f"127.0.0.1:{port}" in refused[1]
        finally:
            stop.set()
            await task
        return reports

    assert asyncio.run(main()) == [(True, ""), (False, "HTTP probe failed with statuscode: 503")]
