"""Gateway PASSTHROUGH and TCP servers, as Istio builds them (issue 12).

Translation (pure): a ``PASSTHROUGH`` server gets a filter chain per VirtualService ``tls``
match, chosen by SNI, with ``tcp_proxy`` to the destination and no TLS termination; a
``TCP`` server a chain with ``tcp_proxy`` to its first matching ``tcp`` route; both carry
the network RBAC filters of the policies selecting the gateway. What they cannot honour is
refused with file, line and field.

Live (real Envoy, certificates made with openssl): through one gateway port, SNI
``httpbin.example.com`` is terminated by the gateway (its certificate) while SNI
``backend.example.com`` reaches a TLS backend untouched — the client sees the *backend's*
certificate, with python's ``ssl`` and with ``openssl s_client``; and a line sent to the
gateway's TCP server comes back from tcp-echo.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.rig import GATEWAY as GATEWAY_REF
from tests.gateway.rig import HOST, GatewayMesh, Pki, gateway_mesh, https_get, tls_context
from trustmesh.config import load_config
from trustmesh.policy.compose import MeshPolicy
from trustmesh.xds.cache import Snapshot
from trustmesh.xds.gateway import GatewayConfigError, gateway_diagnostics, translate_gateway

HERE = Path(__file__).parent
GATEWAY_POD = "istio-system/istio-ingressgateway"
BACKEND_HOST = "backend.example.com"
TCP_PORT = 31400  # Istio's tcp-echo task; no gateway Service port maps it: Envoy binds it
HTTPS_PORT = 8443  # the gateway Service maps 443 → 8443
TLS_TCP_PORT = 31443  # a TLS server the gateway terminates, tcp routes inside

# The TLS backend: answers "backend: <what it read>" over its own TLS (passthrough proof).
TLS_BACKEND = """\
import os, socket, ssl, sys, threading

context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server = socket.create_server((os.environ["HOST"], int(os.environ["PORT"])))


def handle(conn):
    try:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"backend: " + tls.recv(1024))
    except (OSError, ssl.SSLError):
        conn.close()


while True:
    connection, _ = server.accept()
    threading.Thread(target=handle, args=(connection,), daemon=True).start()
"""


def backends(command: list[str]) -> str:
    """A TLS backend (``command``) and Istio's tcp-echo in foo, behind sidecars."""
    return f"""\
apiVersion: v1
kind: ServiceAccount
metadata: {{name: tls-backend, namespace: foo}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: tls-backend, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: tls-backend}}}}
  template:
    metadata: {{labels: {{app: tls-backend}}}}
    spec:
      serviceAccountName: tls-backend
      containers:
      - name: tls-backend
        command: {command!r}
        ports: [{{containerPort: 9443}}]
---
apiVersion: v1
kind: Service
metadata: {{name: tls-backend, namespace: foo}}
spec:
  selector: {{app: tls-backend}}
  ports: [{{name: tls, port: 9443}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: tcp-echo, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: tcp-echo}}}}
  template:
    metadata: {{labels: {{app: tcp-echo, version: v1}}}}
    spec:
      containers:
      - name: tcp-echo
        command: [trustmesh, sample, tcp-echo, --port, "9000", --prefix, hello]
        ports: [{{containerPort: 9000}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: tcp-echo-v2, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: tcp-echo, version: v2}}}}
  template:
    metadata: {{labels: {{app: tcp-echo, version: v2}}}}
    spec:
      containers:
      - name: tcp-echo
        command: [trustmesh, sample, tcp-echo, --port, "9000", --prefix, hi]
        ports: [{{containerPort: 9000}}]
---
apiVersion: v1
kind: Service
metadata: {{name: tcp-echo, namespace: foo}}
spec:
  selector: {{app: tcp-echo}}
  ports: [{{name: tcp, port: 9000}}]
"""


SERVER_HTTPS = f"""\
  - port: {{number: 443, name: https, protocol: HTTPS}}
    tls: {{mode: SIMPLE, credentialName: httpbin-credential}}
    hosts: [{HOST}]
"""
SERVER_PASSTHROUGH = f"""\
  - port: {{number: 443, name: tls-passthrough, protocol: TLS}}
    tls: {{mode: PASSTHROUGH}}
    hosts: [{BACKEND_HOST}]
"""
SERVER_TCP = f"""\
  - port: {{number: {TCP_PORT}, name: tcp, protocol: TCP}}
    hosts: ["*"]
"""
SERVER_TLS_TCP = f"""\
  - port: {{number: {TLS_TCP_PORT}, name: tls-tcp, protocol: TLS}}
    tls: {{mode: SIMPLE, credentialName: httpbin-credential}}
    hosts: [{HOST}]
"""


def gateway(*servers: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\n"
        "metadata: {name: mygateway, namespace: istio-system}\n"
        "spec:\n  selector: {istio: ingressgateway}\n  servers:\n" + "".join(servers)
    )


GATEWAY = gateway(SERVER_HTTPS, SERVER_PASSTHROUGH, SERVER_TCP, SERVER_TLS_TCP)

VS_HTTPBIN = f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin, namespace: foo}}
spec:
  hosts: [{HOST}]
  gateways: [istio-system/mygateway]
  http:
  - route:
    - destination: {{host: httpbin, port: {{number: 8000}}}}
"""
VS_BACKEND = f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: backend, namespace: foo}}
spec:
  hosts: [{BACKEND_HOST}]
  gateways: [istio-system/mygateway]
  tls:
  - match:
    - port: 443
      sniHosts: [{BACKEND_HOST}]
    route:
    - destination: {{host: tls-backend.foo.svc.cluster.local, port: {{number: 9443}}}}
"""


def vs_tcp(name: str = "tcp-echo", port: int = TCP_PORT, host: str = "tcp-echo:9000") -> str:
    service, number = host.split(":")
    return f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: foo}}
spec:
  hosts: ["*"]
  gateways: [istio-system/mygateway]
  tcp:
  - match:
    - port: {port}
    route:
    - destination: {{host: {service}, port: {{number: {number}}}}}
"""


VS_TLS_TCP = vs_tcp("tls-tcp-echo", port=TLS_TCP_PORT).replace('hosts: ["*"]', f"hosts: [{HOST}]")
ROUTES = "\n---\n".join([VS_HTTPBIN, VS_BACKEND, vs_tcp(), VS_TLS_TCP])


# ---------------------------------------------------------------------- translation


def compile_mesh(tmp_path: Path, *docs: str) -> MeshPolicy:
    (tmp_path / "config.yaml").write_text("\n---\n".join([backends(["tls-backend"]), *docs]))
    loaded = load_config([str(HERE / "workloads.yaml"), str(tmp_path / "config.yaml")])
    assert not loaded.errors, loaded.errors
    assert loaded.mesh is not None
    return loaded.mesh


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    made = Pki.make(tmp_path_factory.mktemp("pki"))
    made.issue(BACKEND_HOST, "backend organization", "example.com", serial=4)
    return made


def listener(resources: Any, port: int) -> dict[str, Any]:
    (found,) = [x for x in resources.listeners if x["name"].endswith(f"_{port}")]
    return found  # type: ignore[no-any-return]


def chains_by_sni(found: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    return {
        tuple(c.get("filter_chain_match", {}).get("server_names", ())): c
        for c in found["filter_chains"]
    }


def test_passthrough_chains_by_sni_beside_a_terminated_server(tmp_path: Path, pki: Pki) -> None:
    secret = pki.tls_secret("httpbin-credential", "httpbin.example.com")
    mesh = compile_mesh(tmp_path, secret, GATEWAY, ROUTES)
    resources = translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")
    snapshot = Snapshot.from_resources(resources.all())
    assert snapshot.consistency_errors() == [] and snapshot.encoding_errors() == []
    https = listener(resources, HTTPS_PORT)
    assert [f["name"] for f in https["listener_filters"]] == [
        "envoy.filters.listener.tls_inspector"
    ]
    chains = chains_by_sni(https)
    assert set(chains) == {(HOST,), (BACKEND_HOST,)}
    terminated, passthrough = chains[(HOST,)], chains[(BACKEND_HOST,)]
    assert "transport_socket" in terminated
    assert "transport_socket" not in passthrough  # the client's TLS is not terminated
    (proxy,) = passthrough["filters"]  # no policy selects the gateway: no RBAC filter
    assert proxy["name"] == "envoy.filters.network.tcp_proxy"
    assert proxy["typed_config"]["cluster"] == "outbound|9443||tls-backend.foo.svc.cluster.local"
    clusters = {c["name"]: c for c in resources.clusters}
    upstream = clusters["outbound|9443||tls-backend.foo.svc.cluster.local"]
    assert upstream["transport_socket_matches"][0]["name"] == "tlsMode-istio"  # mesh mTLS
    # The passthrough server needs no Secret: only the terminated one's is served.
    assert [s["name"] for s in resources.secrets] == ["kubernetes://httpbin-credential"]


def test_tcp_server_forwards_to_its_first_matching_route(tmp_path: Path) -> None:
    mesh = compile_mesh(
        tmp_path,
        gateway(SERVER_TCP),
        vs_tcp("first", port=1234),  # another port: does not apply
        vs_tcp("second", host="tcp-echo:9000"),
        vs_tcp("third", host="tls-backend:9443"),  # a later match: never reached
    )
    resources = translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")
    tcp = listener(resources, TCP_PORT)
    assert "listener_filters" not in tcp
    (chain,) = tcp["filter_chains"]
    (proxy,) = chain["filters"]
    assert proxy["typed_config"]["cluster"] == "outbound|9000||tcp-echo.foo.svc.cluster.local"
    assert proxy["typed_config"]["stat_prefix"] == proxy["typed_config"]["cluster"]


def test_a_terminating_tls_server_carries_tcp_routes(tmp_path: Path, pki: Pki) -> None:
    secret = pki.tls_secret("httpbin-credential", "httpbin.example.com")
    mesh = compile_mesh(tmp_path, secret, GATEWAY, ROUTES)
    resources = translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")
    (chain,) = listener(resources, TLS_TCP_PORT)["filter_chains"]
    assert chain["filter_chain_match"] == {"server_names": [HOST]}
    tls = chain["transport_socket"]["typed_config"]
    assert "alpn_protocols" not in tls["common_tls_context"]  # no HTTP inside
    (name,) = [s["name"] for s in tls["common_tls_context"]["tls_certificate_sds_secret_configs"]]
    assert name == "kubernetes://httpbin-credential"
    (proxy,) = chain["filters"]
    assert proxy["typed_config"]["cluster"] == "outbound|9000||tcp-echo.foo.svc.cluster.local"


def test_weighted_destinations_and_subsets(tmp_path: Path) -> None:
    vs = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: foo}
spec:
  hosts: ["*"]
  gateways: [istio-system/mygateway]
  tcp:
  - route:
    - destination: {host: tcp-echo, port: {number: 9000}, subset: v1}
      weight: 80
    - destination: {host: tcp-echo, port: {number: 9000}, subset: v2}
      weight: 20
    - destination: {host: tcp-echo, port: {number: 9000}}
      weight: 0
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo, namespace: foo}
spec:
  host: tcp-echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""
    mesh = compile_mesh(tmp_path, gateway(SERVER_TCP), vs)
    resources = translate_gateway(
        mesh,
        GATEWAY_POD,
        address="127.0.0.9",
        workload_addresses={"foo/tcp-echo": "127.0.0.20", "foo/tcp-echo-v2": "127.0.0.21"},
    )
    (chain,) = listener(resources, TCP_PORT)["filter_chains"]
    config = chain["filters"][-1]["typed_config"]
    assert config["weighted_clusters"]["clusters"] == [  # the 0-weight one left out
        {"name": "outbound|9000|v1|tcp-echo.foo.svc.cluster.local", "weight": 80},
        {"name": "outbound|9000|v2|tcp-echo.foo.svc.cluster.local", "weight": 20},
    ]
    clusters = {c["name"]: c for c in resources.clusters}
    v2 = clusters["outbound|9000|v2|tcp-echo.foo.svc.cluster.local"]
    hosts = [
        e["endpoint"]["address"]["socket_address"]["address"]
        for group in v2["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]
    assert hosts == ["127.0.0.21"]  # the subset's endpoints only


def test_policies_selecting_the_gateway_guard_passthrough_and_tcp(tmp_path: Path, pki: Pki) -> None:
    deny = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-tcp, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - to: [{operation: {ports: ["31400"]}}]
"""
    secret = pki.tls_secret("httpbin-credential", "httpbin.example.com")
    mesh = compile_mesh(tmp_path, secret, GATEWAY, ROUTES, deny)
    resources = translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")
    for chain in (
        listener(resources, TCP_PORT)["filter_chains"][0],
        chains_by_sni(listener(resources, HTTPS_PORT))[(BACKEND_HOST,)],
    ):
        names = [f["name"] for f in chain["filters"]]
        assert names == ["envoy.filters.network.rbac", "envoy.filters.network.tcp_proxy"]
        rules = chain["filters"][0]["typed_config"]["rules"]
        assert rules["action"] == "DENY"
        assert "31400" in str(rules["policies"])


def test_a_port_without_routes_gets_no_listener(tmp_path: Path) -> None:
    mesh = compile_mesh(tmp_path, gateway(SERVER_PASSTHROUGH, SERVER_TCP), VS_HTTPBIN)
    assert translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9").listeners == ()


def test_a_match_two_passthrough_servers_route_is_one_chain(tmp_path: Path) -> None:
    other = SERVER_PASSTHROUGH.replace("tls-passthrough", "other").replace(
        BACKEND_HOST, "other.example.com"
    )
    vs = VS_BACKEND.replace(
        f"  hosts: [{BACKEND_HOST}]", f"  hosts: [{BACKEND_HOST}, other.example.com]"
    ).replace(f"sniHosts: [{BACKEND_HOST}]", f"sniHosts: [{BACKEND_HOST}, other.example.com]")
    mesh = compile_mesh(tmp_path, gateway(SERVER_PASSTHROUGH, other), vs)
    (chain,) = listener(translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9"), HTTPS_PORT)[
        "filter_chains"
    ]
    assert chain["filter_chain_match"] == {"server_names": [BACKEND_HOST, "other.example.com"]}


def test_star_sni_is_any_sni(tmp_path: Path) -> None:
    vs = VS_BACKEND.replace(f"[{BACKEND_HOST}]", '["*"]')
    mesh = compile_mesh(tmp_path, gateway(SERVER_PASSTHROUGH.replace(BACKEND_HOST, "'*'")), vs)
    (chain,) = listener(translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9"), HTTPS_PORT)[
        "filter_chains"
    ]
    assert "filter_chain_match" not in chain  # Envoy has no "*" server name: any SNI


def problems(mesh: MeshPolicy) -> list[tuple[int, str, str, str]]:
    return [
        (d.location.line, d.location.field, d.code, d.message)
        for d in gateway_diagnostics(mesh, GATEWAY_POD)
    ]


@pytest.mark.parametrize(
    ("old", "new", "field", "code", "words"),
    [
        (
            "name: tls-passthrough, protocol: TLS}\n    tls: {mode: PASSTHROUGH}",
            "name: tls-passthrough, protocol: TLS}\n    tls: {mode: SIMPLE, httpsRedirect: true"
            ", credentialName: httpbin-credential}",
            "spec.servers[1].tls.httpsRedirect",
            "unsupported-gateway-field",
            "httpsRedirect on a TLS server",
        ),
        (
            "tls: {mode: PASSTHROUGH}",
            "tls: {mode: AUTO_PASSTHROUGH}",
            "spec.servers[1].tls.mode",
            "unsupported-gateway-field",
            "AUTO_PASSTHROUGH",
        ),
        (  # the gateway never sees inside a passthrough connection
            "tls: {mode: PASSTHROUGH}",
            "tls: {mode: PASSTHROUGH, minProtocolVersion: TLSV1_3}",
            "spec.servers[1].tls.minProtocolVersion",
            "unsupported-gateway-field",
            "with tls.mode PASSTHROUGH",
        ),
        (
            "name: tcp, protocol: TCP}",
            "name: tcp, protocol: TCP}\n    tls: {mode: PASSTHROUGH}",
            "spec.servers[2].tls",
            "unsupported-gateway-field",
            "tls on a TCP server",
        ),
        (
            "name: tcp, protocol: TCP}",
            "name: tcp, protocol: MONGO}",
            "spec.servers[2].port.protocol",
            "unsupported-gateway-field",
            "MONGO",
        ),
        (  # TCP and TLS on one port
            f"number: {TCP_PORT}, name: tcp",
            "number: 443, name: tcp",
            "spec.servers[2].port.protocol",
            "gateway-port-conflict",
            "cannot share a port",
        ),
        (
            f"      sniHosts: [{BACKEND_HOST}]",
            "      sniHosts: [other.example.com]",
            "spec.tls[0].match[0].sniHosts[0]",
            "invalid-field",
            "not one of the VirtualService's hosts",
        ),
        (
            f"      sniHosts: [{BACKEND_HOST}]",
            f"      sniHosts: [{BACKEND_HOST}]\n      sourceLabels: {{app: x}}",
            "spec.tls[0].match[0].sourceLabels",
            "unsupported-gateway-field",
            "sourceLabels",
        ),
        (
            f"    - port: {TCP_PORT}",
            f"    - port: {TCP_PORT}\n      destinationSubnets: [10.0.0.0/8]",
            "spec.tcp[0].match[0].destinationSubnets",
            "unsupported-gateway-field",
            "destinationSubnets",
        ),
        (  # overlapping hosts lists of two terminated servers: one SNI name twice
            SERVER_TLS_TCP,
            SERVER_TLS_TCP.replace(str(TLS_TCP_PORT), "443").replace(
                f"[{HOST}]", f"[other.example.com, {HOST}]"
            ),
            "spec.servers[3].hosts",
            "gateway-duplicate-server",
            "already served by istio-system/mygateway servers[0]",
        ),
        (  # one filter chain per SNI: the terminated server already has this name
            f"  hosts: [{BACKEND_HOST}]\n  gateways: [istio-system/mygateway]\n  tls:\n"
            f"  - match:\n    - port: 443\n      sniHosts: [{BACKEND_HOST}]",
            f"  hosts: [{BACKEND_HOST}, {HOST}]\n  gateways: [istio-system/mygateway]\n  tls:\n"
            f"  - match:\n    - port: 443\n      sniHosts: [{BACKEND_HOST}, {HOST}]",
            "spec.tls[0].match[0].sniHosts",
            "gateway-duplicate-server",
            f"SNI {HOST} is already served by istio-system/mygateway servers[0]",
        ),
    ],
)
def test_what_cannot_be_honoured_is_refused_with_its_location(
    tmp_path: Path, pki: Pki, old: str, new: str, field: str, code: str, words: str
) -> None:
    secret = pki.tls_secret("httpbin-credential", "httpbin.example.com")
    docs = [GATEWAY.replace(old, new), ROUTES.replace(old, new)]
    assert docs != [GATEWAY, ROUTES], old
    mesh = compile_mesh(tmp_path, secret, *docs)
    found = problems(mesh)
    assert any(f == field and c == code and words in m and line > 0 for line, f, c, m in found), (
        found
    )
    with pytest.raises(GatewayConfigError):
        translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")


# --------------------------------------------------------------------------- live


def backend_command(tmp: Path, pki: Pki) -> list[str]:
    script = tmp / "tls_backend.py"
    script.write_text(TLS_BACKEND)
    cert, key = pki.path(f"{BACKEND_HOST}.crt"), pki.path(f"{BACKEND_HOST}.key")
    return [sys.executable, str(script), str(cert), str(key)]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[GatewayMesh]:
    root = tmp_path_factory.mktemp("passthrough")
    secret = pki.tls_secret("httpbin-credential", "httpbin.example.com")
    config = "\n---\n".join([backends(backend_command(root, pki)), secret, GATEWAY, ROUTES])
    with gateway_mesh(root, base="127.62.0.0", config=config) as running:
        yield running


def tls_exchange(address: str, port: int, sni: str, pki: Pki, line: bytes) -> tuple[str, bytes]:
    """(O= of the certificate the client saw, the one-line answer to ``line``) over one
    TLS connection with SNI ``sni``, verified against the example.com CA."""
    context = tls_context(pki)
    with (
        socket.create_connection((address, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        subject = dict(x[0] for x in (tls.getpeercert() or {}).get("subject", ()))
        tls.sendall(line)
        answer = b""
        while not answer.endswith(b"\n") and (chunk := tls.recv(1024)):
            answer += chunk
    return str(subject.get("organizationName", "")), answer


def test_passthrough_client_sees_the_backends_certificate(mesh: GatewayMesh, pki: Pki) -> None:
    address = mesh.address()
    organization, answer = tls_exchange(address, HTTPS_PORT, BACKEND_HOST, pki, b"hello\n")
    assert organization == "backend organization"  # not the gateway's certificate
    assert answer == b"backend: hello\n"
    # On the same port, the terminated server still answers with the gateway's certificate.
    terminated = https_get(address, HTTPS_PORT, "/status/418", tls_context(pki))
    assert (terminated.status, terminated.peer_organization) == (418, "httpbin organization")


def test_passthrough_with_openssl_s_client(mesh: GatewayMesh, pki: Pki) -> None:
    command = ["openssl", "s_client", "-connect", f"{mesh.address()}:{HTTPS_PORT}"]
    command += ["-servername", BACKEND_HOST, "-CAfile", str(pki.path("example.com.crt"))]
    command += ["-verify_return_error", "-brief", "-ign_eof"]  # read until the server closes
    shown = subprocess.run(
        command,
        input=b"openssl\n",
        capture_output=True,
        timeout=30,
        check=False,
    )
    output = (shown.stdout + shown.stderr).decode(errors="replace")
    # (Its exit status is 1: the backend closes without a close_notify.)
    assert "O = backend organization" in output and "Verification: OK" in output, output
    assert "backend: openssl" in output, output


def test_an_unknown_sni_reaches_nothing(mesh: GatewayMesh, pki: Pki) -> None:
    context = ssl.create_default_context(cafile=str(pki.path("example.com.crt")))
    with (
        socket.create_connection((mesh.address(), HTTPS_PORT), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionResetError)),
    ):
        context.wrap_socket(raw, server_hostname="nobody.example.com")


def test_tcp_server_carries_a_line_to_tcp_echo(mesh: GatewayMesh) -> None:
    # Either tcp-echo pod (v1 answers "hello", v2 "hi").
    assert tcp_line(mesh.address(), b"world\n") in (b"hello world\n", b"hi world\n")


def test_tls_server_terminates_then_carries_a_line_to_tcp_echo(mesh: GatewayMesh, pki: Pki) -> None:
    organization, answer = tls_exchange(mesh.address(), TLS_TCP_PORT, HOST, pki, b"tls\n")
    assert organization == "httpbin organization"  # the gateway's credentialName certificate
    assert answer in (b"hello tls\n", b"hi tls\n")


def tcp_line(address: str, line: bytes) -> bytes:
    """What comes back for ``line`` through the gateway's TCP server (b"": closed)."""
    with socket.create_connection((address, TCP_PORT), timeout=10) as sock:
        sock.sendall(line)
        answer = b""
        while not answer.endswith(b"\n") and (chunk := sock.recv(1024)):
            answer += chunk
    return answer


def rbac_denied(mesh: GatewayMesh) -> int:
    """The gateway Envoy's network RBAC denials (``tcp.rbac.denied``)."""
    admin = mesh.running.pod_record(GATEWAY_REF)["admin"]
    with urllib.request.urlopen(f"http://{admin}/stats?filter=tcp\\.rbac\\.denied", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return sum(int(line.rsplit(": ", 1)[1]) for line in lines if line.startswith("tcp.rbac.denied"))


def test_a_deny_policy_on_the_gateway_closes_tcp_connections(mesh: GatewayMesh, pki: Pki) -> None:
    deny = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-tcp-echo, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  action: DENY
  rules:
  - to: [{{operation: {{ports: ["{TCP_PORT}"]}}}}]
"""
    config = (mesh.config_dir / "gateway.yaml").read_text()
    mesh.apply(config + "\n---\n" + deny)
    try:
        before = rbac_denied(mesh)
        assert tcp_line(mesh.address(), b"denied\n") == b""  # closed by the network RBAC
        assert rbac_denied(mesh) == before + 1
        # The policy names the TCP port only: passthrough on 8443 still reaches the backend.
        _, answer = tls_exchange(mesh.address(), HTTPS_PORT, BACKEND_HOST, pki, b"ok\n")
        assert answer == b"backend: ok\n"
    finally:
        mesh.apply(config)
    assert tcp_line(mesh.address(), b"again\n") in (b"hello again\n", b"hi again\n")
