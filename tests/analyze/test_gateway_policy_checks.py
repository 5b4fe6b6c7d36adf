"""Gateway credentials, policy attachment, egressProxy, EnvoyFilters, policy status and JWT
checks (TM-EDGE-006…008, TM-INST-025, TM-AMBIENT-002, TM-AUTHN-004/005): the variants the
istio_coverage inputs do not show. Certificates are made around the real clock."""

from __future__ import annotations

import base64
import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.analyze.checks.jwt_routing import routing_claim
from trustmesh.analyze.findings import Severity

from .util import findings

GATEWAY_POD = """---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ingress, namespace: istio-system}
spec:
  template:
    metadata: {labels: {istio: ingressgateway}}
    spec: {containers: [{name: istio-proxy, image: docker.io/istio/proxyv2:1.24.2}]}
"""


def tls_pair(start: datetime.datetime, end: datetime.datetime) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shop.example.com")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    b64 = base64.b64encode
    return b64(cert.public_bytes(serialization.Encoding.PEM)).decode(), b64(pem_key).decode()


def secret_and_gateway(data: str, mode: str = "SIMPLE") -> str:
    return (
        GATEWAY_POD
        + f"""---
apiVersion: v1
kind: Secret
metadata: {{name: shop-cert, namespace: istio-system}}
type: kubernetes.io/tls
{data}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: shop, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: [shop.example.com]
    tls: {{mode: {mode}, credentialName: shop-cert}}
"""
    )


def test_certificate_validity_is_checked_against_the_real_clock() -> None:
    now = datetime.datetime.now(datetime.UTC)
    hour = datetime.timedelta(hours=1)
    cert, key = tls_pair(now - hour, now + hour)
    text = secret_and_gateway(f"data: {{tls.crt: {cert}, tls.key: {key}}}\n")
    assert findings(text, "TM-EDGE-006", base=False) == []  # valid right now
    [later] = findings(text, "TM-EDGE-006", base=False, now=now + 2 * hour)
    assert "expired on" in later.issue.message
    future, future_key = tls_pair(now + hour, now + 3 * hour)
    text = secret_and_gateway(f"data: {{tls.crt: {future}, tls.key: {future_key}}}\n")
    [early] = findings(text, "TM-EDGE-006", base=False)
    assert "is not valid before" in early.issue.message
    assert early.severity is Severity.ERROR


def test_secret_string_data_and_bad_base64() -> None:
    now = datetime.datetime.now(datetime.UTC)
    cert, key = tls_pair(now - datetime.timedelta(days=1), now + datetime.timedelta(days=1))
    plain_cert = base64.b64decode(cert).decode().replace("\n", "\\n")
    plain_key = base64.b64decode(key).decode().replace("\n", "\\n")
    text = secret_and_gateway(f'stringData: {{tls.crt: "{plain_cert}", tls.key: "{plain_key}"}}\n')
    assert findings(text, "TM-EDGE-006", base=False) == []
    [bad] = findings(secret_and_gateway("data: {tls.crt: '%%%', tls.key: '%%%'}\n"), "TM-EDGE-006")
    assert "not valid base64" in bad.issue.message


def test_selector_policy_on_gateway_api_gateway_escalates_when_it_cannot_apply() -> None:
    gateway = """---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: %s, namespace: web}
spec: {gatewayClassName: %s, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"""
    policy = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: %s, namespace: %s}
spec:
  selector: {matchLabels: {gateway.networking.k8s.io/gateway-name: %s}}
  rules: [{from: [{source: {principals: [cluster.local/ns/web/sa/app]}}]}]
"""
    text = gateway % ("waypoint", "istio-waypoint") + policy % ("at-waypoint", "web", "waypoint")
    [found] = findings(text, "TM-EDGE-007", base=False)
    assert found.severity is Severity.ERROR and "waypoints never apply" in found.issue.message
    text = gateway % ("edge", "istio") + policy % ("mesh-wide", "istio-system", "edge")
    [root] = findings(text, "TM-EDGE-007", base=False)
    assert root.severity is Severity.WARNING  # a root-namespace selector reaches it too
    flag_off = """---
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: cp, namespace: istio-system}
spec:
  values: {pilot: {env: {ENABLE_SELECTOR_BASED_K8S_GATEWAY_POLICY: "false"}}}
"""
    [off] = findings(text + flag_off, "TM-EDGE-007", base=False)
    assert off.severity is Severity.ERROR and "=false" in off.issue.message
    elsewhere = gateway % ("edge", "istio") + policy % ("other-ns", "shop", "edge")
    assert findings(elsewhere, "TM-EDGE-007", base=False) == []


def test_egress_proxy_effects() -> None:
    sidecar = """---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: crawl}
spec:
  %s
  outboundTrafficPolicy:
    mode: %s
    egressProxy: {host: squid.egress.svc.cluster.local, port: {number: 3128}}
"""
    [registry] = findings(sidecar % ("", "REGISTRY_ONLY"), "TM-EDGE-008", base=False)
    assert "mode is REGISTRY_ONLY, so it is ignored" in registry.issue.message
    imported = sidecar % ('egress: [{hosts: ["egress/*"]}]', "ALLOW_ANY")
    [used] = findings(imported, "TM-EDGE-008", base=False)
    assert "undocumented" in used.issue.message
    assert used.issue.location is not None
    assert used.issue.location.field == "spec.outboundTrafficPolicy.egressProxy"


def test_envoy_filter_scope_and_malformed_patches() -> None:
    text = """---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: global-jwt, namespace: istio-system}
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    patch:
      operation: INSERT_FIRST
      value: {name: envoy.filters.http.jwt_authn}
  - applyTo: CLUSTER
    patch: {operation: MERGE, value: {transport_socket: {name: envoy.transport_sockets.tls}}}
"""
    # Malformed patches ("- not-a-patch", "configPatches: oops") are refused by the
    # loader with their file:line:field, as the API server's schema refuses them.
    found = findings(text, "TM-INST-025")
    assert [f.issue.location.field for f in found if f.issue.location] == [
        "spec.configPatches[0]",
        "spec.configPatches[1]",
    ]
    assert "every workload in every namespace" in found[0].issue.message
    assert "foo/httpbin" in found[0].issue.workloads  # the example mesh's workloads


def test_policy_status_accepted_false() -> None:
    text = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec: {}
status:
  conditions:
  - {type: Accepted, status: "False", reason: Invalid}
  - {type: Something, status: "False"}
"""
    [found] = findings(text, "TM-AMBIENT-002")
    assert "Istio does not enforce it (Accepted=False, Invalid)" in found.issue.message


def test_routing_claims_as_istio_parses_them() -> None:
    assert routing_claim("@request.auth.claims.groups") == "groups"
    assert routing_claim("@Request.Auth.Claims[nested][key]") == "nested.key"
    assert routing_claim("@request.auth.claims") is None
    assert routing_claim("@request.auth.claims[]") is None
    assert routing_claim("x-claims") is None


def test_claim_routing_with_a_target_ref_only_authentication() -> None:
    text = (
        GATEWAY_POD
        + """---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: pub, namespace: web}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*.example.com"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: by-claim, namespace: web}
spec:
  hosts: [a.example.com]
  gateways: [pub]
  http:
  - match: [{withoutHeaders: {"@request.auth.claims[role]": {exact: admin}}}]
    route: [{destination: {host: a.web.svc.cluster.local}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: attached, namespace: istio-system}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other}]
  jwtRules: [{issuer: "https://issuer.example", jwksUri: "https://issuer.example/keys"}]
"""
    )
    [found] = findings(text, "TM-AUTHN-004", base=False)
    assert found.severity is Severity.ERROR
    assert "claim role" in found.issue.message
    assert found.issue.workloads == ("istio-system/ingress",)


def test_jwks_fetch_checked_on_the_install_when_istiod_is_not_among_the_inputs() -> None:
    ra = """---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: ra, namespace: foo}
spec: {jwtRules: [{issuer: "https://issuer.example"}]}
"""
    iop = """---
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: cp, namespace: istio-system}
spec:
  values: {pilot: {env: %s}}
"""
    [found] = findings(ra + iop % "{}", "TM-AUTHN-005")
    assert found.issue.resource == "IstioOperator/istio-system/cp"
    assert found.issue.location is not None and found.issue.location.field.endswith("pilot.env")
    blocked = iop % '{BLOCKED_CIDRS_IN_JWKS_URIS: "10.0.0.0/8"}'
    assert findings(ra + blocked, "TM-AUTHN-005") == []
    assert findings(ra, "TM-AUTHN-005") == []  # neither istiod nor its install given


def test_secret_contents_checked_where_the_gateway_may_run_when_no_workload_is_given() -> None:
    now = datetime.datetime.now(datetime.UTC)
    cert, _ = tls_pair(now - datetime.timedelta(days=1), now + datetime.timedelta(days=1))
    text = secret_and_gateway(f"data: {{tls.crt: {cert}}}\n").replace(GATEWAY_POD, "")
    text = text.replace("metadata: {name: shop, namespace: istio-system}", "metadata: {name: shop}")
    [found] = findings(text, "TM-EDGE-006", base=False)
    assert found.issue.resource == "Gateway/default/shop"
    assert found.severity is Severity.WARNING
    assert "if the gateway runs in istio-system" in found.issue.message
    assert found.issue.location is not None and found.issue.location.field == "data.tls.crt"
