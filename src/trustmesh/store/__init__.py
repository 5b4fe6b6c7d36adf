"""Where the mesh's configuration, workload registry and CA records live: a directory of
YAML (the embedded default) or etcd v3 (replicas, hosts). See ``base.ResourceStore``."""

from __future__ import annotations

from pathlib import Path

from trustmesh.store.base import ResourceStore
from trustmesh.store.model import StoreError

__all__ = ["ResourceStore", "StoreError", "open_store", "parse_etcd_endpoints"]


def parse_etcd_endpoints(text: str) -> list[tuple[str, int]]:
    """``H:P[,H:P...]`` (after ``etcd://``) as (host, port) pairs; StoreError if malformed."""
    endpoints: list[tuple[str, int]] = []
    for part in text.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreError(f"--store etcd://{text}: {part!r} is not HOST:PORT")
        endpoints.append((host.strip("[]"), int(port)))
    return endpoints


def open_store(url: str) -> ResourceStore:
    """``etcd://H:P[,H:P...]`` or ``file:DIR``."""
    if url.startswith("etcd://"):
        from trustmesh.store.etcd_client import EtcdClient
        from trustmesh.store.etcd_store import EtcdResourceStore

        return EtcdResourceStore(EtcdClient(parse_etcd_endpoints(url.removeprefix("etcd://"))))
    if url.startswith("file:"):
        from trustmesh.store.file_store import FileResourceStore

        directory = url.removeprefix("file:").removeprefix("//")
        if not directory:
            raise StoreError("--store file:DIR needs a directory")
        return FileResourceStore(Path(directory))
    raise StoreError(f"--store {url}: expected etcd://HOST:PORT[,HOST:PORT...] or file:DIR")
