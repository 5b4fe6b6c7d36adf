"""Istio's "egress gateway with TLS origination" task through a real egress gateway Envoy
(issue 12, must show 3: the gateway side).

A local TLS server with an openssl-made certificate for edition.cnn.com stands in for the
external host; a ServiceEntry declares it. The egress gateway terminates mesh mTLS
(Gateway ``tls.mode: ISTIO_MUTUAL``), so the client's SPIFFE identity is known there; an
AuthorizationPolicy on the gateway pods admits only sleep's principal; the gateway
originates TLS to the external host from the DestinationRule (SIMPLE, then MUTUAL with the
credentialName client certificate). The mesh clients here are what sleep's and
not-sleep's sidecars present: certificates from the mesh's CA for their service accounts.
And under REGISTRY_ONLY, sleep's own sidecar cannot reach the host while the ServiceEntry
is exported to the gateway's namespace only. One mesh for the module.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.e2e.mesh import trustmesh
from tests.gateway.egress_rig import (
    ALLOW_SLEEP,
    EXTERNAL,
    EgressMesh,
    External,
    ExternalPki,
    egress_mesh,
    external_server,
    task_config,
    through_gateway,
)
from trustmesh.cli.main import app

GATEWAY_PORT = 8080  # the Gateway's port 80 is the egress gateway Service's targetPort 8080
GATEWAY_ID = "spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway-service-account"


@dataclass
class Rig:
    pki: ExternalPki
    tls: External  # edition.cnn.com over TLS
    mutual: External  # the same, demanding a client certificate
    plain: External  # its plaintext port 80
    impostor: External  # a certificate of the same CA for another name
    mesh: EgressMesh = field(init=False)

    def config(
        self,
        *,
        mode: str = "SIMPLE",
        port: int | None = None,
        mesh_route: bool = True,
        export_to: str = '["istio-system"]',
    ) -> str:
        task = task_config(
            port or self.tls.port,
            http_port=self.plain.port,
            mode=mode,
            mesh_route=mesh_route,
            export_to=export_to,
        )
        return "\n---\n".join((self.pki.secret(client=True), task, ALLOW_SLEEP))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("egress")
    pki = ExternalPki.make(root / "pki")
    with (
        external_server(pki) as tls,
        external_server(pki, require_client_cert=True) as mutual,
        external_server(pki, tls=False) as plain,
        external_server(pki, certificate="impostor") as impostor,
    ):
        started = Rig(pki, tls, mutual, plain, impostor)
        with egress_mesh(root, base="127.150.0.0", config=started.config()) as mesh:
            started.mesh = mesh
            yield started


def test_sleeps_identity_reaches_the_external_host_with_tls_originated(rig: Rig) -> None:
    rig.mesh.apply(rig.config())
    sleep = rig.mesh.mesh_client("foo", "sleep")
    answer = through_gateway(
        rig.mesh.gateway_address(), GATEWAY_PORT, sleep, "/politics", request_id="allowed-1"
    )
    assert answer.status == 200, answer.body
    assert answer.peer_uri == GATEWAY_ID  # the hop to the gateway is mesh mTLS
    seen = json.loads(answer.body)
    # The external server got TLS from the gateway, for edition.cnn.com, checked against
    # the credential's CA (the gateway verified its certificate to connect at all).
    assert seen == {"path": "/politics", "host": EXTERNAL, "sni": EXTERNAL, "client_cn": ""}


def test_another_workload_is_denied_and_the_gateway_logs_who(rig: Rig) -> None:
    rig.mesh.apply(rig.config())
    log = rig.mesh.gateway_log()
    before_log, before_seen = log.stat().st_size, len(rig.tls.seen)
    other = rig.mesh.mesh_client("foo", "not-sleep")
    # The gateway is the edge: it makes its own x-request-id. The path marks the request.
    answer = through_gateway(
        rig.mesh.gateway_address(), GATEWAY_PORT, other, "/politics?denied-1", request_id="x"
    )
    assert answer.status == 403
    assert b"RBAC: access denied" in answer.body
    assert len(rig.tls.seen) == before_seen  # nothing left the mesh
    entry = _log_entry(log, before_log, "/politics?denied-1")
    assert entry["source_principal"] == "spiffe://cluster.local/ns/foo/sa/not-sleep"
    assert str(entry["response_code"]) == "403"
    assert entry["workload"] == "istio-system/istio-egressgateway"


def test_a_client_without_a_mesh_certificate_is_refused(rig: Rig) -> None:
    rig.mesh.apply(rig.config())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        through_gateway(
            rig.mesh.gateway_address(), GATEWAY_PORT, context, "/politics", request_id="anon-1"
        )


def test_mutual_origination_presents_the_credentials_client_certificate(rig: Rig) -> None:
    sleep = rig.mesh.mesh_client("foo", "sleep")
    address = rig.mesh.gateway_address()
    # SIMPLE to a server that demands a client certificate: the gateway has none to give.
    rig.mesh.apply(rig.config(mode="SIMPLE", port=rig.mutual.port))
    refused = through_gateway(address, GATEWAY_PORT, sleep, "/", request_id="simple-1")
    assert refused.status == 503
    rig.mesh.apply(rig.config(mode="MUTUAL", port=rig.mutual.port))
    answer = through_gateway(address, GATEWAY_PORT, sleep, "/politics", request_id="mutual-1")
    assert answer.status == 200, answer.body
    assert json.loads(answer.body)["client_cn"] == "egress.client"


def test_origination_refuses_a_server_whose_certificate_names_another_host(rig: Rig) -> None:
    """SIMPLE checks the external server: the credential's CA signed the impostor's
    certificate, but for impostor.example.com, not edition.cnn.com: 503, nothing sent."""
    rig.mesh.apply(rig.config(port=rig.impostor.port))
    sleep = rig.mesh.mesh_client("foo", "sleep")
    answer = through_gateway(
        rig.mesh.gateway_address(), GATEWAY_PORT, sleep, "/politics", request_id="impostor"
    )
    assert answer.status == 503
    assert rig.impostor.seen == []


def test_registry_only_keeps_sleeps_sidecar_from_the_host_it_is_not_exported_to(
    rig: Rig,
) -> None:
    """No mesh route to the gateway: exported to istio-system only, the host is unknown to
    sleep's sidecar (502, nothing sent); exported to every namespace, the sidecar goes
    straight to it — the hole exportTo closes."""
    url = f"http://{EXTERNAL}/politics"
    rig.mesh.apply(rig.config(mesh_route=False))
    before = len(rig.plain.seen)
    blocked = trustmesh("request", "--from", "foo/sleep", url, state=rig.mesh.state)
    assert blocked.stdout.startswith("HTTP 502"), blocked.stdout + blocked.stderr
    assert len(rig.plain.seen) == before
    rig.mesh.apply(rig.config(mesh_route=False, export_to='["*"]'))
    direct = trustmesh("request", "--from", "foo/sleep", url, state=rig.mesh.state)
    assert direct.stdout.startswith("HTTP 200"), direct.stdout + direct.stderr
    assert rig.plain.seen[-1]["host"] == EXTERNAL


def test_sleep_reaches_the_host_through_its_sidecar_and_the_egress_gateway(rig: Rig) -> None:
    """The whole task: sleep's plain HTTP request for edition.cnn.com → its sidecar (the
    mesh route) → mesh mTLS → the egress gateway (policy: sleep's principal) → TLS it
    originates → the external server."""
    rig.mesh.apply(rig.config())
    before, before_plain = len(rig.tls.seen), len(rig.plain.seen)
    url = f"http://{EXTERNAL}/politics"
    answer = trustmesh("request", "--from", "foo/sleep", url, state=rig.mesh.state)
    assert answer.stdout.startswith("HTTP 200"), answer.stdout + answer.stderr
    seen = json.loads(answer.stdout.split("\n\n", 1)[1])
    assert seen == {"path": "/politics", "host": EXTERNAL, "sni": EXTERNAL, "client_cn": ""}
    assert len(rig.tls.seen) == before + 1
    assert len(rig.plain.seen) == before_plain  # never straight to port 80


def test_another_workload_through_its_sidecar_is_denied_at_the_gateway(rig: Rig) -> None:
    rig.mesh.apply(rig.config())
    log = rig.mesh.gateway_log()
    offset, before = log.stat().st_size, len(rig.tls.seen)
    url = f"http://{EXTERNAL}/politics?from-not-sleep"
    answer = trustmesh("request", "--from", "foo/not-sleep", url, state=rig.mesh.state)
    assert answer.stdout.startswith("HTTP 403"), answer.stdout + answer.stderr
    assert len(rig.tls.seen) == before
    entry = _log_entry(log, offset, "/politics?from-not-sleep")
    assert entry["source_principal"] == "spiffe://cluster.local/ns/foo/sa/not-sleep"


@pytest.mark.parametrize(
    ("client", "code", "verdict", "status"),
    [("foo/sleep", 0, "allow", "HTTP 200"), ("foo/not-sleep", 3, "deny", "HTTP 403")],
)
def test_authz_check_answers_what_the_egress_gateway_does(
    rig: Rig, client: str, code: int, verdict: str, status: str
) -> None:
    """Offline, ``authz check --to-host edition.cnn.com`` follows the mesh route to the
    egress gateway and decides there, as the live mesh does."""
    rig.mesh.apply(rig.config())
    url = f"http://{EXTERNAL}/politics"
    live = trustmesh("request", "--from", client, url, state=rig.mesh.state)
    assert live.stdout.startswith(status), live.stdout + live.stderr
    offline = CliRunner().invoke(
        app,
        [
            *("authz", "check", "-f", str(rig.mesh.config_dir), "--from", client),
            *("--to-host", EXTERNAL, "--port", "80", "--path", "/politics", "-o", "json"),
            *("--mesh-config", str(rig.mesh.root / "mesh.yaml")),
        ],
    )
    answer = json.loads(offline.stdout)
    assert (offline.exit_code, answer["verdict"]) == (code, verdict), answer


def _log_entry(log: Path, offset: int, path: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in log.read_bytes()[offset:].decode(errors="replace").splitlines():
            if line.startswith("{"):
                entry: dict[str, object] = json.loads(line)
                if entry.get("path") == path:
                    return entry
        time.sleep(0.05)  # Envoy flushes its access log every 100 ms: no event to wait on
    raise AssertionError(f"no access log entry for {path} in {log}")
