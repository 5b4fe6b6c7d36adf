"""The RBAC translation, pinned and checked: golden files, Istio's edge cases, Envoy's word.

* Golden files (``golden/rbac/<scenario>.json``) pin the filters generated for the §7
  acceptance scenarios. ``TRUSTMESH_UPDATE_GOLDEN=1 pytest tests/xds/test_rbac_golden.py``
  rewrites them; review the diff like code.
* Istio's ``checkError`` and builder rules that no scenario shows (bad values, unknown
  keys, CUSTOM, dry-run only, determinism) are asserted directly.
* Every generated filter is parsed into Envoy's protos and the lot is run through
  ``envoy --mode validate`` (regexes, URI templates and enums are only checked there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2  # noqa: F401
from google.protobuf import json_format

from tests.unit.meshutil import compile_text, policy
from tests.xds.rbac_rig import http_listener, jwt_filter, static_cluster, tcp_listener
from trustmesh.agent.envoy import validate_bootstrap
from trustmesh.api import models as m
from trustmesh.api.loader import load_sources
from trustmesh.config import load_config
from trustmesh.policy.authz import TrustBundle
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.xds.rbac import (
    DRY_RUN_DENY_PREFIX,
    http_custom_filters,
    http_rbac_filters,
    network_rbac_filters,
    policy_rules,
)

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "rbac"
UPDATE = os.environ.get("TRUSTMESH_UPDATE_GOLDEN") == "1"
# Scenario → the workload whose inbound filters are pinned.
SCENARIOS = {
    "01-allow-nothing": "foo/httpbin",
    "02-deny-get": "foo/httpbin",
    "03-deny-header-not-admin": "foo/httpbin",
    "04-deny-header-allow-ip": "foo/httpbin",
    "05-tcp-allow-ports": "foo/tcp-echo",
    "06-tcp-allow-http-only-rule": "foo/tcp-echo",
    "07-tcp-deny-methods": "foo/tcp-echo",
    "08-tcp-deny-get-port": "foo/tcp-echo",
    "10-jwt-require-principal": "foo/httpbin",
    "11-jwt-require-group-claim": "foo/httpbin",
    "15-dry-run-deny": "foo/httpbin",
    "16a-trust-domain-migrated": "default/httpbin",
    "16b-trust-domain-alias": "default/httpbin",
    "18-path-normalization-allow-prefix": "foo/httpbin",
    "19-deny-exact-allow-prefix-query": "foo/httpbin",
}


def scenario_mesh(name: str) -> MeshPolicy:
    directory = ROOT / "examples" / "scenarios" / name
    mesh_config = directory / "mesh.yaml"
    loaded = load_config(
        [str(ROOT / "examples" / "mesh"), str(directory / "config.yaml")],
        mesh_config=[str(mesh_config)] if mesh_config.exists() else [],
    )
    assert not loaded.errors and loaded.mesh is not None, loaded.errors
    return loaded.mesh


def _workload(mesh: MeshPolicy, ref: str) -> WorkloadPolicy:
    found = mesh.for_workload(ref)
    assert found is not None, ref
    return found


def render(mesh: MeshPolicy, ref: str) -> dict[str, Any]:
    """Everything the translation gives one workload, as a golden file holds it."""
    wp = _workload(mesh, ref)
    return {
        "workload": ref,
        "http_custom_filters": http_custom_filters(wp, mesh),
        "http_filters": http_rbac_filters(wp, mesh),
        "network_filters": network_rbac_filters(wp, mesh, wp.workload.ports[0]),
    }


def _text(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


# --- golden files -------------------------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_golden(name: str) -> None:
    path = GOLDEN / f"{name}.json"
    got = _text(render(scenario_mesh(name), SCENARIOS[name]))
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"{path} is missing: run with TRUSTMESH_UPDATE_GOLDEN=1"
    assert got == path.read_text(), f"{path.name} changed: TRUSTMESH_UPDATE_GOLDEN=1 to accept"


def test_no_stale_golden_files() -> None:
    assert {p.stem for p in GOLDEN.glob("*.json")} == set(SCENARIOS)


def test_scenarios_show_istio_semantics() -> None:
    """A few facts the golden files hold, stated so a wrong update cannot slip through."""
    alias = render(scenario_mesh("16b-trust-domain-alias"), "default/httpbin")
    allow = alias["http_filters"][0]["typed_config"]["rules"]
    rule = allow["policies"][
        "ns[default]-policy[service-httpbin.default.svc.cluster.local]-rule[0]"
    ]
    principals = rule["principals"][0]["and_ids"]["ids"][0]["or_ids"]["ids"]
    assert [p["authenticated"]["principal_name"]["exact"] for p in principals] == [
        "spiffe://new-td/ns/sleep-allow/sa/sleep",
        "spiffe://old-td/ns/sleep-allow/sa/sleep",
    ]
    # ALLOW methods+ports on TCP: the rule is dropped whole, nothing is allowed.
    tcp_allow = render(scenario_mesh("06-tcp-allow-http-only-rule"), "foo/tcp-echo")
    assert tcp_allow["network_filters"][0]["typed_config"]["rules"] == {
        "action": "ALLOW",
        "policies": {},
    }
    # DENY GET + port 9000 on TCP: only the method is dropped, the port still applies.
    tcp_deny = render(scenario_mesh("08-tcp-deny-get-port"), "foo/tcp-echo")
    [deny] = tcp_deny["network_filters"][0]["typed_config"]["rules"]["policies"].values()
    assert deny["permissions"] == [
        {"and_rules": {"rules": [{"or_rules": {"rules": [{"destination_port": 9000}]}}]}}
    ]
    dry_run = render(scenario_mesh("15-dry-run-deny"), "foo/httpbin")["http_filters"]
    assert [set(f["typed_config"]) for f in dry_run] == [
        {"@type", "shadow_rules", "shadow_rules_stat_prefix"}
    ]
    assert dry_run[0]["typed_config"]["shadow_rules_stat_prefix"] == DRY_RUN_DENY_PREFIX


# --- Istio's rules that no scenario shows ----------------------------------------------


def _resource(spec: str, name: str = "p") -> Any:
    loaded = load_sources([("p.yaml", policy(name, "foo", spec).encode())])
    [resource] = [r for r in loaded.resources if r.kind == "AuthorizationPolicy"]
    return resource


BUNDLE = TrustBundle(("cluster.local",))


def test_a_bad_value_drops_the_allow_rule_but_only_the_value_from_a_deny_rule() -> None:
    rules = """rules:
- from: [{source: {ipBlocks: ["10.0.0.0/33", "10.1.0.0/16"]}}]
- to: [{operation: {ports: ["80"]}}]
"""
    allow = policy_rules(_resource(rules), BUNDLE, m.Action.ALLOW, for_tcp=False)
    assert list(allow) == ["ns[foo]-policy[p]-rule[1]"]
    deny = policy_rules(_resource(rules), BUNDLE, m.Action.DENY, for_tcp=False)
    ids = deny["ns[foo]-policy[p]-rule[0]"]["principals"][0]["and_ids"]["ids"]
    assert ids == [
        {
            "or_ids": {
                "ids": [{"direct_remote_ip": {"address_prefix": "10.1.0.0", "prefix_len": 16}}]
            }
        }
    ]


def test_an_unknown_condition_drops_the_rule_for_every_action() -> None:
    rules = 'rules:\n- when: [{key: request.foo, values: ["x"]}]\n- {}\n'
    for action in m.Action:
        names = list(policy_rules(_resource(rules), BUNDLE, action, for_tcp=False))
        assert names == ["ns[foo]-policy[p]-rule[1]"], action


def test_http_only_keys_on_tcp() -> None:
    rules = """rules:
- from: [{source: {requestPrincipals: ["a/b"], namespaces: ["ns1"]}}]
  to: [{operation: {paths: ["/x"], notPorts: ["9"]}}]
  when: [{key: "request.auth.claims[g]", values: ["v"]}, {key: destination.port, values: ["7"]}]
"""
    assert policy_rules(_resource(rules), BUNDLE, m.Action.ALLOW, for_tcp=True) == {}
    [deny] = policy_rules(_resource(rules), BUNDLE, m.Action.DENY, for_tcp=True).values()
    assert deny["principals"] == [
        {
            "and_ids": {
                "ids": [
                    {
                        "or_ids": {
                            "ids": [
                                {
                                    "authenticated": {
                                        "principal_name": {"safe_regex": {"regex": ".*/ns/ns1/.*"}}
                                    }
                                }
                            ]
                        }
                    }
                ]
            }
        }
    ]
    assert deny["permissions"] == [
        {
            "and_rules": {
                "rules": [
                    {"not_rule": {"or_rules": {"rules": [{"destination_port": 9}]}}},
                    {"or_rules": {"rules": [{"destination_port": 7}]}},
                ]
            }
        }
    ]


def test_a_policy_without_rules_never_matches() -> None:
    [never] = policy_rules(_resource("{}"), BUNDLE, m.Action.ALLOW, for_tcp=False).values()
    assert never == {
        "permissions": [{"not_rule": {"any": True}}],
        "principals": [{"not_id": {"any": True}}],
    }


def test_custom_rules_fail_closed_before_authentication() -> None:
    mesh = compile_text(
        policy(
            "ext",
            "foo",
            "selector: {matchLabels: {app: httpbin}}\naction: CUSTOM\nprovider: {name: opa}\n"
            'rules:\n- to: [{operation: {paths: ["/admin"]}}]\n',
        )
    )
    wp = _workload(mesh, "foo/httpbin")
    assert http_rbac_filters(wp, mesh) == []
    [custom] = http_custom_filters(wp, mesh)
    assert custom["typed_config"]["rules"]["action"] == "DENY"
    assert list(custom["typed_config"]["rules"]["policies"]) == [
        "istio-ext-authz-opa-ns[foo]-policy[ext]-rule[0]-deny-due-to-bad-CUSTOM-action"
    ]
    [network] = network_rbac_filters(wp, mesh, 8000)
    assert network["name"] == "envoy.filters.network.rbac"
    assert network["typed_config"]["rules"]["action"] == "DENY"


def test_translation_is_deterministic_and_ignores_policy_order() -> None:
    spec = "selector: {matchLabels: {app: httpbin}}\nrules: [{to: [{operation: {paths: [/%s]}}]}]"
    docs = [policy(name, "foo", spec % name) for name in ("b", "a", "c")]
    one, two = compile_text("".join(docs)), compile_text("".join(reversed(docs)))
    first = _text(render(one, "foo/httpbin"))
    assert first == _text(render(one, "foo/httpbin")) == _text(render(two, "foo/httpbin"))
    with pytest.raises(ValueError):
        network_rbac_filters(_workload(one, "foo/httpbin"), one, 0)


# --- Envoy accepts it ------------------------------------------------------------------

# Every attribute kind, including those the differential test cannot send (peer
# identities, trust domains, JWT audiences / presenter / nested claims, experimental
# metadata, destination IP, SNI), so Envoy checks each generated matcher.
EVERY_ATTRIBUTE = policy(
    "every-attribute",
    "foo",
    """selector: {matchLabels: {app: httpbin}}
rules:
- from:
  - source:
      principals: ["cluster.local/ns/a/sa/b", "*", "pre*", "*suf"]
      notPrincipals: ["cluster.local/ns/x/sa/y"]
      namespaces: ["ns", "ns-*", "*-ns", "a*b"]
      notNamespaces: ["kube-system"]
      requestPrincipals: ["iss/sub", "*", "*/sub", "iss/*", "pre*", "*suf", "noslash"]
      notRequestPrincipals: ["https://a.example.com/x"]
      ipBlocks: ["10.0.0.0/8", "192.168.1.1", "2001:db8::/32"]
      notIpBlocks: ["10.1.2.3/16"]
      remoteIpBlocks: ["172.16.0.0/12"]
      notRemoteIpBlocks: ["::1"]
  - source: {serviceAccounts: ["sa", "other/sa2"], notServiceAccounts: ["x/y"]}
  to:
  - operation:
      hosts: ["a.example.com", "*.example.com", "a.*", "*"]
      notHosts: ["b.example.com"]
      ports: ["8000", "0"]
      notPorts: ["65535"]
      methods: ["GET", "PO*", "*ST", "*"]
      notMethods: ["DELETE"]
      paths: ["/exact", "/prefix/*", "*/suffix", "*", "/t/{*}/x", "/t/{**}", "/a*b"]
      notPaths: ["/no/{**}"]
  when:
  - {key: "request.headers[X-Header]", values: ["v", "v*", "*v", "*"], notValues: ["n"]}
  - {key: source.ip, values: ["10.0.0.1"], notValues: ["10.0.0.2/31"]}
  - {key: remote.ip, values: ["10.0.0.0/24"]}
  - {key: source.namespace, values: ["ns*"], notValues: ["*x"]}
  - {key: source.principal, values: ["cluster.local/ns/a/sa/b"], notValues: ["*"]}
  - {key: source.serviceAccount, values: ["ns/sa"]}
  - {key: request.auth.principal, values: ["iss/sub"], notValues: ["*"]}
  - {key: request.auth.audiences, values: ["aud1", "aud*"], notValues: ["x"]}
  - {key: request.auth.presenter, values: ["azp"]}
  - {key: "request.auth.claims[groups]", values: ["g1", "g*"], notValues: ["bad"]}
  - {key: "request.auth.claims[nested][claim]", values: ["v"]}
  - {key: destination.ip, values: ["10.0.0.1", "fd00::/8"], notValues: ["10.0.0.2"]}
  - {key: destination.port, values: ["8000"], notValues: ["9000"]}
  - {key: connection.sni, values: ["*.example.com", "*"], notValues: ["x"]}
  - {key: "experimental.envoy.filters.a.b[c]", values: ["v", "[w]"], notValues: ["x*"]}
""",
)


def _all_meshes() -> list[tuple[str, MeshPolicy, str]]:
    meshes = [(name, scenario_mesh(name), ref) for name, ref in SCENARIOS.items()]
    for kind, action in (("allow", "ALLOW"), ("deny", "DENY"), ("audit", "AUDIT")):
        text = EVERY_ATTRIBUTE.replace("  rules:\n", f"  action: {action}\n  rules:\n", 1)
        meshes.append((f"every-attribute-{kind}", compile_text(text), "foo/httpbin"))
    return meshes


def test_every_filter_parses_into_envoy_protos() -> None:
    for _, mesh, ref in _all_meshes():
        rendered = render(mesh, ref)
        for key in ("http_custom_filters", "http_filters", "network_filters"):
            message = network_rbac_pb2.RBAC if key == "network_filters" else http_rbac_pb2.RBAC
            for rbac_filter in rendered[key]:
                config = dict(rbac_filter["typed_config"])
                assert config.pop("@type") == f"type.googleapis.com/{message.DESCRIPTOR.full_name}"
                json_format.ParseDict(config, message())


def test_envoy_validates_every_generated_filter(tmp_path: Path) -> None:
    listeners, port = [], 10000
    for name, mesh, ref in _all_meshes():
        rendered, port = render(mesh, ref), port + 2
        jwt = jwt_filter(_workload(mesh, ref), mesh)
        http = [*rendered["http_custom_filters"], *jwt, *rendered["http_filters"]]
        log = tmp_path / "access.log"
        listeners.append(http_listener(f"{name}-http", "127.0.0.1", port, http, "BASE", log))
        tcp = rendered["network_filters"]
        listeners.append(tcp_listener(f"{name}-tcp", "127.0.0.1", port + 1, tcp, "backend"))
    bootstrap = {
        "node": {"id": "validate", "cluster": "validate"},
        "static_resources": {
            "listeners": listeners,
            "clusters": [static_cluster("backend", "127.0.0.1", 1)],
        },
    }
    asyncio.run(validate_bootstrap(bootstrap, workdir=tmp_path, timeout=60))


# --- cost ----------------------------------------------------------------------------


def thousand_policies() -> str:
    """1,000 policies selecting foo/httpbin: ALLOW and DENY, identity, JWT, paths, ports."""
    shapes = (
        'from: [{{source: {{principals: ["td/ns/n{i}/sa/s"], namespaces: ["n{i}*"]}}}}]\n'
        '  to: [{{operation: {{methods: ["GET"], paths: ["/v{i}/*", "/i/{{*}}/x"]}}}}]\n'
        '- to: [{{operation: {{ports: ["8000"], hosts: ["h{i}.example.com"]}}}}]\n'
        '  when: [{{key: "request.headers[x-t]", values: ["t{i}"]}}]',
        'from: [{{source: {{ipBlocks: ["10.{j}.0.0/16"], notRequestPrincipals: ["*"]}}}}]\n'
        '  to: [{{operation: {{paths: ["/admin/{i}"], notMethods: ["GET"]}}}}]',
        'from: [{{source: {{requestPrincipals: ["iss{i}/sub{i}"]}}}}]\n'
        '  when: [{{key: "request.auth.claims[groups]", values: ["g{i}"]}}]',
        'from: [{{source: {{serviceAccounts: ["foo/sa{i}"]}}}}]\n'
        '  to: [{{operation: {{paths: ["/p{i}"]}}}}]',
    )
    docs = []
    for i in range(1000):
        action = "DENY" if i % 4 == 1 else "ALLOW"
        rules = "- " + shapes[i % 4].format(i=i, j=i % 250)
        spec = f"selector: {{matchLabels: {{app: httpbin}}}}\naction: {action}\nrules:\n{rules}\n"
        docs.append(policy(f"p{i:04d}", "foo", spec))
    return "".join(docs)


def test_translation_time_for_a_thousand_policy_workload() -> None:
    mesh = compile_text(thousand_policies())
    wp = _workload(mesh, "foo/httpbin")
    assert len(wp.authz.allow.policies) + len(wp.authz.deny.policies) == 1000
    cold, warm = [], []
    for _ in range(5):
        mesh = dataclasses.replace(mesh)  # a new mesh object: nothing derived from it yet
        started = time.perf_counter()
        http_rbac_filters(wp, mesh)
        network_rbac_filters(wp, mesh, 8000)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()  # another workload selecting the same policies
        http_rbac_filters(wp, mesh)
        network_rbac_filters(wp, mesh, 8000)
        warm.append(time.perf_counter() - started)
    print(
        f"\n1,000-policy workload, HTTP + TCP RBAC: {statistics.median(cold) * 1000:.0f} ms"
        f" (median of 5; max {max(cold) * 1000:.0f} ms), policies remembered per mesh:"
        f" {statistics.median(warm) * 1000:.1f} ms"
    )
    assert statistics.median(cold) < 2.0
