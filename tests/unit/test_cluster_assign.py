"""``up --hosts``: which host runs which pod (spec.nodeName first, the rest in turn)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.meshutil import ROOT
from trustmesh.runtime.cluster import assign_pods
from trustmesh.runtime.supervisor import StartError

MESH = ROOT / "examples" / "mesh" / "workloads.yaml"


def _with_node(tmp_path: Path, node: str) -> str:
    text = MESH.read_text()
    # foo/sleep's pod template pinned to a host
    head, sep, tail = text.partition("  name: sleep\n  namespace: foo\n")
    assert sep, "examples/mesh changed: foo/sleep's Deployment header not found"
    tail = tail.replace("    spec:\n", f"    spec:\n      nodeName: {node}\n", 1)
    path = tmp_path / "workloads.yaml"
    path.write_text(head + sep + tail)
    return str(path)


def test_pods_spread_in_turn_and_node_name_is_respected(tmp_path: Path) -> None:
    spread = assign_pods([str(MESH)], ["host-1", "host-2"], "127.10.0.0")
    assert "foo/httpbin" in spread["host-1"] and "foo/sleep" in spread["host-2"]
    assert sum(map(len, spread.values())) == 7
    pinned = assign_pods([_with_node(tmp_path, "host-1")], ["host-1", "host-2"], "127.10.0.0")
    assert "foo/sleep" in pinned["host-1"] and "foo/sleep" not in pinned["host-2"]


def test_a_node_name_outside_the_hosts_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StartError, match=r"spec\.nodeName 'host-9'"):
        assign_pods([_with_node(tmp_path, "host-9")], ["host-1", "host-2"], "127.10.0.0")
