"""The egress gateway's translation (pure): ServiceEntry hosts as clusters with their
endpoints, DestinationRule TLS origination, exportTo, and what cannot be honoured refused
with file, line and field."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.egress_rig import ALLOW_SLEEP, EXTERNAL, SECRET, ExternalPki, task_config
from trustmesh.config import load_config
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import Verdict
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source
from trustmesh.xds.cache import TYPE_SECRET, Snapshot
from trustmesh.xds.gateway import gateway_diagnostics, translate_gateway
from trustmesh.xds.outbound import outbound_clusters, outbound_routes

HERE = Path(__file__).parent
EGRESS = "istio-system/istio-egressgateway"
CLUSTER = f"outbound|443||{EXTERNAL}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ExternalPki:
    return ExternalPki.make(tmp_path_factory.mktemp("external-pki"))


def compile_mesh(tmp_path: Path, *docs: str) -> MeshPolicy:
    (tmp_path / "config.yaml").write_text("\n---\n".join(d.strip("\n") for d in docs) + "\n")
    loaded = load_config([str(HERE / "egress_workloads.yaml"), str(tmp_path / "config.yaml")])
    assert not loaded.errors, loaded.errors
    assert loaded.mesh is not None
    return loaded.mesh


def by_name(items: Any) -> dict[str, dict[str, Any]]:
    return {str(i["name"]): i for i in items}


def problems(mesh: MeshPolicy) -> list[tuple[int, str, str, str]]:
    return [
        (d.location.line, d.location.field, d.code, d.message)
        for d in gateway_diagnostics(mesh, EGRESS)
    ]


def test_the_tasks_gateway_terminates_mesh_mtls_and_originates_tls(
    tmp_path: Path, pki: ExternalPki
) -> None:
    mesh = compile_mesh(tmp_path, pki.secret(client=False), task_config(9443), ALLOW_SLEEP)
    resources = translate_gateway(mesh, EGRESS, address="127.0.0.9")
    snapshot = Snapshot.from_resources(resources.all())
    assert snapshot.consistency_errors() == [] and snapshot.encoding_errors() == []
    # Port 80 of the Gateway is the Service's targetPort 8080: ISTIO_MUTUAL, SNI-matched.
    (listener,) = resources.listeners
    assert listener["address"]["socket_address"]["port_value"] == 8080
    (chain,) = listener["filter_chains"]
    assert chain["filter_chain_match"] == {"server_names": [EXTERNAL]}
    downstream = chain["transport_socket"]["typed_config"]
    assert downstream["require_client_certificate"] is True
    validation = downstream["common_tls_context"]["combined_validation_context"]
    assert validation["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    # The gateway route: edition.cnn.com → its port 443 cluster.
    (route,) = resources.routes
    vhost = next(v for v in route["virtual_hosts"] if EXTERNAL in v["domains"])
    assert vhost["routes"][0]["route"]["cluster"] == CLUSTER
    # The cluster: the ServiceEntry's endpoint (its https port), TLS to it, server checked.
    cluster = by_name(resources.clusters)[CLUSTER]
    assert cluster["type"] == "STATIC"
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9443,
    }
    upstream = cluster["transport_socket"]["typed_config"]
    assert upstream["sni"] == EXTERNAL
    common = upstream["common_tls_context"]
    assert "tls_certificate_sds_secret_configs" not in common  # SIMPLE: no client cert
    check = common["combined_validation_context"]
    assert check["validation_context_sds_secret_config"]["name"] == f"kubernetes://{SECRET}-cacert"
    sans = check["default_validation_context"]["match_typed_subject_alt_names"]
    assert {"san_type": "DNS", "matcher": {"exact": EXTERNAL}} in sans
    secret = by_name(resources.secrets)[f"kubernetes://{SECRET}-cacert"]
    assert secret["@type"] == TYPE_SECRET
    ca = pki.path("ca.crt").read_text()
    assert secret["validation_context"]["trusted_ca"]["inline_string"] == ca
    # The policy selecting the egress gateway is in its chain.
    manager = chain["filters"][0]["typed_config"]
    assert "trustmesh.authz.allow" in [f["name"] for f in manager["http_filters"]]
    allow = by_name(resources.extension_configs)["trustmesh.authz.allow"]["typed_config"]
    (rule,) = allow["rules"]["policies"].values()
    assert "spiffe://cluster.local/ns/foo/sa/sleep" in str(rule["principals"])
    log = manager["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert log["source_principal"] == "%DOWNSTREAM_PEER_URI_SAN%"


def test_mutual_origination_presents_the_credentials_client_certificate(
    tmp_path: Path, pki: ExternalPki
) -> None:
    mesh = compile_mesh(tmp_path, pki.secret(client=True), task_config(9443, mode="MUTUAL"))
    resources = translate_gateway(mesh, EGRESS, address="127.0.0.9")
    common = by_name(resources.clusters)[CLUSTER]["transport_socket"]["typed_config"][
        "common_tls_context"
    ]
    (certificate,) = common["tls_certificate_sds_secret_configs"]
    assert certificate["name"] == f"kubernetes://{SECRET}"
    served = by_name(resources.secrets)[f"kubernetes://{SECRET}"]["tls_certificate"]
    assert served["certificate_chain"]["inline_string"] == pki.path("client.crt").read_text()
    assert Snapshot.from_resources(resources.all()).consistency_errors() == []


def test_istio_mutual_to_an_entry_uses_the_gateways_mesh_identity(
    tmp_path: Path, pki: ExternalPki
) -> None:
    mesh = compile_mesh(tmp_path, task_config(9443, mode="ISTIO_MUTUAL"))
    resources = translate_gateway(mesh, EGRESS, address="127.0.0.9")
    upstream = by_name(resources.clusters)[CLUSTER]["transport_socket"]["typed_config"]
    common = upstream["common_tls_context"]
    assert common["tls_certificate_sds_secret_configs"][0]["name"] == "default"
    assert upstream["sni"] == f"outbound_.443_._.{EXTERNAL}"
    assert resources.secrets == ()


def test_a_missing_credential_is_refused_on_the_destination_rule(
    tmp_path: Path, pki: ExternalPki
) -> None:
    mesh = compile_mesh(tmp_path, task_config(9443, mode="MUTUAL"))
    ((line, field, code, message),) = problems(mesh)
    assert code == "gateway-credential"
    assert field == "spec.trafficPolicy.portLevelSettings[0].tls.credentialName"
    assert f"no Secret {SECRET} in namespace istio-system" in message
    text = (tmp_path / "config.yaml").read_text().splitlines()
    assert "credentialName" in text[line - 1]
    # SIMPLE needs the CA to check the external server: fail closed, never unchecked TLS.
    mesh = compile_mesh(tmp_path, task_config(9443, mode="SIMPLE"))
    ((_, field, code, message),) = problems(mesh)
    assert field.endswith("tls.credentialName") and "has no ca.crt" in message


def test_a_broken_origination_nothing_routes_to_leaves_the_gateway_serving(
    tmp_path: Path, pki: ExternalPki
) -> None:
    """Istio builds the cluster for every gateway, and a missing credential only keeps
    that cluster from warming: a gateway whose routes never name it carries on — without
    the cluster, never with plaintext in its place."""
    mesh = compile_mesh(tmp_path, task_config(9443, mode="MUTUAL", gateway_route=False))
    assert problems(mesh) == []
    resources = translate_gateway(mesh, EGRESS, address="127.0.0.9")
    assert CLUSTER not in by_name(resources.clusters)
    assert f"outbound|80||{EXTERNAL}" in by_name(resources.clusters)  # the entry's others


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (("address: 127.0.0.1", "address: cnn.internal"), "address", "is not an IP address"),
        (("address: 127.0.0.1", "address: unix:///cnn.sock"), "address", "not supported"),
        (("{http-port:", "{http:"), "ports.http", "is not a port of the ServiceEntry"),
    ],
)
def test_endpoints_trustmesh_cannot_use_are_refused_where_they_are_written(
    tmp_path: Path, pki: ExternalPki, change: tuple[str, str], field: str, message: str
) -> None:
    config = task_config(9443).replace(*change)
    (tmp_path / "config.yaml").write_text(config)
    loaded = load_config([str(HERE / "egress_workloads.yaml"), str(tmp_path / "config.yaml")])
    (problem,) = loaded.errors
    assert problem.location.field == f"spec.endpoints[0].{field}"
    assert message in problem.message
    line = config.splitlines()[problem.location.line - 1]
    assert change[1].split(":")[0].strip("{") in line


def test_resolution_none_takes_no_endpoints(tmp_path: Path) -> None:
    config = task_config(9443).replace("resolution: STATIC", "resolution: NONE")
    (tmp_path / "config.yaml").write_text(config)
    loaded = load_config([str(HERE / "egress_workloads.yaml"), str(tmp_path / "config.yaml")])
    (problem,) = loaded.errors
    assert problem.location.field == "spec.endpoints[0]"
    assert "resolution NONE" in problem.message


def test_dns_resolution_resolves_the_endpoints_or_the_host(
    tmp_path: Path, pki: ExternalPki
) -> None:
    config = task_config(9443).replace("resolution: STATIC", "resolution: DNS")
    resources = translate_gateway(
        compile_mesh(tmp_path, pki.secret(client=False), config), EGRESS, address="127.0.0.9"
    )
    cluster = by_name(resources.clusters)[CLUSTER]
    assert cluster["type"] == "STRICT_DNS"
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"]["address"] == "127.0.0.1"
    bare = config[: config.index("  endpoints:")] + config[config.index("---") :]
    resources = translate_gateway(
        compile_mesh(tmp_path, pki.secret(client=False), bare), EGRESS, address="127.0.0.9"
    )
    cluster = by_name(resources.clusters)[CLUSTER]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": EXTERNAL,
        "port_value": 443,
    }


def test_export_to_hides_the_entry_from_the_sidecars_of_other_namespaces(
    tmp_path: Path, pki: ExternalPki
) -> None:
    """exportTo [istio-system]: only the egress gateway knows edition.cnn.com; sleep's
    sidecar (foo) has neither its cluster nor its virtual host, so under REGISTRY_ONLY its
    requests for the host meet block_all (502) — unless a route sends them to the gateway.
    Exported everywhere, the sidecar would reach the endpoint directly."""
    for export_to, visible in (('["istio-system"]', False), ('["*"]', True)):
        config = task_config(9443, export_to=export_to, mesh_route=False)
        mesh = compile_mesh(tmp_path, pki.secret(client=False), config)
        sleep = mesh.for_workload("foo/sleep")
        assert sleep is not None
        clusters = by_name(outbound_clusters(sleep, mesh, "sds-grpc"))
        assert (f"outbound|80||{EXTERNAL}" in clusters) is visible
        assert (EXTERNAL in _domains(sleep, mesh)) is visible
        resources = translate_gateway(mesh, EGRESS, address="127.0.0.9")
        assert CLUSTER in by_name(resources.clusters)
    endpoint = clusters[f"outbound|80||{EXTERNAL}"]["load_assignment"]["endpoints"][0]
    address = endpoint["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {"address": "127.0.0.1", "port_value": 9443}


def test_the_mesh_route_sends_the_hidden_host_to_the_egress_gateway(
    tmp_path: Path, pki: ExternalPki
) -> None:
    """With the task's mesh route, sleep's sidecar gets a virtual host for the host it
    does not otherwise know, to the egress gateway's cnn subset, mesh mTLS with SNI
    edition.cnn.com (the name the gateway's server matches)."""
    mesh = compile_mesh(tmp_path, pki.secret(client=False), task_config(9443))
    sleep = mesh.for_workload("foo/sleep")
    assert sleep is not None
    vhost = next(
        v
        for r in outbound_routes(sleep, mesh)
        if r["name"] == "80"
        for v in r["virtual_hosts"]
        if EXTERNAL in v["domains"]
    )
    subset = "outbound|80|cnn|istio-egressgateway.istio-system.svc.cluster.local"
    assert vhost["routes"][0]["route"]["cluster"] == subset
    cluster = by_name(outbound_clusters(sleep, mesh, "sds-grpc"))[subset]
    upstream = cluster["transport_socket"]["typed_config"]
    assert upstream["sni"] == EXTERNAL
    assert f"outbound|80||{EXTERNAL}" not in by_name(outbound_clusters(sleep, mesh, "sds-grpc"))


def _domains(wp: Any, mesh: MeshPolicy) -> set[str]:
    return {d for r in outbound_routes(wp, mesh) for v in r["virtual_hosts"] for d in v["domains"]}


@pytest.mark.parametrize(
    ("export_to", "mesh_route", "verdict", "status"),
    [
        ('["*"]', False, Verdict.ALLOW, 200),  # exported: sleep's sidecar knows the host
        ('["istio-system"]', False, Verdict.DENY, 502),  # hidden: block_all, as live
        ('["istio-system"]', True, Verdict.UNSUPPORTED, None),  # routed via the gateway
    ],
)
def test_the_offline_egress_answer_honours_export_to(
    tmp_path: Path,
    pki: ExternalPki,
    export_to: str,
    mesh_route: bool,
    verdict: Verdict,
    status: int | None,
) -> None:
    """``authz check`` for sleep → edition.cnn.com under REGISTRY_ONLY gives what the
    live test sees; a mesh route through the egress gateway is said to be beyond it,
    never answered as if the sidecar went straight out."""
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text("outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n")
    config = task_config(9443, export_to=export_to, mesh_route=mesh_route)
    (tmp_path / "config.yaml").write_text(pki.secret(client=False) + "---\n" + config)
    loaded = load_config(
        [str(HERE / "egress_workloads.yaml"), str(tmp_path / "config.yaml")],
        mesh_config=[str(mesh_file)],
    )
    assert not loaded.errors and loaded.mesh is not None
    request = Request(
        Source.workload("foo/sleep"),
        "",
        80,
        HttpRequest("GET", "/politics"),
        destination_host=EXTERNAL,
    )
    decision = evaluate(loaded.mesh, request, now=time.time())
    assert (decision.verdict, decision.status) == (verdict, status)
