"""CPU time and memory of processes and of the whole machine, read from /proc; the
machine's description that heads each benchmark's JSON."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used (all its threads), from /proc/<pid>/stat;
    0 once it has exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def machine_busy_seconds() -> float:
    """CPU time every core spent not idle so far, kernel included, from /proc/stat: set
    against what our processes used, it shows load from elsewhere (another job)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / _TICK  # no guest: in user


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (the peak resident size so far), in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(value.split()[0]) / 1024, 1)  # the kernel reports kB
    return values


def machine() -> dict[str, Any]:
    """Python version, CPU architecture and core count."""
    return {"python": sys.version.split()[0], "cpu": platform.machine(), "cores": os.cpu_count()}
