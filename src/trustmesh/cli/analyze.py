"""``trustmesh analyze`` and ``trustmesh harden``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from trustmesh.analyze import report
from trustmesh.analyze.context import AnalysisContext, build_context
from trustmesh.analyze.engine import AnalysisResult, Suppression, analyze
from trustmesh.analyze.findings import Finding, Severity
from trustmesh.analyze.harden import HardenPlan, plan
from trustmesh.analyze.harden_calls import CallReport, keep_implied_calls
from trustmesh.analyze.registry import all_rules
from trustmesh.cli import render
from trustmesh.cli.options import AssumeInjectedOpt, NamespaceOpt, namespace_problem
from trustmesh.config import load_config

Files = Annotated[
    list[str], typer.Option("-f", "--filename", help="YAML file, directory or - for stdin.")
]
MeshConfigOpt = Annotated[
    list[str] | None, typer.Option("--mesh-config", help="MeshConfig or IstioOperator file.")
]
VersionOpt = Annotated[
    str | None, typer.Option("--istio-version", help="Istio version (else the install tag).")
]
_COLOR = {Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}

# Exit codes of `analyze` (and `harden`), documented in README.md and --help.
EXIT_CLEAN = 0  # no finding at or above --fail-on
EXIT_FINDINGS = 1  # a finding at or above --fail-on
EXIT_USAGE = 2  # bad command line (unknown option value, rule, suppression)
EXIT_INVALID_INPUT = 3  # the configuration has errors: nothing was analyzed


def _context(
    files: list[str],
    mesh_config: list[str] | None,
    version: str | None,
    output: str,
    namespace: str = "default",
    assume_injected: bool = False,
) -> AnalysisContext:
    problem = namespace_problem(namespace)
    if problem:
        raise ValueError(problem)
    with render.LoadProgress() as progress:
        loaded = load_config(
            files,
            mesh_config=mesh_config or (),
            default_namespace=namespace,
            assume_injected=assume_injected,
            progress=progress,
        )
    if loaded.mesh is None:
        if output == "sarif":
            sys.stdout.write(json.dumps(report.invalid_input_sarif(loaded.diagnostics), indent=2))
            sys.stdout.write("\n")
        elif output == "json":
            document = report.invalid_input_document(loaded.diagnostics)
            sys.stdout.write(json.dumps(document, indent=2) + "\n")
        elif output == "yaml":
            document = report.invalid_input_document(loaded.diagnostics)
            sys.stdout.write(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
        else:
            render.diagnostics(loaded.diagnostics, "table", summary=loaded)
        raise typer.Exit(EXIT_INVALID_INPUT)
    return build_context(loaded.snapshot, loaded.mesh, loaded.helm_values, version, loaded.unknown)


def analyze_command(
    files: Files,
    mesh_config: MeshConfigOpt = None,
    output: Annotated[str, typer.Option("-o", "--output", help="text|json|yaml|sarif")] = "text",
    fail_on: Annotated[
        str,
        typer.Option(
            "--fail-on", help="Exit 1 if a finding is at least this severe (info|warning|error)."
        ),
    ] = "error",
    suppress: Annotated[
        list[str] | None, typer.Option("--suppress", help="RULE or RULE=RESOURCE_GLOB")
    ] = None,
    rules: Annotated[
        str | None, typer.Option("--rules", help="Comma-separated rule IDs, globs or families.")
    ] = None,
    istio_version: VersionOpt = None,
    list_rules: Annotated[bool, typer.Option("--list-rules", help="List rules and exit.")] = False,
    namespace: NamespaceOpt = "default",
    assume_injected: AssumeInjectedOpt = False,
) -> None:
    """Find security risks in Istio configuration.

    Exit codes:
    0 no finding at or above --fail-on,
    1 findings at or above --fail-on,
    2 bad command line,
    3 invalid input: nothing analyzed (-o json|yaml|sarif still write the input errors).
    """
    if list_rules:
        for info in all_rules():
            fix = " (fixable)" if info.fixable else ""
            typer.echo(f"{info.id:<14} {info.severity.label:<8} {info.title}{fix}")
        return
    try:
        if output not in ("text", "json", "yaml", "sarif"):
            raise ValueError(f"-o must be text, json, yaml or sarif, got {output!r}")
        threshold = Severity.parse(fail_on)
        suppressions = [Suppression.parse(s) for s in suppress or ()]
        selection = [r.strip() for r in rules.split(",") if r.strip()] if rules else None
        context = _context(files, mesh_config, istio_version, output, namespace, assume_injected)
        result = analyze(context, selection, suppressions)
    except ValueError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    if output == "json":
        sys.stdout.write(report.to_json(result))
    elif output == "yaml":
        sys.stdout.write(report.to_yaml(result))
    elif output == "sarif":
        sys.stdout.write(json.dumps(report.to_sarif(result), indent=2) + "\n")
    else:
        _text(result)
    failed = any(f.severity >= threshold for f in result.findings)
    raise typer.Exit(EXIT_FINDINGS if failed else EXIT_CLEAN)


def harden_command(
    files: Files,
    mesh_config: MeshConfigOpt = None,
    out: Annotated[Path | None, typer.Option("-o", "--output", help="Write here, not stdout.")] = (
        None
    ),
    istio_version: VersionOpt = None,
    namespace: NamespaceOpt = "default",
    assume_injected: AssumeInjectedOpt = False,
    keep_calls: Annotated[
        bool,
        typer.Option(
            "--keep-implied-calls/--list-implied-calls",
            help="Add ALLOW policies that keep the calls the inputs imply (Service names in"
            " env/args, Istio's bookinfo layout, gateway routes) working under the proposed"
            " default-deny, or only list what it would deny.",
        ),
    ] = True,
    traffic: Annotated[
        list[str] | None,
        typer.Option(
            "--traffic",
            help="Records of `traffic export`: add least-privilege ALLOWs proven on them"
            " (as `generate`), replayed again with every proposed fix.",
        ),
    ] = None,
) -> None:
    """Write the YAML that fixes findings with a mechanical fix (never applied).

    Exit codes: 0 written; 2 bad command line; 3 invalid input, bad records, or recorded
    traffic no least-privilege policy can be proven for (nothing written).
    """
    try:
        context = _context(files, mesh_config, istio_version, "text", namespace, assume_injected)
    except ValueError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    result = analyze(context)
    for note in result.notes:
        typer.echo(f"# note: {note}", err=True)
    fixes = plan(result.findings)
    still_broken, recorded = _recorded_traffic(context, fixes, traffic) if traffic else ([], None)
    # Recorded traffic is the better evidence: implied calls it does not cover are listed,
    # not opened with a port-wide ALLOW that would undo its least privilege.
    calls = keep_implied_calls(
        context, fixes, generate=keep_calls and not traffic, recorded=recorded or frozenset()
    )
    text = fixes.render()
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
    fixed = sum(len(v) for v in fixes.reasons.values())
    typer.echo(
        f"# {fixed} finding(s) have a fix above; "
        f"{sum(1 for f in result.findings if not f.rule.fixable)} need a person",
        err=True,
    )
    _calls_summary(calls, any(d.get("kind") == "AuthorizationPolicy" for d in fixes.resources))
    for line in still_broken:
        typer.echo(f"# NOT kept: {line}", err=True)


def _recorded_traffic(
    context: AnalysisContext, fixes: HardenPlan, paths: list[str]
) -> tuple[list[str], frozenset[tuple[str, str, int]]]:
    """``--traffic``: the proven least-privilege policies added to ``fixes``; what the plan
    still breaks, and who was recorded calling what."""
    import time

    from trustmesh.analyze.harden_traffic import add_recorded_traffic, recorded_pairs
    from trustmesh.insight.files import read_traffic
    from trustmesh.insight.generate import ProofFailed
    from trustmesh.insight.traffic import TrafficSet

    recorded = TrafficSet()
    unreadable = read_traffic(paths, recorded)
    for problem in [*unreadable, *recorded.problems]:
        typer.echo(f"error: {problem}", err=True)
    if unreadable or recorded.problem_count or not recorded.records:
        if not recorded.records and not unreadable and not recorded.problem_count:
            typer.echo(f"error: no records in {', '.join(paths)}", err=True)
        raise typer.Exit(EXIT_INVALID_INPUT)
    try:
        broken = add_recorded_traffic(context, fixes, recorded.distinct, time.time())
        return broken, recorded_pairs(recorded.distinct)
    except ProofFailed as exc:
        for failure in exc.failures:
            typer.echo(f"error: {failure}", err=True)
        typer.echo("error: nothing written: no least-privilege policy is proven", err=True)
        raise typer.Exit(EXIT_INVALID_INPUT) from None


def _calls_summary(calls: CallReport, default_deny: bool) -> None:
    broken = calls.broken
    if not calls.outcomes and default_deny:
        typer.echo(
            "# no call between the inputs' workloads is implied (no Service named in env, args"
            " or command, no known sample, no gateway route): check what the proposed"
            " default-deny stops before applying it",
            err=True,
        )
    if calls.outcomes:
        typer.echo(
            f"# {len(calls.outcomes)} call(s) implied by the inputs; the fixes would stop"
            f" {len(broken)} of them",
            err=True,
        )
    if calls.generated:
        typer.echo(
            f"# {len(calls.generated)} ALLOW policy(ies) added to keep them"
            f" ({', '.join(calls.generated)}); each was decided with every fix applied: its"
            " callers are allowed, a plaintext client and another identity are not",
            err=True,
        )
    elif broken:
        for o in broken:
            if calls.is_recorded(o.call):
                typer.echo(
                    f"#   kept for its recorded requests only: {o.call.describe()}"
                    f" → {o.call.destination} [{o.call.evidence}]",
                    err=True,
                )
            else:
                typer.echo(
                    f"#   would stop {o.call.describe()}"
                    + (f" → {o.call.destination}" if calls.recorded else "")
                    + f" [{o.call.evidence}]",
                    err=True,
                )
    for line in calls.unkept:
        typer.echo(f"# not kept: {line}", err=True)
    for note in calls.notes:
        typer.echo(f"# note: {note}", err=True)


def _text(result: AnalysisResult) -> None:
    console = Console(highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"[yellow]NOTE[/yellow] {_esc(note)}")
    for finding in result.findings:
        _print_finding(console, finding)
    counts = report.summary(result)
    console.print(
        f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info; "
        f"{counts['suppressed']} suppressed; {len(result.rules_run)} rules run"
    )


def _print_finding(console: Console, finding: Finding) -> None:
    issue = finding.issue
    color = _COLOR[finding.severity]
    where = str(issue.location) if issue.location else "(mesh defaults)"
    console.print(
        f"[{color}]{finding.severity.label.upper()}[/{color}] [bold]{finding.rule.id}[/bold] "
        f"{_esc(finding.rule.title)}"
    )
    console.print(f"  at {_esc(where)}")
    console.print(f"  {_esc(issue.message)}")
    if issue.workloads:
        console.print(f"  workloads: {_esc(', '.join(issue.workloads))}")
    console.print(f"  why: {_esc(finding.rule.rationale)}")
    if issue.fix:
        console.print("  fix:")
        for line in issue.fix.rstrip().splitlines():
            console.print(f"    {_esc(line)}")


def _esc(text: str) -> str:
    return text.replace("[", "\\[")
