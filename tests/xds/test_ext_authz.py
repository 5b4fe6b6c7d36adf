"""CUSTOM / ext_authz pieces: provider checks, the translation, the sample authorizer.

* ``meshConfig.extensionProviders`` problems are reported at file, line and field, as
  errors (what istiod refuses) or warnings (a service the configuration does not list);
* a sidecar's resources carry the pair of filters in Istio's order (before jwt_authn and
  the other RBAC filters, over ECDS or inline), the authorizer's outbound cluster (HTTP/2
  for a gRPC port), and Envoy accepts them;
* the sample answers like Istio's ext-authz over HTTP and gRPC;
* ``trustmesh up`` runs it for Istio's image, with the image's flags.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests.unit.meshutil import compile_text, diagnostics_of, policy
from trustmesh.agent.envoy import validate_bootstrap
from trustmesh.samples.ext_authz import ExtAuthzServer
from trustmesh.samples.http1 import Request as SampleRequest
from trustmesh.samples.images import stand_in_for
from trustmesh.xds.translate import CaptureMode, FilterDelivery, static_bootstrap, translate

SERVICE = """apiVersion: v1
kind: Service
metadata: {name: ext-authz, namespace: foo}
spec:
  selector: {app: ext-authz}
  ports: [{name: http, port: 8000}, {name: grpc, port: 9000}]
---
"""
GOOD_MESH = """extensionProviders:
- name: sample-grpc
  envoyExtAuthzGrpc: {service: ext-authz.foo.svc.cluster.local, port: 9000}
- name: sample-http
  envoyExtAuthzHttp: {service: foo/ext-authz.foo.svc.cluster.local, port: 8000}
"""


def custom(provider: str, app: str = "httpbin") -> str:
    return policy(
        f"ext-{app}",
        "foo",
        f"selector: {{matchLabels: {{app: {app}}}}}\naction: CUSTOM\n"
        f"provider: {{name: {provider}}}\nrules: [{{to: [{{operation: {{paths: [/admin/*]}}}}]}}]",
    )


# --- provider checks ------------------------------------------------------------------


BAD_MESH = """extensionProviders:
- name: default
  envoyExtAuthzHttp:
    service: foo/ext-authz.foo.svc.cluster.local
    port: 999999
    pathPrefix: check
    statusOnError: "999"
    headersToDownstreamOnDeny: ["*"]
- name: Bad_Name
  envoyExtAuthzGrpc:
    service: ext-authz.foo.svc.cluster.local
    port: 9001
    timeout: 2 seconds
- name: default
  envoyExtAuthzGrpc: {service: nowhere.foo.svc.cluster.local, port: 9000}
"""


def test_bad_providers_are_reported_at_file_line_and_field() -> None:
    found = {
        (d.severity.value, d.location.line, d.location.field)
        for d in diagnostics_of(SERVICE, mesh=BAD_MESH)
        if d.location.file == "mesh.yaml"
    }
    p = "extensionProviders"
    assert found == {
        ("error", 5, f"{p}[0].envoyExtAuthzHttp.port"),
        ("error", 6, f"{p}[0].envoyExtAuthzHttp.pathPrefix"),
        ("error", 7, f"{p}[0].envoyExtAuthzHttp.statusOnError"),
        ("error", 8, f"{p}[0].envoyExtAuthzHttp.headersToDownstreamOnDeny[0]"),
        ("error", 9, f"{p}[1].name"),
        ("warning", 12, f"{p}[1].envoyExtAuthzGrpc.port"),  # the Service has no 9001
        ("error", 13, f"{p}[1].envoyExtAuthzGrpc.timeout"),
        ("error", 14, f"{p}[2].name"),  # defined twice
        ("warning", 15, f"{p}[2].envoyExtAuthzGrpc.service"),  # not in the registry
    }
    messages = [str(d) for d in diagnostics_of(SERVICE, mesh=BAD_MESH)]
    assert any("port must be 1..65535, found 999999" in m for m in messages)
    assert not any("Traceback" in m or "pydantic" in m for m in messages)


def test_a_field_istio_does_not_have_is_refused_where_it_is_written() -> None:
    text = (
        "extensionProviders:\n- name: h\n  envoyExtAuthzHttp:\n"
        "    service: ext-authz.foo.svc.cluster.local\n    port: 8000\n"
        "    headersToUpstreamOnDeny: [x-a]\n"
    )
    [problem] = [d for d in diagnostics_of(SERVICE, mesh=text) if d.is_error]
    assert (problem.location.line, problem.location.field) == (
        6,
        "extensionProviders[0].envoyExtAuthzHttp.headersToUpstreamOnDeny",
    )
    assert "unknown field" in problem.message


def test_a_custom_policy_naming_an_unusable_provider_is_flagged_where_it_names_it() -> None:
    text = SERVICE + custom("missing")
    [warning] = [d for d in diagnostics_of(text, mesh=GOOD_MESH) if d.code.startswith("custom")]
    assert warning.location.field.endswith("provider.name")
    assert "'missing' is not in meshConfig.extensionProviders" in warning.message
    assert not [d for d in diagnostics_of(SERVICE + custom("sample-grpc"), mesh=GOOD_MESH)
                if d.code.startswith("custom")]  # fmt: skip


# --- translation -------------------------------------------------------------------------


def _names(filters: list[dict[str, Any]]) -> list[str]:
    return [f["name"] for f in filters]


def test_sidecar_gets_the_pair_before_jwt_and_rbac_and_the_authorizer_cluster() -> None:
    mesh = compile_text(
        SERVICE
        + custom("sample-grpc")
        + policy("deny-x", "foo", "action: DENY\nrules: [{to: [{operation: {paths: [/x]}}]}]"),
        mesh=GOOD_MESH,
    )
    inline = translate(
        mesh, "foo/httpbin", inbound_address="127.0.0.20", delivery=FilterDelivery.INLINE
    )
    [listener] = inline.listeners
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    names = _names(manager["http_filters"])
    start = names.index("envoy.filters.http.ext_authz") - 1
    assert names[start:] == [
        "envoy.filters.http.rbac",  # CUSTOM shadow rules
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.rbac",  # DENY
        "envoy.filters.http.router",
    ]
    shadow = manager["http_filters"][start]["typed_config"]
    assert shadow["shadow_rules_stat_prefix"] == "istio_ext_authz_"
    assert list(shadow["shadow_rules"]["policies"]) == [
        "istio-ext-authz-sample-grpc-ns[foo]-policy[ext-httpbin]-rule[0]"
    ]
    clusters = {c["name"]: c for c in inline.clusters}
    grpc_cluster = clusters["outbound|9000||ext-authz.foo.svc.cluster.local"]
    options = grpc_cluster["typed_extension_protocol_options"]
    assert "http2_protocol_options" in str(options)

    ecds = translate(mesh, "foo/httpbin", inbound_address="127.0.0.20")
    slots = {e["name"]: e["typed_config"]["@type"] for e in ecds.extension_configs}
    assert slots["trustmesh.authz.custom.0"].endswith("rbac.v3.RBAC")
    assert slots["trustmesh.authz.custom.1"].endswith("ext_authz.v3.ExtAuthz")


def test_envoy_accepts_every_layout(tmp_path: Path) -> None:
    for provider in ("sample-grpc", "sample-http"):
        mesh = compile_text(
            SERVICE + custom(provider) + custom(provider, app="tcp-echo").replace("ext-tcp", "t"),
            mesh=GOOD_MESH,
        )
        for workload, capture in (
            ("foo/httpbin", CaptureMode.PROCESS),
            ("foo/tcp-echo", CaptureMode.TRANSPARENT),
        ):
            for delivery in FilterDelivery:
                resources = translate(
                    mesh,
                    workload,
                    inbound_address="127.0.0.20",
                    delivery=delivery,
                    capture=capture,
                )
                bootstrap = static_bootstrap(
                    resources, node_id="validate", sds_socket=str(tmp_path / "sds.sock")
                )
                asyncio.run(validate_bootstrap(bootstrap, workdir=tmp_path, timeout=60))


def test_tcp_chains_get_grpc_providers_only() -> None:
    tcp_custom = policy(
        "ext",
        "foo",
        "selector: {matchLabels: {app: tcp-echo}}\naction: CUSTOM\nprovider: {name: P}\n"
        'rules: [{to: [{operation: {ports: ["9000"]}}]}]',
    )

    def network_names(provider: str) -> list[str]:
        mesh = compile_text(
            SERVICE + tcp_custom.replace("{name: P}", f"{{name: {provider}}}"), mesh=GOOD_MESH
        )
        resources = translate(mesh, "foo/tcp-echo", inbound_address="127.0.0.21")
        [listener] = resources.listeners
        chain = next(c for c in listener["filter_chains"] if c["name"] == "inbound|9000|mtls")
        return _names(chain["filters"])

    assert network_names("sample-grpc") == [
        "envoy.filters.network.rbac",
        "envoy.filters.network.ext_authz",
        "envoy.filters.network.tcp_proxy",
    ]
    assert network_names("sample-http") == ["envoy.filters.network.tcp_proxy"]
    assert network_names("missing") == [
        "envoy.filters.network.rbac",  # fails closed: DENY
        "envoy.filters.network.tcp_proxy",
    ]


# --- the sample ---------------------------------------------------------------------------


def test_sample_http_side() -> None:
    server = ExtAuthzServer(log=lambda _line: None)

    def check(*headers: tuple[str, str]) -> Any:
        request = SampleRequest("GET", "/check/x", "HTTP/1.1", headers)
        return asyncio.run(server.http_check(request))

    allowed = check(("x-ext-authz", "allow"), ("x-ext-authz-additional-header-override", "o"))
    assert allowed.status == 200
    assert ("x-ext-authz-check-result", "allowed") in allowed.headers
    assert ("x-ext-authz-additional-header-override", "o") in allowed.headers
    denied = check(("x-ext-authz", "deny"))
    assert denied.status == 403
    assert ("x-ext-authz-check-result", "denied") in denied.headers
    assert denied.body.startswith(b"denied by ext_authz")
    assert server.checks == {"http": 2, "grpc": 0}


def test_sample_grpc_side_over_the_wire() -> None:
    asyncio.run(_grpc_checks())


async def _grpc_checks() -> None:
    server = ExtAuthzServer(log=lambda _line: None)
    stop = asyncio.Event()
    ports: list[int] = []
    task = asyncio.create_task(
        server.serve("127.0.0.1", 0, 0, stop=stop, ready=lambda _h, p: ports.append(p))
    )
    try:
        async with asyncio.timeout(10):
            while len(ports) < 2:
                await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)

            async def ask(headers: dict[str, str], principal: str = "") -> Any:
                request = external_auth_pb2.CheckRequest()
                request.attributes.request.http.headers.update(headers)
                request.attributes.source.principal = principal
                return await stub.Check(request)

            allowed = await ask({"x-ext-authz": "allow"})
            assert allowed.status.code == 0 and allowed.HasField("ok_response")
            denied = await ask({"x-ext-authz": "no"}, "spiffe://cluster.local/ns/foo/sa/a")
            assert denied.status.code == 7  # PERMISSION_DENIED: the header decides
            assert denied.denied_response.status.code == 403
            assert {h.header.key: h.header.value for h in denied.denied_response.headers}[
                "x-ext-authz-check-result"
            ] == "denied"
            # No header (a TCP connection): the caller's service account decides.
            assert (await ask({}, "spiffe://cluster.local/ns/foo/sa/a")).status.code == 0
            assert (await ask({}, "spiffe://cluster.local/ns/foo/sa/b")).status.code == 7
            assert (await ask({})).status.code == 7
        assert server.checks == {"http": 0, "grpc": 5}
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await task


def test_istio_image_runs_the_stand_in_with_its_flags() -> None:
    stand_in = stand_in_for("registry.istio.io/testing/ext-authz:latest")
    assert stand_in is not None and stand_in.ports == (8000, 9000)
    assert stand_in.command() == ("trustmesh", "sample", "ext-authz")
    assert stand_in.command(("-http", "8080", "--grpc=9090", "-allow_service_account", "b")) == (
        "trustmesh",
        "sample",
        "ext-authz",
        "--http=8080",
        "--grpc=9090",
        "--allow-service-account=b",
    )
    for bad in (("-http",), ("-port", "1"), ("-grpc", "x")):
        with pytest.raises(ValueError, match="ext-authz"):
            stand_in.command(bad)


# --- offline, from the command line -------------------------------------------------------


def test_authz_check_answers_for_an_authorizer_that_cannot_be_reached(tmp_path: Path) -> None:
    """``--ext-authz P=unreachable``: Envoy's failOpen / statusOnError, offline."""
    from typer.testing import CliRunner

    from tests.unit.meshutil import BASE
    from trustmesh.cli.main import app

    (tmp_path / "apps.yaml").write_bytes(BASE)
    (tmp_path / "policy.yaml").write_text(SERVICE + custom("sample-grpc"))
    open_mesh = GOOD_MESH.replace("port: 9000}", "port: 9000, failOpen: true}")
    closed_mesh = GOOD_MESH.replace("port: 9000}", 'port: 9000, statusOnError: "503"}')
    runner = CliRunner()

    def check(mesh: str, answer: str) -> Any:
        (tmp_path / "mesh.yaml").write_text(mesh)
        args = ["authz", "check", "-f", str(tmp_path / "apps.yaml"), "-f"]
        args += [str(tmp_path / "policy.yaml"), "--mesh-config", str(tmp_path / "mesh.yaml")]
        args += ["--from", "foo/sleep", "--to", "foo/httpbin", "--path", "/admin/x"]
        args += ["--ext-authz", f"sample-grpc={answer}", "-o", "json"]
        return runner.invoke(app, args)

    opened = check(open_mesh, "unreachable")
    assert opened.exit_code == 0, opened.output
    closed = check(closed_mesh, "unreachable")
    assert closed.exit_code == 3 and '"status": 503' in closed.output, closed.output
    assert check(closed_mesh, "allow").exit_code == 0
    bad = check(closed_mesh, "maybe")
    assert bad.exit_code == 2 and "allow, deny or unreachable" in bad.output


def test_an_authorizer_outside_the_mesh_declared_by_a_service_entry(tmp_path: Path) -> None:
    """A gRPC authorizer reached by name (ServiceEntry, DNS): its cluster speaks HTTP/2,
    as a GRPC port's must, and the provider is usable."""
    entry = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: opa, namespace: foo}
spec:
  hosts: [opa.example.com]
  ports: [{number: 9191, name: grpc-opa, protocol: GRPC}]
  resolution: DNS
  location: MESH_EXTERNAL
---
"""
    mesh_text = (
        "extensionProviders:\n- name: opa\n"
        "  envoyExtAuthzGrpc: {service: opa.example.com, port: 9191}\n"
    )
    mesh = compile_text(entry + custom("opa"), mesh=mesh_text)
    resources = translate(
        mesh, "foo/httpbin", inbound_address="127.0.0.20", delivery=FilterDelivery.INLINE
    )
    clusters = {c["name"]: c for c in resources.clusters}
    cluster = clusters["outbound|9191||opa.example.com"]
    assert cluster["type"] == "STRICT_DNS"
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    [listener] = resources.listeners
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    [ext] = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    target = ext["typed_config"]["grpc_service"]["envoy_grpc"]
    assert target == {
        "cluster_name": "outbound|9191||opa.example.com",
        "authority": "opa.example.com",
    }
    bootstrap = static_bootstrap(resources, node_id="v", sds_socket=str(tmp_path / "sds.sock"))
    asyncio.run(validate_bootstrap(bootstrap, workdir=tmp_path, timeout=60))
