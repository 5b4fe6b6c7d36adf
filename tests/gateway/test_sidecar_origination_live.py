"""Istio's "Egress TLS Origination" task at the *sidecar*, through a real sidecar Envoy.

The application sends plain HTTP for ``http://edition.cnn.com/politics``; the
DestinationRule for the ServiceEntry's port 80 (``tls.mode: SIMPLE``) makes sleep's
sidecar originate TLS. A local TLS server with an openssl-made certificate for
edition.cnn.com stands in for the host: the task's YAML as written, plus an ``endpoints``
entry pointing at it (the name cannot resolve to 127.0.0.1) and, where the test says so,
``caCertificates`` (the stand-in's CA is not in the system bundle, which is what a rule
without it checks against). Then a wrong CA, a server certificate for another name and a
missing CA file (503, nothing reaches the server), ``insecureSkipVerify``, MUTUAL with
the rule's client certificate files, DestinationRule subsets of a ServiceEntry host
routed by a VirtualService, and ``credentialName`` (refused on its line). Each live
answer is compared with ``authz check`` offline. One mesh for the module.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.e2e.mesh import mesh_started, replace_file, trustmesh
from tests.gateway.egress_rig import EXTERNAL, External, ExternalPki, external_server
from tests.gateway.openssl_pki import make_ca
from tests.gateway.origination_task import SERVICE_ENTRY, rule
from trustmesh.cli.main import app
from trustmesh.runtime.running import RunningMesh

URL = f"http://{EXTERNAL}/politics"
SUBSET_HOST = "api.example.com"

WORKLOADS = """
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: sleep, namespace: foo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep, namespace: foo}
spec:
  selector:
    matchLabels: {app: sleep}
  template:
    metadata:
      labels: {app: sleep}
    spec:
      serviceAccountName: sleep
      containers:
      - name: sleep
        command: [trustmesh, sample, sleep]
"""


def task(port: int, tls: str) -> str:
    """The task's ServiceEntry and DestinationRule as written (``tls`` replaces the
    ``tls`` block of port 80), the entry's endpoint at the stand-in's ``port``."""
    endpoint = (
        "  endpoints:\n"
        "  - address: 127.0.0.1\n"
        f"    ports: {{http-port: {port}, https-port: {port}}}\n"
    )
    return f"{SERVICE_ENTRY}{endpoint}---{rule(tls)}"


def subsets(v1: int, v2: int, ca: Path, subset: str) -> str:
    """A ServiceEntry with two labelled endpoints (v1 plaintext, v2 TLS), a
    DestinationRule with a subset each (v2 originates TLS), and a VirtualService sending
    every request for the host to ``subset``."""
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: foo}}
spec:
  hosts: [{SUBSET_HOST}]
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {v1}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {v2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: foo}}
spec:
  host: {SUBSET_HOST}
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
    trafficPolicy:
      tls: {{mode: SIMPLE, caCertificates: {ca}, sni: {EXTERNAL}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: foo}}
spec:
  hosts: [{SUBSET_HOST}]
  http:
  - route:
    - destination: {{host: {SUBSET_HOST}, subset: {subset}}}
"""


@dataclass
class Rig:
    root: Path
    pki: ExternalPki
    tls: External  # edition.cnn.com over TLS
    mutual: External  # the same, demanding a client certificate
    impostor: External  # a certificate of the same CA for another name
    plain: External  # a plaintext server (subset v1)
    config_dir: Path = field(init=False)
    state: Path = field(init=False)

    def apply(self, text: str) -> None:
        replace_file(self.config_dir / "egress.yaml", text)
        asyncio.run(RunningMesh.open(self.state).wait_synced(timeout=30))

    def request(self, url: str = URL) -> tuple[str, dict[str, str] | None]:
        """sleep's plain HTTP request through its sidecar: the status line, and the
        stand-in's JSON answer when it answered."""
        answer = trustmesh("request", "--from", "foo/sleep", url, state=self.state)
        status = " ".join(answer.stdout.split("\n", 1)[0].split()[:2])  # "HTTP 200"
        body = answer.stdout.split("\n\n", 1)[1] if "\n\n" in answer.stdout else ""
        try:
            seen = json.loads(body)
        except ValueError:
            seen = None
        return status, seen if isinstance(seen, dict) else None

    def offline(self, host: str = EXTERNAL) -> tuple[int, dict[str, object]]:
        result = CliRunner().invoke(
            app,
            [
                *("authz", "check", "-f", str(self.config_dir), "--from", "foo/sleep"),
                *("--to-host", host, "--port", "80", "--path", "/politics", "-o", "json"),
            ],
        )
        return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("sidecar-origination")
    pki = ExternalPki.make(root / "pki")
    make_ca(pki.root, "wrong-ca", "/O=someone else/CN=wrong.example")
    with (
        external_server(pki) as tls,
        external_server(pki, require_client_cert=True) as mutual,
        external_server(pki, certificate="impostor") as impostor,
        external_server(pki, tls=False) as plain,
    ):
        started = Rig(root, pki, tls, mutual, impostor, plain)
        started.config_dir, started.state = root / "config", root / "state"
        started.config_dir.mkdir()
        (started.config_dir / "workloads.yaml").write_text(WORKLOADS)
        ca = pki.path("ca.crt")
        (started.config_dir / "egress.yaml").write_text(
            task(tls.port, f"        mode: SIMPLE\n        caCertificates: {ca}")
        )
        mesh_file = root / "mesh.yaml"
        mesh_file.write_text("outboundTrafficPolicy:\n  mode: ALLOW_ANY\n")
        with mesh_started(started.config_dir, mesh_file, state=started.state, base="127.160.0.0"):
            yield started


def _simple(rig: Rig, ca: str = "ca.crt", extra: str = "") -> str:
    return f"        mode: SIMPLE\n        caCertificates: {rig.pki.path(ca)}{extra}"


def test_the_tasks_plain_http_request_leaves_the_sidecar_over_tls(rig: Rig) -> None:
    rig.apply(task(rig.tls.port, _simple(rig)))
    before = len(rig.tls.seen)
    status, seen = rig.request()
    assert status == "HTTP 200", status
    # The stand-in only speaks TLS: it answered, so the sidecar originated TLS, for
    # edition.cnn.com, and checked its certificate against caCertificates.
    assert seen == {"path": "/politics", "host": EXTERNAL, "sni": EXTERNAL, "client_cn": ""}
    assert len(rig.tls.seen) == before + 1
    code, offline = rig.offline()
    assert (code, offline["verdict"]) == (0, "allow")
    assert "the sidecar originates TLS" in str(offline["reason"])
    assert "SNI edition.cnn.com" in str(offline["reason"])


def test_the_task_as_written_checks_the_server_against_the_system_bundle(rig: Rig) -> None:
    """No caCertificates: the system CA bundle (Istio's VERIFY_CERTIFICATE_AT_CLIENT),
    which does not hold the stand-in's private CA: 503, nothing reaches it."""
    rig.apply(task(rig.tls.port, "        mode: SIMPLE # initiates HTTPS"))
    before = len(rig.tls.seen)
    status, _ = rig.request()
    assert status == "HTTP 503", status
    assert len(rig.tls.seen) == before
    assert "system CA bundle" in str(rig.offline()[1]["reason"])


@pytest.mark.parametrize(
    ("server", "ca"),
    [("tls", "wrong-ca.crt"), ("impostor", "ca.crt")],
    ids=["wrong-ca", "certificate-for-another-name"],
)
def test_a_server_the_rule_does_not_vouch_for_gets_nothing(rig: Rig, server: str, ca: str) -> None:
    target: External = getattr(rig, server)
    rig.apply(task(target.port, _simple(rig, ca)))
    before = len(target.seen)
    status, _ = rig.request()
    assert status == "HTTP 503", status
    assert len(target.seen) == before  # no request, in plaintext or otherwise


def test_a_ca_file_that_cannot_be_loaded_leaves_no_way_out(rig: Rig) -> None:
    """caCertificates names no file: the sidecar's Envoy refuses the cluster (the
    control plane shows the rejection), so the host has no cluster — 503 — and nothing
    leaves in plaintext. A new host, so no earlier cluster of that name lingers."""
    missing = rig.pki.path("no-such-ca.crt")
    good = task(rig.tls.port, _simple(rig))
    extra = f"""
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: missing-ca, namespace: foo}}
spec:
  hosts: [missing-ca.example.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {rig.plain.port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: missing-ca, namespace: foo}}
spec:
  host: missing-ca.example.com
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {missing}}}
"""
    replace_file(rig.config_dir / "egress.yaml", good + extra)
    running = RunningMesh.open(rig.state)
    deadline = time.monotonic() + 30
    nack = ""
    while not nack and time.monotonic() < deadline:
        status = running.syncz() or {}
        nack = " ".join(str(p.get("nack") or "") for p in status.get("proxies", {}).values())
        time.sleep(0.1)  # polling the control plane's debug endpoint: no event to wait on
    assert str(missing) in nack, nack
    before = len(rig.plain.seen)
    status_line, _ = rig.request("http://missing-ca.example.com/politics")
    assert status_line == "HTTP 503", status_line
    assert len(rig.plain.seen) == before  # the plaintext server never heard of it
    rig.apply(good)


def test_insecure_skip_verify_checks_nothing(rig: Rig) -> None:
    rig.apply(
        task(rig.impostor.port, _simple(rig, "wrong-ca.crt", "\n        insecureSkipVerify: true"))
    )
    status, seen = rig.request()
    assert status == "HTTP 200", status
    assert seen is not None and seen["sni"] == EXTERNAL
    assert "insecureSkipVerify" in str(rig.offline()[1]["reason"])


def test_mutual_presents_the_rules_client_certificate(rig: Rig) -> None:
    rig.apply(task(rig.mutual.port, _simple(rig)))
    status, _ = rig.request()
    assert status == "HTTP 503", status  # SIMPLE has no client certificate to give
    key, cert = rig.pki.path("client.key"), rig.pki.path("client.crt")
    rig.apply(
        task(
            rig.mutual.port,
            f"        mode: MUTUAL\n        clientCertificate: {cert}\n"
            f"        privateKey: {key}\n        caCertificates: {rig.pki.path('ca.crt')}",
        )
    )
    status, seen = rig.request()
    assert status == "HTTP 200", status
    assert seen is not None and seen["client_cn"] == "egress.client"
    assert f"presenting the client certificate {cert}" in str(rig.offline()[1]["reason"])


def test_subsets_of_a_service_entry_host_routed_by_a_virtual_service(rig: Rig) -> None:
    url = f"http://{SUBSET_HOST}/politics"
    ca = rig.pki.path("ca.crt")
    rig.apply(subsets(rig.plain.port, rig.tls.port, ca, "v2"))
    plain_before, tls_before = len(rig.plain.seen), len(rig.tls.seen)
    status, seen = rig.request(url)
    assert status == "HTTP 200", status
    assert seen is not None and seen["sni"] == EXTERNAL  # v2's endpoint, over v2's TLS
    assert (len(rig.plain.seen), len(rig.tls.seen)) == (plain_before, tls_before + 1)
    rig.apply(subsets(rig.plain.port, rig.tls.port, ca, "v1"))
    status, seen = rig.request(url)
    assert status == "HTTP 200", status
    assert seen is not None and seen["sni"] == ""  # v1: the plaintext endpoint
    assert (len(rig.plain.seen), len(rig.tls.seen)) == (plain_before + 1, tls_before + 1)


def test_credential_name_at_a_sidecar_is_refused_on_its_line(rig: Rig) -> None:
    """istiod would leave this cluster in plaintext at the sidecar: the control plane
    refuses the configuration instead and names the field; the sidecar keeps the last
    good configuration (which still originates TLS)."""
    rig.apply(task(rig.tls.port, _simple(rig)))
    with pytest.raises(ValueError, match=r"egress\.yaml:\d+ .*credentialName"):
        rig.apply(task(rig.tls.port, "        mode: SIMPLE\n        credentialName: cnn-secret"))
    status, seen = rig.request()
    assert status == "HTTP 200" and seen is not None and seen["sni"] == EXTERNAL
    replace_file(rig.config_dir / "egress.yaml", task(rig.tls.port, _simple(rig)))
