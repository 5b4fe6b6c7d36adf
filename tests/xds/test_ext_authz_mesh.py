"""Istio's "external authorization" task through ``trustmesh up`` (process and netns).

The mesh is the task's: httpbin and sleep in ``foo`` with sidecars, Istio's ext-authz
sample manifest as published (image ``registry.istio.io/testing/ext-authz``, no sidecar:
``trustmesh up`` runs its stand-in), the two providers of the task in the mesh config,
and a CUSTOM policy on httpbin's ``/headers``. From sleep, through both sidecars and
real mTLS: allowed with ``x-ext-authz: allow`` (the authorizer's header reaches httpbin),
denied 403 with ``x-ext-authz-check-result: denied`` otherwise, other paths never asked.
Then the policy switches to the HTTP provider by a file write and the same holds. The
netns variant runs every pod in its own network namespace with captured sidecars.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.e2e.test_live_samples import running_mesh
from tests.sandbox.conftest import requires_root
from tests.sandbox.meshrun import sandboxed_mesh
from tests.sandbox.meshrun import trustmesh as sandbox_trustmesh
from trustmesh.runtime.client import HttpResult, http_request
from trustmesh.runtime.running import RunningMesh

pytestmark = pytest.mark.envoy

MANIFESTS = """apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: httpbin, namespace: foo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  template:
    metadata: {labels: {app: httpbin, version: v1}}
    spec:
      serviceAccountName: httpbin
      containers:
      - name: httpbin
        command: ["trustmesh", "sample", "httpbin"]
        ports: [{containerPort: 8000}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 8000}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: sleep, namespace: foo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep, namespace: foo}
spec:
  selector: {matchLabels: {app: sleep}}
  template:
    metadata: {labels: {app: sleep}}
    spec:
      serviceAccountName: sleep
      containers: [{name: sleep, command: ["trustmesh", "sample", "sleep"]}]
---
# Istio's samples/extauthz/ext-authz.yaml
apiVersion: v1
kind: Service
metadata:
  name: ext-authz
  namespace: foo
  labels: {app: ext-authz}
spec:
  ports:
  - {name: http, port: 8000, targetPort: 8000}
  - {name: grpc, port: 9000, targetPort: 9000}
  selector: {app: ext-authz}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ext-authz, namespace: foo}
spec:
  replicas: 1
  selector: {matchLabels: {app: ext-authz}}
  template:
    metadata:
      labels: {app: ext-authz, sidecar.istio.io/inject: "false"}
    spec:
      containers:
      - image: registry.istio.io/testing/ext-authz:latest
        imagePullPolicy: Always
        name: ext-authz
        ports: [{containerPort: 8000}, {containerPort: 9000}]
---
"""
MESH = """extensionProviders:
- name: sample-ext-authz-grpc
  envoyExtAuthzGrpc: {service: ext-authz.foo.svc.cluster.local, port: 9000}
- name: sample-ext-authz-http
  envoyExtAuthzHttp:
    service: ext-authz.foo.svc.cluster.local
    port: 8000
    includeRequestHeadersInCheck: [x-ext-authz]
    headersToUpstreamOnAllow: [x-ext-authz-check-result]
    headersToDownstreamOnDeny: [x-ext-authz-check-result]
"""
POLICY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: CUSTOM
  provider: {name: PROVIDER}
  rules: [{to: [{operation: {paths: ["/headers"]}}]}]
"""


def _get(running: RunningMesh, path: str, *headers: tuple[str, str]) -> HttpResult:
    answer = asyncio.run(
        http_request(
            running.plan,
            running.pod("foo/sleep"),
            f"http://httpbin.foo:8000{path}",
            headers=headers,
            timeout=15,
        )
    )
    assert not answer.reset, answer.why
    return answer


def _task(running: RunningMesh) -> None:
    allowed = _get(running, "/headers", ("x-ext-authz", "allow"))
    assert allowed.status == 200, allowed
    assert b"X-Ext-Authz-Check-Result" in allowed.body and b"allowed" in allowed.body
    denied = _get(running, "/headers", ("x-ext-authz", "deny"))
    assert denied.status == 403, denied
    assert denied.header("x-ext-authz-check-result") == "denied"
    assert b"denied by ext_authz" in denied.body
    assert _get(running, "/ip").status == 200  # not a CUSTOM path: never asked


def test_istio_ext_authz_task(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "apps.yaml").write_text(MANIFESTS)
    policy = config / "policy.yaml"
    policy.write_text(POLICY.replace("PROVIDER", "sample-ext-authz-grpc"))
    mesh_config = tmp_path / "mesh.yaml"
    mesh_config.write_text(MESH)
    with running_mesh(
        config, tmp_path / "state", "127.120.0.0", "--mesh-config", str(mesh_config)
    ) as running:
        asyncio.run(running.wait_synced(timeout=60))  # every proxy has the configuration
        _task(running)
        _write(policy, POLICY.replace("PROVIDER", "sample-ext-authz-http"))
        asyncio.run(running.wait_synced(timeout=30))  # the policy as just written
        denied = _get(running, "/headers")
        # The HTTP provider's deny carries only the header it lists downstream.
        assert denied.status == 403 and denied.header("x-ext-authz-check-received") is None
        _task(running)


def _write(path: Path, text: str) -> None:
    """Replace ``path`` whole: the control plane never reads it half written."""
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)


# ------------------------------------------------------------------ netns isolation


@requires_root
@pytest.mark.sandbox
def test_istio_ext_authz_task_in_network_namespaces(tmp_path: Path) -> None:
    """The same task with every pod in its own network namespace and captured sidecars:
    the sidecar reaches the authorizer by its Service address, as in a cluster."""
    (tmp_path / "apps.yaml").write_text(MANIFESTS)
    (tmp_path / "policy.yaml").write_text(POLICY.replace("PROVIDER", "sample-ext-authz-grpc"))
    mesh_config = tmp_path / "mesh.yaml"
    mesh_config.write_text(MESH)
    with sandboxed_mesh(
        tmp_path / "state", [tmp_path / "apps.yaml", tmp_path / "policy.yaml"], [mesh_config]
    ) as mesh:

        def ask(path: str, *headers: str) -> tuple[int, dict[str, str], str]:
            args = ["request", "--from", "foo/sleep", f"http://httpbin.foo:8000{path}"]
            for header in headers:
                args += ["-H", header]
            done = sandbox_trustmesh(*args, state=mesh.state, timeout=60)
            assert done.returncode == 0, done.stderr
            head, _, body = done.stdout.partition("\n\n")
            status_line, *lines = head.splitlines()
            fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
            return int(status_line.split()[1]), fields, body

        asyncio.run(mesh.running.wait_synced(timeout=60))
        status, _, body = ask("/headers", "x-ext-authz: allow")
        assert status == 200 and "X-Ext-Authz-Check-Result" in body, (status, body)
        status, fields, body = ask("/headers", "x-ext-authz: deny")
        assert status == 403 and fields.get("x-ext-authz-check-result") == "denied", body
        assert ask("/ip")[0] == 200
