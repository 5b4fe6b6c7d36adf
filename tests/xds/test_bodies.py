"""The ADS server's cache of encoded responses keeps only what a second stream asks for."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from trustmesh.xds.cache import TYPE_CLUSTER, Snapshot
from trustmesh.xds.server import _Bodies


def _snapshot(name: str) -> Snapshot:
    cluster = {
        "@type": TYPE_CLUSTER,
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
    }
    return Snapshot({TYPE_CLUSTER: {name: cluster}})


def test_a_response_is_kept_from_its_second_use_on() -> None:
    bodies = _Bodies()
    shared, own = _snapshot("shared"), _snapshot("own")
    digests = shared.digests(TYPE_CLUSTER)
    version, first = bodies.encoded(TYPE_CLUSTER, digests, shared)
    assert bodies._bytes == 0  # asked for once: not kept
    again_version, second = bodies.encoded(TYPE_CLUSTER, digests, shared)
    assert (again_version, second) == (version, first)
    assert bodies._bytes == len(first)  # a second stream asked: kept
    third = bodies.encoded(TYPE_CLUSTER, digests, shared)[1]
    assert third is second  # served from the cache, not encoded again
    bodies.encoded(TYPE_CLUSTER, own.digests(TYPE_CLUSTER), own)
    assert bodies._bytes == len(first)  # one proxy's own content stays out
    response = discovery_pb2.DiscoveryResponse.FromString(first)
    assert response.version_info == version and len(response.resources) == 1


def test_a_subscription_to_every_resource_of_a_type_shares_the_snapshot_mapping() -> None:
    from trustmesh.xds.cache import TYPE_ENDPOINT
    from trustmesh.xds.server import _selection, _Watch

    def endpoints(name: str) -> dict[str, object]:
        return {"@type": TYPE_ENDPOINT, "cluster_name": name, "endpoints": []}

    snapshot = Snapshot({TYPE_ENDPOINT: {n: endpoints(n) for n in ("a", "b")}})
    every = _selection(TYPE_ENDPOINT, _Watch(names=frozenset({"a", "b", "gone"})), snapshot)
    assert every is snapshot.digests(TYPE_ENDPOINT)  # shared, not a copy per stream
    some = _selection(TYPE_ENDPOINT, _Watch(names=frozenset({"b", "gone"})), snapshot)
    assert dict(some) == {"b": snapshot.digests(TYPE_ENDPOINT)["b"]}
    assert dict(every) == {n: snapshot.digests(TYPE_ENDPOINT)[n] for n in ("a", "b")}
