"""Runs PolicyTest cases against a compiled mesh (pure: ``now`` is passed in)."""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh.api.policytest import Case, Expectation
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import Decision, RequestError
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source


@dataclass(frozen=True, slots=True)
class CaseResult:
    suite: str
    case: str
    location: str
    passed: bool
    failures: tuple[str, ...]
    decision: Decision | None

    def as_dict(self) -> dict[str, object]:
        return {
            "suite": self.suite,
            "case": self.case,
            "location": self.location,
            "passed": self.passed,
            "failures": list(self.failures),
            "decision": self.decision.as_dict() if self.decision else None,
        }


def case_request(case: Case) -> Request:
    src = case.from_
    if src.workload is not None:
        source = Source.workload(src.workload, src.ip)
    elif src.principal is not None:
        source = Source.principal(src.principal, src.ip)
    else:
        source = Source.plaintext(src.ip)
    http = None
    if case.request is not None:
        headers: list[tuple[str, str]] = []
        for name, value in case.request.headers.items():
            values = value if isinstance(value, list) else [value]
            headers.extend((name, v) for v in values)
        http = HttpRequest(
            method=case.request.method,
            path=case.request.path,
            host=case.request.host,
            headers=tuple(headers),
            jwt=case.request.jwt,
        )
    return Request(
        source=source,
        destination=case.to.workload or "",
        port=case.to.port,
        http=http,
        destination_host=case.to.host,
    )


def run_case(mesh: MeshPolicy, suite: str, location: str, case: Case, now: float) -> CaseResult:
    try:
        decision = evaluate(
            mesh,
            case_request(case),
            now=float(case.now) if case.now is not None else now,
            trace=True,
            ext_authz={
                k: None if v == "unreachable" else v == "allow" for k, v in case.ext_authz.items()
            },
        )
    except RequestError as exc:
        return CaseResult(suite, case.name, location, False, (f"bad case: {exc}",), None)
    failures = check(decision, case.expect)
    return CaseResult(suite, case.name, location, not failures, tuple(failures), decision)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a request came to — decided offline, or observed on the wire (``None``:
    not observable there, e.g. the ALLOW rule that let a request through)."""

    verdict: str
    status: int | None
    rule: str | None
    dry_run: frozenset[str] | None  # "allowed" / "denied" per applicable dry-run policy
    upstream_headers: dict[str, str] | None
    reason: str = ""
    rule_known: bool = True  # False: the deciding rule was not observable (rule is None)
    status_known: bool = True  # False: the status was not observable (status is None)

    @classmethod
    def of(cls, decision: Decision) -> Outcome:
        return cls(
            decision.verdict.value,
            decision.status,
            decision.rule,
            frozenset(s.result for s in decision.dry_run),
            dict(decision.upstream_headers),
            decision.reason,
        )


def check(decision: Decision | Outcome, expect: str | Expectation) -> list[str]:
    """Why ``decision`` does not meet ``expect`` (empty: it does). An outcome field that
    is ``None`` was not observed and is not checked."""
    got = decision if isinstance(decision, Outcome) else Outcome.of(decision)
    if isinstance(expect, str):
        expect = Expectation(verdict=expect)
    failures = []
    if expect.verdict is not None and got.verdict != expect.verdict:
        failures.append(f"expected {expect.verdict}, got {got.verdict} ({got.reason})")
    if expect.status is not None and got.status_known and got.status != expect.status:
        failures.append(f"expected status {expect.status}, got {got.status}")
    if expect.rule is not None and got.rule_known and got.rule != expect.rule:
        failures.append(f"expected rule {expect.rule}, got {got.rule}")
    if expect.dry_run is not None and got.dry_run is not None:
        results = got.dry_run
        if not results:
            failures.append(f"expected dry-run {expect.dry_run}, but no dry-run policy applies")
        elif expect.dry_run == "denied" and "denied" not in results:
            failures.append("expected dry-run denied, got allowed")
        elif expect.dry_run == "allowed" and "denied" in results:
            failures.append("expected dry-run allowed, got denied")
    got_headers = got.upstream_headers if got.upstream_headers is not None else {}
    expected_headers = expect.upstream_headers if got.upstream_headers is not None else {}
    for name, value in expected_headers.items():
        if got_headers.get(name.lower()) != value:
            failures.append(
                f"expected upstream header {name}: {value}, got {got_headers.get(name.lower())}"
            )
    return failures
