"""EnvoyFilter with Istio's semantics on trustmesh's translated config: matching
(context, port, filter and sub-filter names, workloadSelector, namespaces), operations,
priority order, what Envoy actually gets (ECDS slots, RDS routes), and patches Envoy would
reject reported with file:line:field before anything is pushed."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.unit.meshutil import BASE, compile_text
from trustmesh.api.loader import load_sources
from trustmesh.api.snapshot import build_snapshot
from trustmesh.cli.main import app
from trustmesh.pipeline import compile_sources
from trustmesh.policy.compose import MeshPolicy, compile_mesh
from trustmesh.xds.envoyfilter import EnvoyFilterRejected, envoy_filter_diagnostics
from trustmesh.xds.translate import ProxyResources, translate

ROUTER = "envoy.filters.http.router"
LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"


def envoy_filter(patches: str, *, name: str = "ef", namespace: str = "foo", extra: str = "") -> str:
    return (
        "---\napiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{extra}"
        f"  configPatches:\n{patches}"
    )


def lua(name: str, operation: str, match: str = "", context: str = "SIDECAR_INBOUND") -> str:
    return (
        "  - applyTo: HTTP_FILTER\n"
        f"    match:\n      context: {context}\n{match}"
        f"    patch:\n      operation: {operation}\n"
        f"      value: {{name: {name}, typed_config: {{'@type': '{LUA}', default_source_code:"
        " {inline_string: 'function envoy_on_request(h) end'}}}\n"
    )


def sub_filter(name: str, port: int = 0) -> str:
    port_line = f"        portNumber: {port}\n" if port else ""
    return (
        f"      listener:\n{port_line}        filterChain:\n          filter:\n"
        "            name: envoy.filters.network.http_connection_manager\n"
        f"            subFilter: {{name: {name}}}\n"
    )


def http_filters(resources: ProxyResources) -> list[list[str]]:
    out = []
    for listener in resources.listeners:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                manager = network_filter.get("typed_config", {})
                if "http_filters" in manager:
                    out.append([f["name"] for f in manager["http_filters"]])
    return out


def inbound(text: str, workload: str = "foo/httpbin") -> ProxyResources:
    return translate(compile_text(text), workload, inbound_address="127.0.0.2")


def test_insert_relative_to_the_router_and_first_and_after() -> None:
    text = envoy_filter(
        lua("before-router", "INSERT_BEFORE", sub_filter(ROUTER))
        + lua("after-router", "INSERT_AFTER", sub_filter(ROUTER))
        + lua("first", "INSERT_FIRST")
        + lua("no-sub-filter-after", "INSERT_AFTER")
    )
    chains = http_filters(inbound(text))
    assert len(chains) == 2  # mTLS and plaintext chains of port 8000
    for names in chains:
        assert names[0] == "first"
        assert names[-4:] == ["before-router", ROUTER, "after-router", "no-sub-filter-after"]


def test_sub_filter_names_match_ecds_slots_by_istio_filter_name() -> None:
    policy = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-get, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""
    base = inbound(policy)
    text = policy + envoy_filter(
        lua("before-rbac", "INSERT_BEFORE", sub_filter("envoy.filters.http.rbac"))
    )
    (names, _) = http_filters(inbound(text))
    assert names.index("before-rbac") == names.index("trustmesh.authz.audit") - 1
    removed = policy + envoy_filter(
        "  - applyTo: HTTP_FILTER\n    match:\n      context: ANY\n"
        + sub_filter("envoy.filters.http.rbac")
        + "    patch: {operation: REMOVE}\n"
    )
    (names, _) = http_filters(inbound(removed))
    assert not [n for n in names if n.startswith("trustmesh.authz")]
    assert http_filters(base)[0][-1] == ROUTER


def test_merge_on_an_ecds_slot_merges_into_the_served_extension_config() -> None:
    policy = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-get, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""
    text = policy + envoy_filter(
        "  - applyTo: HTTP_FILTER\n    match:\n      context: SIDECAR_INBOUND\n"
        + sub_filter("trustmesh.authz.deny")
        + "    patch:\n      operation: MERGE\n      value:\n        typed_config:\n"
        "          '@type': type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC\n"
        "          shadow_rules_stat_prefix: patched_\n"
    )
    resources = inbound(text)
    (deny,) = [e for e in resources.extension_configs if e["name"] == "trustmesh.authz.deny"]
    assert deny["typed_config"]["shadow_rules_stat_prefix"] == "patched_"
    assert deny["typed_config"]["rules"]["action"] == "DENY"  # merged, not replaced


def test_context_port_and_selector_decide_where_a_patch_applies() -> None:
    base = inbound("")
    outbound_only = envoy_filter(lua("x", "INSERT_FIRST", context="SIDECAR_OUTBOUND"))
    assert http_filters(inbound(outbound_only)) == http_filters(base)
    gateway = envoy_filter(lua("x", "INSERT_FIRST", context="GATEWAY"))
    assert http_filters(inbound(gateway)) == http_filters(base)
    other_port = envoy_filter(lua("x", "INSERT_FIRST", sub_filter(ROUTER, port=9000)))
    assert http_filters(inbound(other_port)) == http_filters(base)
    this_port = envoy_filter(lua("x", "INSERT_FIRST", sub_filter(ROUTER, port=8000)))
    assert all(names[0] == "x" for names in http_filters(inbound(this_port)))
    selected = envoy_filter(
        lua("x", "INSERT_FIRST"), extra="  workloadSelector:\n    labels: {app: other}\n"
    )
    assert http_filters(inbound(selected)) == http_filters(base)
    elsewhere = envoy_filter(lua("x", "INSERT_FIRST"), namespace="bar")
    assert http_filters(inbound(elsewhere)) == http_filters(base)
    root = envoy_filter(lua("x", "INSERT_FIRST"), namespace="istio-system")
    assert all(names[0] == "x" for names in http_filters(inbound(root)))
    targeted = envoy_filter(
        lua("x", "INSERT_FIRST"),
        extra="  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n",
    )
    assert http_filters(inbound(targeted)) == http_filters(base)


def test_priority_then_root_namespace_then_name_order_the_patches() -> None:
    text = (
        envoy_filter(lua("b", "INSERT_FIRST"), name="b")
        + envoy_filter(lua("a", "INSERT_FIRST"), name="a")
        + envoy_filter(lua("late", "INSERT_FIRST"), name="late", extra="  priority: 10\n")
        + envoy_filter(lua("early", "INSERT_FIRST"), name="early", extra="  priority: -5\n")
        + envoy_filter(lua("root", "INSERT_FIRST"), name="z", namespace="istio-system")
    )
    (names, _) = http_filters(inbound(text))
    # Each INSERT_FIRST goes in front of the ones applied before it.
    assert names[:5] == ["late", "b", "a", "root", "early"]


def test_a_slot_a_merge_fills_is_switched_on_in_every_inbound_virtual_host() -> None:
    """Empty slots are off in the listener and switched on per inbound route: a patch
    that fills one (here the deny slot, on a workload with no policy) must run."""
    text = envoy_filter(
        "  - applyTo: HTTP_FILTER\n    match:\n      context: SIDECAR_INBOUND\n"
        + sub_filter("trustmesh.authz.deny")
        + "    patch:\n      operation: MERGE\n      value:\n        typed_config:\n"
        "          '@type': type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC\n"
        "          rules: {action: DENY, policies: {all: {permissions: [{any: true}],"
        " principals: [{any: true}]}}}\n"
    )
    plain = inbound("")
    (route,) = [r for r in plain.routes if r["name"] == "inbound|8000||"]
    assert "trustmesh.authz.deny" not in route["virtual_hosts"][0].get(
        "typed_per_filter_config", {}
    )
    resources = inbound(text)
    (route,) = [r for r in resources.routes if r["name"] == "inbound|8000||"]
    for host in route["virtual_hosts"]:
        assert "trustmesh.authz.deny" in host["typed_per_filter_config"]


def test_cluster_and_route_patches_touch_copies_and_the_rds_route() -> None:
    text = envoy_filter(
        "  - applyTo: CLUSTER\n    match:\n      context: SIDECAR_OUTBOUND\n"
        "      cluster: {service: httpbin.foo.svc.cluster.local, portNumber: 8000}\n"
        "    patch: {operation: MERGE, value: {connect_timeout: 7s}}\n"
        "  - applyTo: HTTP_ROUTE\n    match:\n      context: SIDECAR_INBOUND\n"
        "      routeConfiguration:\n        vhost:\n          name: inbound|http|8000\n"
        "          route: {action: ANY}\n"
        "    patch:\n      operation: MERGE\n      value: {decorator: {operation: patched}}\n",
        extra="  workloadSelector:\n    labels: {app: sleep}\n",
    )
    mesh = compile_text(text)
    sleep = translate(mesh, "foo/sleep", inbound_address="127.0.0.2")
    httpbin = translate(mesh, "foo/httpbin", inbound_address="127.0.0.3")
    name = "outbound|8000||httpbin.foo.svc.cluster.local"
    (patched,) = [c for c in sleep.clusters if c["name"] == name]
    (shared,) = [c for c in httpbin.clusters if c["name"] == name]
    assert patched["connect_timeout"] == "7s"
    assert shared["connect_timeout"] != "7s"  # another proxy's (shared) cluster untouched
    text = text.replace("labels: {app: sleep}", "labels: {app: httpbin}")
    routes = translate(compile_text(text), "foo/httpbin", inbound_address="127.0.0.3").routes
    (route,) = [r for r in routes if r["name"] == "inbound|8000||"]
    assert route["virtual_hosts"][0]["routes"][0]["decorator"] == {"operation": "patched"}


def _diagnostics(text: str) -> list[str]:
    loaded = load_sources([("ef.yaml", text.encode())])
    assert not loaded.diagnostics, loaded.diagnostics
    return [str(d) for d in envoy_filter_diagnostics(build_snapshot(loaded))]


def test_patches_envoy_would_reject_name_file_line_and_field() -> None:
    unknown_type = envoy_filter(lua("x", "INSERT_FIRST").replace("lua.v3.Lua", "lua.v3.Luaa"))
    (shown,) = _diagnostics(unknown_type)
    assert shown.startswith("ef.yaml:12 spec.configPatches[0].patch.value.typed_config.@type:")
    assert "unknown type" in shown and "Luaa" in shown
    typo = envoy_filter(
        "  - applyTo: HTTP_FILTER\n    patch:\n      operation: INSERT_FIRST\n"
        "      value:\n        name: rl\n        typed_config:\n"
        "          '@type': type.googleapis.com/udpa.type.v1.TypedStruct\n"
        "          type_url: type.googleapis.com/"
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n"
        "          value:\n            stat_prefix: rl\n"
        "            token_bucket: {max_tokenz: 10}\n"
    )
    (shown,) = _diagnostics(typo)
    assert shown.startswith(
        "ef.yaml:17 spec.configPatches[0].patch.value.typed_config.value.token_bucket.max_tokenz:"
    )
    assert "warning[envoy-would-reject]: unknown field 'max_tokenz'" in shown
    bad_value = envoy_filter(
        "  - applyTo: CLUSTER\n    patch: {operation: MERGE, value: {lb_policy: FASTEST}}\n"
    )
    (shown,) = _diagnostics(bad_value)
    assert shown.startswith("ef.yaml:8 spec.configPatches[0].patch.value.lb_policy:")
    assert "FASTEST" in shown
    bad_duration = typo.replace("max_tokenz: 10", "max_tokens: 10, fill_interval: 1")
    (shown,) = _diagnostics(bad_duration)
    assert shown.startswith(
        "ef.yaml:17 spec.configPatches[0].patch.value.typed_config.value.token_bucket"
        ".fill_interval: error[invalid-envoy-config]: Envoy would reject it: Duration"
    )
    no_operation = envoy_filter("  - applyTo: CLUSTER\n    patch: {value: {name: x}}\n")
    assert "patch.operation" in _diagnostics(no_operation)[0]


def _unchecked(text: str) -> MeshPolicy:
    """Compiled although validation refuses the EnvoyFilter: translate() must refuse on
    its own (a control plane never pushes what Envoy would NACK)."""
    compiled = compile_sources([("policy.yaml", BASE), ("filters.yaml", text.encode())])
    assert {d.code for d in compiled.errors} <= {"invalid-envoy-config"}, compiled.errors
    return compile_mesh(compiled.snapshot)


def test_translate_refuses_a_proxy_config_with_a_patch_envoy_would_reject() -> None:
    bad = envoy_filter(lua("x", "INSERT_FIRST").replace("lua.v3.Lua", "lua.v3.Luaa"))
    with pytest.raises(EnvoyFilterRejected, match="unknown type"):
        translate(_unchecked(bad), "foo/httpbin", inbound_address="127.0.0.2")
    # Istio only warns about these; Envoy would reject them: refused, never skipped.
    typo = envoy_filter(lua("x", "INSERT_FIRST").replace("default_source_code", "default_src"))
    with pytest.raises(EnvoyFilterRejected, match="unknown field 'default_src'"):
        translate(_unchecked(typo), "foo/httpbin", inbound_address="127.0.0.2")
    by_name = envoy_filter(
        "  - applyTo: HTTP_FILTER\n    patch: {operation: INSERT_FIRST, value: {name: x}}\n"
    )
    with pytest.raises(EnvoyFilterRejected, match="without typed_config"):
        translate(_unchecked(by_name), "foo/httpbin", inbound_address="127.0.0.2")


def test_a_patch_that_breaks_the_merged_config_is_refused_before_any_push() -> None:
    # Valid alone, but the cluster already has a discovery type: two members of a oneof.
    text = envoy_filter(
        "  - applyTo: CLUSTER\n    match:\n      context: SIDECAR_OUTBOUND\n"
        "      cluster: {service: httpbin.foo.svc.cluster.local}\n"
        "    patch:\n      operation: MERGE\n"
        "      value: {cluster_type: {name: envoy.clusters.aggregate}}\n"
    )
    assert _diagnostics(text) == []
    with pytest.raises(EnvoyFilterRejected) as refused:
        translate(compile_text(text), "foo/sleep", inbound_address="127.0.0.2")
    assert isinstance(refused.value, ValueError)  # the control plane keeps the last config
    (shown,) = [str(d) for d in refused.value.diagnostics]
    assert shown.startswith("policy.yaml:")
    assert "spec.configPatches[0].patch.value" in shown
    assert "outbound|8000||httpbin.foo.svc.cluster.local for foo/sleep" in shown


def test_cli_validate_reports_and_analyze_does_not_crash(tmp_path: Path) -> None:
    config = tmp_path / "ef.yaml"
    config.write_text(envoy_filter(lua("x", "INSERT_FIRST").replace("lua.v3.Lua", "lua.v3.Nope")))
    result = CliRunner().invoke(app, ["validate", "-f", str(config)])
    assert result.exit_code == 1, result.output
    assert f"{config}:12 spec.configPatches[0].patch.value.typed_config.@type" in result.output
    good = tmp_path / "good.yaml"
    good.write_text(envoy_filter(lua("x", "INSERT_FIRST")))
    analyzed = CliRunner().invoke(app, ["analyze", "-f", str(good)])
    assert analyzed.exception is None or isinstance(analyzed.exception, SystemExit), analyzed.output
    assert "Traceback" not in analyzed.output
