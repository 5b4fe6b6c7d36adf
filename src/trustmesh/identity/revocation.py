"""The CA's revocation record, as current as the file on disk at every check.

``revoked.jsonl`` is append-only and shared between processes: ``trustmesh ca revoke``
appends to it while ``ca serve`` (or the local mesh's control plane) answers renewals. A
revocation must apply to the very next request, so :meth:`RevocationList.current` costs
one ``stat`` per call and reads only the bytes appended since the last call — no polling
interval, no window. Appends are one ``write`` of one line with ``O_APPEND``; a reader
consumes complete lines only, so a line being written is read whole by the next call.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trustmesh.identity.store import StoreError

__all__ = ["RevocationList", "RevocationSource"]


class RevocationSource(Protocol):
    """Revoked serials as of now; raises :class:`StoreError` when they cannot be known (the
    CA then refuses every renewal). :class:`RevocationList` (a file) and
    ``trustmesh.store.ca_records.WatchedRevocations`` (an etcd watch) are two."""

    def current(self) -> frozenset[int]: ...


@dataclass(frozen=True, slots=True)
class _FileId:
    device: int
    inode: int


class RevocationList:
    """Serials whose certificates may no longer renew, re-read from ``path`` when it grows.

    A file that is replaced (another inode) or shrinks is read again from the start: the
    file is the truth, so an operator who edits it gets exactly what it now says. A line
    that is not a revocation record raises :class:`StoreError` naming ``file:line`` on
    every call until it is fixed — callers refuse renewals meanwhile (fail closed).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._serials: set[int] = set()
        self._file: _FileId | None = None
        self._offset = 0  # bytes consumed: always the end of a complete line
        self._lines = 0  # lines consumed, for error locations

    def current(self) -> frozenset[int]:
        """The revoked serials as the file holds them now."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            self._reset(None)
            return frozenset()
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc.strerror}") from None
        file_id = _FileId(info.st_dev, info.st_ino)
        if file_id != self._file or info.st_size < self._offset:
            self._reset(file_id)
        if info.st_size > self._offset:
            self._read_appended()
        return frozenset(self._serials)

    def add(self, serial: int) -> None:
        """Append ``serial`` (one write, so a concurrent reader never sees half a line)."""
        line = json.dumps({"serial": serial}, sort_keys=True).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.current()

    def _reset(self, file_id: _FileId | None) -> None:
        self._serials = set()
        self._file = file_id
        self._offset = 0
        self._lines = 0

    def _read_appended(self) -> None:
        try:
            with open(self.path, "rb") as record:
                record.seek(self._offset)
                data = record.read()
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc.strerror}") from None
        complete = data[: data.rfind(b"\n") + 1]
        for raw in complete.splitlines(keepends=True):
            serial = self._parse(raw, self._lines + 1)
            if serial is not None:
                self._serials.add(serial)
            self._offset += len(raw)
            self._lines += 1

    def _parse(self, raw: bytes, line: int) -> int | None:
        text = raw.strip()
        if not text:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        serial = record.get("serial") if isinstance(record, dict) else None
        if isinstance(serial, str):  # hex, as `ca inspect` prints serials
            try:
                serial = int(serial, 16)
            except ValueError:
                serial = None
        if not isinstance(serial, int) or isinstance(serial, bool) or serial <= 0:
            raise StoreError(
                f"{self.path}:{line}: not a revocation record (expected "
                '{"serial": <positive integer>})'
            )
        return serial
