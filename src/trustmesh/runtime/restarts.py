"""When a pod's app that exited is started again, as the kubelet decides it (pure).

* ``restartPolicy``: ``Always`` restarts after any exit, ``OnFailure`` after a non-zero
  one, ``Never`` not at all (:func:`should_restart`).
* Back-off (:class:`Backoff`): the kubelet waits 10 s before the first restart, doubles
  the wait after each further crash up to 5 minutes, and starts again from 10 s once the
  container ran 10 minutes without exiting. ``trustmesh up --restart-backoff SECONDS``
  scales all three together (first wait, cap = 30×, reset = 60×).
* An exit is recorded as the kubelet reports it (:class:`Exit`): exit code, or 128 + N
  for a process killed by signal N, reason ``Completed`` / ``Error``, and when.
"""

from __future__ import annotations

import datetime as dt
import signal
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_BACKOFF", "Backoff", "Exit", "should_restart"]


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 10.0
    cap: float = 300.0
    reset_after: float = 600.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap or self.reset_after <= 0:
            raise ValueError("back-off needs 0 < initial <= cap and reset_after > 0")

    @classmethod
    def scaled(cls, initial: float) -> Backoff:
        """The kubelet's shape from another first wait: cap 30×, reset after 60×."""
        if not initial > 0:
            raise ValueError(f"the restart back-off must be > 0 seconds, got {initial}")
        return cls(initial, initial * 30, initial * 60)

    def next_delay(self, previous: float | None, ran_for: float) -> float:
        """The wait before restarting an app that ran ``ran_for`` seconds, after waiting
        ``previous`` seconds before its last start (None: it was never restarted)."""
        if previous is None or ran_for >= self.reset_after:
            return self.initial
        return min(previous * 2, self.cap)


DEFAULT_BACKOFF = Backoff()


def should_restart(policy: str, exit_code: int) -> bool:
    """Whether the kubelet starts a container again after it exited with ``exit_code``."""
    if policy == "Never":
        return False
    if policy == "OnFailure":
        return exit_code != 0
    return True


@dataclass(frozen=True, slots=True)
class Exit:
    """How an app ended: ``exit_code`` as Kubernetes shows it, the signal if killed."""

    exit_code: int
    signal: str | None
    at: dt.datetime

    @classmethod
    def of(cls, returncode: int, at: dt.datetime) -> Exit:
        """From a process's return code (``-N``: killed by signal N)."""
        if returncode >= 0:
            return cls(returncode, None, at)
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return cls(128 - returncode, name, at)

    @property
    def reason(self) -> str:
        return "Completed" if self.exit_code == 0 else "Error"

    def describe(self) -> str:
        """``exit 1`` or ``SIGKILL (exit 137)``."""
        if self.signal:
            return f"{self.signal} (exit {self.exit_code})"
        return f"exit {self.exit_code}"

    def to_json(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "reason": self.reason,
            "finished_at": self.at.isoformat(timespec="seconds"),
        }
