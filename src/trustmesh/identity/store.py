"""CA state on disk: keys 0600 in a 0700 directory, append-only logs, atomic writes.

Layout::

    DIR/state.json                 trust domain, TTLs, slots and their states
    DIR/token-key.pem              Ed25519 key that signs bootstrap tokens (0600)
    DIR/slots/<id>/ca-key.pem      signing key (0600)
    DIR/slots/<id>/ca-cert.pem     signing certificate
    DIR/slots/<id>/cert-chain.pem  signing certificate … up to (excluding) the root
    DIR/slots/<id>/root-cert.pem   trust anchor
    DIR/issued.jsonl, used-tokens.jsonl, revoked.jsonl   append-only records

Several CA processes may serve one directory (``ca serve --workers N``): every append is
one ``O_APPEND`` write of whole lines, a single-use token is burnt under an exclusive
``flock`` of ``used-tokens.jsonl`` (so of processes racing on one token exactly one wins),
and issued serials are made durable by group commit (:class:`DurableLog`).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class StoreError(Exception):
    pass


def _check_private(path: Path, rule: str) -> None:
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise StoreError(f"{path} is mode {mode:o}; {rule}")
    if info.st_uid not in (os.geteuid(), 0):  # root may own anything it could read anyway
        raise StoreError(
            f"{path} belongs to uid {info.st_uid}, not to the CA's user (uid {os.geteuid()})"
        )


class CaStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._burnt: dict[str, tuple[int, set[Any]]] = {}  # name → (bytes read, values)

    # --- layout -------------------------------------------------------------------------

    def slot_dir(self, slot_id: str) -> Path:
        return self.root / "slots" / slot_id

    @functools.cached_property
    def state_file(self) -> Path:
        return self.root / "state.json"  # stat()ed on every request: built once

    def exists(self) -> bool:
        return self.state_file.exists()

    def create(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        (self.root / "slots").mkdir(mode=0o700, exist_ok=True)

    def check_permissions(self) -> None:
        """Refuse a CA directory or key that others can read or that another user owns
        (like ssh does): whoever owns them can read the keys or put in their own."""
        slots = self.root / "slots"
        folders = [self.root, *(p for p in [slots, *slots.glob("*")] if p.is_dir())]
        for folder in folders:
            _check_private(folder, "it must be 0700")
        for key in [self.root / "token-key.pem", *slots.glob("*/ca-key.pem")]:
            _check_private(key, "CA keys must be 0600")

    # --- files --------------------------------------------------------------------------

    def write(self, path: Path, data: bytes, *, secret: bool = False) -> None:
        """Atomic write: a temp file (0600 for secrets) moved into place."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None

    def load_state(self) -> dict[str, Any]:
        try:
            value = json.loads(self.read(self.state_file))
        except ValueError as exc:
            raise StoreError(f"{self.state_file} is corrupt: {exc}") from None
        if not isinstance(value, dict):
            raise StoreError(f"{self.state_file} is corrupt")
        return value

    def save_state(self, state: dict[str, Any]) -> None:
        self.write(self.state_file, json.dumps(state, indent=2, sort_keys=True).encode())

    def append(self, name: str, record: dict[str, Any]) -> None:
        """One ``O_APPEND`` write of one line: another process reading never sees half."""
        line = json.dumps(record, sort_keys=True).encode() + b"\n"
        fd = os.open(self.root / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def burn_once(self, name: str, key: str, record: dict[str, Any]) -> bool:
        """Append ``record`` to ``name`` unless a record with the same ``key`` field is
        already there; True if this call appended it. Exclusive ``flock`` across processes,
        the line fsynced before the lock is released: exactly one caller of any number of
        processes racing on one value gets True, and its record survives a crash."""
        value = record[key]
        line = json.dumps(record, sort_keys=True).encode() + b"\n"
        fd = os.open(self.root / name, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seen = self._burnt.setdefault(name, (0, set()))
            offset, values = seen
            size = os.fstat(fd).st_size
            if size < offset:  # replaced or truncated by hand: read it all again
                offset, values = 0, set()
            if size > offset:
                data = os.pread(fd, size - offset, offset)
                complete = data[: data.rfind(b"\n") + 1]
                for raw in complete.splitlines():
                    if raw.strip():
                        try:
                            values.add(json.loads(raw).get(key))
                        except (ValueError, AttributeError):
                            raise StoreError(f"{self.root / name}: unreadable record") from None
                offset += len(complete)
            self._burnt[name] = (offset, values)
            if value in values:
                return False
            os.write(fd, line)
            os.fsync(fd)
            self._burnt[name] = (offset + len(line), values | {value})
            return True
        finally:
            os.close(fd)  # releases the lock

    def records(self, name: str) -> Iterator[dict[str, Any]]:
        path = self.root / name
        if not path.exists():
            return
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                line = line.strip()
                if line:
                    yield json.loads(line)


class DurableLog:
    """An append-only record file whose appends return once they are on disk.

    Group commit: :meth:`append` queues a line and waits; one flusher writes every queued
    line with a single ``O_APPEND`` write and one ``fdatasync`` (in a thread, so the event
    loop keeps serving), then wakes all of them. While one batch is being synced the next
    one gathers, so under load many records share an fsync, and when idle a record is
    synced at once (no timer, no added delay).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.syncs = 0  # batches made durable
        self.lines = 0  # lines made durable
        self._fd: int | None = None
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def _write(self, lines: list[bytes]) -> None:
        if self._fd is None:
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            if created:  # the new directory entry must survive a crash too
                folder = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(folder)
                finally:
                    os.close(folder)
        data = memoryview(b"".join(lines))
        while data:
            data = data[os.write(self._fd, data) :]
        os.fdatasync(self._fd)
        self.syncs += 1
        self.lines += len(lines)

    def append_now(self, line: bytes) -> None:
        """Write and sync one line before returning (callers outside an event loop)."""
        try:
            self._write([line])
        except OSError as exc:
            raise StoreError(f"cannot record in {self.path}: {exc.strerror}") from None

    async def append(self, line: bytes) -> None:
        """Return once ``line`` is durable (raises :class:`StoreError` if it cannot be)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((line, future))
        if self._flusher is None or self._flusher.done() or self._flusher.get_loop() is not loop:
            self._flusher = loop.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write, [line for line, _ in batch])
            except OSError as exc:
                error = StoreError(f"cannot record in {self.path}: {exc.strerror}")
                for _, future in batch:
                    if not future.done() and not future.get_loop().is_closed():
                        future.set_exception(error)
                continue
            for _, future in batch:
                if not future.done() and not future.get_loop().is_closed():
                    future.set_result(None)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
