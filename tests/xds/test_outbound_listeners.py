"""xds.outbound_listeners: the listeners a client app reaches its sidecar by (no capture).

1. Shape: the HTTP proxy's virtual hosts (domains → the right ``outbound|port||fqdn``
   cluster), the default for unknown hosts (ALLOW_ANY → dynamic forward proxy,
   REGISTRY_ONLY → 502), a TCP listener per TCP Service port; no ``outbound_address``,
   no outbound listener.
2. Envoy accepts the translation (``envoy --mode validate``) and the snapshot cache's
   consistency and encoding checks pass.
3. Live: a client sidecar and a server sidecar both from ``translate()``; an absolute-form
   request to the client's HTTP proxy reaches the app over mesh mTLS; under ALLOW_ANY an
   unknown host is reached through the dynamic forward proxy, under REGISTRY_ONLY it is 502.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.envoy.conftest import (  # fixtures are registered by importing them
    Loopback,
    MiniCA,
    Sidecars,
    ca,
    loopback,
    run,
    sidecars,
    workroot,
)
from tests.unit.meshutil import compile_text
from tests.xds.translate_rig import SLEEP_ID, _app, _bootstrap_patch, _mesh, _request
from trustmesh.agent.envoy import validate_bootstrap
from trustmesh.xds.cache import Snapshot
from trustmesh.xds.outbound_listeners import (
    DYNAMIC_FORWARD_PROXY_CLUSTER,
    HTTP_PROXY_ROUTE,
    OUTBOUND_HTTP_LISTENER,
    OUTBOUND_HTTP_PORT,
)
from trustmesh.xds.translate import ProxyResources, static_bootstrap, translate

__all__ = ["ca", "loopback", "sidecars", "workroot"]  # re-exported fixtures, used by name

OUT = "10.0.0.9"
HTTPBIN_FOO = "outbound|8000||httpbin.foo.svc.cluster.local"
HTTPBIN_BAR = "outbound|8000||httpbin.bar.svc.cluster.local"


def _sleep(*scenarios: str, outbound: str = OUT) -> ProxyResources:
    return translate(
        _mesh(*scenarios), "foo/sleep", inbound_address="10.0.0.1", outbound_address=outbound
    )


def _listeners(resources: ProxyResources) -> dict[str, dict[str, Any]]:
    return {listener["name"]: listener for listener in resources.listeners}


def _manager(resources: ProxyResources) -> dict[str, Any]:
    listener = _listeners(resources)[OUTBOUND_HTTP_LISTENER]
    config: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return config


def _route_config(resources: ProxyResources) -> dict[str, Any]:
    """The proxy's route configuration: the RDS resource its manager names."""
    name = _manager(resources)["rds"]["route_config_name"]
    (config,) = [r for r in resources.routes if r["name"] == name]
    return config


def _cluster_by_domain(resources: ProxyResources) -> dict[str, str]:
    """Every domain of the proxy's route configuration → where it goes."""
    out: dict[str, str] = {}
    for vhost in _route_config(resources)["virtual_hosts"]:
        route = vhost["routes"][0]
        target = route["route"]["cluster"] if "route" in route else "direct_response"
        for domain in vhost["domains"]:
            assert domain not in out, f"{domain} in two virtual hosts"
            out[domain] = target
    return out


# ---------------------------------------------------------------------------- 1. shape


def test_without_outbound_address_there_is_no_outbound_listener() -> None:
    plain = translate(_mesh(), "foo/sleep", inbound_address="10.0.0.1")
    assert plain.listeners == ()
    assert DYNAMIC_FORWARD_PROXY_CLUSTER not in {c["name"] for c in plain.clusters}
    with_proxy = _sleep()
    # The outbound listeners add to the translation (their routes over RDS); nothing else
    # changes.
    assert [r for r in with_proxy.routes if r["name"] != HTTP_PROXY_ROUTE] == list(plain.routes)
    assert HTTP_PROXY_ROUTE not in {r["name"] for r in plain.routes}
    assert [c for c in with_proxy.clusters if c["name"] != DYNAMIC_FORWARD_PROXY_CLUSTER] == list(
        plain.clusters
    )


def test_http_proxy_listener_is_an_absolute_url_http1_proxy_on_15001() -> None:
    resources = _sleep()
    listener = _listeners(resources)[OUTBOUND_HTTP_LISTENER]
    assert listener["address"]["socket_address"] == {"address": OUT, "port_value": 15001}
    manager = _manager(resources)
    assert manager["codec_type"] == "HTTP1"
    assert manager["http_protocol_options"] == {"allow_absolute_url": True}
    # Routes over RDS (Istio's "http_proxy"), never inline: a VirtualService change must
    # not change the listener, whose drain would cut requests in flight.
    assert "route_config" not in manager
    assert manager["rds"] == {
        "config_source": {"ads": {}, "resource_api_version": "V3"},
        "route_config_name": HTTP_PROXY_ROUTE,
    }
    assert _route_config(resources)["name"] == "http_proxy"


def test_service_domains_route_to_their_outbound_cluster() -> None:
    domains = _cluster_by_domain(_sleep())
    for host in ("httpbin.foo.svc.cluster.local", "httpbin.foo.svc", "httpbin.foo", "httpbin"):
        assert domains[host] == HTTPBIN_FOO, host
        assert domains[f"{host}:8000"] == HTTPBIN_FOO, host
    for host in ("httpbin.bar.svc.cluster.local", "httpbin.bar.svc", "httpbin.bar"):
        assert domains[host] == domains[f"{host}:8000"] == HTTPBIN_BAR, host
    # The short name is foo's own service only (a DNS search path in namespace foo).
    assert "httpbin.legacy" in domains and domains["httpbin"] == HTTPBIN_FOO
    # TCP services are not reachable by Host.
    assert not any(d.startswith("tcp-echo") for d in domains)
    assert domains["*"] == DYNAMIC_FORWARD_PROXY_CLUSTER


def test_allow_any_resolves_unknown_hosts_with_a_dynamic_forward_proxy() -> None:
    resources = _sleep()
    default = _route_config(resources)["virtual_hosts"][-1]
    assert default["name"] == "allow_any" and default["domains"] == ["*"]
    filters = [f["name"] for f in _manager(resources)["http_filters"]]
    assert filters == ["envoy.filters.http.dynamic_forward_proxy", "envoy.filters.http.router"]
    clusters = {c["name"]: c for c in resources.clusters}
    dfp = clusters[DYNAMIC_FORWARD_PROXY_CLUSTER]
    assert dfp["cluster_type"]["name"] == "envoy.clusters.dynamic_forward_proxy"
    filter_cache = _manager(resources)["http_filters"][0]["typed_config"]["dns_cache_config"]
    assert dfp["cluster_type"]["typed_config"]["dns_cache_config"] == filter_cache


def test_registry_only_answers_unknown_hosts_with_502_and_has_no_forward_proxy() -> None:
    resources = _sleep("17a-registry-only")
    default = _route_config(resources)["virtual_hosts"][-1]
    assert default["name"] == "block_all"
    assert default["routes"][0]["direct_response"] == {"status": 502}
    assert [f["name"] for f in _manager(resources)["http_filters"]] == ["envoy.filters.http.router"]
    assert DYNAMIC_FORWARD_PROXY_CLUSTER not in {c["name"] for c in resources.clusters}


def test_service_entry_http_hosts_are_routed_and_https_ones_are_not() -> None:
    domains = _cluster_by_domain(_sleep("17b-registry-only-service-entry"))
    assert domains["httpbin.org"] == domains["httpbin.org:80"] == "outbound|80||httpbin.org"
    assert not any(d.startswith("www.google.com") for d in domains)
    assert domains["*"] == "direct_response"


def test_a_bare_host_means_port_80_when_the_service_has_it() -> None:
    service = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: bar}
spec:
  selector: {app: web}
  ports:
  - {name: http-alt, port: 8080}
  - {name: http, port: 80}
  - {name: tcp-db, port: 5432}
"""
    resources = translate(
        compile_text(service), "foo/sleep", inbound_address="10.0.0.1", outbound_address=OUT
    )
    domains = _cluster_by_domain(resources)
    assert domains["web.bar"] == domains["web.bar:80"] == "outbound|80||web.bar.svc.cluster.local"
    assert domains["web.bar:8080"] == "outbound|8080||web.bar.svc.cluster.local"
    assert "web" not in domains  # another namespace: no short name
    assert _listeners(resources)["outbound_tcp_5432"]  # its TCP port gets a listener


def test_a_tcp_listener_per_tcp_service_port() -> None:
    listeners = _listeners(_sleep())
    assert sorted(listeners) == [
        OUTBOUND_HTTP_LISTENER,
        "outbound_tcp_9000",
        "outbound_tcp_9001",
        "outbound_tcp_9002",
        "outbound_tls_443",
    ]
    for port in (9000, 9001, 9002):
        listener = listeners[f"outbound_tcp_{port}"]
        assert listener["address"]["socket_address"] == {"address": OUT, "port_value": port}
        (tcp,) = listener["filter_chains"][0]["filters"]
        assert tcp["name"] == "envoy.filters.network.tcp_proxy"
        assert tcp["typed_config"]["cluster"] == f"outbound|{port}||tcp-echo.foo.svc.cluster.local"


def test_a_tcp_port_two_services_share_goes_to_the_clients_namespace() -> None:
    service = """
apiVersion: v1
kind: Service
metadata: {name: aaa-echo, namespace: bar}
spec:
  selector: {app: aaa-echo}
  ports: [{name: tcp, port: 9000}, {name: tcp-proxy-port, port: 15001}]
"""
    mesh = compile_text(service)

    def cluster(workload: str) -> str:
        resources = translate(
            mesh, workload, inbound_address="10.0.0.1", outbound_address="10.0.0.2"
        )
        listeners = _listeners(resources)
        assert listeners[OUTBOUND_HTTP_LISTENER]["address"]["socket_address"]["port_value"] == (
            OUTBOUND_HTTP_PORT
        )  # a Service port 15001 does not take the proxy's port
        tcp = listeners["outbound_tcp_9000"]["filter_chains"][0]["filters"][0]
        return str(tcp["typed_config"]["cluster"])

    assert cluster("foo/sleep") == "outbound|9000||tcp-echo.foo.svc.cluster.local"
    assert cluster("bar/sleep") == "outbound|9000||aaa-echo.bar.svc.cluster.local"


def test_tls_egress_is_routed_by_sni_and_unknown_names_blackholed_under_registry_only() -> None:
    entry = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: google, namespace: default}
spec:
  hosts: [www.google.com]
  ports: [{number: 443, name: https, protocol: HTTPS}, {number: 8443, name: tls, protocol: TLS}]
  resolution: DNS
"""
    mesh = "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n"
    resources = translate(
        compile_text(entry, mesh=mesh),
        "foo/sleep",
        inbound_address="10.0.0.1",
        outbound_address=OUT,
    )
    listeners = _listeners(resources)
    for port in (443, 8443):
        listener = listeners[f"outbound_tls_{port}"]
        assert listener["listener_filters"][0]["name"] == "envoy.filters.listener.tls_inspector"
        (chain,) = listener["filter_chains"]
        assert chain["filter_chain_match"] == {"server_names": ["www.google.com"]}
        assert chain["filters"][-1]["typed_config"]["cluster"] == f"outbound|{port}||www.google.com"
        default = listener["default_filter_chain"]["filters"]
        assert [f["typed_config"]["cluster"] for f in default] == ["BlackHoleCluster"]


def test_tls_egress_under_allow_any_forwards_by_sni() -> None:
    listener = _listeners(_sleep())["outbound_tls_443"]
    assert listener["filter_chains"] == []  # no ServiceEntry
    names = [f["name"] for f in listener["default_filter_chain"]["filters"]]
    assert names == [
        "envoy.filters.network.sni_dynamic_forward_proxy",
        "envoy.filters.network.tcp_proxy",
    ]


def test_outbound_address_is_checked() -> None:
    mesh = _mesh()
    with pytest.raises(ValueError, match="IP address"):
        translate(mesh, "foo/sleep", inbound_address="10.0.0.1", outbound_address="localhost")
    # tcp-echo serves 9000-9002 inbound: the same ports outbound on one address collide.
    with pytest.raises(ValueError, match=r"\[9000, 9001, 9002\]"):
        translate(mesh, "foo/tcp-echo", inbound_address="10.0.0.1", outbound_address="10.0.0.1")
    # httpbin's inbound 8000 does not collide with 15001 and 9000-9002.
    same = translate(mesh, "foo/httpbin", inbound_address="10.0.0.1", outbound_address="10.0.0.1")
    assert [x["name"] for x in same.listeners][-1] == "virtualInbound"


# ---------------------------------------------------------------------------- 2. validate


@pytest.mark.envoy
@pytest.mark.parametrize(
    "scenarios",
    [(), ("17a-registry-only",), ("17b-registry-only-service-entry",), ("12-mesh-strict",)],
    ids=lambda s: "+".join(s) or "base",
)
def test_envoy_accepts_the_outbound_listeners(scenarios: tuple[str, ...], tmp_path: Path) -> None:
    resources = _sleep(*scenarios, outbound="127.0.0.3")
    snapshot = Snapshot.from_resources(resources.all())
    assert snapshot.consistency_errors() == []
    assert snapshot.encoding_errors() == []
    bootstrap = static_bootstrap(resources, node_id="validate", sds_socket=str(tmp_path / "s"))
    run(validate_bootstrap(bootstrap, workdir=tmp_path), timeout=60)


# ---------------------------------------------------------------------------- 3. live


def _client_patch(resources: ProxyResources, server: str) -> Any:
    """The client's translation, with the server's address in place of the placeholder
    endpoint of ``httpbin.foo`` (what the runtime fills in)."""
    base = _bootstrap_patch(resources)

    def patch(bootstrap: dict[str, Any]) -> None:
        base(bootstrap)
        for cluster in bootstrap["static_resources"]["clusters"]:
            if cluster["name"] == HTTPBIN_FOO:
                for group in cluster["load_assignment"]["endpoints"]:
                    for endpoint in group["lb_endpoints"]:
                        endpoint["endpoint"]["address"]["socket_address"]["address"] = server

    return patch


@pytest.mark.envoy
def test_live_http_proxy_reaches_a_strict_server_over_mesh_mtls(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars
) -> None:
    """``HTTP_PROXY=http://<outbound>:15001``: absolute-form requests through a client
    sidecar reach the server's app over mTLS (STRICT, the caller's SPIFFE ID arrives);
    unknown hosts go through the dynamic forward proxy (ALLOW_ANY) or get 502
    (REGISTRY_ONLY)."""
    allow_any = _mesh("12-mesh-strict")
    registry_only = _mesh("12-mesh-strict", "17a-registry-only")
    inbound, app = loopback.address(), loopback.address()
    open_out, closed_out = loopback.address(), loopback.address()
    server = translate(allow_any, "foo/httpbin", inbound_address=inbound, app_address=app)
    clients = [
        translate(mesh, "foo/sleep", inbound_address=loopback.address(), outbound_address=out)
        for mesh, out in ((allow_any, open_out), (registry_only, closed_out))
    ]

    async def scenario() -> None:
        async with (
            _app(app, 8000),
            sidecars.run("httpbin", ca.issue("foo", "httpbin"), patch=_bootstrap_patch(server)),
            sidecars.run(
                "open", ca.issue("foo", "sleep"), patch=_client_patch(clients[0], inbound)
            ),
            sidecars.run(
                "closed", ca.issue("foo", "sleep"), patch=_client_patch(clients[1], inbound)
            ),
        ):
            for out in (open_out, closed_out):
                reply = await _request(
                    out, 15001, "GET", "http://httpbin.foo:8000/get", authority="httpbin.foo:8000"
                )
                assert reply.status == 200, reply
                seen = json.loads(reply.body)
                assert seen["path"] == "/get"  # the absolute URL became an origin-form path
                assert f"URI={SLEEP_ID}" in seen["xfcc"]  # mesh mTLS: the server saw sleep

            # ALLOW_ANY: a host the registry does not know, resolved by the proxy itself
            # (here the app's own address: reached directly, without mTLS).
            direct = await _request(
                open_out, 15001, "GET", f"http://{app}:8000/direct", authority=f"{app}:8000"
            )
            assert direct.status == 200, direct
            assert json.loads(direct.body) == {"method": "GET", "path": "/direct", "xfcc": None}

            blocked = await _request(
                closed_out, 15001, "GET", "http://edition.cnn.com/", authority="edition.cnn.com"
            )
            assert blocked.status == 502, blocked
            blocked = await _request(
                closed_out, 15001, "GET", f"http://{app}:8000/direct", authority=f"{app}:8000"
            )
            assert blocked.status == 502, blocked

    run(scenario(), timeout=40)
