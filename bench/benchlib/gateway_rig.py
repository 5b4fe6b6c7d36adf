"""The gateway benchmark's two ingress gateways in front of one backend.

* The backend: httpbin's trustmesh sidecar (mesh STRICT) in front of the app (an Envoy
  ``direct_response``), configured by the real control plane.
* ``trustmesh``: the gateway pod ``istio-system/istio-ingressgateway`` configured over ADS
  by the same control plane from a Gateway (HTTPS ``SIMPLE``, ``credentialName`` Secret)
  and a VirtualService with two routes, its certificate from its agent over SDS.
* ``handwritten``: a static Envoy doing the same — TLS termination with the very same
  certificate (selected by SNI), the same two routes, upstream mTLS with a certificate for
  the gateway's identity from the same CA, the backend pinned by its SPIFFE ID.

The edge certificates are made with the ``openssl`` CLI, as Istio's "secure gateways" task
makes them. Every process is stopped by its PID when the caller's exit stack closes.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.dataplane_pairs import stacked_envoy
from benchlib.envoy_pair import Credentials, issue
from benchlib.mesh_rig import RunningAgent, sidecar_bootstrap
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.xds.controlplane import ControlPlane, ProxyRegistration

ROOT = Path(__file__).resolve().parents[2]

HOST = "httpbin.example.com"
APP_PORT = 8000
GATEWAY_PORT = 8443  # the gateway Service maps 443 → 8443, as Istio's chart does
APP_ADDRESS = "127.0.78.1"
HTTPBIN_POD_ADDRESS = "127.0.78.2"
GATEWAY_POD_ADDRESS = "127.0.78.3"
HAND_GATEWAY_ADDRESS = "127.0.78.4"
# The same two gateways again, under callgrind (instructions per request).
GATEWAY_CALLGRIND_ADDRESS = "127.0.78.5"
HAND_CALLGRIND_ADDRESS = "127.0.78.6"

HTTPBIN = SpiffeId("cluster.local", "foo", "httpbin")
GATEWAY = SpiffeId("cluster.local", "istio-system", "istio-ingressgateway-service-account")
BACKEND_SNI = f"outbound_.{APP_PORT}_._.httpbin.foo.svc.cluster.local"
MESH_CLIENT_ALPN = ["istio-peer-exchange", "istio"]

# The two routes of the VirtualService; the load goes to the second one.
ROUTE_PREFIXES = ("/status", "/get")
REQUEST = f"GET /get HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()

_T = "type.googleapis.com/"
_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
_DOWNSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_UPSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_TLS_INSPECTOR = _T + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"

WORKLOADS = f"""\
apiVersion: v1
kind: Namespace
metadata: {{name: istio-system}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: foo, labels: {{istio-injection: enabled}}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: istio-ingressgateway-service-account, namespace: istio-system}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: istio-ingressgateway, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  template:
    metadata:
      annotations: {{inject.istio.io/templates: gateway}}
      labels: {{istio: ingressgateway, app: istio-ingressgateway}}
    spec:
      serviceAccountName: istio-ingressgateway-service-account
      containers:
      - {{name: istio-proxy, image: auto, ports: [{{containerPort: {GATEWAY_PORT}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: istio-ingressgateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  ports:
  - {{name: https, port: 443, targetPort: {GATEWAY_PORT}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: httpbin, namespace: foo}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: httpbin, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  template:
    metadata: {{labels: {{app: httpbin, version: v1}}}}
    spec:
      serviceAccountName: httpbin
      containers:
      - {{name: httpbin, image: httpbin, ports: [{{containerPort: {APP_PORT}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: httpbin, namespace: foo}}
spec:
  selector: {{app: httpbin}}
  ports:
  - {{name: http, port: {APP_PORT}, targetPort: {APP_PORT}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
"""

GATEWAY_CONFIG = f"""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: mygateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    tls: {{mode: SIMPLE, credentialName: httpbin-credential}}
    hosts: [{HOST}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin, namespace: foo}}
spec:
  hosts: [{HOST}]
  gateways: [istio-system/mygateway]
  http:
  - match: [{{uri: {{prefix: {ROUTE_PREFIXES[0]}}}}}]
    route: [{{destination: {{host: httpbin, port: {{number: {APP_PORT}}}}}}}]
  - match: [{{uri: {{prefix: {ROUTE_PREFIXES[1]}}}}}]
    route: [{{destination: {{host: httpbin, port: {{number: {APP_PORT}}}}}}}]
"""


# ------------------------------------------------------------------------ the edge PKI


@dataclass(frozen=True, slots=True)
class EdgePki:
    """Istio's task's files: the example.com CA, httpbin.example.com's certificate + key."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def make(cls, root: Path) -> EdgePki:
        root.mkdir(parents=True)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

        openssl(
            "req", "-x509", "-sha256", "-nodes", "-days", "365", "-newkey", "rsa:2048",
            "-subj", "/O=example Inc./CN=example.com", "-keyout", "example.com.key",
            "-out", "example.com.crt",
        )  # fmt: skip
        openssl(
            "req", "-out", f"{HOST}.csr", "-newkey", "rsa:2048", "-nodes", "-keyout",
            f"{HOST}.key", "-subj", f"/CN={HOST}/O=httpbin organization",
        )  # fmt: skip
        openssl(
            "x509", "-req", "-sha256", "-days", "365", "-CA", "example.com.crt",
            "-CAkey", "example.com.key", "-set_serial", "1", "-in", f"{HOST}.csr",
            "-out", f"{HOST}.crt",
        )  # fmt: skip
        return cls(root / "example.com.crt", root / f"{HOST}.crt", root / f"{HOST}.key")

    def secret(self) -> str:
        """``kubectl create secret tls httpbin-credential`` in istio-system."""
        crt = base64.b64encode(self.cert_file.read_bytes()).decode()
        key = base64.b64encode(self.key_file.read_bytes()).decode()
        return (
            "apiVersion: v1\nkind: Secret\n"
            "metadata: {name: httpbin-credential, namespace: istio-system}\n"
            f"type: kubernetes.io/tls\ndata:\n  tls.crt: {crt}\n  tls.key: {key}\n"
        )


# ------------------------------------------------------------------- trustmesh's side


@dataclass(frozen=True, slots=True)
class Mesh:
    backend: EnvoyProcess  # httpbin's sidecar
    gateway: EnvoyProcess  # trustmesh's gateway
    callgrind_bootstrap: dict[str, Any]  # a second gateway Envoy's, on its own address


async def trustmesh_mesh(
    stack: contextlib.AsyncExitStack, ca: CertificateAuthority, pki: EdgePki, workdir: Path
) -> Mesh:
    """The control plane, httpbin's sidecar and the gateway pod's Envoy."""
    config = workdir / "config"
    config.mkdir(parents=True)
    (config / "workloads.yaml").write_text(WORKLOADS)
    (config / "gateway.yaml").write_text(GATEWAY_CONFIG)
    (config / "secret.yaml").write_text(pki.secret())
    ca_server = CaServer(ca)
    stack.push_async_callback(ca_server.stop)
    await ca_server.start()
    httpbin = ProxyRegistration.sidecar("foo/httpbin", HTTPBIN_POD_ADDRESS, app_address=APP_ADDRESS)
    gateway = ProxyRegistration.router("istio-system/istio-ingressgateway", GATEWAY_POD_ADDRESS)
    second = ProxyRegistration.router(
        "istio-system/istio-ingressgateway", GATEWAY_CALLGRIND_ADDRESS
    )
    plane = ControlPlane(
        [str(config)],
        ca=ca,
        workload_addresses={
            "foo/httpbin": HTTPBIN_POD_ADDRESS,
            "istio-system/istio-ingressgateway": GATEWAY_POD_ADDRESS,
        },
    )
    plane.register(httpbin)
    plane.register(gateway)
    plane.register(second)
    stack.push_async_callback(plane.stop)
    await plane.start()
    if plane.last_errors:
        raise RuntimeError(f"control plane: {[str(d) for d in plane.last_errors]}")
    envoys = []
    for identity, registration in ((HTTPBIN, httpbin), (GATEWAY, gateway)):
        home = workdir / identity.service_account
        home.mkdir(parents=True)
        ports = (ca_server.port, ca_server.renewal_port)
        agent = await RunningAgent.start(identity, ca, ports, home, ready_timeout=10)
        stack.push_async_callback(agent.close)
        bootstrap = sidecar_bootstrap(
            registration.node_id, identity, agent.sds, plane.port, plane.spiffe_id
        )
        envoys.append(await stacked_envoy(stack, bootstrap, home / "envoy"))
    # The gateway pod's agent serves the second gateway Envoy its certificate too.
    callgrind = sidecar_bootstrap(second.node_id, GATEWAY, agent.sds, plane.port, plane.spiffe_id)
    return Mesh(envoys[0], envoys[1], callgrind)


# ------------------------------------------------------------------ the hand-written one


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _inline(text: str) -> dict[str, str]:
    return {"inline_string": text}


def handwritten_gateway_bootstrap(address: str, pki: EdgePki, mesh: Credentials) -> dict[str, Any]:
    """TLS termination (SNI httpbin.example.com) → the two routes → httpbin over mTLS."""
    downstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _DOWNSTREAM_TLS,
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [
                    {
                        "certificate_chain": _inline(pki.cert_file.read_text()),
                        "private_key": _inline(pki.key_file.read_text()),
                    }
                ],
            },
        },
    }
    routes = [
        {"match": {"prefix": prefix}, "route": {"cluster": "httpbin"}} for prefix in ROUTE_PREFIXES
    ]
    manager = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM,
            "stat_prefix": "gateway",
            "codec_type": "AUTO",
            "use_remote_address": True,
            "route_config": {
                "virtual_hosts": [{"name": HOST, "domains": [HOST, f"{HOST}:*"], "routes": routes}]
            },
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}
            ],
        },
    }
    listener = {
        "name": "gateway",
        "address": _address(address, GATEWAY_PORT),
        "listener_filters": [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": _TLS_INSPECTOR},
            }
        ],
        "filter_chains": [
            {
                "filter_chain_match": {"server_names": [HOST]},
                "transport_socket": downstream_tls,
                "filters": [manager],
            }
        ],
    }
    upstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _UPSTREAM_TLS,
            "sni": BACKEND_SNI,
            "common_tls_context": {
                "alpn_protocols": MESH_CLIENT_ALPN,
                "tls_certificates": [
                    {
                        "certificate_chain": _inline(mesh.chain_pem),
                        "private_key": _inline(mesh.key_pem),
                    }
                ],
                "validation_context": {
                    "trusted_ca": _inline(mesh.roots_pem),
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": HTTPBIN.uri}}
                    ],
                },
            },
        },
    }
    endpoint = {"endpoint": {"address": _address(HTTPBIN_POD_ADDRESS, APP_PORT)}}
    cluster = {
        "name": "httpbin",
        "type": "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {"cluster_name": "httpbin", "endpoints": [{"lb_endpoints": [endpoint]}]},
        "transport_socket": upstream_tls,
    }
    return {
        "node": {"id": "handwritten-gateway", "cluster": "handwritten-gateway"},
        "admin": {"address": _address("127.0.0.1", 0)},
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
    }


async def handwritten_gateway(
    stack: contextlib.AsyncExitStack, ca: CertificateAuthority, pki: EdgePki, workdir: Path
) -> EnvoyProcess:
    creds = issue(ca, GATEWAY, dt.datetime.now(dt.UTC))
    bootstrap = handwritten_gateway_bootstrap(HAND_GATEWAY_ADDRESS, pki, creds)
    return await stacked_envoy(stack, bootstrap, workdir)
