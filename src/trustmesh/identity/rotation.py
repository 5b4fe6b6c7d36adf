"""Root rotation decided by pure functions over key slots (SPIRE's shape).

A slot is a signing certificate + key. The ACTIVE slot signs; a PREPARED slot is
already in every trust bundle but signs nothing yet; an OLD slot signs nothing but stays
trusted until every leaf it signed has expired. Deciding (these functions, clock passed
in) is kept apart from doing (the CA's ``tick``), so tests move the clock, not sleep.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable
from dataclasses import dataclass


class SlotState(enum.Enum):
    PREPARED = "prepared"
    ACTIVE = "active"
    OLD = "old"


@dataclass(frozen=True, slots=True)
class SlotTimes:
    """The times that matter for one slot."""

    slot_id: str
    state: SlotState
    not_before: dt.datetime
    not_after: dt.datetime
    prepared_at: dt.datetime
    retire_after: dt.datetime | None = None  # OLD slots: when its last leaf expires
    forced: bool = False  # prepared by an operator (``ca rotate-root``), not by age


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    prepare_at: float = 0.5  # fraction of the active root's life elapsed
    activate_at: float = 0.8  # Istio rotates a self-signed root with 20 % left
    overlap: dt.timedelta = dt.timedelta(hours=1)  # minimum time a prepared root is trusted


def life_elapsed(slot: SlotTimes, now: dt.datetime) -> float:
    total = (slot.not_after - slot.not_before).total_seconds()
    return 1.0 if total <= 0 else (now - slot.not_before).total_seconds() / total


def should_prepare(slots: Iterable[SlotTimes], now: dt.datetime, policy: RotationPolicy) -> bool:
    """A next root is needed: none is prepared and the active one is past ``prepare_at``."""
    slots = list(slots)
    if any(s.state is SlotState.PREPARED for s in slots):
        return False
    active = [s for s in slots if s.state is SlotState.ACTIVE]
    return not active or life_elapsed(active[0], now) >= policy.prepare_at


def should_activate(slots: Iterable[SlotTimes], now: dt.datetime, policy: RotationPolicy) -> bool:
    """Switch signing to the prepared root once it has been trusted long enough.

    Activation waits for the overlap even when the active root is past ``activate_at``:
    proxies must have the new root in their bundle before any leaf chains to it.
    """
    slots = list(slots)
    prepared = [s for s in slots if s.state is SlotState.PREPARED]
    if not prepared or now - prepared[0].prepared_at < policy.overlap:
        return False
    if prepared[0].forced:
        return True
    active = [s for s in slots if s.state is SlotState.ACTIVE]
    return not active or life_elapsed(active[0], now) >= policy.activate_at


def retired(slot: SlotTimes, now: dt.datetime) -> bool:
    """An OLD slot can leave the bundle: all its leaves have expired (or it has)."""
    if slot.state is not SlotState.OLD:
        return False
    return now >= slot.not_after or (slot.retire_after is not None and now >= slot.retire_after)


def trusted(slots: Iterable[SlotTimes], now: dt.datetime) -> list[str]:
    """Slot ids whose root belongs in the trust bundle now, active first."""
    order = {SlotState.ACTIVE: 0, SlotState.PREPARED: 1, SlotState.OLD: 2}
    keep = [s for s in slots if now < s.not_after and not retired(s, now)]
    return [s.slot_id for s in sorted(keep, key=lambda s: order[s.state])]
