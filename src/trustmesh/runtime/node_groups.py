"""``trustmesh node join --group NS/NAME``: a VM's workload from its WorkloadGroup.

What ``istioctl x workload entry configure`` prepares for a VM, and its istio-agent
started with ``ISTIO_META_AUTO_REGISTER_GROUP``: the host runs one workload per group —
the group template's identity (serviceAccount), labels and ports, an app (trustmesh's
httpbin stand-in on the template's first port) and its sidecar — and registers it with
the group; the replica writes its WorkloadEntry (``runtime/registration.py``).

The host plans the workload as one more pod of the mesh's plan (a Pod written to
``STATE/workloadgroups.yaml``, pinned to this host, after every other object so no other
pod's address moves) and names it as istiod names the entry: ``<group>-<address>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trustmesh.api import models as m
from trustmesh.api.workloadgroup import entry_name, identity_of
from trustmesh.config import load_config
from trustmesh.runtime.node_probe import ProbeError, parse_probe
from trustmesh.runtime.plan import Isolation, plan_mesh
from trustmesh.runtime.supervisor import StartError

__all__ = ["GROUPS_FILE", "VmWorkloads", "vm_workloads"]

GROUPS_FILE = "workloadgroups.yaml"
APP_COMMAND = ["trustmesh", "sample", "httpbin"]


@dataclass(frozen=True, slots=True)
class VmWorkloads:
    """The file of the planned workloads, each one's ref → its group's name, and the
    refs of those whose group has a probe → the probe (:class:`~trustmesh.runtime.
    node_probe.Probe` JSON)."""

    path: Path
    groups: tuple[tuple[str, str], ...]
    probes: tuple[tuple[str, str], ...] = ()


def vm_workloads(
    config: list[str], groups: list[str], node: str, base: str, state: Path
) -> VmWorkloads:
    """Write the groups' workloads as Pods of this host (:class:`StartError` when a group
    is not in ``config`` or the workloads cannot be planned)."""
    loaded = load_config(config, compile_policy=False)
    if loaded.errors:
        raise StartError("the configuration has errors", loaded.errors)
    found: dict[str, Any] = {
        f"{r.namespace}/{r.name}": r for r in loaded.snapshot.resources if r.kind == "WorkloadGroup"
    }
    documents: list[dict[str, Any]] = []
    probes: list[str] = []
    for index, ref in enumerate(groups):
        resource = found.get(ref)
        if resource is None:
            raise StartError(f"--group {ref}: no WorkloadGroup {ref} in the configuration")
        spec: m.WorkloadGroupSpec = resource.spec
        try:
            probe = None if spec.probe is None else parse_probe(spec.probe, spec.template.ports)
        except ProbeError as exc:
            raise StartError(f"{resource.location('spec', 'probe')}: {exc}") from None
        probes.append("" if probe is None else probe.to_json())
        documents.append(
            _pod(resource.namespace, f"{resource.name}-vm-{index}", resource.spec, node)
        )
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state / GROUPS_FILE
    _write(path, documents)
    planned = load_config([*config, str(path)], compile_policy=False)
    if planned.errors:
        raise StartError("the WorkloadGroups' workloads are invalid", planned.errors)
    plan, problems = plan_mesh(planned.snapshot, base=base, isolation=Isolation.PROCESS)
    if plan is None:
        raise StartError("the WorkloadGroups' workloads cannot run here", problems)
    address = {p.ref: p.pod_ip for p in plan.pods}
    named: list[tuple[str, str]] = []
    for ref, document in zip(groups, documents, strict=True):
        metadata = document["metadata"]
        group = ref.partition("/")[2]
        metadata["name"] = entry_name(group, address[f"{metadata['namespace']}/{metadata['name']}"])
        named.append((f"{metadata['namespace']}/{metadata['name']}", group))
    _write(path, documents)
    probed = tuple((r, p) for (r, _), p in zip(named, probes, strict=True) if p)
    return VmWorkloads(path, tuple(named), probed)


def _pod(namespace: str, name: str, spec: m.WorkloadGroupSpec, node: str) -> dict[str, Any]:
    labels = {**spec.template.labels, **spec.metadata.labels, "sidecar.istio.io/inject": "true"}
    ports = [{"containerPort": port} for port in spec.template.ports.values()]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "serviceAccountName": identity_of(spec),
            "containers": [{"name": "vm", "command": APP_COMMAND, "ports": ports}],
        },
    }


def _write(path: Path, documents: list[dict[str, Any]]) -> None:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
