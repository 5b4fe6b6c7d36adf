"""Istio's "secure gateways" task through a real gateway Envoy (issue 12, must show 1).

httpbin.example.com behind the ingress gateway with ``credentialName`` Secrets made with
openssl: SIMPLE TLS, then MUTUAL (the right client certificate, none, one from another
CA), then the Secret replaced while requests run — the new certificate is served with no
restart and no failed request. One mesh for the module (process mode).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from collections.abc import Iterator

import pytest

from tests.gateway.rig import (
    HOST,
    GatewayMesh,
    Pki,
    gateway_mesh,
    http_get,
    https_get,
    tls_context,
)

HTTPS_PORT = 8443  # the gateway Service maps 443 → 8443, as Istio's chart does

VIRTUAL_SERVICE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: foo}
spec:
  hosts: [httpbin.example.com]
  gateways: [istio-system/mygateway]
  http:
  - match:
    - uri: {prefix: /status}
    - uri: {prefix: /delay}
    route:
    - destination: {host: httpbin, port: {number: 8000}}
"""


def gateway(mode: str, *, extra: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: mygateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    tls: {{mode: {mode}, credentialName: httpbin-credential{extra}}}
    hosts: [httpbin.example.com]
"""


def config(pki: Pki, mode: str, *, cert: str = "httpbin.example.com") -> str:
    ca = "example.com" if mode != "SIMPLE" else None
    secret = pki.tls_secret("httpbin-credential", cert, ca=ca)
    return "\n---\n".join([secret, gateway(mode), VIRTUAL_SERVICE])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[GatewayMesh]:
    root = tmp_path_factory.mktemp("secure-gateway")
    with gateway_mesh(root, base="127.60.0.0", config=config(pki, "SIMPLE")) as running:
        yield running


class KeptAlive:
    """One TLS connection reused for several requests."""

    def __init__(self, address: str, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection((address, port), timeout=10)
        self.tls = context.wrap_socket(raw, server_hostname=HOST)
        self.connection = http.client.HTTPConnection(HOST, port, timeout=10)
        self.connection.sock = self.tls
        cert = self.tls.getpeercert() or {}
        self.organization = dict(x[0] for x in cert.get("subject", ()))["organizationName"]

    def get(self, path: str) -> int:
        self.connection.request("GET", path, headers={"Host": HOST})
        response = self.connection.getresponse()
        response.read()
        return response.status

    def close(self) -> None:
        self.connection.close()


def refused(mesh: GatewayMesh, context: ssl.SSLContext) -> str:
    """Which handshake check of the gateway Envoy refused the client (its own counter:
    with TLS 1.3 the client may see the alert, or only the connection closing)."""
    before = mesh.tls_failures()
    try:
        answer = https_get(mesh.address(), HTTPS_PORT, "/status/200", context)
    except (ssl.SSLError, ConnectionError):
        after = mesh.tls_failures()
        failed = [k for k, v in after.items() if v > before.get(k, 0)]
        assert len(failed) == 1, (before, after)
        return failed[0]
    raise AssertionError(f"the gateway answered {answer.status}")


def test_simple_tls_serves_the_credential_certificate(mesh: GatewayMesh, pki: Pki) -> None:
    mesh.apply(config(pki, "SIMPLE"))
    answer = https_get(mesh.address(), HTTPS_PORT, "/status/418", tls_context(pki))
    assert answer.status == 418
    assert answer.peer_organization == "httpbin organization"
    # A path the VirtualService does not route: Envoy's 404, not httpbin.
    assert https_get(mesh.address(), HTTPS_PORT, "/headers", tls_context(pki)).status == 404


def test_mutual_tls_requires_a_client_certificate_from_the_ca(mesh: GatewayMesh, pki: Pki) -> None:
    mesh.apply(config(pki, "MUTUAL"))
    right = https_get(
        mesh.address(), HTTPS_PORT, "/status/200", tls_context(pki, "client.example.com")
    )
    assert right.status == 200
    assert refused(mesh, tls_context(pki)) == "fail_verify_no_cert"
    assert refused(mesh, tls_context(pki, "client.other.com")) == "fail_verify_error"


def test_optional_mutual_verifies_a_certificate_only_when_one_is_sent(
    mesh: GatewayMesh, pki: Pki
) -> None:
    mesh.apply(config(pki, "OPTIONAL_MUTUAL"))
    address = mesh.address()
    assert https_get(address, HTTPS_PORT, "/status/200", tls_context(pki)).status == 200
    right = tls_context(pki, "client.example.com")
    assert https_get(address, HTTPS_PORT, "/status/200", right).status == 200
    assert refused(mesh, tls_context(pki, "client.other.com")) == "fail_verify_error"


def test_mutual_tls_checks_subject_alt_names(mesh: GatewayMesh, pki: Pki) -> None:
    # The client certificates carry no SAN: a subjectAltNames list refuses them all.
    text = config(pki, "MUTUAL").replace(
        "credentialName: httpbin-credential",
        "credentialName: httpbin-credential, subjectAltNames: [spiffe://example.com/client]",
    )
    mesh.apply(text)
    assert refused(mesh, tls_context(pki, "client.example.com")) == "fail_verify_san"
    mesh.apply(config(pki, "MUTUAL"))
    assert (
        https_get(
            mesh.address(), HTTPS_PORT, "/status/200", tls_context(pki, "client.example.com")
        ).status
        == 200
    )


def test_a_replaced_secret_is_served_without_restart_or_failed_request(
    mesh: GatewayMesh, pki: Pki
) -> None:
    mesh.apply(config(pki, "MUTUAL"))
    pid = mesh.envoy_pid()
    context = tls_context(pki, "client.example.com")
    warmed, rotated, stop = threading.Event(), threading.Event(), threading.Event()
    failures: list[str] = []
    counts = {"before": 0, "after": 0}
    lock = threading.Lock()

    def load() -> None:
        after = 0
        while not stop.is_set() and after < 40:  # bounded: 40 requests after the new cert
            try:  # a new connection each time: every request is a new handshake
                answer = https_get(mesh.address(), HTTPS_PORT, "/status/200", context)
            except (OSError, ssl.SSLError) as exc:
                failures.append(repr(exc))
                continue
            if answer.status != 200:
                failures.append(f"status {answer.status}")
            new = answer.peer_organization == "rotated organization"
            if new:
                rotated.set()
                after += 1
            with lock:
                counts["after" if new else "before"] += 1
                if counts["before"] >= 20:
                    warmed.set()

    # A keep-alive connection opened before the rotation carries on after it.
    kept = KeptAlive(mesh.address(), HTTPS_PORT, context)
    assert kept.get("/status/200") == 200
    workers = [threading.Thread(target=load) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        assert warmed.wait(timeout=30), f"no load before the rotation: {failures[:3]}"
        mesh.write(config(pki, "MUTUAL", cert="rotated"))
        assert rotated.wait(timeout=30), "the new certificate was never served"
    finally:
        for worker in workers:
            worker.join(timeout=60)
        stop.set()
    assert failures == []
    assert counts["before"] >= 20 and counts["after"] >= 80
    assert kept.get("/status/200") == 200
    assert kept.organization == "httpbin organization"  # its handshake was before
    kept.close()
    assert mesh.envoy_pid() == pid  # no restart
    # Plain HTTP is not served: no server listens on the HTTP port.
    with pytest.raises(OSError):
        http_get(mesh.address(), 8080, "/status/200", host=HOST)
