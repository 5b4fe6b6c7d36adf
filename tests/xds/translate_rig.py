"""Harness for the translation tests (test_translate, test_translate_live,
test_outbound_listeners).

Provides ``_mesh`` (the example mesh under given scenarios), the golden ``Case``s, the
Envoy config around a translation (``_route_listener``, ``_ecds_bootstrap`` and the
bootstrap patches ``_bootstrap_patch``, ``_client_patch``, ``_ads_patch``), the app
behind a sidecar (``_app``) and raw HTTP/1.1 clients (``_request``, ``_exchange``,
``_mesh_client``, ``_no_cert_client``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.envoy.conftest import MiniCA, mesh_client_tls
from tests.unit.meshutil import ROOT, compile_text
from trustmesh.policy.compose import MeshPolicy
from trustmesh.xds.translate import (
    CaptureMode,
    FilterDelivery,
    ProxyResources,
    static_bootstrap,
    translate,
)

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


# The example mesh's Services as a sandboxed runtime would address them (golden files).
CLUSTER_IPS = {
    "foo/httpbin": "10.96.0.10",
    "foo/tcp-echo": "10.96.0.11",
    "bar/httpbin": "10.96.0.12",
    "legacy/httpbin": "10.96.0.13",
}
POD_IP = "10.88.0.5"  # golden files of captured sidecars: only the node id would use it


@dataclass(frozen=True)
class Case:
    scenario: str  # "" = the example mesh alone
    workload: str
    delivery: FilterDelivery = FilterDelivery.ECDS
    capture: CaptureMode = CaptureMode.PROCESS

    @property
    def id(self) -> str:
        suffix = ".inline" if self.delivery is FilterDelivery.INLINE else ""
        if self.capture is CaptureMode.TRANSPARENT:
            suffix += ".transparent"
        return f"{self.scenario or 'base'}__{self.workload.replace('/', '-')}{suffix}"

    def translate(self) -> ProxyResources:
        mesh = _mesh(*filter(None, [self.scenario]))
        if self.capture is CaptureMode.TRANSPARENT:
            return translate(
                mesh,
                self.workload,
                inbound_address=POD_IP,
                delivery=self.delivery,
                capture=self.capture,
                service_addresses=CLUSTER_IPS,
            )
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
    # Istio's layout behind capture rules (a sandboxed pod).
    Case("", "foo/httpbin", capture=CaptureMode.TRANSPARENT),
    Case("", "foo/sleep", capture=CaptureMode.TRANSPARENT),
    Case("02-deny-get", "foo/httpbin", FilterDelivery.INLINE, CaptureMode.TRANSPARENT),
    Case("05-tcp-allow-ports", "foo/tcp-echo", capture=CaptureMode.TRANSPARENT),
    Case("12-mesh-strict", "foo/httpbin", capture=CaptureMode.TRANSPARENT),
    Case("14b-workload-strict-port-disable", "bar/httpbin", capture=CaptureMode.TRANSPARENT),
    Case("17b-registry-only-service-entry", "foo/sleep", capture=CaptureMode.TRANSPARENT),
]


def _as_json(resources: ProxyResources) -> str:
    body = {
        "listeners": resources.listeners,
        "clusters": resources.clusters,
        "routes": resources.routes,
        "extension_configs": resources.extension_configs,
    }
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------- envoy config


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


# ---------------------------------------------------------------------------- live


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
