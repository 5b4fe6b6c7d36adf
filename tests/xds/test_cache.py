"""Snapshots and the snapshot cache: content versions, consistency, latest-value waiting."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from trustmesh.xds.cache import (
    EMPTY_VERSION,
    TYPE_CLUSTER,
    TYPE_ECDS,
    TYPE_ENDPOINT,
    TYPE_LISTENER,
    TYPE_ROUTE,
    TYPE_SECRET,
    Nack,
    Snapshot,
    SnapshotCache,
)

T = TypeVar("T")
NODE = "sidecar~127.0.0.1~web.shop~shop.svc.cluster.local"
HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
JWT = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
ADS = {"ads": {}, "resource_api_version": "V3"}


def run(coro: Coroutine[Any, Any, T], timeout: float = 5) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def listener(name: str, *, route: str = "web", filter_name: str | None = None) -> dict[str, Any]:
    """A listener whose routes come over RDS and, optionally, one filter over ECDS."""
    filters: list[dict[str, Any]] = []
    if filter_name is not None:
        filters.append(
            {"name": filter_name, "config_discovery": {"config_source": ADS, "type_urls": [RBAC]}}
        )
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}})
    manager = {
        "@type": HCM,
        "stat_prefix": name,
        "rds": {"config_source": ADS, "route_config_name": route},
        "http_filters": filters,
    }
    return {
        "@type": TYPE_LISTENER,
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15006}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }


def route(name: str = "web", body: str = "hello") -> dict[str, Any]:
    return {
        "@type": TYPE_ROUTE,
        "name": name,
        "virtual_hosts": [
            {
                "name": "all",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": body}},
                    }
                ],
            }
        ],
    }


def rbac_filter(name: str = "authz", action: str = "ALLOW") -> dict[str, Any]:
    policy = {"permissions": [{"any": True}], "principals": [{"any": True}]}
    return {
        "@type": TYPE_ECDS,
        "name": name,
        "typed_config": {"@type": RBAC, "rules": {"action": action, "policies": {"all": policy}}},
    }


def web(body: str = "hello", action: str = "ALLOW") -> Snapshot:
    return Snapshot.from_resources(
        [listener("inbound", filter_name="authz"), route(body=body), rbac_filter(action=action)]
    )


# ---------------------------------------------------------------------------- versions


def test_versions_are_content_hashes() -> None:
    first = web()
    # Same content built separately, keys in another order: the same snapshot.
    reordered = Snapshot(
        {
            TYPE_ROUTE: {"web": dict(reversed(list(route().items())))},
            TYPE_ECDS: {"authz": rbac_filter()},
            TYPE_LISTENER: {"inbound": listener("inbound", filter_name="authz")},
        }
    )
    assert reordered == first and hash(reordered) == hash(first)
    assert reordered.version == first.version and reordered.versions == first.versions

    changed = web(body="changed")
    assert changed != first
    assert changed.version_of(TYPE_ROUTE) != first.version_of(TYPE_ROUTE)
    # Only the type that changed has a new version: the other types need no push.
    for type_url in (TYPE_LISTENER, TYPE_ECDS, TYPE_CLUSTER):
        assert changed.version_of(type_url) == first.version_of(type_url)
    assert first.version_of(TYPE_CLUSTER) == EMPTY_VERSION
    # An empty type is the same content as an absent one.
    assert Snapshot({TYPE_CLUSTER: {}}) == Snapshot({})
    assert set(first.versions) >= {TYPE_LISTENER, TYPE_CLUSTER, TYPE_ROUTE, TYPE_SECRET, TYPE_ECDS}


def test_version_of_a_named_subset() -> None:
    snapshot = Snapshot.from_resources([route("a"), route("b")])
    assert snapshot.version_of(TYPE_ROUTE, ["a", "b"]) == snapshot.version_of(TYPE_ROUTE)
    assert snapshot.version_of(TYPE_ROUTE, ["a", "missing"]) == snapshot.version_of(
        TYPE_ROUTE, ["a"]
    )
    assert snapshot.version_of(TYPE_ROUTE, ["a"]) != snapshot.version_of(TYPE_ROUTE, ["b"])


def test_snapshot_copies_its_input() -> None:
    resource = route(body="before")
    snapshot = Snapshot.from_resources([resource])
    resource["virtual_hosts"][0]["routes"][0]["direct_response"]["body"]["inline_string"] = "x"
    assert snapshot == Snapshot.from_resources([route(body="before")])
    with pytest.raises(TypeError):
        snapshot.resources[TYPE_ROUTE]["other"] = route("other")  # type: ignore[index]
    # What a snapshot hands out can build the next one.
    assert Snapshot(snapshot.resources) == snapshot
    assert Snapshot({**snapshot.resources, TYPE_ECDS: {"authz": rbac_filter()}}) != snapshot


def test_from_resources_rejects_duplicates_and_unnamed() -> None:
    with pytest.raises(ValueError, match="two RouteConfiguration resources named 'web'"):
        Snapshot.from_resources([route(), route()])
    with pytest.raises(ValueError, match="without @type or name"):
        Snapshot.from_resources([{"@type": TYPE_ROUTE}])


# ---------------------------------------------------------------------------- consistency


def test_consistency_refuses_missing_references() -> None:
    dangling = Snapshot.from_resources([listener("inbound", route="nowhere", filter_name="gone")])
    errors = dangling.consistency_errors()
    assert errors == [
        "Listener 'inbound': filter_chains[0].filters[0].typed_config.http_filters[0].name"
        " refers to TypedExtensionConfig 'gone', which is not in the snapshot",
        "Listener 'inbound': filter_chains[0].filters[0].typed_config.rds.route_config_name"
        " refers to RouteConfiguration 'nowhere', which is not in the snapshot",
    ]
    cache = SnapshotCache()
    cache.set(NODE, web())
    with pytest.raises(ValueError, match="'nowhere', which is not in the snapshot"):
        cache.set(NODE, dangling)
    assert cache.get(NODE) == web()  # the last good snapshot stays published


def test_consistency_checks_names_types_eds_and_ads_secrets() -> None:
    cluster = {
        "@type": TYPE_CLUSTER,
        "name": "outbound|80||cart",
        "type": "EDS",
        "eds_cluster_config": {"eds_config": ADS},
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {
                    # over ADS: must be in the snapshot
                    "tls_certificate_sds_secret_configs": [{"name": "cert", "sds_config": ADS}],
                    # from the agent's own SDS socket: not this snapshot's business
                    "validation_context_sds_secret_config": {
                        "name": "ROOTCA",
                        "sds_config": {"api_config_source": {"api_type": "GRPC"}},
                    },
                },
            },
        },
    }
    snapshot = Snapshot(
        {TYPE_CLUSTER: {"outbound|80||cart": cluster}, TYPE_ROUTE: {"misfiled": route("web")}}
    )
    assert snapshot.consistency_errors() == [
        "Cluster 'outbound|80||cart': eds_cluster_config.service_name refers to"
        " ClusterLoadAssignment 'outbound|80||cart', which is not in the snapshot",
        "Cluster 'outbound|80||cart': transport_socket.typed_config.common_tls_context"
        ".tls_certificate_sds_secret_configs[0].name refers to Secret 'cert',"
        " which is not in the snapshot",
        "RouteConfiguration 'misfiled': name is 'web'",
    ]
    complete = Snapshot.from_resources(
        [
            cluster,
            {"@type": TYPE_ENDPOINT, "cluster_name": "outbound|80||cart", "endpoints": []},
            {"@type": TYPE_SECRET, "name": "cert"},
        ]
    )
    assert complete.consistency_errors() == []
    wrong_type = Snapshot({TYPE_LISTENER: {"web": route("web")}})
    assert wrong_type.consistency_errors() == [
        f"Listener 'web': @type is {TYPE_ROUTE!r}, not {TYPE_LISTENER}"
    ]


def test_unencodable_resource_is_refused() -> None:
    bad = route()
    bad["virtual_hosts"][0]["no_such_field"] = 1
    cache = SnapshotCache()
    with pytest.raises(ValueError, match='no field named "no_such_field"'):
        cache.set(NODE, Snapshot.from_resources([bad]))
    assert cache.get(NODE) is None


_LAZY_IMPORT = f"""
import sys
from trustmesh.xds.cache import TYPE_ECDS, Snapshot
module = "envoy.extensions.filters.http.jwt_authn.v3.config_pb2"
assert module not in sys.modules
jwt = {{
    "@type": TYPE_ECDS,
    "name": "jwt",
    "typed_config": {{"@type": "{JWT}", "providers": {{"p": {{"issuer": "https://i"}}}}}},
}}
snapshot = Snapshot.from_resources([jwt])
assert snapshot.encoding_errors() == [], snapshot.encoding_errors()
assert module in sys.modules
print("ok")
"""


def test_types_not_imported_up_front_are_loaded_on_first_use() -> None:
    # A fresh interpreter: in this one another test may have imported jwt_authn already.
    result = subprocess.run(
        [sys.executable, "-c", _LAZY_IMPORT], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_packed_resources_are_reused_across_snapshots() -> None:
    first, second = web(body="one"), web(body="two")
    assert first.encoding_errors() == [] and second.encoding_errors() == []
    # Unchanged resources are not encoded again; the changed one is.
    assert second.packed(TYPE_LISTENER, "inbound") is first.packed(TYPE_LISTENER, "inbound")
    assert second.packed(TYPE_ECDS, "authz") is first.packed(TYPE_ECDS, "authz")
    assert second.packed(TYPE_ROUTE, "web") is not first.packed(TYPE_ROUTE, "web")


# ---------------------------------------------------------------------------- cache


async def _settle() -> None:
    # Wake-ups travel through call_soon_threadsafe: a few loop turns deliver them.
    for _ in range(5):
        await asyncio.sleep(0)


def test_unchanged_set_wakes_nobody() -> None:
    async def scenario() -> None:
        cache = SnapshotCache()
        first = web()
        cache.set(NODE, first)
        waiter = asyncio.create_task(cache.wait_newer(NODE, first.versions))
        await _settle()
        cache.set(NODE, web())  # equal content, a different object
        await _settle()
        assert not waiter.done()
        assert cache.get(NODE) is first
        cache.set(NODE, web(body="new"))
        assert await waiter == web(body="new")

    run(scenario())


def test_listeners_hear_each_different_snapshot_of_their_node_only_until_stopped() -> None:
    cache = SnapshotCache()
    heard: list[str] = []
    stop = cache.listen(NODE, lambda: heard.append("a"))
    cache.listen("other", lambda: heard.append("other"))
    cache.set(NODE, web())
    cache.set(NODE, web())  # equal content: nothing to hear
    cache.record_ack(NODE, "type", "1")  # an ACK is not a snapshot
    assert heard == ["a"]
    cache.set(NODE, web(body="new"))
    assert heard == ["a", "a"]
    stop()
    stop()  # twice is harmless
    cache.set(NODE, web(body="newer"))
    assert heard == ["a", "a"]


def test_first_wait_returns_any_snapshot_even_empty() -> None:
    async def scenario() -> None:
        cache = SnapshotCache()
        waiter = asyncio.create_task(cache.wait_newer(NODE, {}))
        await _settle()
        assert not waiter.done()
        cache.set(NODE, Snapshot({}))  # "no listeners" is an answer Envoy waits for
        assert await waiter == Snapshot({})

    run(scenario())


def test_latest_value_a_waiter_sees_the_newest() -> None:
    async def scenario() -> None:
        cache = SnapshotCache()
        waiter = asyncio.create_task(cache.wait_newer(NODE, {}))
        await _settle()
        cache.set(NODE, web(body="one"))
        cache.set(NODE, web(body="two"))  # before the waiter ran: "one" is skipped
        assert await waiter == web(body="two")
        # Other nodes are independent.
        assert cache.get("other") is None and cache.node_ids == {NODE}

    run(scenario())


def test_set_from_another_thread_wakes_the_loop() -> None:
    async def scenario() -> None:
        cache = SnapshotCache()
        cache.set(NODE, web(body="one"))
        waiter = asyncio.create_task(cache.wait_newer(NODE, web(body="one").versions))
        await _settle()
        loop_thread = threading.get_ident()
        setter_threads: list[int] = []

        def writer() -> None:
            setter_threads.append(threading.get_ident())
            for index in range(50):  # many sets; the waiter only needs the newest
                cache.set(NODE, web(body=f"from thread {index}"))

        thread = threading.Thread(target=writer)
        thread.start()
        snapshot = await waiter
        await asyncio.to_thread(thread.join, 5)
        assert setter_threads and setter_threads[0] != loop_thread
        body = snapshot.get(TYPE_ROUTE)["web"]["virtual_hosts"][0]["routes"][0]
        assert body["direct_response"]["body"]["inline_string"].startswith("from thread")
        newest = await cache.wait_newer(NODE, web(body="from thread 48").versions)
        assert newest == web(body="from thread 49")

    run(scenario())


def test_acks_and_nacks_are_recorded_per_node() -> None:
    async def scenario() -> None:
        cache = SnapshotCache()
        acked = asyncio.create_task(cache.wait_acked(NODE, TYPE_LISTENER, "v2"))
        nacked = asyncio.create_task(cache.wait_nacked(NODE, TYPE_LISTENER))
        cache.record_ack(NODE, TYPE_LISTENER, "v1")
        nack = Nack(TYPE_LISTENER, "v2", "v1", "bad regex", 3)
        cache.record_nack(NODE, nack)
        assert await nacked == nack
        assert cache.nacks == {NODE: nack}
        assert not acked.done()
        cache.record_ack(NODE, TYPE_ROUTE, "r1")  # another type: the NACK stays
        assert cache.nacks == {NODE: nack}
        cache.record_ack(NODE, TYPE_LISTENER, "v2")
        await acked
        assert cache.nacks == {}
        assert cache.acked(NODE) == {TYPE_LISTENER: "v2", TYPE_ROUTE: "r1"}
        cache.clear(NODE)
        assert cache.acked(NODE) == {} and cache.get(NODE) is None

    run(scenario())


def test_a_shared_canonical_gives_the_same_snapshots_as_encoding_each_alone() -> None:
    from trustmesh.xds.cache import Canonical

    shared_cluster = {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "shared",
        "type": "STATIC",
    }
    canonical = Canonical()
    for own in ("a", "b"):
        mine = {**shared_cluster, "name": own}
        alone = Snapshot.from_resources([shared_cluster, mine])
        together = Snapshot.from_resources([shared_cluster, mine], canonical)
        assert together == alone and together.version == alone.version
    shared = Snapshot.from_resources([shared_cluster], canonical)
    shared_cluster["type"] = "EDS"  # only a fresh Canonical sees a changed dict
    assert Snapshot.from_resources([shared_cluster], Canonical()) != shared


def test_a_bounded_canonical_keeps_what_is_shared_and_drops_the_rest() -> None:
    from trustmesh.xds.cache import Canonical

    shared_cluster = {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "shared",
        "type": "STATIC",
    }
    canonical = Canonical(limit=3)
    first_copy = canonical.encode(shared_cluster)[0]
    for own in "abcdefgh":  # one proxy at a time: its own cluster, then the shared one
        mine = {**shared_cluster, "name": own}
        together = Snapshot.from_resources([shared_cluster, mine], canonical)
        assert together == Snapshot.from_resources([shared_cluster, mine])
        assert len(canonical._by_id) <= 3
    assert canonical.encode(shared_cluster)[0] is first_copy  # never evicted: used each time
