"""What other local users and processes can reach: a probe run as another user (a forked
child that drops root; needs root, as CI has) and the TCP ports a process listens on."""

from __future__ import annotations

import ctypes
import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

NOBODY = 65534
PR_SET_DUMPABLE = 4
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def as_other_user(probe: Callable[[], Any], uid: int = NOBODY) -> Any:
    """``probe()``'s JSON-able result, computed in a child process running as ``uid``
    (gid ``uid``, no supplementary groups, no capabilities)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            # A process that changed uid is not dumpable, which makes its own
            # /proc/self/fd root's: probes address sockets through it.
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
            result = {"uid": os.getuid(), "euid": os.geteuid(), "value": probe()}
            os.write(write_end, json.dumps(result).encode())
            status = 0
        except BaseException:
            traceback.print_exc()  # the test's output shows why the probe failed
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, "the probe as another user failed"
    result = json.loads(answer)
    assert result["uid"] == result["euid"] == uid
    return result["value"]


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on, from its own network namespace's tables
    (matched by socket inode, so other processes' listeners do not count)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in (Path(f"/proc/{pid}/net/tcp"), Path(f"/proc/{pid}/net/tcp6")):
        lines = table.read_text().splitlines()[1:] if table.exists() else []
        for line in lines:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports
