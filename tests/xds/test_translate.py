"""xds.translate: golden Envoy config for the example mesh, accepted by Envoy, enforced live.

1. Golden files pin the translation of the istio.io example mesh under a few scenarios
   (``TRUSTMESH_UPDATE_GOLDEN=1`` rewrites them; review the diff like code).
2. Every golden config passes ``envoy --mode validate``: as a static bootstrap, in its
   ECDS form (with an ADS config source), and each outbound route configuration inside a
   listener that checks its clusters exist; and the snapshot cache's consistency checks.
3. The inbound listener enforces what the evaluator predicts, in a real Envoy fed over SDS
   by a test CA, in front of a tiny HTTP app.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.envoy.conftest import (  # fixtures are registered by importing them
    Loopback,
    MiniCA,
    Sidecars,
    ca,
    eventually,
    loopback,
    mesh_client_tls,
    run,
    sidecars,
    workroot,
)
from tests.unit.meshutil import ROOT, compile_text
from trustmesh.agent.envoy import validate_bootstrap
from trustmesh.policy.compose import MeshPolicy
from trustmesh.xds.cache import Snapshot, SnapshotCache
from trustmesh.xds.server import AdsServer
from trustmesh.xds.translate import (
    ECDS_TYPE,
    FilterDelivery,
    ProxyResources,
    static_bootstrap,
    translate,
)

__all__ = ["ca", "loopback", "sidecars", "workroot"]  # re-exported fixtures, used by name

GOLDEN = Path(__file__).parent / "golden" / "translate"
SCENARIOS = ROOT / "examples" / "scenarios"
INBOUND_ADDRESS = "127.0.0.2"  # golden files only: nothing binds it
HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
HCM_NAME = "envoy.filters.network.http_connection_manager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def _mesh(*scenarios: str) -> MeshPolicy:
    text = "".join((SCENARIOS / s / "config.yaml").read_text() + "\n---\n" for s in scenarios)
    mesh_config = "".join(
        (SCENARIOS / s / "mesh.yaml").read_text()
        for s in scenarios
        if (SCENARIOS / s / "mesh.yaml").exists()
    )
    return compile_text(text, mesh=mesh_config)


@dataclass(frozen=True)
class Case:
    scenario: str  # "" = the example mesh alone
    workload: str
    delivery: FilterDelivery = FilterDelivery.ECDS

    @property
    def id(self) -> str:
        suffix = ".inline" if self.delivery is FilterDelivery.INLINE else ""
        return f"{self.scenario or 'base'}__{self.workload.replace('/', '-')}{suffix}"

    def translate(self) -> ProxyResources:
        mesh = _mesh(*filter(None, [self.scenario]))
        return translate(
            mesh, self.workload, inbound_address=INBOUND_ADDRESS, delivery=self.delivery
        )


CASES = [
    Case("", "foo/httpbin"),
    Case("", "foo/tcp-echo"),
    Case("", "foo/sleep"),
    Case("02-deny-get", "foo/httpbin"),
    Case("02-deny-get", "foo/httpbin", FilterDelivery.INLINE),
    Case("05-tcp-allow-ports", "foo/tcp-echo"),
    Case("09-jwt-request-authentication", "foo/httpbin"),
    Case("09-jwt-request-authentication", "foo/httpbin", FilterDelivery.INLINE),
    Case("12-mesh-strict", "foo/httpbin"),
    Case("12-mesh-strict", "foo/tcp-echo"),
    Case("12-mesh-strict", "foo/sleep"),
    Case("14b-workload-strict-port-disable", "bar/httpbin"),
    Case("14b-workload-strict-port-disable", "foo/sleep"),
    Case("17b-registry-only-service-entry", "foo/sleep"),
]


def _as_json(resources: ProxyResources) -> str:
    body = {
        "listeners": resources.listeners,
        "clusters": resources.clusters,
        "routes": resources.routes,
        "extension_configs": resources.extension_configs,
    }
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


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


def _route_listener(
    name: str, route: dict[str, Any], address: tuple[str, int], *, check: bool = False
) -> dict[str, Any]:
    """A plaintext listener routing by ``route`` (a route configuration resource), as the
    outbound listener (not built yet) will; ``check``: fail if a cluster is missing."""
    config = {k: copy.deepcopy(v) for k, v in route.items() if k != "@type"}
    config["validate_clusters"] = check  # Istio's own route configurations skip the check
    router = {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
    manager = {"@type": HCM, "stat_prefix": name, "route_config": config, "http_filters": [router]}
    return {
        "name": name,
        "address": {"socket_address": {"address": address[0], "port_value": address[1]}},
        "filter_chains": [{"filters": [{"name": HCM_NAME, "typed_config": manager}]}],
    }


def _ecds_bootstrap(resources: ProxyResources, sds_socket: str) -> dict[str, Any]:
    """The listeners as an ADS server would serve them (filters fetched over ECDS)."""
    bootstrap = static_bootstrap(resources, node_id="validate", sds_socket=sds_socket)
    bootstrap["static_resources"]["listeners"] = [
        {k: v for k, v in copy.deepcopy(listener).items() if k != "@type"}
        for listener in resources.listeners
    ]
    ads = copy.deepcopy(bootstrap["static_resources"]["clusters"][-1])  # the SDS cluster
    ads["name"] = ads["load_assignment"]["cluster_name"] = "xds-grpc"
    bootstrap["static_resources"]["clusters"].append(ads)
    bootstrap["dynamic_resources"] = {
        "ads_config": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
        }
    }
    return bootstrap


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


# ---------------------------------------------------------------------------- 3. live


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    method: str,
    path: str,
    authority: str,
    *,
    close: bool = True,
) -> Reply:
    """One HTTP/1.1 request and its response on an open connection."""
    connection = "Connection: close\r\n" if close else ""
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: {authority}\r\n"
        f"Content-Length: 0\r\n{connection}\r\n".encode()
    )
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.removesuffix("\r\n\r\n").split("\r\n")
        headers = {}
        for line in lines:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    except asyncio.IncompleteReadError as error:
        raise ConnectionError(f"no HTTP response: {error}") from None
    return Reply(int(status_line.split()[1]), headers, body)


async def _request(
    host: str,
    port: int,
    method: str = "GET",
    path: str = "/",
    *,
    tls: ssl.SSLContext | None = None,
    authority: str = "httpbin.foo:8000",
    timeout: float = 5,
) -> Reply:
    """One request on a new connection; raises ConnectionError / OSError if no reply."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        try:
            return await _exchange(reader, writer, method, path, authority)
        finally:
            writer.transport.abort()  # no TLS close_notify wait


@contextlib.asynccontextmanager
async def _app(address: str, port: int) -> AsyncIterator[None]:
    """The workload itself: answers every request with what it saw, as JSON."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            headers = dict(
                (k.strip().lower(), v.strip()) for k, _, v in (x.partition(":") for x in lines if x)
            )
            await reader.readexactly(int(headers.get("content-length", "0")))
            method, path, _ = request_line.split(" ", 2)
            body = json.dumps(
                {"method": method, "path": path, "xfcc": headers.get("x-forwarded-client-cert")}
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, address, port)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def _bootstrap_patch(resources: ProxyResources) -> Any:
    """Replace the fixture's listeners and clusters by the translation, keeping its SDS."""

    def patch(bootstrap: dict[str, Any]) -> None:
        (sds,) = bootstrap["static_resources"]["clusters"]
        endpoint = sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ours = static_bootstrap(
            resources,
            node_id=bootstrap["node"]["id"],
            sds_socket=endpoint["address"]["pipe"]["path"],
        )
        bootstrap["static_resources"] = ours["static_resources"]

    return patch


def _mesh_client(ca: MiniCA, workdir: Path, *, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    context = mesh_client_tls(ca.issue("foo", "sleep"), workdir)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def _no_cert_client(ca: MiniCA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=ca.root_pem.decode())
    return context


SLEEP_ID = "spiffe://cluster.local/ns/foo/sa/sleep"


@pytest.mark.envoy
def test_live_strict_refuses_plaintext_and_accepts_mesh_mtls(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars, workroot: Path
) -> None:
    inbound, app = loopback.address(), loopback.address()
    resources = translate(
        _mesh("12-mesh-strict"), "foo/httpbin", inbound_address=inbound, app_address=app
    )

    async def scenario() -> None:
        async with (
            _app(app, 8000),
            sidecars.run("httpbin", ca.issue("foo", "httpbin"), patch=_bootstrap_patch(resources)),
        ):
            reply = await _request(inbound, 8000, path="/get", tls=_mesh_client(ca, workroot))
            assert reply.status == 200, reply
            seen = json.loads(reply.body)
            assert seen["path"] == "/get"
            # The app learns the caller from the handshake, not from anything it sent.
            assert f"URI={SLEEP_ID}" in seen["xfcc"]
            with pytest.raises((ConnectionError, OSError)):  # plaintext: no chain, reset
                await _request(inbound, 8000, path="/get")
            with pytest.raises((ConnectionError, OSError)):  # TLS without a client cert
                await _request(inbound, 8000, path="/get", tls=_no_cert_client(ca))

    run(scenario(), timeout=30)


@pytest.mark.envoy
def test_live_permissive_accepts_both_and_enforces_rbac_with_logs(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars, workroot: Path
) -> None:
    inbound, app = loopback.address(), loopback.address()
    mesh = _mesh("02-deny-get", "15-dry-run-deny")
    resources = translate(mesh, "foo/httpbin", inbound_address=inbound, app_address=app)
    mesh_tls = _mesh_client(ca, workroot, alpn=("istio-http/1.1",))

    async def scenario() -> Path:
        async with (
            _app(app, 8000),
            sidecars.run(
                "httpbin", ca.issue("foo", "httpbin"), patch=_bootstrap_patch(resources)
            ) as sidecar,
        ):
            plain = await _request(inbound, 8000, "POST", "/post")
            assert plain.status == 200, plain
            assert json.loads(plain.body)["xfcc"] is None
            over_mtls = await _request(inbound, 8000, "POST", "/post", tls=mesh_tls)
            assert over_mtls.status == 200, over_mtls
            assert f"URI={SLEEP_ID}" in json.loads(over_mtls.body)["xfcc"]
            # TLS that is not mesh mTLS (no istio ALPN) has no chain on an HTTP port.
            with pytest.raises((ConnectionError, OSError)):
                await _request(inbound, 8000, "POST", "/post", tls=_mesh_client(ca, workroot))

            denied = await _request(inbound, 8000, "GET", "/get", tls=mesh_tls)
            assert (denied.status, denied.body) == (403, b"RBAC: access denied")
            shadow = await _request(inbound, 8000, "POST", "/headers")
            assert shadow.status == 200  # dry run: evaluated, logged, not enforced

            return sidecar.envoy.log_path

    # Envoy flushes access logs every 10 s, and at exit: read them once it has stopped.
    log = run(scenario(), timeout=30)
    entries: dict[str, dict[str, Any]] = {}
    unmatched = 0
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("workload") == "foo/httpbin":
                if "path" in entry:
                    entries[entry["path"]] = entry
                else:
                    unmatched += entry["message"] == "no filter chain matched"
    assert unmatched == 1  # the TLS connection without a mesh ALPN, logged by the listener
    assert entries["/get"]["response_code"] == 403
    assert "ns[foo]-policy[deny-method-get]-rule[0]" in entries["/get"]["response_code_details"]
    assert entries["/get"]["peer_principal"] == SLEEP_ID
    rbac = entries["/headers"]["rbac"]
    assert rbac["istio_dry_run_deny_shadow_effective_policy_id"] == (
        "ns[foo]-policy[deny-path-headers]-rule[0]"
    )
    assert rbac["istio_dry_run_deny_shadow_engine_result"] == "denied"


def _client_patch(resources: ProxyResources, listen: tuple[str, int], server: str) -> Any:
    """The client's translation, plus what the (later) outbound listener and runtime add:
    a plaintext listener using route configuration ``8000``, and the server's address in
    place of the placeholder endpoint of ``httpbin.foo``."""
    base = _bootstrap_patch(resources)
    (route,) = [r for r in resources.routes if r["name"] == "8000"]

    def patch(bootstrap: dict[str, Any]) -> None:
        base(bootstrap)
        for cluster in bootstrap["static_resources"]["clusters"]:
            if cluster["name"] == "outbound|8000||httpbin.foo.svc.cluster.local":
                for group in cluster["load_assignment"]["endpoints"]:
                    for endpoint in group["lb_endpoints"]:
                        endpoint["endpoint"]["address"]["socket_address"]["address"] = server
        bootstrap["static_resources"]["listeners"].append(
            _route_listener("outbound-test", route, listen)
        )

    return patch


@pytest.mark.envoy
def test_live_outbound_cluster_speaks_mesh_mtls_to_the_inbound_listener(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars
) -> None:
    """Client and server sidecars both from translate(): auto mTLS with the server's
    SPIFFE ID pinned reaches a STRICT port; an unknown host gets REGISTRY_ONLY's 502."""
    mesh = _mesh("12-mesh-strict", "17b-registry-only-service-entry")
    inbound, app, client = loopback.address(), loopback.address(), loopback.endpoint()
    server = translate(mesh, "foo/httpbin", inbound_address=inbound, app_address=app)
    sleep = translate(mesh, "foo/sleep", inbound_address=loopback.address())

    async def scenario() -> None:
        async with (
            _app(app, 8000),
            sidecars.run("httpbin", ca.issue("foo", "httpbin"), patch=_bootstrap_patch(server)),
            sidecars.run(
                "sleep", ca.issue("foo", "sleep"), patch=_client_patch(sleep, client, inbound)
            ),
        ):
            reply = await _request(*client, "GET", "/get", authority="httpbin.foo:8000")
            assert reply.status == 200, reply
            assert f"URI={SLEEP_ID}" in json.loads(reply.body)["xfcc"]
            unknown = await _request(*client, "GET", "/", authority="edition.cnn.com")
            assert unknown.status == 502

    run(scenario(), timeout=30)


@pytest.mark.envoy
def test_live_client_refuses_a_server_with_another_identity(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars
) -> None:
    mesh = _mesh("12-mesh-strict")
    inbound, app, client = loopback.address(), loopback.address(), loopback.endpoint()
    server = translate(mesh, "foo/httpbin", inbound_address=inbound, app_address=app)
    sleep = translate(mesh, "foo/sleep", inbound_address=loopback.address())

    async def scenario() -> None:
        async with (
            _app(app, 8000),
            # The server presents bar/httpbin's identity where foo/httpbin's is pinned.
            sidecars.run("httpbin", ca.issue("bar", "httpbin"), patch=_bootstrap_patch(server)),
            sidecars.run(
                "sleep", ca.issue("foo", "sleep"), patch=_client_patch(sleep, client, inbound)
            ),
        ):
            reply = await _request(*client, "GET", "/get", authority="httpbin.foo:8000")
            assert reply.status == 503, reply

    run(scenario(), timeout=30)


def _ads_patch(node_id: str, ads_port: int) -> Any:
    """Everything but the SDS cluster over ADS from 127.0.0.1:``ads_port``."""

    def patch(bootstrap: dict[str, Any]) -> None:
        bootstrap["node"]["id"] = node_id
        ads = {"ads": {}, "resource_api_version": "V3"}
        xds = copy.deepcopy(bootstrap["static_resources"]["clusters"][0])  # gRPC, like SDS
        xds["name"] = xds["load_assignment"]["cluster_name"] = "xds-grpc"
        endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": ads_port}}
        bootstrap["static_resources"]["clusters"].append(xds)
        bootstrap["dynamic_resources"] = {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
            "lds_config": ads,
            "cds_config": ads,
        }

    return patch


@pytest.mark.envoy
def test_live_over_ads_a_new_policy_reaches_an_open_connection(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars
) -> None:
    """The reason for ECDS delivery: adding a DENY policy changes only an extension
    config, and Envoy applies it to a keep-alive connection that is already open."""
    inbound, app = loopback.address(), loopback.address()
    node = "sidecar~127.0.0.1~httpbin.foo~foo.svc.cluster.local"

    def snapshot(*scenarios: str) -> Snapshot:
        mesh = _mesh(*scenarios)
        resources = translate(mesh, "foo/httpbin", inbound_address=inbound, app_address=app)
        return Snapshot.from_resources(resources.all())

    cache = SnapshotCache()
    cache.set(node, snapshot())
    server = AdsServer(cache)

    async def scenario() -> None:
        port = await server.start()
        try:
            async with (
                _app(app, 8000),
                sidecars.run("httpbin", ca.issue("foo", "httpbin"), patch=_ads_patch(node, port)),
            ):
                reader, writer = await asyncio.open_connection(inbound, 8000)
                try:

                    async def get() -> int:
                        reply = await _exchange(
                            reader, writer, "GET", "/get", "httpbin.foo:8000", close=False
                        )
                        return reply.status

                    assert await get() == 200
                    cache.set(node, snapshot("02-deny-get"))

                    async def denied() -> bool:
                        return await get() == 403

                    await eventually(denied, what="403 on the open connection", timeout=5)
                finally:
                    writer.transport.abort()
        finally:
            await server.stop()

    run(scenario(), timeout=30)
