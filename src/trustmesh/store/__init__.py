"""Where the mesh's configuration, workload registry and CA records live: a directory of
YAML (the embedded default) or etcd v3 (replicas, hosts). See ``base.ResourceStore``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trustmesh.store.base import ResourceStore
from trustmesh.store.model import StoreError

if TYPE_CHECKING:
    from trustmesh.store.etcd_client import EtcdTls

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


def open_store(url: str, tls: EtcdTls | None = None) -> ResourceStore:
    """``https://H:P[,H:P...]`` (with ``tls``), ``etcd://H:P[,H:P...]`` or ``file:DIR``."""
    if url.startswith(("etcd://", "https://")):
        from trustmesh.store.etcd_client import connect
        from trustmesh.store.etcd_store import EtcdResourceStore

        return EtcdResourceStore(connect(url, tls))
    if url.startswith("file:"):
        from trustmesh.store.file_store import FileResourceStore

        directory = url.removeprefix("file:").removeprefix("//")
        if not directory:
            raise StoreError("--store file:DIR needs a directory")
        return FileResourceStore(Path(directory))
    raise StoreError(
        f"--store {url}: expected https://HOST:PORT[,...], etcd://HOST:PORT[,...] or file:DIR"
    )
