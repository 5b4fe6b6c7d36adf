"""A real etcd per test module: started on loopback with free ports, data in tmp, stopped
by PID at teardown (also when a test fails)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from trustmesh.store.etcd_server import EtcdCluster


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def etcd3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd3"), size=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
