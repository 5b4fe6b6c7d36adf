"""Ingress/egress checks: each trigger next to its near-identical non-trigger."""

from __future__ import annotations

from trustmesh.analyze.findings import Finding, Severity
from trustmesh.api.diagnostics import Location

from .util import findings

INGRESS = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  template:
    metadata:
      labels: {istio: ingressgateway}
    spec:
      containers: [{name: istio-proxy}]
"""


def where(found: Finding) -> Location:
    assert found.issue.location is not None
    return found.issue.location


def gateway(servers: str, name: str = "gw", namespace: str = "istio-system", sel: str = "") -> str:
    return f"""\
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  selector: {{istio: {sel or "ingressgateway"}}}
  servers:
{servers}"""


def virtual_service(name: str, hosts: str, gateways: str, backend: str = "httpbin") -> str:
    return f"""\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: istio-system}}
spec:
  hosts: [{hosts}]
  gateways: [{gateways}]
  http:
  - route:
    - destination: {{host: {backend}.foo.svc.cluster.local}}
"""


def server(hosts: str, tls: str = "{mode: SIMPLE, credentialName: cert}", port: int = 443) -> str:
    protocol = "HTTPS" if port == 443 else "HTTP"
    lines = f"""\
  - port: {{number: {port}, name: p{port}, protocol: {protocol}}}
    hosts: [{hosts}]
"""
    return lines + (f"    tls: {tls}\n" if tls else "")


# --- TM-EDGE-001 --------------------------------------------------------------------------

REGISTRY_ONLY = "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n"


def test_default_allow_any_names_sidecars_and_the_missing_inventory() -> None:
    [found] = findings("", "TM-EDGE-001")
    assert found.issue.location is None  # an absent setting: Istio's default
    assert found.issue.resource == ""
    assert "foo/httpbin" in found.issue.workloads and "bar/sleep" in found.issue.workloads
    assert not any(w.startswith("legacy/") for w in found.issue.workloads)  # no sidecar
    assert "no ServiceEntry" in found.issue.message and "no egress gateway" in found.issue.message
    assert "mode: REGISTRY_ONLY" in found.issue.fix and "ServiceEntry" in found.issue.fix


def test_registry_only_mesh_is_fine() -> None:
    assert findings("", "TM-EDGE-001", mesh=REGISTRY_ONLY) == []


def test_explicit_allow_any_points_at_the_mesh_field() -> None:
    [found] = findings("", "TM-EDGE-001", mesh="outboundTrafficPolicy:\n  mode: ALLOW_ANY\n")
    assert (where(found).file, where(found).line) == ("mesh.yaml", 2)
    assert where(found).field == "outboundTrafficPolicy.mode"


SIDECAR = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: NS}
spec:
  outboundTrafficPolicy:
    mode: MODE
"""


def test_sidecar_override_to_allow_any_is_reported_at_the_sidecar() -> None:
    text = SIDECAR.replace("NS", "foo").replace("MODE", "ALLOW_ANY")
    [found] = findings(text, "TM-EDGE-001", mesh=REGISTRY_ONLY)
    assert found.issue.resource == "Sidecar/foo/default"
    assert found.issue.workloads == ("foo/httpbin", "foo/sleep", "foo/tcp-echo")
    assert (where(found).line, where(found).field) == (6, "spec.outboundTrafficPolicy.mode")
    assert "overriding the mesh-wide REGISTRY_ONLY" in found.issue.message


def test_root_sidecar_with_registry_only_covers_every_workload() -> None:
    text = SIDECAR.replace("NS", "istio-system").replace("MODE", "REGISTRY_ONLY")
    assert findings(text, "TM-EDGE-001") == []


def test_inventory_and_egress_gateway_silence_the_notes() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: istio-system}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
""" + gateway(server('"api.example.com"', "", 80), "egress", sel="egressgateway")
    [found] = findings(text, "TM-EDGE-001")
    assert "ServiceEntry" not in found.issue.message
    assert "egress gateway" not in found.issue.message


# --- TM-EDGE-002 --------------------------------------------------------------------------


def test_gateway_hosts_star() -> None:
    text = INGRESS + gateway(server('"app.example.com"') + server('"*"', "", 80))
    [found] = findings(text, "TM-EDGE-002")
    assert found.issue.workloads == ("istio-system/istio-ingressgateway",)
    assert (where(found).line, where(found).field) == (21, "spec.servers[1].hosts[0]")


def test_specific_and_namespace_delegated_hosts_are_fine() -> None:
    text = INGRESS + gateway(server('"app.example.com", "foo/*", "./*"'))
    assert findings(text, "TM-EDGE-002") == []


def test_catch_all_virtual_service_on_catch_all_gateway() -> None:
    text = INGRESS + gateway(server('"*"', "", 80)) + virtual_service("all", '"*"', "gw")
    found = [f for f in findings(text, "TM-EDGE-002") if f.issue.resource.startswith("Virtual")]
    assert [f.issue.resource for f in found] == ["VirtualService/istio-system/all"]
    assert where(found[0]).field == "spec.hosts[0]"


def test_catch_all_virtual_service_on_specific_gateway_is_fine() -> None:
    text = INGRESS + gateway(server('"app.example.com"')) + virtual_service("all", '"*"', "gw")
    assert findings(text, "TM-EDGE-002") == []


# --- TM-EDGE-003 --------------------------------------------------------------------------

ADMIN = server('"admin.example.com"', "{mode: MUTUAL, credentialName: admin}")
GUEST = server('"*.example.com"')


def test_one_gateway_mutual_admin_and_simple_wildcard_is_an_error() -> None:
    text = INGRESS + gateway(GUEST + ADMIN) + virtual_service("admin", '"admin.example.com"', "gw")
    [found] = findings(text, "TM-EDGE-003")
    assert found.severity is Severity.ERROR
    assert found.issue.workloads == ("istio-system/istio-ingressgateway",)
    assert (where(found).line, where(found).field) == (19, "spec.servers[0].tls")
    assert "no client certificate required" in found.issue.message
    assert "istio-system/admin is bound to both" in found.issue.message
    assert "into a Gateway of its own" in found.issue.fix and "status: 421" in found.issue.fix


def test_the_421_recipe_closes_the_finding() -> None:
    text = (
        INGRESS
        + gateway(GUEST, "guest")
        + gateway(ADMIN, "admin")
        + virtual_service("admin", '"admin.example.com"', "admin", backend="admin")
        + virtual_service("guest", '"*.example.com"', "guest", backend="admin")
    )
    [found] = findings(text, "TM-EDGE-003")
    assert found.issue.fix.startswith("apiVersion:")  # separate Gateways: the VS alone
    assert findings(text + "---\n" + found.issue.fix, "TM-EDGE-003") == []


def test_separate_gateways_without_a_wildcard_route_are_fine() -> None:
    text = (
        INGRESS
        + gateway(GUEST, "guest")
        + gateway(ADMIN, "admin")
        + virtual_service("admin", '"admin.example.com"', "admin")
    )
    assert findings(text, "TM-EDGE-003") == []


def test_wildcard_route_to_the_same_backend_is_an_error_to_another_is_info() -> None:
    base = (
        INGRESS
        + gateway(GUEST, "guest")
        + gateway(ADMIN, "admin")
        + virtual_service("admin", '"admin.example.com"', "admin", backend="admin")
    )
    [same] = findings(
        base + virtual_service("g", '"*.example.com"', "guest", "admin"), "TM-EDGE-003"
    )
    assert same.severity is Severity.ERROR and "same backend" in same.issue.message
    [other] = findings(
        base + virtual_service("g", '"*.example.com"', "guest", "blog"), "TM-EDGE-003"
    )
    assert other.severity is Severity.INFO


def test_same_tls_or_another_port_or_another_gateway_workload_is_fine() -> None:
    vs = virtual_service("admin", '"admin.example.com"', "gw")
    mutual = server('"*.example.com"', "{mode: MUTUAL, credentialName: wild}")
    assert findings(INGRESS + gateway(mutual + ADMIN) + vs, "TM-EDGE-003") == []
    other_port = GUEST.replace("number: 443", "number: 8443")
    assert findings(INGRESS + gateway(other_port + ADMIN) + vs, "TM-EDGE-003") == []
    split = gateway(GUEST, "guest", sel="other") + gateway(ADMIN, "gw")
    assert findings(INGRESS + split + vs, "TM-EDGE-003") == []


def test_without_virtual_services_it_is_only_info() -> None:
    [found] = findings(INGRESS + gateway(GUEST + ADMIN), "TM-EDGE-003")
    assert found.severity is Severity.INFO


# --- TM-EDGE-004 --------------------------------------------------------------------------


def edge4(servers: str, sel: str = "") -> list[Finding]:
    return findings(INGRESS + gateway(servers, sel=sel), "TM-EDGE-004")


def test_passthrough_is_info_auto_passthrough_warning_unless_east_west() -> None:
    [passthrough] = edge4(server('"a.example.com"', "{mode: PASSTHROUGH}"))
    assert passthrough.severity is Severity.INFO
    assert where(passthrough).field == "spec.servers[0].tls.mode"
    [auto] = edge4(server('"*.local"', "{mode: AUTO_PASSTHROUGH}"))
    assert auto.severity is Severity.WARNING
    [east_west] = edge4(server('"*.local"', "{mode: AUTO_PASSTHROUGH}"), sel="eastwestgateway")
    assert east_west.severity is Severity.INFO


def test_unset_mode_is_passthrough_and_ignores_the_credential() -> None:
    [found] = edge4(server('"a.example.com"', "{credentialName: cert}"))
    assert found.severity is Severity.WARNING
    assert "unset, which means PASSTHROUGH" in found.issue.message


def test_http_without_redirect_next_to_https() -> None:
    [found] = edge4(server('"a.example.com"') + server('"a.example.com"', "", 80))
    assert (where(found).line, where(found).field) == (20, "spec.servers[1]")
    assert "httpsRedirect: true" in found.issue.fix
    redirect = server('"a.example.com"', "{httpsRedirect: true}", 80)
    assert edge4(server('"a.example.com"') + redirect) == []
    assert edge4(server('"a.example.com"') + server('"b.example.com"', "", 80)) == []


def test_old_tls_versions() -> None:
    [found] = edge4(
        server('"a.example.com"', "{mode: SIMPLE, credentialName: c, minProtocolVersion: TLSV1_0}")
    )
    assert where(found).field == "spec.servers[0].tls.minProtocolVersion"
    assert (
        edge4(
            server(
                '"a.example.com"', "{mode: SIMPLE, credentialName: c, minProtocolVersion: TLSV1_2}"
            )
        )
        == []
    )


def test_mutual_without_any_ca() -> None:
    [found] = edge4(
        server('"a.example.com"', "{mode: MUTUAL, serverCertificate: /c, privateKey: /k}")
    )
    assert "no CA" in found.issue.message
    assert edge4(server('"a.example.com"', "{mode: MUTUAL, credentialName: c}")) == []


def secret(
    name: str, namespace: str = "istio-system", keys: str = "tls.crt: eA==, tls.key: eA=="
) -> str:
    return f"""\
---
apiVersion: v1
kind: Secret
metadata: {{name: {name}, namespace: {namespace}}}
data: {{{keys}}}
"""


def test_mutual_credential_whose_secret_has_no_ca() -> None:
    mutual = gateway(server('"a.example.com"', "{mode: MUTUAL, credentialName: c}"))
    [found] = findings(INGRESS + mutual + secret("c"), "TM-EDGE-004")
    assert where(found).field == "spec.servers[0].tls.credentialName"
    assert "no ca.crt" in found.issue.message
    with_ca = secret("c", keys="tls.crt: eA==, tls.key: eA==, ca.crt: eA==")
    assert findings(INGRESS + mutual + with_ca, "TM-EDGE-004") == []
    ca_secret = secret("c") + secret("c-cacert", keys="cacert: eA==")
    assert findings(INGRESS + mutual + ca_secret, "TM-EDGE-004") == []


# --- TM-EDGE-005 --------------------------------------------------------------------------

TLS_GW = gateway(server('"a.example.com"'))  # credentialName: cert, Gateway in istio-system


def test_credential_not_among_inputs_is_info() -> None:
    [found] = findings(INGRESS + TLS_GW, "TM-EDGE-005")
    assert found.severity is Severity.INFO
    assert (where(found).line, where(found).field) == (19, "spec.servers[0].tls.credentialName")
    assert found.issue.workloads == ("istio-system/istio-ingressgateway",)


def test_credential_present_in_the_gateway_namespace_is_fine() -> None:
    assert findings(INGRESS + TLS_GW + secret("cert"), "TM-EDGE-005") == []
    certificate = """\
---
apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {name: a-example, namespace: istio-system}
spec: {secretName: cert, dnsNames: [a.example.com]}
"""
    assert findings(INGRESS + TLS_GW + certificate, "TM-EDGE-005") == []


def test_secret_in_the_gateway_resource_namespace_instead_of_the_workload_namespace() -> None:
    text = INGRESS + gateway(server('"a.example.com"'), namespace="foo") + secret("cert", "foo")
    [found] = findings(text, "TM-EDGE-005")
    assert found.severity is Severity.WARNING
    assert "exists in foo, but the gateway workload runs in istio-system" in found.issue.message


def test_missing_when_the_inputs_hold_secrets() -> None:
    [found] = findings(INGRESS + TLS_GW + secret("other"), "TM-EDGE-005")
    assert found.severity is Severity.WARNING
    assert "no Secret istio-system/cert" in found.issue.message


def test_cross_namespace_reference() -> None:
    text = INGRESS + gateway(server('"a.example.com"', "{mode: SIMPLE, credentialName: foo/cert}"))
    [found] = findings(text + secret("cert", "foo"), "TM-EDGE-005")
    assert found.severity is Severity.WARNING
    assert "refers to namespace foo" in found.issue.message
    same_ns = text.replace("foo/cert", "istio-system/cert") + secret("cert")
    assert findings(same_ns, "TM-EDGE-005") == []


def test_gateway_workload_not_in_inputs_is_assumed_and_info() -> None:
    [found] = findings(TLS_GW + secret("cert", "foo"), "TM-EDGE-005")
    assert found.severity is Severity.INFO
    assert "assuming the gateway workload runs in istio-system" in found.issue.message


def test_credential_names_list_and_non_secret_credentials() -> None:
    listed = "{mode: SIMPLE, credentialNames: [rsa-cert, ecdsa-cert]}"
    text = INGRESS + gateway(server('"a.example.com"', listed)) + secret("rsa-cert")
    [found] = findings(text, "TM-EDGE-005")
    assert where(found).field == "spec.servers[0].tls.credentialNames[1]"
    builtin = "{mode: SIMPLE, credentialName: builtin://}"
    assert findings(INGRESS + gateway(server('"a.example.com"', builtin)), "TM-EDGE-005") == []
