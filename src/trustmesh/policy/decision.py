"""What the evaluator answers: a verdict, the deciding rule, dry-run results, a trace."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from trustmesh.policy.trace import TraceEvent


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    UNAUTHENTICATED = "unauthenticated"
    RESET = "reset"
    BAD_REQUEST = "bad-request"
    # trustmesh cannot decide it exactly (a waypoint's L7 enforcement, a gateway's
    # listeners, how ztunnel reaches a sidecar): never guessed, the reason says why.
    UNSUPPORTED = "unsupported"


class RequestError(ValueError):
    """The question itself is wrong (unknown workload, missing port): not a verdict."""


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """A dry-run rule set's answer, as Envoy logs it (``shadow denied, matched …``)."""

    action: str  # "ALLOW" | "DENY"
    result: str  # "allowed" | "denied"
    rule: str | None

    def log_line(self) -> str:
        matched = f", matched policy {self.rule}" if self.rule else ""
        return f"shadow {self.result}{matched}"


class Decision(NamedTuple):
    """The evaluator's answer. A NamedTuple: built once per decision on the hot path,
    where a frozen dataclass's field-by-field ``__init__`` costs a tenth of the budget."""

    verdict: Verdict
    status: int | None  # HTTP status the client sees; None for TCP / reset
    rule: str | None  # the deciding Envoy policy name, if a rule decided
    reason: str
    dry_run: tuple[ShadowResult, ...] = ()
    audit: str | None = None
    # Frozen events (trustmesh.policy.trace), rendered to text by ``render_trace``.
    trace: tuple[TraceEvent, ...] = ()
    upstream_headers: tuple[tuple[str, str], ...] = ()
    principal: str | None = None
    request_principal: str | None = None
    # How a workload the answer depends on was taken to meet the mesh without the input
    # showing it (namespace not given: injection unknown or assumed).
    assumptions: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        from trustmesh.policy.trace import event_json, render_trace  # it imports this module

        return {
            "verdict": self.verdict.value,
            "status": self.status,
            "rule": self.rule,
            "reason": self.reason,
            "dry_run": [
                {"action": s.action, "result": s.result, "rule": s.rule, "log": s.log_line()}
                for s in self.dry_run
            ],
            "audit": self.audit,
            "principal": self.principal,
            "request_principal": self.request_principal,
            "upstream_headers": dict(self.upstream_headers),
            "assumptions": list(self.assumptions),
            "trace": list(render_trace(self.trace)),
            "events": [event_json(event) for event in self.trace],
        }
