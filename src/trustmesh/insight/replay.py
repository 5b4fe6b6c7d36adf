"""Replaying recorded requests through the evaluator (pure).

A record becomes the :class:`Request` the destination's sidecar saw: an mTLS peer with the
recorded principal (or a plaintext client) from the recorded address, to the recorded
workload and port, with the recorded method, path and :authority. Each distinct request
is decided once per configuration (:mod:`trustmesh.insight.traffic` deduplicates).

A request that carried a JWT cannot be replayed exactly (the token is not in the log):
it is decided without one and flagged ``inexact``, never silently as if it had none.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson

from trustmesh.insight.records import Protocol, TrafficRecord
from trustmesh.insight.traffic import Observed
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import Decision, RequestError, Verdict
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source
from trustmesh.xds.translate import translate

__all__ = [
    "Flip",
    "FlipGroup",
    "ImpactReport",
    "Outcome",
    "decide",
    "impact",
    "request_of",
]


_UNSUPPORTED = Verdict.UNSUPPORTED.value


def request_of(record: TrafficRecord) -> Request:
    """The evaluator's question for a recorded request."""
    if record.mtls and record.source_principal:
        source = Source.principal(record.source_principal, record.source_ip)
    else:
        source = Source.plaintext(record.source_ip)
    http = None
    if record.protocol is Protocol.HTTP:
        http = HttpRequest(record.method or "GET", record.path or "/", record.host)
    return Request(source, record.destination, record.port, http)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A replayed decision: the verdict, the deciding rule, or why there is none."""

    verdict: str  # a Verdict value, or "error" when the question has no answer
    rule: str | None
    reason: str

    @property
    def allowed(self) -> bool:
        return self.verdict == Verdict.ALLOW.value

    @classmethod
    def of(cls, decision: Decision) -> Outcome:
        return cls(decision.verdict.value, decision.rule, decision.reason)


def decide(mesh: MeshPolicy, record: TrafficRecord, now: float) -> Outcome:
    try:
        return Outcome.of(evaluate(mesh, request_of(record), now=now))
    except RequestError as exc:
        return Outcome("error", None, str(exc))


@dataclass(frozen=True, slots=True)
class Flip:
    """One distinct request decided differently after the change."""

    observed: Observed
    before: Outcome
    after: Outcome

    @property
    def direction(self) -> str:
        return "allow→deny" if self.before.allowed else "deny→allow"


@dataclass(frozen=True, slots=True)
class FlipGroup:
    """Flips with the same direction, source, destination and deciding rules."""

    direction: str
    source: str
    destination: str
    rule_before: str | None
    rule_after: str | None
    flips: tuple[Flip, ...]

    @property
    def records(self) -> int:
        return sum(f.observed.count for f in self.flips)


@dataclass(slots=True)
class ImpactReport:
    distinct: int = 0
    records: int = 0
    flips: list[Flip] = field(default_factory=list)
    inexact: list[Observed] = field(default_factory=list)  # carried a JWT
    unknown: list[tuple[Observed, Outcome]] = field(default_factory=list)  # no answer before
    # trustmesh cannot decide it exactly on one side (ambient waypoint, gateway): never
    # counted as unchanged, since it may flip
    undecidable: list[Flip] = field(default_factory=list)
    # decided (before the change) otherwise than the sidecar recorded it: the current files
    # may not be what was running when the traffic was recorded
    mismatched: list[tuple[Observed, Outcome]] = field(default_factory=list)

    def groups(self) -> list[FlipGroup]:
        by: dict[tuple[str, str, str, str, str], list[Flip]] = defaultdict(list)
        for flip in self.flips:
            record = flip.observed.record
            key = (
                flip.direction,
                record.describe_source(),
                f"{record.destination}:{record.port}",
                flip.before.rule or "",
                flip.after.rule or "",
            )
            by[key].append(flip)
        return [
            FlipGroup(d, s, dst, rb or None, ra or None, tuple(flips))
            for (d, s, dst, rb, ra), flips in sorted(by.items())
        ]


class UnchangedSidecars:
    """Which destinations' sidecars get byte-identical Envoy configuration before and after.

    A recorded request is replayed as the destination's sidecar saw it (a peer principal
    or a plaintext client, not a source workload), so its verdict is a function of that
    sidecar's configuration alone: where the translation (:func:`trustmesh.xds.translate`,
    the configuration the control plane would push) is identical, no request to it can
    flip and none is decided twice. Anything that does not translate (no sidecar, unknown
    workload) is never taken as unchanged.
    """

    def __init__(self, before: MeshPolicy, after: MeshPolicy) -> None:
        self._before, self._after = before, after
        self._known: dict[str, bool] = {}

    def __call__(self, ref: str) -> bool:
        known = self._known.get(ref)
        if known is None:
            old, new = _sidecar_config(self._before, ref), _sidecar_config(self._after, ref)
            known = self._known[ref] = old is not None and old == new
        return known


def _sidecar_config(mesh: MeshPolicy, ref: str) -> bytes | None:
    try:
        proxy = translate(mesh, ref, inbound_address="127.0.0.1")
    except (LookupError, ValueError):
        return None
    return orjson.dumps([proxy.listeners, proxy.extension_configs], option=orjson.OPT_SORT_KEYS)


def impact(
    observed: Sequence[Observed],
    before: MeshPolicy,
    after: MeshPolicy,
    *,
    now: float,
    progress: Callable[[int, int], None] | None = None,
    skip_unchanged: bool = True,
) -> ImpactReport:
    """Decide every distinct request before and after; collect what flips. Requests to a
    destination whose sidecar configuration is the same on both sides are not decided
    (``skip_unchanged``; see :class:`UnchangedSidecars`)."""
    report = ImpactReport(distinct=len(observed))
    total = len(observed)
    unchanged = UnchangedSidecars(before, after) if skip_unchanged else None
    for done, item in enumerate(observed, 1):
        if progress is not None and done % 256 == 0:
            progress(done, total)
        record = item.record
        report.records += item.count
        if record.request_principal:
            report.inexact.append(item)
        if unchanged is not None and unchanged(record.destination):
            continue
        was = decide(before, record, now)
        if was.verdict == "error":
            report.unknown.append((item, was))
            continue
        if _recorded_otherwise(item, was):
            report.mismatched.append((item, was))
        will = decide(after, record, now)
        if _UNSUPPORTED in (was.verdict, will.verdict):
            report.undecidable.append(Flip(item, was, will))
        elif was.allowed != will.allowed:
            report.flips.append(Flip(item, was, will))
    if progress is not None:
        progress(total, total)
    return report


def _recorded_otherwise(item: Observed, outcome: Outcome) -> bool:
    """Every record of ``item`` has one known verdict, and it is not ``outcome``'s."""
    if len(item.verdicts) != 1 or outcome.verdict == _UNSUPPORTED:
        return False
    (recorded,) = item.verdicts
    if recorded == "unknown":
        return False
    return (recorded == "allow") != outcome.allowed
