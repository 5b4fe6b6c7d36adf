"""Run a probe as another local user (a forked child that drops root), to observe what the
kernel or a server refuses that user. Needs root; CI runs as root."""

from __future__ import annotations

import ctypes
import json
import os
import traceback
from collections.abc import Callable
from typing import Any

import pytest

NOBODY = 65534
PR_SET_DUMPABLE = 4

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
