"""Progress lines on stderr (stdout carries the JSON alone), timed from the run's start."""

from __future__ import annotations

import sys
import time

_started = time.monotonic()  # this module is imported as the benchmark starts


def log(message: str) -> None:
    """``[  12.3s] message`` on stderr: seconds since the benchmark started."""
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)
