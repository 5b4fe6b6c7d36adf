"""A local mesh with Istio's ingress gateway in front of httpbin, and clients outside it.

Certificates are made with the ``openssl`` CLI exactly as Istio's "secure gateways" task
makes them (a root CA for example.com, a server certificate for httpbin.example.com, a
client certificate), plus a second CA nobody trusts. Clients are Python's ``ssl`` +
``http.client``: a client outside the mesh connecting to the gateway's address with SNI.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.mesh import mesh_started, replace_file
from tests.gateway.openssl_pki import issue, make_ca, secret_yaml
from trustmesh.runtime.running import RunningMesh

HERE = Path(__file__).parent
HOST = "httpbin.example.com"
GATEWAY = "istio-system/istio-ingressgateway"


@dataclass(frozen=True)
class Pki:
    """Files made by openssl in ``root``."""

    root: Path

    def path(self, name: str) -> Path:
        return self.root / name

    @classmethod
    def make(cls, root: Path) -> Pki:
        for ca, org in (("example.com", "example Inc."), ("other.com", "other Inc.")):
            make_ca(root, ca, f"/O={org}/CN={ca}")
        pki = cls(root)
        pki.issue("httpbin.example.com", "httpbin organization", "example.com", serial=0)
        pki.issue("rotated", "rotated organization", "example.com", serial=1, cn=HOST)
        pki.issue("client.example.com", "client organization", "example.com", serial=2)
        pki.issue("client.other.com", "client organization", "other.com", serial=3)
        return pki

    def issue(self, name: str, org: str, ca: str, *, serial: int, cn: str = "") -> None:
        issue(self.root, name, f"/CN={cn or name}/O={org}", ca=ca, serial=serial)

    def tls_secret(self, name: str, cert: str, *, ca: str | None = None) -> str:
        """A kubernetes.io/tls Secret in istio-system, as `kubectl create secret` makes it."""
        data = {"tls.crt": self.path(f"{cert}.crt"), "tls.key": self.path(f"{cert}.key")}
        if ca is not None:
            data["ca.crt"] = self.path(f"{ca}.crt")
        return secret_yaml(name, "kubernetes.io/tls", data)


@dataclass
class GatewayMesh:
    root: Path
    state: Path
    config_dir: Path

    @property
    def running(self) -> RunningMesh:
        return RunningMesh.open(self.state)

    def address(self) -> str:
        pod = self.running.plan.pod(GATEWAY)
        assert pod is not None and pod.gateway
        return pod.pod_ip

    def write(self, text: str) -> None:
        """Make ``text`` the mesh's gateway configuration (the control plane watches it)."""
        replace_file(self.config_dir / "gateway.yaml", text)

    def apply(self, text: str) -> None:
        """:meth:`write` and wait until every proxy (the gateway too) has it."""
        import asyncio

        self.write(text)
        asyncio.run(self.running.wait_synced(timeout=30))

    def tls_failures(self) -> dict[str, int]:
        """The gateway Envoy's TLS handshake failures by kind (``fail_verify_no_cert``,
        ``fail_verify_error``, ``fail_verify_san``…), summed over its listeners."""
        admin = self.running.pod_record(GATEWAY)["admin"]
        with urllib.request.urlopen(f"http://{admin}/stats?filter=ssl.fail_", timeout=5) as r:
            text = r.read().decode()
        found: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if name.startswith("listener.") and value.strip().isdigit():
                kind = name.rsplit(".", 1)[1]
                found[kind] = found.get(kind, 0) + int(value)
        return found

    def envoy_pid(self) -> int:
        pid = self.running.pod_processes(GATEWAY)["envoy"]
        assert isinstance(pid, int)
        return pid


@contextmanager
def gateway_mesh(
    root: Path, *, base: str, config: str, mesh_config: str = "{}\n", sandboxed: bool = False
) -> Iterator[GatewayMesh]:
    config_dir, state = root / "config", root / "state"
    config_dir.mkdir(parents=True)
    shutil.copy(HERE / "workloads.yaml", config_dir / "workloads.yaml")
    (config_dir / "gateway.yaml").write_text(config)
    mesh_file = root / "mesh.yaml"
    mesh_file.write_text(mesh_config)
    with mesh_started(config_dir, mesh_file, state=state, base=base, sandboxed=sandboxed):
        yield GatewayMesh(root, state, config_dir)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    peer_organization: str  # O= of the certificate the gateway presented ("" over HTTP)


def tls_context(pki: Pki, client: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.path("example.com.crt")))
    if client is not None:
        context.load_cert_chain(pki.path(f"{client}.crt"), pki.path(f"{client}.key"))
    return context


def https_get(
    address: str,
    port: int,
    path: str,
    context: ssl.SSLContext,
    *,
    sni: str = HOST,
    headers: dict[str, str] | None = None,
) -> Answer:
    """GET over a new TLS connection to ``address:port`` with SNI ``sni`` (curl's
    ``--resolve httpbin.example.com:443:<address>``)."""
    raw = socket.create_connection((address, port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname=sni)
    try:
        connection = http.client.HTTPConnection(sni, port, timeout=10)
        connection.sock = tls
        connection.request("GET", path, headers={"Host": sni, **(headers or {})})
        response = connection.getresponse()
        body = response.read()
        organization = _organization(tls.getpeercert() or {})
        return Answer(response.status, body, organization)
    finally:
        tls.close()


def _organization(cert: dict[str, object]) -> str:
    for rdn in cert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "organizationName":
                return str(value)
    return ""


def http_get(
    address: str, port: int, path: str, *, host: str = HOST, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    connection = http.client.HTTPConnection(address, port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": host, **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()
