"""Istio's "egress gateway with TLS origination" task, its resources as the task writes
them, with a local TLS server standing in for ``edition.cnn.com``.

The stand-in: ``openssl`` makes a CA and a server certificate for edition.cnn.com (and a
client certificate for the MUTUAL variant); a Python TLS server on 127.0.0.1 answers
``GET`` with 200 and a JSON body saying what it saw (path, Host, SNI, client certificate).
The ServiceEntry points at it with ``resolution: STATIC`` and an ``endpoints`` entry whose
``ports`` map the entry's port names to the server's port, as a ServiceEntry for a
fixed-address external service does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import json
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.mesh import mesh_started, replace_file
from tests.gateway.openssl_pki import issue, make_ca, secret_yaml
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.identity.pki import sign_leaf as pki_sign_leaf
from trustmesh.runtime.running import RunningMesh

HERE = Path(__file__).parent
EXTERNAL = "edition.cnn.com"
SECRET = "cnn-origination"  # the DestinationRule's credentialName, in istio-system


@dataclass(frozen=True)
class ExternalPki:
    root: Path

    def path(self, name: str) -> Path:
        return self.root / name

    @classmethod
    def make(cls, root: Path) -> ExternalPki:
        make_ca(root, "ca", "/O=cnn Inc./CN=cnn.com")
        pki = cls(root)
        pki.issue("server", EXTERNAL, serial=1, san=f"DNS:{EXTERNAL}")
        pki.issue("client", "egress.client", serial=2)
        # Signed by the same CA, for another name: TLS origination must refuse it.
        pki.issue("impostor", "impostor.example.com", serial=3, san="DNS:impostor.example.com")
        return pki

    def issue(self, name: str, cn: str, *, serial: int, san: str = "") -> None:
        issue(self.root, name, f"/CN={cn}/O=cnn", ca="ca", serial=serial, san=san)

    def secret(self, *, client: bool) -> str:
        """The DestinationRule's credential in the gateway's namespace: ``ca.crt`` (to
        check the server), and for MUTUAL the client's ``tls.crt`` / ``tls.key``."""
        data = {"ca.crt": self.path("ca.crt")}
        if client:
            data["tls.crt"] = self.path("client.crt")
            data["tls.key"] = self.path("client.key")
        return secret_yaml(SECRET, "kubernetes.io/tls" if client else "Opaque", data)


@dataclass
class External:
    """The stand-in server: its port, and what it was asked."""

    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def external_server(
    pki: ExternalPki,
    *,
    require_client_cert: bool = False,
    tls: bool = True,
    certificate: str = "server",
) -> Iterator[External]:
    """The stand-in on 127.0.0.1 (any free port): TLS with edition.cnn.com's certificate,
    or plaintext HTTP (``tls=False``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.path(f"{certificate}.crt"), pki.path(f"{certificate}.key"))
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.path("ca.crt"))
    names: dict[int, str] = {}

    def remember_sni(sock: ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        names[id(sock)] = name or ""

    context.sni_callback = remember_sni
    state = External(port=0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            sock = self.connection
            peer = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
            seen = {
                "path": self.path,
                "host": self.headers.get("Host", ""),
                "sni": names.get(id(sock), ""),
                "client_cn": _common_name(peer or {}),
            }
            state.seen.append(seen)
            body = json.dumps(seen).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _common_name(cert: dict[str, Any]) -> str:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def task_config(
    port: int,
    *,
    http_port: int | None = None,
    mode: str = "SIMPLE",
    export_to: str = '["istio-system"]',
    mesh_route: bool = True,
    gateway_route: bool = True,
) -> str:
    """Istio's task: ServiceEntry, Gateway (port 80, ISTIO_MUTUAL), the DestinationRule to
    the egress gateway (ISTIO_MUTUAL, sni), the VirtualService (mesh → gateway, gateway →
    edition.cnn.com:443) and the DestinationRule originating TLS at the gateway."""
    docs = [
        f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: cnn, namespace: foo}}
spec:
  hosts: [{EXTERNAL}]
  exportTo: {export_to}
  ports:
  - {{number: 80, name: http-port, protocol: HTTP}}
  - {{number: 443, name: https, protocol: HTTPS}}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports: {{http-port: {http_port or port}, https: {port}}}
""",
        f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: istio-egressgateway, namespace: foo}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 80, name: https-port-for-tls-origination, protocol: HTTPS}}
    hosts: [{EXTERNAL}]
    tls: {{mode: ISTIO_MUTUAL}}
""",
        f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: egressgateway-for-cnn, namespace: foo}}
spec:
  host: istio-egressgateway.istio-system.svc.cluster.local
  subsets:
  - name: cnn
    trafficPolicy:
      loadBalancer: {{simple: ROUND_ROBIN}}
      portLevelSettings:
      - port: {{number: 80}}
        tls: {{mode: ISTIO_MUTUAL, sni: {EXTERNAL}}}
""",
        f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: originate-tls-for-edition-cnn-com, namespace: foo}}
spec:
  host: {EXTERNAL}
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    portLevelSettings:
    - port: {{number: 443}}
      tls: {{mode: {mode}, credentialName: {SECRET}}}
""",
    ]
    routes = []
    if mesh_route:
        routes.append(
            """
  - match:
    - gateways: [mesh]
      port: 80
    route:
    - destination:
        host: istio-egressgateway.istio-system.svc.cluster.local
        subset: cnn
        port: {number: 80}"""
        )
    if gateway_route:
        routes.append(
            f"""
  - match:
    - gateways: [istio-egressgateway]
      port: 80
    route:
    - destination:
        host: {EXTERNAL}
        port: {{number: 443}}
      weight: 100"""
        )
    if routes:
        gateways = [
            g for g, on in (("istio-egressgateway", gateway_route), ("mesh", mesh_route)) if on
        ]
        docs.append(
            f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: direct-cnn-through-egress-gateway, namespace: foo}}
spec:
  hosts: [{EXTERNAL}]
  gateways: [{", ".join(gateways)}]
  http:{"".join(routes)}
"""
        )
    return "\n---\n".join(d.strip("\n") for d in docs) + "\n"


ALLOW_SLEEP = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep-to-cnn, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/foo/sa/sleep]}
"""


# ----------------------------------------------------------------------- live mesh

EGRESS_POD = "istio-system/istio-egressgateway"
REGISTRY_ONLY = "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n"


@dataclass
class EgressMesh:
    root: Path
    state: Path
    config_dir: Path

    @property
    def running(self) -> RunningMesh:
        return RunningMesh.open(self.state)

    def gateway_address(self) -> str:
        pod = self.running.plan.pod(EGRESS_POD)
        assert pod is not None and pod.gateway
        return pod.pod_ip

    def apply(self, text: str) -> None:
        """Make ``text`` the Istio configuration and wait until every proxy has it."""
        replace_file(self.config_dir / "egress.yaml", text)
        asyncio.run(self.running.wait_synced(timeout=30))

    def gateway_log(self) -> Path:
        running = self.running
        return running.layout.envoy_log(running.pod(EGRESS_POD).key)

    def mesh_client(self, namespace: str, service_account: str) -> ssl.SSLContext:
        """A TLS client holding a mesh certificate for ``namespace/service_account``,
        signed by the mesh's CA (what that workload's agent would get), trusting the
        mesh's roots. The gateway's certificate names a SPIFFE ID, no host: the test
        checks that ID itself."""
        ca = CertificateAuthority.load(self.running.layout.ca)
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        slot = ca.active
        leaf = pki_sign_leaf(
            ca_key=slot.key,
            ca_cert=slot.cert,
            public_key=key.public_key(),
            uri=f"spiffe://cluster.local/ns/{namespace}/sa/{service_account}",
            not_before=now - dt.timedelta(minutes=1),
            not_after=now + dt.timedelta(hours=1),
        )
        folder = self.root / "clients"
        folder.mkdir(exist_ok=True)
        cert_file = folder / f"{namespace}-{service_account}.crt"
        key_file = folder / f"{namespace}-{service_account}.key"
        chain = [leaf.public_bytes(serialization.Encoding.PEM).decode(), *slot.chain_and_root_pem]
        cert_file.write_text("".join(chain))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=ca.bundle_pem(now).decode())
        context.load_cert_chain(cert_file, key_file)
        return context


@contextmanager
def egress_mesh(root: Path, *, base: str, config: str) -> Iterator[EgressMesh]:
    config_dir, state = root / "config", root / "state"
    config_dir.mkdir(parents=True)
    shutil.copy(HERE / "egress_workloads.yaml", config_dir / "workloads.yaml")
    (config_dir / "egress.yaml").write_text(config)
    mesh_file = root / "mesh.yaml"
    mesh_file.write_text(REGISTRY_ONLY)
    with mesh_started(config_dir, mesh_file, state=state, base=base):
        yield EgressMesh(root, state, config_dir)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    peer_uri: str  # the URI SAN of the certificate the gateway presented


def through_gateway(
    address: str, port: int, context: ssl.SSLContext, path: str, *, request_id: str
) -> Answer:
    """What sleep's sidecar sends the egress gateway: mTLS with SNI edition.cnn.com, then
    ``GET path`` for Host edition.cnn.com."""
    raw = socket.create_connection((address, port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname=EXTERNAL)
    try:
        connection = http.client.HTTPConnection(EXTERNAL, port, timeout=10)
        connection.sock = tls
        connection.request("GET", path, headers={"Host": EXTERNAL, "x-request-id": request_id})
        response = connection.getresponse()
        body = response.read()
        sans = (tls.getpeercert() or {}).get("subjectAltName", ())
        uri = next((str(v) for k, v in sans if k == "URI"), "")
        return Answer(response.status, body, uri)
    finally:
        tls.close()
