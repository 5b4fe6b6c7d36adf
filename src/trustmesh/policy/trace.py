"""The evaluator's trace as values: what it considered, in order, and why.

The evaluator records frozen events (a rule's outcome, the TLS choice, the JWT filter's
answer, ...); nothing is formatted while it decides. :func:`render` turns an event into
the one line of text the CLI and ``trustmesh test`` print, and :func:`event_json` into
the object ``authz check -o json`` lists under ``"events"``. Steps the evaluator only
explains in words (routing, the HTTP codec, ztunnel) are :class:`Step` events.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from trustmesh.policy.authz import RuleOutcome, miss_text
from trustmesh.policy.decision import ShadowResult

__all__ = [
    "AllowPhase",
    "DataplaneSeen",
    "ExtAuthzAnswer",
    "JwtOutcome",
    "JwtStep",
    "NoRuleForProtocol",
    "PeerAuthentication",
    "PeerPrincipal",
    "PolicySkipped",
    "RuleEvaluated",
    "ShadowEvaluated",
    "Step",
    "TlsChoice",
    "TlsReset",
    "TraceEvent",
    "event_json",
    "render",
    "render_trace",
]


@dataclass(frozen=True, slots=True)
class Step:
    """A step explained in words only (a route, the HTTP codec, a header, ztunnel)."""

    text: str


@dataclass(frozen=True, slots=True)
class DataplaneSeen:
    """How the source or destination workload meets the mesh."""

    role: Literal["source", "destination"]
    workload: str
    description: str


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """The destination port's PeerAuthentication mode and the policy it comes from."""

    workload: str
    port: int
    mode: str  # STRICT | PERMISSIVE | DISABLE
    scope: str | None  # workload | namespace | mesh; None: the default
    policy: str | None


@dataclass(frozen=True, slots=True)
class TlsChoice:
    """The client's TLS choice (its sidecar's cluster, a passthrough, plaintext)."""

    explanation: str


@dataclass(frozen=True, slots=True)
class TlsReset:
    """The client's TLS and the server's PeerAuthentication do not meet: reset."""

    reason: str


@dataclass(frozen=True, slots=True)
class PeerPrincipal:
    """The identity in the client's certificate, as the server's RBAC sees it."""

    principal: str


@dataclass(frozen=True, slots=True)
class ExtAuthzAnswer:
    """A CUSTOM provider's (ext_authz) answer."""

    provider: str
    allowed: bool


@dataclass(frozen=True, slots=True)
class JwtStep:
    """One step of the JWT filter (a provider's token found, verified, rejected)."""

    text: str


@dataclass(frozen=True, slots=True)
class JwtOutcome:
    """The JWT filter's answer: ok, none, unauthenticated, audience, ..."""

    status: str
    message: str


@dataclass(frozen=True, slots=True)
class RuleEvaluated:
    """One rule considered in a phase (CUSTOM, AUDIT, DENY, ALLOW, dry-run ...)."""

    phase: str
    outcome: RuleOutcome


@dataclass(frozen=True, slots=True)
class NoRuleForProtocol:
    """Policies of a phase apply, but none has a rule for this request's protocol."""

    phase: str
    policies: int


@dataclass(frozen=True, slots=True)
class ShadowEvaluated:
    """A dry-run rule set's answer, as Envoy logs it."""

    result: ShadowResult


@dataclass(frozen=True, slots=True)
class PolicySkipped:
    """A policy not enforced here, and why (ztunnel cannot enforce it, ...)."""

    policy: str  # namespace/name, or the kind when a whole kind is skipped
    why: str


@dataclass(frozen=True, slots=True)
class AllowPhase:
    """How the ALLOW phase ended when no ALLOW rule matched or none applies."""

    outcome: Literal["none-apply", "no-rule-for-protocol", "no-match"]
    protocol: Literal["HTTP", "TCP"]
    at: str | None = None  # "ztunnel" when ztunnel decides


TraceEvent = (
    Step
    | DataplaneSeen
    | PeerAuthentication
    | TlsChoice
    | TlsReset
    | PeerPrincipal
    | ExtAuthzAnswer
    | JwtStep
    | JwtOutcome
    | RuleEvaluated
    | NoRuleForProtocol
    | ShadowEvaluated
    | PolicySkipped
    | AllowPhase
)


def render(event: TraceEvent) -> str:
    """The event as one line of the trace (``authz check``, ``trustmesh test``)."""
    match event:
        case Step(text) | TlsChoice(text) | TlsReset(text):
            return text
        case RuleEvaluated(phase, outcome):
            return f"{phase} {outcome.rule.name}: {outcome.text()}"
        case DataplaneSeen(role, workload, description):
            return f"{role} {workload}: {description}"
        case PeerAuthentication(workload, port, mode, scope, policy):
            origin = f"from {scope} policy {policy}" if policy else "default"
            return f"destination {workload} port {port}: PeerAuthentication {mode} ({origin})"
        case PeerPrincipal(principal):
            return f"peer principal {principal}"
        case ExtAuthzAnswer(provider, allowed):
            return f"external authorizer {provider!r} answers {'allow' if allowed else 'deny'}"
        case JwtStep(text):
            return f"JWT {text}"
        case JwtOutcome(status, message):
            return f"JWT: {status}: {message}"
        case NoRuleForProtocol(phase, policies):
            return f"{phase}: {policies} policies apply, no rule for this protocol"
        case ShadowEvaluated(result):
            return result.log_line()
        case PolicySkipped(policy, why):
            return f"{policy} is not enforced: {why}"
        case AllowPhase("none-apply", _, _):
            return "no ALLOW policy applies: allowed"
        case AllowPhase("no-rule-for-protocol", protocol, _):
            return f"ALLOW policies apply but none has a rule for {protocol}: denied"
        case AllowPhase(_, _, at):
            return "no ALLOW rule matched" + (f" at {at}" if at else "") + ": denied"
    raise AssertionError(f"unknown trace event {event!r}")  # pragma: no cover


def render_trace(events: Iterable[TraceEvent]) -> tuple[str, ...]:
    return tuple(render(event) for event in events)


def event_json(event: TraceEvent) -> dict[str, object]:
    """The event as JSON: ``{"event": <kind>, ...its fields..., "text": <rendered>}``.

    A rule's outcome is ``{"phase", "rule", "policy", "matched", "misses"}`` with each miss
    as ``"from[0].principals"`` / ``"when request.headers[x]"`` (the trace's wording)."""
    body: dict[str, object]
    match event:
        case RuleEvaluated(phase, outcome):
            policy = outcome.rule.policy
            body = {
                "phase": phase,
                "rule": outcome.rule.name,
                "policy": f"{policy.namespace}/{policy.name}",
                "matched": outcome.matched,
                "misses": [miss_text(miss) for miss in outcome.misses],
            }
        case ShadowEvaluated(result):
            body = {"action": result.action, "result": result.result, "rule": result.rule}
        case _:
            body = {name: getattr(event, name) for name in event.__slots__}
    return {"event": _KINDS[type(event)], **body, "text": render(event)}


_KINDS: dict[type, str] = {
    Step: "step",
    DataplaneSeen: "dataplane",
    PeerAuthentication: "peer-authentication",
    TlsChoice: "tls-choice",
    TlsReset: "tls-reset",
    PeerPrincipal: "peer-principal",
    ExtAuthzAnswer: "ext-authz",
    JwtStep: "jwt-step",
    JwtOutcome: "jwt",
    RuleEvaluated: "rule",
    NoRuleForProtocol: "no-rule-for-protocol",
    ShadowEvaluated: "dry-run",
    PolicySkipped: "policy-skipped",
    AllowPhase: "allow-phase",
}
