"""Rendering of diagnostics, decisions and test results: rich tables or JSON."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

if TYPE_CHECKING:  # only the mesh commands' types: importing them costs ~1 s of CPU
    from trustmesh.api.diagnostics import Diagnostic
    from trustmesh.api.loader import IgnoredKind
    from trustmesh.policy.decision import Decision
    from trustmesh.policy.routing import RouteChoice
    from trustmesh.policy.targets import Destination, Target
    from trustmesh.policy.testing import CaseResult
    from trustmesh.policy.trace import TraceEvent
    from trustmesh.runtime.live import LiveCaseResult

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)


class _Summary(Protocol):
    @property
    def errors(self) -> list[Diagnostic]: ...


class StepProgress:
    """A rich progress bar on stderr for a step that takes more than ``delay`` seconds,
    only when stderr is a terminal (a CI log or JSON output gets nothing)."""

    def __init__(
        self,
        label: str,
        console: Console | None = None,
        delay: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._label = label
        self._console = console or _err
        self._delay = delay
        self._clock = clock
        self._started = clock()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> StepProgress:
        self._started = self._clock()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            if not self._console.is_terminal or self._clock() - self._started < self._delay:
                return
            self._bar = Progress(
                TextColumn(self._label),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=self._console,
                transient=True,
            )
            self._task = self._bar.add_task(self._label, total=max(total, 1))
            self._bar.start()
        assert self._task is not None
        self._bar.update(self._task, completed=done, total=max(total, 1))

    @property
    def shown(self) -> bool:
        return self._bar is not None


class LoadProgress(StepProgress):
    """:class:`StepProgress` for reading configuration files."""

    def __init__(
        self,
        console: Console | None = None,
        delay: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("reading configuration", console, delay, clock)


def usage_error(message: str) -> None:
    _err.print(f"[red]error:[/red] {message}", markup=True)


def _json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def diagnostics(
    items: Sequence[Diagnostic],
    output: str,
    summary: _Summary,
    ignored: Sequence[IgnoredKind] | None = None,
) -> None:
    """Every diagnostic and a verdict line; ``ignored`` (validate): kinds kept unread."""
    if output == "json":
        body: dict[str, object] = {
            "valid": not summary.errors,
            "diagnostics": [d.as_dict() for d in items],
        }
        if ignored is not None:
            body["ignored"] = [i.as_dict() for i in ignored]
        _json(body)
        return
    for d in items:
        color = "red" if d.is_error else "yellow"
        _out.print(f"[{color}]{_escape(str(d))}[/{color}]")
    if ignored:
        _ignored(ignored)
    errors = sum(1 for d in items if d.is_error)
    warnings = len(items) - errors
    if errors:
        _out.print(f"{errors} error(s), {warnings} warning(s): configuration is invalid")
    else:
        _out.print(f"configuration is valid ({warnings} warning(s))")


_SHOWN_LOCATIONS = 5


def _ignored(ignored: Sequence[IgnoredKind]) -> None:
    total = sum(i.count for i in ignored)
    _out.print(f"ignored {total} resource(s) of kinds trustmesh does not read (never enforced):")
    for item in ignored:
        shown = ", ".join(f"{loc.file}:{loc.line}" for loc in item.locations[:_SHOWN_LOCATIONS])
        more = item.count - _SHOWN_LOCATIONS
        if more > 0:
            shown += f" and {more} more"
        _out.print(
            f"  {_escape(item.kind)} ({_escape(item.api_version)}) ×{item.count},"
            f" {item.reason}: {_escape(shown)}"
        )


def _trace_lines(trace: Sequence[TraceEvent]) -> tuple[str, ...]:
    from trustmesh.policy.trace import render_trace  # the policy model: only when shown

    return render_trace(trace)


# By Verdict value: every verdict but these two is a refusal.
_COLORS = {"allow": "green", "unsupported": "yellow"}


def decision(d: Decision, output: str) -> None:
    if output == "json":
        _json(d.as_dict())
        return
    color = _COLORS.get(d.verdict.value, "red")
    status = f" {d.status}" if d.status is not None else ""
    _out.print(
        f"[bold {color}]{d.verdict.value.upper()}[/bold {color}]{status}: {_escape(d.reason)}"
    )
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("rule", _escape(d.rule or "-"))
    if d.principal:
        table.add_row("principal", _escape(d.principal))
    if d.request_principal:
        table.add_row("request principal", _escape(d.request_principal))
    for shadow in d.dry_run:
        table.add_row(f"dry-run {shadow.action}", _escape(shadow.log_line()))
    if d.audit:
        table.add_row("audit", _escape(d.audit))
    for name, value in d.upstream_headers:
        table.add_row("upstream header", _escape(f"{name}: {value}"))
    for assumption in d.assumptions:
        table.add_row("[yellow]assumed[/yellow]", _escape(assumption))
    _out.print(table)
    _out.print("trace:")
    for step in _trace_lines(d.trace):
        _out.print(f"  {_escape(step)}")


def service_decisions(
    destination: Destination,
    decisions: Sequence[tuple[Target, Decision]],
    output: str,
    route: RouteChoice | None = None,
) -> None:
    """``authz check --to`` a Service: which workloads it selects (or the client's
    VirtualService route reaches) and each one's answer."""
    verdicts = {d.verdict for _, d in decisions}
    overall = next(iter(verdicts)).value if len(verdicts) == 1 else "mixed"
    if not decisions:
        overall = "not_reached"
    if output == "json":
        _json(
            {
                "service": destination.ref,
                "port": destination.service_port,
                "verdict": overall,
                **({"route": route.as_dict()} if route is not None else {}),
                "workloads": [
                    {"workload": t.workload.ref, "port": t.port, **d.as_dict()}
                    for t, d in decisions
                ],
            }
        )
        return
    refs = ", ".join(t.workload.ref for t, _ in decisions)
    if route is not None:
        _out.print(route.describe(), markup=False)
        if not decisions:
            _out.print("no workload is reached", markup=False)
            return
    kind = "Service" if destination.is_service else "Host"
    _out.print(
        f"{kind} {_escape(destination.ref)} port {destination.service_port} "
        + ("routes to" if route is not None else "selects")
        + f" {len(decisions)} workload(s): {_escape(refs)}"
    )
    for target, d in decisions:
        _out.print(f"\n[bold]{_escape(target.workload.ref)}[/bold] port {target.port}:")
        decision(d, output)
    if overall == "mixed":
        _out.print(
            "\n[yellow]the workloads answer differently: a request to the Service may land on"
            " any of them[/yellow]"
        )


def test_results(results: Sequence[CaseResult], output: str) -> None:
    passed = sum(r.passed for r in results)
    failed = len(results) - passed
    assumptions = list(
        dict.fromkeys(a for r in results if r.decision for a in r.decision.assumptions)
    )
    if output == "json":
        _json(
            {
                "passed": passed,
                "failed": failed,
                "assumptions": assumptions,
                "cases": [r.as_dict() for r in results],
            }
        )
        return
    for r in results:
        mark = "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]"
        assumed = r.decision is not None and bool(r.decision.assumptions)
        suffix = " [yellow](rests on an assumption, see below)[/yellow]" if assumed else ""
        _out.print(f"{mark} {_escape(r.suite)} / {_escape(r.case)}{suffix}")
        if not r.passed:
            _out.print(f"     at {_escape(r.location)}")
            for failure in r.failures:
                _out.print(f"     {_escape(failure)}")
            if r.decision is not None:
                for step in _trace_lines(r.decision.trace):
                    _out.print(f"       · {_escape(step)}")
    for assumption in assumptions:
        _out.print(f"[yellow]assumed:[/yellow] {_escape(assumption)}")
    _out.print(f"{passed} passed, {failed} failed")


def _escape(text: str) -> str:
    return text.replace("[", "\\[")


def live_results(results: Sequence[LiveCaseResult], output: str) -> None:
    passed = sum(r.passed for r in results)
    not_run = sum(bool(r.not_run) for r in results)
    failed = len(results) - passed - not_run
    if output == "json":
        _json(
            {
                "passed": passed,
                "failed": failed,
                "notRun": not_run,
                "cases": [r.as_dict() for r in results],
            }
        )
        return
    for r in results:
        if r.not_run:
            mark = "[yellow]NOT RUN[/yellow]"
        else:
            mark = "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]"
        live = "" if r.live is None else f" — live {r.live.verdict}"
        if r.live is not None and r.live.status is not None:
            live += f" {r.live.status}"
        _out.print(f"{mark} {_escape(r.suite)} / {_escape(r.case)}{_escape(live)}")
        if r.not_run:
            _out.print(f"     {_escape(r.not_run)}")
        elif not r.passed:
            _out.print(f"     at {_escape(r.location)}")
            _out.print(f"     {_escape(r.detail)}")
            for problem in (*r.failures, *(f"offline differs: {m}" for m in r.mismatches)):
                _out.print(f"     {_escape(problem)}")
    _out.print(f"{passed} passed, {failed} failed, {not_run} not run live")
