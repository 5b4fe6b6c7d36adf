"""Gateway translation (pure): what is served, and every input it cannot honour refused
with file, line and field."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.config import load_config
from trustmesh.policy.compose import MeshPolicy
from trustmesh.xds.cache import TYPE_SECRET, Snapshot
from trustmesh.xds.gateway import GatewayConfigError, gateway_diagnostics, translate_gateway

HERE = Path(__file__).parent
GATEWAY_POD = "istio-system/istio-ingressgateway"


def _self_signed(name: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


PEM, KEY = _self_signed("httpbin.example.com")
CAS = {name: _self_signed(name)[0] for name in ("cred", "cred-cacert")}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret(name: str, namespace: str = "istio-system", *, ca: bool = False) -> str:
    ca_line = f"  ca.crt: {b64(CAS[name])}\n" if ca else ""
    return (
        f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        f"type: kubernetes.io/tls\ndata:\n  tls.crt: {b64(PEM)}\n  tls.key: {b64(KEY)}\n" + ca_line
    )


def gateway(servers: str, name: str = "gw") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\n"
        f"metadata: {{name: {name}, namespace: istio-system}}\n"
        f"spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n{servers}"
    )


HTTPS = """\
  - port: {number: 443, name: https, protocol: HTTPS}
    tls: {mode: MODE, credentialName: cred}
    hosts: [httpbin.example.com]
"""
HTTP = """\
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
"""
VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: foo}
spec:
  hosts: ["*"]
  gateways: [istio-system/gw]
  http:
  - route:
    - destination: {host: httpbin, port: {number: 8000}}
"""


def compile_mesh(tmp_path: Path, *docs: str) -> MeshPolicy:
    (tmp_path / "config.yaml").write_text("\n---\n".join(docs))
    loaded = load_config([str(HERE / "workloads.yaml"), str(tmp_path / "config.yaml")])
    assert not loaded.errors, loaded.errors
    assert loaded.mesh is not None
    return loaded.mesh


def problems(mesh: MeshPolicy) -> list[tuple[int, str, str, str]]:
    return [
        (d.location.line, d.location.field, d.code, d.message)
        for d in gateway_diagnostics(mesh, GATEWAY_POD)
    ]


def by_type(resources: Any, type_url: str) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in resources.all() if r["@type"] == type_url}


def test_listeners_bind_the_gateway_services_target_ports(tmp_path: Path) -> None:
    mesh = compile_mesh(
        tmp_path, secret("cred"), gateway(HTTPS.replace("MODE", "SIMPLE") + HTTP), VS
    )
    resources = translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")
    ports = sorted(x["address"]["socket_address"]["port_value"] for x in resources.listeners)
    assert ports == [8080, 8443]  # Service 80 → 8080, 443 → 8443
    snapshot = Snapshot.from_resources(resources.all())
    assert snapshot.consistency_errors() == [] and snapshot.encoding_errors() == []
    secrets = by_type(resources, TYPE_SECRET)
    assert list(secrets) == ["kubernetes://cred"]  # SIMPLE: no CA served
    https = next(x for x in resources.listeners if x["name"].endswith("_8443"))
    chain = https["filter_chains"][0]
    assert chain["filter_chain_match"] == {"server_names": ["httpbin.example.com"]}
    tls = chain["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is False
    assert tls["common_tls_context"]["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"


def test_a_server_port_no_service_maps_is_bound_as_written(tmp_path: Path) -> None:
    servers = "  - port: {number: 9090, name: http, protocol: HTTP}\n    hosts: ['*']\n"
    mesh = compile_mesh(tmp_path, gateway(servers), VS)
    resources = translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")
    assert [x["address"]["socket_address"]["port_value"] for x in resources.listeners] == [9090]


@pytest.mark.parametrize("mode", ["MUTUAL", "OPTIONAL_MUTUAL"])
def test_mutual_validates_clients_with_the_cacert_companion_first(
    tmp_path: Path, mode: str
) -> None:
    mesh = compile_mesh(
        tmp_path,
        secret("cred", ca=True),
        secret("cred-cacert", ca=True),
        gateway(HTTPS.replace("MODE", mode)),
        VS,
    )
    resources = translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")
    secrets = by_type(resources, TYPE_SECRET)
    ca = secrets["kubernetes://cred-cacert"]["validation_context"]["trusted_ca"]
    assert ca["inline_string"] == CAS["cred-cacert"]  # the companion Secret wins over ca.crt
    tls = resources.listeners[0]["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is (mode == "MUTUAL")
    validation = tls["common_tls_context"]["combined_validation_context"]
    assert validation["validation_context_sds_secret_config"]["name"] == "kubernetes://cred-cacert"


def test_mutual_falls_back_to_the_credentials_own_ca(tmp_path: Path) -> None:
    mesh = compile_mesh(
        tmp_path, secret("cred", ca=True), gateway(HTTPS.replace("MODE", "MUTUAL")), VS
    )
    resources = translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")
    ca = by_type(resources, TYPE_SECRET)["kubernetes://cred-cacert"]
    assert ca["validation_context"]["trusted_ca"]["inline_string"] == CAS["cred"]


def test_tls_settings_reach_envoy(tmp_path: Path) -> None:
    servers = HTTPS.replace("MODE", "MUTUAL").replace(
        "credentialName: cred}",
        "credentialName: cred, minProtocolVersion: TLSV1_3, subjectAltNames: [client.example],"
        " cipherSuites: [ECDHE-RSA-AES256-GCM-SHA384]}",
    )
    mesh = compile_mesh(tmp_path, secret("cred", ca=True), gateway(servers), VS)
    resources = translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")
    tls = resources.listeners[0]["filter_chains"][0]["transport_socket"]["typed_config"]
    common = tls["common_tls_context"]
    assert common["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    assert common["tls_params"]["cipher_suites"] == ["ECDHE-RSA-AES256-GCM-SHA384"]
    sans = common["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"
    ]
    assert {s["matcher"]["exact"] for s in sans} == {"client.example"}


def test_hcm_reads_the_client_address_behind_trusted_proxies(tmp_path: Path) -> None:
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text("defaultConfig: {gatewayTopology: {numTrustedProxies: 2}}\n")
    (tmp_path / "config.yaml").write_text(gateway(HTTP) + "\n---\n" + VS)
    loaded = load_config(
        [str(HERE / "workloads.yaml"), str(tmp_path / "config.yaml")],
        mesh_config=[str(mesh_file)],
    )
    assert loaded.mesh is not None
    resources = translate_gateway(loaded.mesh, GATEWAY_POD, address="127.0.0.9")
    manager = resources.listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["use_remote_address"] is True
    assert manager["xff_num_trusted_hops"] == 2
    assert manager["forward_client_cert_details"] == "SANITIZE_SET"


@pytest.mark.parametrize(
    ("docs", "field", "code", "words"),
    [
        (  # a typo: the API server's schema refuses it
            [secret("cred"), gateway(HTTPS.replace("MODE", "SIMPLE").replace("mode", "mdoe"))],
            "spec.servers[0].tls.mdoe",
            "unknown-field",
            "",
        ),
        (
            [gateway(HTTPS.replace("MODE", "SIMPLE"))],
            "spec.servers[0].tls.credentialName",
            "gateway-credential",
            "no Secret cred in namespace istio-system",
        ),
        (  # a gateway reads Secrets of its own namespace only
            [secret("cred", "foo"), gateway(HTTPS.replace("MODE", "SIMPLE"))],
            "spec.servers[0].tls.credentialName",
            "gateway-credential",
            "no Secret cred in namespace istio-system",
        ),
        (
            [secret("cred"), gateway(HTTPS.replace("MODE", "MUTUAL"))],
            "spec.servers[0].tls.credentialName",
            "gateway-credential",
            "needs a CA",
        ),
        (
            [secret("cred"), gateway(HTTPS.replace("MODE", "AUTO_PASSTHROUGH"))],
            "spec.servers[0].tls.mode",
            "unsupported-gateway-field",
            "AUTO_PASSTHROUGH",
        ),
        (
            [gateway(HTTP.replace("protocol: HTTP", "protocol: MONGO"))],
            "spec.servers[0].port.protocol",
            "unsupported-gateway-field",
            "MONGO",
        ),
        (
            [gateway(HTTP), VS + "    fault: {abort: {httpStatus: 500}}\n"],
            "spec.http[0].fault",
            "unsupported-gateway-field",
            "fault",
        ),
        (
            [
                gateway(HTTP),
                VS.replace("  - route:", "  - match: [{sourceLabels: {a: b}}]\n    route:"),
            ],
            "spec.http[0].match[0].sourceLabels",
            "unsupported-gateway-field",
            "sourceLabels",
        ),
        (
            [
                secret("cred"),
                gateway(
                    HTTPS.replace("MODE", "SIMPLE").replace(
                        "credentialName: cred}", "credentialName: cred, cipherSuites: [NOPE]}"
                    )
                ),
            ],
            "spec.servers[0].tls.cipherSuites[0]",
            "invalid-field",
            "NOPE",
        ),
        (  # TLS and plaintext on one port
            [
                secret("cred"),
                gateway(HTTP + HTTPS.replace("MODE", "SIMPLE").replace("443", "80")),
            ],
            "spec.servers[1].port.protocol",
            "gateway-port-conflict",
            "cannot share a port",
        ),
        (
            [gateway(HTTP), VS.replace("  - route:", "  - timeout: soon\n    route:")],
            "spec.http[0].timeout",
            "invalid-field",
            "soon",
        ),
    ],
)
def test_what_cannot_be_honoured_is_refused_with_its_location(
    tmp_path: Path, docs: list[str], field: str, code: str, words: str
) -> None:
    mesh = compile_mesh(tmp_path, *docs)
    found = problems(mesh)
    assert any(f == field and c == code and words in m and line > 0 for line, f, c, m in found), (
        found
    )
    with pytest.raises(GatewayConfigError):
        translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")


@pytest.mark.parametrize(
    ("export_to", "bound"),
    [("", True), ('["."]', False), ("[istio-system]", True), ('["*"]', True), ("[bar]", False)],
)
def test_a_virtual_service_binds_only_where_it_is_exported(
    tmp_path: Path, export_to: str, bound: bool
) -> None:
    vs = VS + (f"  exportTo: {export_to}\n" if export_to else "")
    mesh = compile_mesh(tmp_path, gateway(HTTP), vs)
    resources = translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")
    (routes,) = resources.routes
    routed = [h for h in routes["virtual_hosts"] if h["routes"]]
    assert bool(routed) is bound  # foo's VS, the gateway pod in istio-system


def test_istio_mutual_serves_the_gateways_mesh_certificate(tmp_path: Path) -> None:
    servers = HTTPS.replace("{mode: MODE, credentialName: cred}", "{mode: ISTIO_MUTUAL}")
    mesh = compile_mesh(tmp_path, gateway(servers), VS)
    resources = translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")
    assert resources.secrets == ()  # the agent's SDS serves the mesh certificate
    tls = resources.listeners[0]["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    common = tls["common_tls_context"]
    assert common["tls_certificate_sds_secret_configs"][0]["name"] == "default"
    validation = common["combined_validation_context"]["validation_context_sds_secret_config"]
    assert validation["name"] == "ROOTCA"


def test_istio_mutual_with_a_credential_is_refused(tmp_path: Path) -> None:
    mesh = compile_mesh(
        tmp_path, secret("cred"), gateway(HTTPS.replace("MODE", "ISTIO_MUTUAL")), VS
    )
    assert [(f, c) for _, f, c, _ in problems(mesh)] == [
        ("spec.servers[0].tls.credentialName", "invalid-field")
    ]


def test_the_pods_proxy_config_annotation_sets_trusted_proxies(tmp_path: Path) -> None:
    workloads = (HERE / "workloads.yaml").read_text()
    annotated = workloads.replace(
        "        inject.istio.io/templates: gateway\n",
        "        inject.istio.io/templates: gateway\n"
        "        proxy.istio.io/config: '{gatewayTopology: {numTrustedProxies: 3}}'\n",
    )
    assert annotated != workloads
    (tmp_path / "workloads.yaml").write_text(annotated)
    (tmp_path / "config.yaml").write_text(gateway(HTTP) + "\n---\n" + VS)
    mesh_file = tmp_path.parent / f"{tmp_path.name}-mesh.yaml"
    mesh_file.write_text("defaultConfig: {gatewayTopology: {numTrustedProxies: 1}}\n")
    loaded = load_config([str(tmp_path)], mesh_config=[str(mesh_file)])
    assert loaded.mesh is not None, loaded.errors
    resources = translate_gateway(loaded.mesh, GATEWAY_POD, address="127.0.0.9")
    manager = resources.listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["xff_num_trusted_hops"] == 3  # the pod's own setting wins


def test_a_secret_envoy_would_refuse_is_named_by_file_line_and_key(tmp_path: Path) -> None:
    other_key = _self_signed("other")[1]
    wrong_key = secret("cred").replace(b64(KEY), b64(other_key))
    mesh = compile_mesh(tmp_path, wrong_key, gateway(HTTPS.replace("MODE", "SIMPLE")), VS)
    assert [(line, f, m) for line, f, _, m in problems(mesh)] == [
        (7, "data.tls.key", "is not the private key of the certificate")
    ]
    garbage = secret("cred").replace(b64(PEM), b64("not a certificate"))
    mesh = compile_mesh(tmp_path, garbage, gateway(HTTPS.replace("MODE", "SIMPLE")), VS)
    assert [(f, m) for _, f, _, m in problems(mesh)] == [
        ("data.tls.crt", "is not a PEM certificate chain")
    ]


ALLOW_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-some, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  rules: [{to: [{operation: {paths: [/status/*]}}]}]
"""


def test_every_virtual_host_switches_on_the_gateways_policy(tmp_path: Path) -> None:
    vs = VS.replace('hosts: ["*"]', "hosts: [httpbin.example.com]")
    mesh = compile_mesh(tmp_path, gateway(HTTP), vs, ALLOW_POLICY)
    resources = translate_gateway(mesh, GATEWAY_POD, address="127.0.0.9")
    (routes,) = resources.routes
    # A Host no VirtualService names meets the policy too (403 before the 404), as at
    # Istio's blackhole virtual host.
    assert [h["domains"] for h in routes["virtual_hosts"]] == [
        ["httpbin.example.com", "httpbin.example.com:*"],
        ["*"],
    ]
    for host in routes["virtual_hosts"]:
        assert "trustmesh.authz.allow" in host["typed_per_filter_config"]
