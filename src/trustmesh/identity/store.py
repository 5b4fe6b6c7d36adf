"""CA state on disk: keys 0600 in a 0700 directory, append-only logs, atomic writes.

Layout::

    DIR/state.json                 trust domain, TTLs, slots and their states
    DIR/token-key.pem              Ed25519 key that signs bootstrap tokens (0600)
    DIR/slots/<id>/ca-key.pem      signing key (0600)
    DIR/slots/<id>/ca-cert.pem     signing certificate
    DIR/slots/<id>/cert-chain.pem  signing certificate … up to (excluding) the root
    DIR/slots/<id>/root-cert.pem   trust anchor
    DIR/issued.jsonl, used-tokens.jsonl, revoked.jsonl   append-only records
"""

from __future__ import annotations

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

    # --- layout -------------------------------------------------------------------------

    def slot_dir(self, slot_id: str) -> Path:
        return self.root / "slots" / slot_id

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

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

    def records(self, name: str) -> Iterator[dict[str, Any]]:
        path = self.root / name
        if not path.exists():
            return
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                line = line.strip()
                if line:
                    yield json.loads(line)
