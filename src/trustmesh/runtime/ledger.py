"""The ledger: what a sandboxed mesh created on this host, written down before it exists.

Every namespace, link, nftables table and file the sandbox makes is appended to
``<state>/ledger.jsonl`` (one JSON object per line, flushed and fsync'd) *before* it is
created. ``down`` — and the next ``up`` after a crash — remove exactly what the ledger
lists, newest first, and nothing else: an entry whose object is already gone is fine (the
crash may have come between the record and the creation), so removal is idempotent. The
ledger is emptied only once every entry is gone.

Kinds of entries (``netns`` carries the namespace an object lives in):

* ``netns``: a named network namespace (``/run/netns/<name>``); removing it also drops
  every link, address, route and nftables table inside it.
* ``link`` / ``nft``: a link or an ``ip`` nftables table inside one of those namespaces,
  recorded so the ledger says everything; gone with their namespace.
* ``dir``: a directory tree the runtime owns (the pods' runtime files under /run).

Mounts are never recorded: the runtime mounts only inside its pods' private mount
namespaces, which end with their last process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Entry", "Ledger"]

KINDS = ("netns", "link", "nft", "dir")


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str
    name: str
    netns: str | None = None  # the namespace a link or table lives in

    def to_json(self) -> dict[str, str | None]:
        return {"kind": self.kind, "name": self.name, "netns": self.netns}

    def __str__(self) -> str:
        where = f" in {self.netns}" if self.netns else ""
        return f"{self.kind} {self.name}{where}"


class Ledger:
    """Append-only record of created objects, at ``path`` (0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, kind: str, name: str, netns: str | None = None) -> Entry:
        """Write ``kind name`` to disk (fsync'd); call it before creating the object."""
        if kind not in KINDS:
            raise ValueError(f"unknown ledger kind {kind!r}")
        entry = Entry(kind, name, netns)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(entry.to_json()) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    def entries(self) -> list[Entry]:
        """Every recorded entry, oldest first; a torn last line (a crash while writing)
        is skipped: its object was never created."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out: list[Entry] = []
        for line in text.splitlines():
            try:
                data = json.loads(line)
                out.append(Entry(str(data["kind"]), str(data["name"]), data.get("netns")))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def undo(self, remove: Callable[[Entry], None]) -> list[str]:
        """Remove every entry newest first with ``remove`` (which must accept an object
        that is already gone); the problems, empty when the ledger was cleared."""
        problems: list[str] = []
        for entry in reversed(dict.fromkeys(self.entries())):
            try:
                remove(entry)
            except OSError as exc:
                problems.append(f"{entry}: {exc.strerror or exc}")
        if not problems:
            self.path.unlink(missing_ok=True)
        return problems
