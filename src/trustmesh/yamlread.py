"""Reading one large YAML file on two cores.

libyaml reads about ten megabytes a second, and a dump of tens of thousands of policies
is mostly that. A file over :data:`PARALLEL_MIN_CHARS` is cut at a ``---`` line near its
middle (a document never spans one): a forked child reads the second half while this
process reads — and types — the first, then the child sends its documents back as plain
values, a batch at a time. The result is exactly :func:`trustmesh.api.yamldoc.iter_yaml`'s:
the second half is read with the first half's line breaks in front of it, so every line
number is the file's, and if anything goes wrong with the child the whole file is read
again here (after a ``Restart``).

Forking is done only where it is safe: one thread in this process (a control plane with
gRPC or worker threads never forks), the fork start method available, and two CPUs.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
from collections.abc import Iterator
from typing import BinaryIO

from trustmesh.api.yamldoc import (
    Item,
    Restart,
    WireItem,
    YamlDocument,
    from_wire,
    iter_yaml,
    split_point,
    to_wire,
)

PARALLEL_MIN_CHARS = 4 * 1024 * 1024
_BATCH = 2000
_HEADER = 8


class _ChildFailed(Exception):
    pass


def read_yaml(text: str, name: str) -> Iterator[Item]:
    """:func:`iter_yaml`, on two cores when the text is large and forking is safe."""
    cut = split_point(text) if _parallel_ok(text) else None
    if not cut:
        yield from iter_yaml(text, name)
        return
    head = text[:cut]
    tail = "\n" * head.count("\n") + text[cut:]
    child = _start(tail, name)
    if child is None:
        yield from iter_yaml(text, name)
        return
    pid, stream = child
    try:
        count = 0
        for item in iter_yaml(head, name):
            if isinstance(item, YamlDocument):
                count += 1
            elif isinstance(item, Restart):
                count = 0
            yield item
        try:
            yield from _receive(pid, stream, tail, count)
        except _ChildFailed:
            yield Restart()
            yield from iter_yaml(text, name)
    finally:
        stream.close()
        _reap(pid)


def _parallel_ok(text: str) -> bool:
    if len(text) < PARALLEL_MIN_CHARS or "\r" in text or not hasattr(os, "fork"):
        return False
    if threading.active_count() != 1:
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus >= 2


def _start(tail: str, name: str) -> tuple[int, BinaryIO] | None:
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:  # the child: read the tail, send it, and leave without cleanup
        code = 1
        try:
            os.close(read_end)
            _send(tail, name, os.fdopen(write_end, "wb"))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, os.fdopen(read_end, "rb")


def _send(tail: str, name: str, out: BinaryIO) -> None:
    items: list[WireItem] = []
    for item in iter_yaml(tail, name):
        if isinstance(item, Restart):
            items.clear()
        else:
            items.append(to_wire(item))
    with out:
        for start in range(0, len(items), _BATCH):
            data = pickle.dumps(items[start : start + _BATCH], protocol=pickle.HIGHEST_PROTOCOL)
            out.write(len(data).to_bytes(_HEADER, "big"))
            out.write(data)
        out.write((0).to_bytes(_HEADER, "big"))


def _receive(pid: int, stream: BinaryIO, tail: str, index: int) -> Iterator[Item]:
    while True:
        header = stream.read(_HEADER)
        if len(header) != _HEADER:
            raise _ChildFailed
        size = int.from_bytes(header, "big")
        if size == 0:
            break
        data = stream.read(size)
        if len(data) != size:
            raise _ChildFailed
        for wire in pickle.loads(data):
            item = from_wire(tail, wire, index)
            if isinstance(item, YamlDocument):
                index += 1
            yield item
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise _ChildFailed


def _reap(pid: int) -> None:
    """Make sure the child is gone (it may still run if the reader stopped early)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # already reaped by _receive


__all__ = ["PARALLEL_MIN_CHARS", "read_yaml"]
