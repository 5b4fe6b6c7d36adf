"""xds.translate: golden Envoy config for the example mesh, accepted by Envoy.

1. Golden files pin the translation of the istio.io example mesh under a few scenarios
   (``TRUSTMESH_UPDATE_GOLDEN=1`` rewrites them; review the diff like code).
2. Every golden config passes ``envoy --mode validate``: as a static bootstrap, in its
   ECDS form (with an ADS config source), and each outbound route configuration inside a
   listener that checks its clusters exist; and the snapshot cache's consistency checks.

That the inbound listener enforces what the evaluator predicts, live, is in
test_translate_live.py; the harness is in translate_rig.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.envoy.conftest import run
from tests.unit.meshutil import ROOT, compile_text
from tests.xds.translate_rig import (
    CASES,
    GOLDEN,
    Case,
    _as_json,
    _ecds_bootstrap,
    _mesh,
    _route_listener,
)
from trustmesh.agent.envoy import validate_bootstrap
from trustmesh.xds.cache import Snapshot
from trustmesh.xds.translate import ECDS_TYPE, FilterDelivery, static_bootstrap, translate

# ---------------------------------------------------------------------------- 1. golden


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_translation_matches_golden_file(case: Case) -> None:
    text = _as_json(case.translate())
    path = GOLDEN / f"{case.id}.json"
    if os.environ.get("TRUSTMESH_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path.name}: run with TRUSTMESH_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs (TRUSTMESH_UPDATE_GOLDEN=1 rewrites)"


def test_translation_is_deterministic_across_compilations() -> None:
    first = _as_json(translate(_mesh("02-deny-get"), "foo/httpbin", inbound_address="10.0.0.1"))
    again = _as_json(translate(_mesh("02-deny-get"), "foo/httpbin", inbound_address="10.0.0.1"))
    assert first == again


def test_strict_port_has_only_a_tls_chain_and_permissive_a_plaintext_one_too() -> None:
    strict = translate(_mesh("12-mesh-strict"), "foo/httpbin", inbound_address="10.0.0.1")
    (listener,) = strict.listeners
    assert [c["name"] for c in listener["filter_chains"]] == ["inbound|8000|mtls"]
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    assert [s["name"] for s in tls["common_tls_context"]["tls_certificate_sds_secret_configs"]] == [
        "default"
    ]

    permissive = translate(_mesh(), "foo/tcp-echo", inbound_address="10.0.0.1")
    chains = {c["name"] for c in permissive.listeners[0]["filter_chains"]}
    assert chains == {
        f"inbound|{p}|{k}" for p in (9000, 9001, 9002) for k in ("mtls", "plaintext", "tls")
    }
    addresses = [
        a["address"]["socket_address"]["port_value"]
        for a in permissive.listeners[0]["additional_addresses"]
    ]
    assert addresses == [9001, 9002]


def test_port_level_disable_gives_plaintext_chain_and_auto_mtls_skips_that_endpoint() -> None:
    mesh = _mesh("14b-workload-strict-port-disable")
    bar = translate(mesh, "bar/httpbin", inbound_address="10.0.0.1")
    assert [c["name"] for c in bar.listeners[0]["filter_chains"]] == ["inbound|8000|plaintext"]
    sleep = translate(mesh, "foo/sleep", inbound_address="10.0.0.1")
    clusters = {c["name"]: c for c in sleep.clusters}
    endpoint = clusters["outbound|8000||httpbin.bar.svc.cluster.local"]["load_assignment"][
        "endpoints"
    ][0]["lb_endpoints"][0]
    assert "envoy.transport_socket_match" not in endpoint["metadata"]["filter_metadata"]
    foo = clusters["outbound|8000||httpbin.foo.svc.cluster.local"]["load_assignment"]
    metadata = foo["endpoints"][0]["lb_endpoints"][0]["metadata"]["filter_metadata"]
    assert metadata["envoy.transport_socket_match"] == {"tlsMode": "istio"}


def test_registry_only_routes_unknown_hosts_to_a_502() -> None:
    sleep = translate(
        _mesh("17b-registry-only-service-entry"), "foo/sleep", inbound_address="10.0.0.1"
    )
    routes = {r["name"]: r for r in sleep.routes}
    default = routes["80"]["virtual_hosts"][-1]
    assert default["name"] == "block_all"
    assert default["routes"][0]["direct_response"] == {"status": 502}
    assert any("httpbin.org" in v["domains"] for v in routes["80"]["virtual_hosts"])
    allow_any = translate(_mesh(), "foo/sleep", inbound_address="10.0.0.1")
    assert allow_any.routes[0]["virtual_hosts"][-1]["name"] == "allow_any"


def test_path_normalization_follows_mesh_config() -> None:
    expected = {
        "NONE": {"normalize_path": False, "path_with_escaped_slashes_action": "KEEP_UNCHANGED"},
        "BASE": {"normalize_path": True, "path_with_escaped_slashes_action": "KEEP_UNCHANGED"},
        "MERGE_SLASHES": {
            "normalize_path": True,
            "merge_slashes": True,
            "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        },
        "DECODE_AND_MERGE_SLASHES": {
            "normalize_path": True,
            "merge_slashes": True,
            "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
        },
    }
    keys = ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action")
    for mode, fields in expected.items():
        mesh = compile_text(mesh=f"pathNormalization:\n  normalization: {mode}\n")
        resources = translate(mesh, "foo/httpbin", inbound_address="10.0.0.1")
        manager = resources.listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
        assert {k: manager[k] for k in keys if k in manager} == fields, mode


def test_ecds_slots_are_stable_when_a_policy_is_added() -> None:
    """Adding the first DENY policy changes an extension config, not the listener: the
    change reaches connections that are already open."""
    before = translate(_mesh(), "foo/httpbin", inbound_address="10.0.0.1")
    after = translate(_mesh("02-deny-get"), "foo/httpbin", inbound_address="10.0.0.1")
    assert before.listeners == after.listeners
    changed = [
        a["name"]
        for a, b in zip(after.extension_configs, before.extension_configs, strict=True)
        if a != b
    ]
    assert changed == ["trustmesh.authz.deny"]


def test_jwt_filter_has_istio_shape() -> None:
    resources = translate(
        _mesh("09-jwt-request-authentication"),
        "foo/httpbin",
        inbound_address="10.0.0.1",
        delivery=FilterDelivery.INLINE,
    )
    manager = resources.listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in manager["http_filters"]]
    # No policy reads Host: no host guard (Istio's inline shape exactly).
    assert names == ["envoy.filters.http.jwt_authn", "envoy.filters.http.router"]
    jwt = manager["http_filters"][0]["typed_config"]
    provider = jwt["providers"]["origins-0"]
    assert provider["issuer"] == "testing@secure.istio.io"
    assert provider["payload_in_metadata"] == "payload"
    assert provider["forward"] is False
    assert json.loads(provider["local_jwks"]["inline_string"])["keys"][0]["kid"] == (
        "trustmesh-scenarios"
    )
    assert jwt["rules"][0]["requires"] == {
        "requires_any": {"requirements": [{"provider_name": "origins-0"}, {"allow_missing": {}}]}
    }


def test_several_jwt_providers_use_istios_composite_and_remote_jwks() -> None:
    policy = """
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: two, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  jwtRules:
  - issuer: z-issuer
    jwksUri: https://keys.example.com/jwks.json
    forwardOriginalToken: true
    fromHeaders: [{name: X-Token, prefix: "Bearer "}]
    outputClaimToHeaders: [{header: x-jwt-claim-foo, claim: foo}]
  - issuer: a-issuer
    jwks: '{"keys":[{"kty":"EC","crv":"P-256","d":"secret",
      "x":"gS-hfNlLJtH4Nr1fnNxkKz7QrU9aCmAM_l5ScqQKbJM",
      "y":"9zuUKr3qJG2ZCWZzxqSPL4QXqCq3JMK1Beb1d7TdQKI"}]}'
"""
    resources = translate(compile_text(policy), "foo/httpbin", inbound_address="10.0.0.1")
    (jwt,) = [e["typed_config"] for e in resources.extension_configs if e["name"].endswith("jwt")]
    first, second = jwt["providers"]["origins-0"], jwt["providers"]["origins-1"]
    assert (first["issuer"], second["issuer"]) == ("a-issuer", "z-issuer")  # sorted by issuer
    assert "d" not in json.loads(first["local_jwks"]["inline_string"])["keys"][0]
    assert second["remote_jwks"]["http_uri"]["cluster"] == "jwksuri-autogen-keys.example.com-443"
    assert second["forward"] is True
    assert second["from_headers"] == [{"name": "x-token", "value_prefix": "Bearer "}]
    assert second["claim_to_headers"] == [{"header_name": "x-jwt-claim-foo", "claim_name": "foo"}]
    any_of = jwt["rules"][0]["requires"]["requires_any"]["requirements"]
    assert any_of[:2] == [{"provider_name": "origins-0"}, {"provider_name": "origins-1"}]
    assert len(any_of[2]["requires_all"]["requirements"]) == 2
    assert "jwksuri-autogen-keys.example.com-443" in {c["name"] for c in resources.clusters}


def test_translate_refuses_unknown_or_sidecarless_workloads() -> None:
    mesh = _mesh()
    with pytest.raises(LookupError):
        translate(mesh, "foo/nope", inbound_address="10.0.0.1")
    with pytest.raises(ValueError, match="no sidecar"):
        translate(mesh, "legacy/httpbin", inbound_address="10.0.0.1")
    with pytest.raises(ValueError, match="IP address"):
        translate(mesh, "foo/httpbin", inbound_address="localhost")


# ---------------------------------------------------------------------------- 2. envoy validate


@pytest.mark.envoy
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_envoy_accepts_the_translation(case: Case, tmp_path: Path) -> None:
    resources = case.translate()
    # What the ADS server will check before serving it: every reference resolves, every
    # resource encodes.
    snapshot = Snapshot.from_resources(resources.all())
    assert snapshot.consistency_errors() == []
    assert snapshot.encoding_errors() == []
    sds_socket = str(tmp_path / "sds.sock")
    static = static_bootstrap(resources, node_id="validate", sds_socket=sds_socket)
    static["static_resources"]["listeners"] += [
        _route_listener(f"route-{r['name']}", r, ("127.0.0.3", 20000 + i), check=True)
        for i, r in enumerate(resources.routes)
    ]
    bootstraps = [static]
    if resources.extension_configs:
        assert all(e["@type"] == ECDS_TYPE for e in resources.extension_configs)
        bootstraps.append(_ecds_bootstrap(resources, sds_socket))

    async def check() -> None:
        await asyncio.gather(*(validate_bootstrap(b, workdir=tmp_path) for b in bootstraps))

    run(check(), timeout=60)


def test_clients_in_one_namespace_share_their_outbound_clusters_and_routes() -> None:
    from trustmesh.config import load_config

    loaded = load_config([str(ROOT / "examples" / "mesh")])
    assert loaded.mesh is not None
    one = translate(loaded.mesh, "foo/sleep", inbound_address="10.0.0.1")
    two = translate(loaded.mesh, "foo/httpbin", inbound_address="10.0.0.2")
    other = translate(loaded.mesh, "bar/sleep", inbound_address="10.0.0.3")
    shared = {c["name"]: c for c in one.clusters if c["name"].startswith("outbound|")}
    for cluster in two.clusters:
        if cluster["name"] in shared:
            assert cluster is shared[cluster["name"]]  # built once for the namespace
    assert one.routes[0] is two.routes[0]
    assert other.routes[0] is not one.routes[0]  # bar's short names differ
