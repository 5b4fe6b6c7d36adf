"""The embedded store: a directory of YAML that ``trustmesh up DIR`` reads as it is.

Each object this store writes is one file, ``DIR/<namespace>/<kind>-<name>.yaml``
(``_cluster`` for cluster-scoped objects), whose ``metadata.resourceVersion`` is the
store's revision at the write, kept in ``DIR/.trustmesh-revision``. Writers take an
exclusive ``flock`` on ``DIR/.trustmesh-lock``, check every expected version, then move
each file into place (written to a temporary name first): concurrent writers never lose
each other's changes. A crash between two renames of one commit leaves some files of it
written; there is no transaction log (that is what the etcd store is for).

Objects in other files of DIR (written by hand) are read too, but not rewritten: a write
to one is refused, naming its file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from trustmesh.store.model import (
    Conflict,
    EventBatch,
    ResourceDelete,
    ResourceEvent,
    ResourceKey,
    ResourceWrite,
    StoredResource,
    StoreError,
)

SUFFIXES = (".yaml", ".yml", ".json")


def _group(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


class FileResourceStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def describe(self) -> str:
        return f"file:{self.directory}"

    async def close(self) -> None:
        return None

    def path_of(self, key: ResourceKey) -> Path:
        return (
            self.directory / (key.namespace or "_cluster") / f"{key.kind.lower()}-{key.name}.yaml"
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".trustmesh-lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _revision(self) -> int:
        try:
            return int((self.directory / ".trustmesh-revision").read_text() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            raise StoreError(f"{self.directory}/.trustmesh-revision is corrupt") from None

    def _read_all(self) -> dict[ResourceKey, tuple[StoredResource, Path]]:
        found: dict[ResourceKey, tuple[StoredResource, Path]] = {}
        if not self.directory.is_dir():
            return found
        files = sorted(p for p in self.directory.rglob("*") if p.suffix in SUFFIXES)
        for path in files:
            try:
                documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise StoreError(f"{path}: unreadable: {exc}") from None
            for body in documents:
                if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
                    continue
                for item in body.get("items", [body]) if body.get("kind") == "List" else [body]:
                    try:
                        stored = _stored(item)
                    except StoreError as exc:
                        raise StoreError(f"{path}: {exc}") from None
                    if stored is not None:
                        found[stored.key] = (stored, path)
        return found

    async def get(self, key: ResourceKey) -> StoredResource | None:
        entry = self._read_all().get(key)
        return None if entry is None else entry[0]

    async def list(
        self, kind: str | None = None, namespace: str | None = None
    ) -> tuple[list[StoredResource], int]:
        with self._locked():
            everything = self._read_all()
            revision = self._revision()
        found = [
            stored
            for key, (stored, _) in sorted(everything.items())
            if (kind is None or key.kind == kind)
            and (namespace is None or key.namespace == namespace)
        ]
        return found, revision

    async def commit(
        self, writes: Sequence[ResourceWrite], deletes: Sequence[ResourceDelete] = ()
    ) -> int:
        changes: list[ResourceWrite | ResourceDelete] = [*writes, *deletes]
        with self._locked():
            everything = self._read_all()
            for change in changes:
                entry = everything.get(change.key)
                found = 0 if entry is None else entry[0].resource_version
                if found != change.expected_version:
                    raise Conflict(change.key, change.expected_version, found)
                if entry is not None and entry[1] != self.path_of(change.key):
                    raise StoreError(
                        f"{change.key.display()} is defined in {entry[1]}, a file this store "
                        "did not write: change it there"
                    )
            revision = self._revision() + 1
            staged: list[tuple[Path, Path]] = []
            for write in writes:
                body = json.loads(write.manifest)
                body.setdefault("metadata", {})["resourceVersion"] = str(revision)
                target = self.path_of(write.key)
                target.parent.mkdir(parents=True, exist_ok=True)
                temporary = target.with_name(f".{target.name}.tmp")
                temporary.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
                staged.append((temporary, target))
            counter = self.directory / ".trustmesh-revision.tmp"
            counter.write_text(str(revision))
            os.replace(counter, self.directory / ".trustmesh-revision")
            for temporary, target in staged:
                os.replace(temporary, target)
            for delete in deletes:
                self.path_of(delete.key).unlink()
            return revision

    async def watch(self, from_revision: int) -> AsyncIterator[ResourceEvent]:
        # The embedded control plane already follows the directory's files itself.
        raise StoreError("the file store has no watch; `trustmesh up DIR` follows the files")
        yield  # pragma: no cover  (makes this an async generator)

    async def watch_batches(self, from_revision: int) -> AsyncIterator[EventBatch]:
        raise StoreError("the file store has no watch; `trustmesh up DIR` follows the files")
        yield []  # pragma: no cover  (makes this an async generator)


def _stored(body: dict[str, Any]) -> StoredResource | None:
    metadata = body.get("metadata")
    kind, api_version = body.get("kind"), body.get("apiVersion", "")
    if not isinstance(metadata, dict) or not isinstance(kind, str) or not metadata.get("name"):
        return None
    version = metadata.get("resourceVersion", 0)
    try:
        resource_version = int(version)
    except (TypeError, ValueError):
        resource_version = 0
    key = ResourceKey(
        _group(str(api_version)), kind, str(metadata.get("namespace", "")), str(metadata["name"])
    )
    clean = json.loads(json.dumps(body, default=str))
    clean["metadata"].pop("resourceVersion", None)
    return StoredResource(key, json.dumps(clean, sort_keys=True), resource_version)
