"""The fleet benchmark's mesh: namespace ``fleet`` with workloads ``app-<i>``, each pod on
its own loopback address, their registrations, and the config directory the control plane
reads (every write lands whole), with the policies the benchmark switches between."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmesh.xds.controlplane import ProxyRegistration

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "fleet"
APP_PORT = 8000
STRICT = (ROOT / "examples/scenarios/12-mesh-strict/config.yaml").read_text()
ALLOW_ALL = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: fleet-policy, namespace: {NAMESPACE}}}
spec:
  action: ALLOW
  rules:
  - to: [{{operation: {{paths: ["/*"]}}}}]
"""
DENY_GET = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: fleet-policy, namespace: {NAMESPACE}}}
spec:
  action: DENY
  rules:
  - to: [{{operation: {{methods: ["GET"]}}}}]
"""
Json = dict[str, Any]


def pod_ip(index: int) -> str:
    """Each pod its own loopback address (Linux routes all of 127/8 to lo)."""
    return f"127.0.{100 + index // 200}.{index % 200 + 1}"


def app_ip(index: int) -> str:
    # Not the pod IP: the inbound cluster would send requests back into the sidecar.
    return f"127.0.{150 + index // 200}.{index % 200 + 1}"


def registration(index: int) -> ProxyRegistration:
    return ProxyRegistration.sidecar(
        f"{NAMESPACE}/app-{index}", pod_ip(index), app_address=app_ip(index)
    )


def workload_docs(lo: int, hi: int) -> str:
    """ServiceAccount, Deployment and Service ``app-<i>`` for ``lo <= i < hi``."""
    docs = []
    for i in range(lo, hi):
        docs.append(
            f"apiVersion: v1\nkind: ServiceAccount\n"
            f"metadata: {{name: app-{i}, namespace: {NAMESPACE}}}\n---\n"
            f"apiVersion: apps/v1\nkind: Deployment\n"
            f"metadata: {{name: app-{i}, namespace: {NAMESPACE}}}\n"
            f"spec:\n  selector:\n    matchLabels: {{app: app-{i}}}\n"
            f"  template:\n    metadata:\n      labels: {{app: app-{i}}}\n"
            f"    spec:\n      serviceAccountName: app-{i}\n"
            f"      containers:\n      - name: app\n"
            f"        ports: [{{containerPort: {APP_PORT}}}]\n"
            f"---\napiVersion: v1\nkind: Service\n"
            f"metadata: {{name: app-{i}, namespace: {NAMESPACE}}}\n"
            f"spec:\n  selector: {{app: app-{i}}}\n"
            f"  ports: [{{name: http, port: {APP_PORT}, targetPort: {APP_PORT}}}]\n---\n"
        )
    return "".join(docs)


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")  # not .yaml: the control plane never reads it
    partial.write_text(text)
    os.replace(partial, path)


@dataclass(frozen=True)
class FleetConfig:
    """The directory the control plane reads; every write lands whole (os.replace)."""

    path: Path

    @classmethod
    def create(cls, path: Path, count: int) -> FleetConfig:
        path.mkdir(parents=True)
        namespaces = (
            f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n"
            "  labels: {istio-injection: enabled}\n---\n"
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: istio-system\n"
        )
        (path / "namespaces.yaml").write_text(namespaces)
        (path / "mtls.yaml").write_text(STRICT)
        config = cls(path)
        config.add_workloads(0, count)
        config.write_policy(ALLOW_ALL)
        return config

    def add_workloads(self, lo: int, hi: int) -> None:
        write_atomically(self.path / f"workloads-{lo:04d}.yaml", workload_docs(lo, hi))

    def write_policy(self, text: str) -> None:
        write_atomically(self.path / "policy.yaml", text)
