"""DestinationRule TLS origination at the sidecar, offline: the clusters a sidecar gets
for a ServiceEntry host (Istio's "Egress TLS Origination" task), subsets of the host,
what ``authz check`` says, and what sidecars cannot honour refused with file, line and
field."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.egress_rig import EXTERNAL
from tests.gateway.origination_task import SERVICE_ENTRY, rule
from trustmesh.config import LoadedConfig, load_config
from trustmesh.policy.compose import MeshPolicy, compile_mesh
from trustmesh.policy.decision import Verdict
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source
from trustmesh.xds.outbound import SYSTEM_CA_BUNDLE, outbound_clusters, outbound_routes

WORKLOADS = """
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep, namespace: foo}
spec:
  selector: {matchLabels: {app: sleep}}
  template:
    metadata: {labels: {app: sleep}}
    spec:
      containers: [{name: sleep, image: curl}]
"""

TASK_RULE = rule("        mode: SIMPLE # initiates HTTPS when accessing edition.cnn.com")
HTTP80 = f"outbound|80||{EXTERNAL}"
HTTPS443 = f"outbound|443||{EXTERNAL}"


def load(tmp_path: Path, *docs: str) -> LoadedConfig:
    (tmp_path / "workloads.yaml").write_text(WORKLOADS)
    (tmp_path / "config.yaml").write_text("\n---\n".join(d.strip("\n") for d in docs) + "\n")
    return load_config([str(tmp_path / "workloads.yaml"), str(tmp_path / "config.yaml")])


def clusters(mesh: MeshPolicy) -> dict[str, dict[str, Any]]:
    sleep = mesh.for_workload("foo/sleep")
    assert sleep is not None
    return {c["name"]: c for c in outbound_clusters(sleep, mesh, "sds-grpc")}


def loaded_mesh(tmp_path: Path, *docs: str) -> MeshPolicy:
    loaded = load(tmp_path, *docs)
    assert not loaded.errors, loaded.errors
    assert loaded.mesh is not None
    return loaded.mesh


def upstream(cluster: dict[str, Any]) -> dict[str, Any]:
    socket = cluster["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    typed: dict[str, Any] = socket["typed_config"]
    return typed


def test_the_tasks_port_80_leaves_the_sidecar_over_tls_checked_against_the_system_bundle(
    tmp_path: Path,
) -> None:
    found = clusters(loaded_mesh(tmp_path, SERVICE_ENTRY, TASK_RULE))
    cluster = found[HTTP80]
    # resolution DNS, no endpoints: the host itself, at targetPort 443
    assert cluster["type"] == "STRICT_DNS"
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": EXTERNAL,
        "port_value": 443,
    }
    tls = upstream(cluster)
    assert tls["sni"] == EXTERNAL
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": SYSTEM_CA_BUNDLE}
    assert {"san_type": "DNS", "matcher": {"exact": EXTERNAL}} in validation[
        "match_typed_subject_alt_names"
    ]
    assert "tls_certificates" not in tls["common_tls_context"]
    # Port 443 (the application's own HTTPS): the rule says nothing, nothing is added.
    assert "transport_socket" not in found[HTTPS443]


def test_without_the_rule_the_request_leaves_as_sent(tmp_path: Path) -> None:
    assert "transport_socket" not in clusters(loaded_mesh(tmp_path, SERVICE_ENTRY))[HTTP80]


def test_ca_certificates_sni_and_subject_alt_names(tmp_path: Path) -> None:
    tls = "        mode: SIMPLE\n        caCertificates: /etc/cnn/ca.pem\n        sni: cnn.example"
    cluster = clusters(loaded_mesh(tmp_path, SERVICE_ENTRY, rule(tls)))[HTTP80]
    context = upstream(cluster)
    assert context["sni"] == "cnn.example"
    validation = context["common_tls_context"]["validation_context"]
    # an explicit sni turns Istio's automatic name check off: the CA alone
    assert validation == {"trusted_ca": {"filename": "/etc/cnn/ca.pem"}}
    tls += "\n        subjectAltNames: [edition.cnn.com]"
    cluster = clusters(loaded_mesh(tmp_path, SERVICE_ENTRY, rule(tls)))[HTTP80]
    validation = upstream(cluster)["common_tls_context"]["validation_context"]
    assert validation["match_typed_subject_alt_names"][0]["matcher"] == {"exact": EXTERNAL}


def test_insecure_skip_verify_checks_neither_ca_nor_name(tmp_path: Path) -> None:
    tls = "        mode: SIMPLE\n        insecureSkipVerify: true"
    context = upstream(clusters(loaded_mesh(tmp_path, SERVICE_ENTRY, rule(tls)))[HTTP80])
    assert context["sni"] == EXTERNAL
    assert "validation_context" not in context["common_tls_context"]


def test_mutual_presents_the_rules_key_pair(tmp_path: Path) -> None:
    tls = (
        "        mode: MUTUAL\n        clientCertificate: /etc/cnn/client.pem\n"
        "        privateKey: /etc/cnn/client.key\n        caCertificates: /etc/cnn/ca.pem"
    )
    context = upstream(clusters(loaded_mesh(tmp_path, SERVICE_ENTRY, rule(tls)))[HTTP80])
    assert context["common_tls_context"]["tls_certificates"] == [
        {
            "certificate_chain": {"filename": "/etc/cnn/client.pem"},
            "private_key": {"filename": "/etc/cnn/client.key"},
        }
    ]


def test_mutual_without_a_key_pair_is_refused_as_istio_admission_does(tmp_path: Path) -> None:
    loaded = load(tmp_path, SERVICE_ENTRY, rule("        mode: MUTUAL"))
    found = {(e.location.field, e.message) for e in loaded.errors}
    field = "spec.trafficPolicy.portLevelSettings[0].tls.mode"
    assert (field, "client certificate required for mutual tls (clientCertificate)") in found
    assert (field, "private key required for mutual tls (privateKey)") in found
    assert loaded.mesh is None


def test_credential_name_with_files_is_refused_as_istio_admission_does(tmp_path: Path) -> None:
    tls = "        mode: SIMPLE\n        credentialName: cnn\n        caCertificates: /ca.pem"
    loaded = load(tmp_path, SERVICE_ENTRY, rule(tls, port=443))
    assert any(
        "cannot specify client certificates or CA certificate" in e.message for e in loaded.errors
    )


def test_credential_name_where_the_sidecar_would_send_plaintext_is_an_error_on_its_line(
    tmp_path: Path,
) -> None:
    loaded = load(
        tmp_path, SERVICE_ENTRY, rule("        mode: SIMPLE\n        credentialName: cnn")
    )
    (problem,) = [d for d in loaded.diagnostics if d.code == "destination-rule-tls-not-at-sidecar"]
    assert problem.is_error
    assert problem.location.file.endswith("config.yaml")
    lines = (tmp_path / "config.yaml").read_text().splitlines()
    assert lines[problem.location.line - 1] == "        credentialName: cnn"
    assert problem.location.field == "spec.trafficPolicy.portLevelSettings[0].tls.credentialName"
    assert "port 80 of ServiceEntry foo/edition-cnn-com would leave in plaintext" in (
        problem.message
    )
    # Were it loaded anyway, the sidecar would have no cluster for the port: 503.
    mesh = compile_mesh(loaded.snapshot, {})
    found = clusters(mesh)
    assert HTTP80 not in found and HTTPS443 in found


def test_credential_name_on_the_applications_own_tls_port_is_a_warning(tmp_path: Path) -> None:
    """Istio's egress-gateway task: credentialName for port 443, which the gateway
    reads; a sidecar seeing the entry passes the application's TLS through."""
    tls = "        mode: SIMPLE\n        credentialName: cnn"
    loaded = load(tmp_path, SERVICE_ENTRY, rule(tls, port=443))
    assert not loaded.errors and loaded.mesh is not None
    (problem,) = [d for d in loaded.diagnostics if d.code == "destination-rule-tls-not-at-sidecar"]
    assert not problem.is_error
    assert "carries the application's own TLS unchanged" in problem.message
    found = clusters(loaded.mesh)
    assert "transport_socket" not in found[HTTPS443]
    assert "transport_socket" not in found[HTTP80]


def test_credential_name_for_a_host_no_sidecar_sees_is_not_reported(tmp_path: Path) -> None:
    entry = SERVICE_ENTRY.replace("  resolution: DNS", "  resolution: DNS\n  exportTo: [other]")
    loaded = load(tmp_path, entry, rule("        mode: SIMPLE\n        credentialName: cnn"))
    assert not [d for d in loaded.diagnostics if d.code == "destination-rule-tls-not-at-sidecar"]


SUBSETS = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: foo}
spec:
  hosts: [api.example.com]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: foo}
spec:
  host: api.example.com
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 7}}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      tls: {mode: SIMPLE, caCertificates: /etc/api/ca.pem}
  - name: none
    labels: {version: v3}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: foo}
spec:
  hosts: [api.example.com]
  http:
  - match: [{headers: {x-version: {exact: v2}}}]
    route: [{destination: {host: api.example.com, subset: v2}}]
  - route: [{destination: {host: api.example.com, subset: v1}}]
"""


def _addresses(cluster: dict[str, Any]) -> list[str]:
    return [
        e["endpoint"]["address"]["socket_address"]["address"]
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]


def test_subsets_of_a_service_entry_host_hold_the_endpoints_with_their_labels(
    tmp_path: Path,
) -> None:
    mesh = loaded_mesh(tmp_path, WORKLOADS.split("---")[0], SUBSETS)
    found = clusters(mesh)
    host = "api.example.com"
    assert _addresses(found[f"outbound|80||{host}"]) == ["10.0.0.1", "10.0.0.2"]
    assert _addresses(found[f"outbound|80|v1|{host}"]) == ["10.0.0.1"]
    assert _addresses(found[f"outbound|80|v2|{host}"]) == ["10.0.0.2"]
    assert _addresses(found[f"outbound|80|none|{host}"]) == []  # nothing carries v3: 503
    # the subset's TLS over the rule's (none); the rule's connection pool everywhere
    assert "transport_socket" not in found[f"outbound|80|v1|{host}"]
    assert upstream(found[f"outbound|80|v2|{host}"])["sni"] == host
    for name in (f"outbound|80|v1|{host}", f"outbound|80|v2|{host}"):
        threshold = found[name]["circuit_breakers"]["thresholds"][0]
        assert threshold["max_connections"] == 7
    sleep = mesh.for_workload("foo/sleep")
    assert sleep is not None
    vhost = next(
        v for r in outbound_routes(sleep, mesh) for v in r["virtual_hosts"] if host in v["domains"]
    )
    assert [r["route"]["cluster"] for r in vhost["routes"]] == [
        f"outbound|80|v2|{host}",
        f"outbound|80|v1|{host}",
    ]


def test_a_wildcard_host_takes_sni_and_the_name_to_check_from_each_request(
    tmp_path: Path,
) -> None:
    entry = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wiki, namespace: foo}
spec:
  hosts: ["*.wikipedia.org"]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: wiki, namespace: foo}
spec:
  host: "*.wikipedia.org"
  trafficPolicy: {tls: {mode: SIMPLE}}
"""
    cluster = clusters(loaded_mesh(tmp_path, entry))["outbound|80||*.wikipedia.org"]
    assert upstream(cluster)["sni"] == ""
    assert (
        "match_typed_subject_alt_names"
        not in (upstream(cluster)["common_tls_context"]["validation_context"])
    )
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["upstream_http_protocol_options"] == {
        "auto_sni": True,
        "auto_san_validation": True,
    }


@pytest.mark.parametrize(
    ("tls", "says"),
    [
        (
            "        mode: SIMPLE",
            "the sidecar originates TLS (DestinationRule foo/edition-cnn-com tls SIMPLE",
        ),
        ("        mode: SIMPLE", "against the system CA bundle for edition.cnn.com"),
        ("        mode: SIMPLE\n        insecureSkipVerify: true", "insecureSkipVerify"),
        ("        mode: DISABLE", "it leaves the sidecar in plaintext (DestinationRule"),
    ],
)
def test_authz_check_says_how_the_request_leaves_the_sidecar(
    tmp_path: Path, tls: str, says: str
) -> None:
    mesh = loaded_mesh(tmp_path, SERVICE_ENTRY, rule(tls))
    request = Request(
        Source.workload("foo/sleep"),
        "",
        80,
        HttpRequest("GET", "/politics"),
        destination_host=EXTERNAL,
    )
    decision = evaluate(mesh, request, now=time.time())
    assert (decision.verdict, decision.status) == (Verdict.ALLOW, 200)
    assert says in decision.reason


SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: db, namespace: foo}
spec:
  selector: {app: db}
  ports:
  - {name: http, port: 8000}
  - {name: https, port: 8443}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: foo}
spec:
  host: db
  trafficPolicy:
    tls: {mode: SIMPLE, credentialName: db-ca}
"""


def test_credential_name_for_a_service_is_refused_at_sidecars_too(tmp_path: Path) -> None:
    loaded = load(tmp_path, SERVICE)
    found = sorted(
        (d.is_error, d.message.split("): ", 1)[1][:28])
        for d in loaded.diagnostics
        if d.code == "destination-rule-tls-not-at-sidecar"
    )
    assert found == [
        (False, "port 8443 of Service foo/db "),
        (True, "port 8000 of Service foo/db "),
    ]
    found_clusters = clusters(compile_mesh(loaded.snapshot, {}))
    host = "db.foo.svc.cluster.local"
    assert f"outbound|8000||{host}" not in found_clusters  # no plaintext way out: 503
    assert "transport_socket" not in found_clusters[f"outbound|8443||{host}"]
