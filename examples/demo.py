"""`make demo`: the istio.io security tasks, decided offline by trustmesh.

For every scenario under examples/scenarios (istio-semantics.md §7) it loads the
example mesh plus that scenario's Istio YAML, asks each of the scenario's requests, and
prints the verdict with the rule that decided it, checked against the expectation.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trustmesh.analyze.context import build_context
from trustmesh.analyze.engine import analyze
from trustmesh.config import load_config
from trustmesh.policy.testing import run_case

HERE = Path(__file__).resolve().parent
NOW = 1_790_000_000.0  # the example tokens' clock


def main() -> int:
    console = Console(width=None if sys.stdout.isatty() else 150)
    table = Table(title="trustmesh: istio.io security scenarios, decided offline")
    for column in ("scenario", "request", "verdict", "deciding rule", "expected"):
        table.add_column(column, overflow="fold")
    failures = 0
    for scenario in sorted(p for p in (HERE / "scenarios").iterdir() if (p / "test.yaml").exists()):
        mesh_config = [str(scenario / "mesh.yaml")] if (scenario / "mesh.yaml").exists() else []
        loaded = load_config(
            [str(HERE / "mesh"), str(scenario / "config.yaml")],
            mesh_config=mesh_config,
            test_paths=[str(scenario / "test.yaml")],
        )
        if loaded.mesh is None:
            for problem in loaded.errors:
                console.print(f"[red]{problem}[/red]")
            return 1
        first = True
        for suite in loaded.tests:
            for case in suite.spec.cases:
                result = run_case(loaded.mesh, suite.name, str(suite.location), case, NOW)
                decision = result.decision
                verdict = "?" if decision is None else decision.verdict.value
                status = (
                    "" if decision is None or decision.status is None else f" {decision.status}"
                )
                color = "green" if verdict == "allow" else "red"
                rule = (decision.rule if decision else None) or "-"
                table.add_row(
                    scenario.name if first else "",
                    case.name,
                    f"[{color}]{verdict}{status}[/{color}]",
                    rule.replace("[", "\\["),
                    "[green]✓[/green]" if result.passed else "[red]✗ " + "; ".join(result.failures),
                )
                failures += not result.passed
                first = False
        table.add_section()
    console.print(table)
    console.print(
        "Ask your own: .venv/bin/trustmesh authz check -f examples/mesh"
        " -f examples/scenarios/02-deny-get/config.yaml"
        " --from foo/sleep --to foo/httpbin --path /get"
    )
    _analyzer(console)
    return 1 if failures else 0


def _analyzer(console: Console) -> None:
    """The analyzer on an insecure-by-default install (examples/insecure)."""
    loaded = load_config([str(HERE / "insecure")])
    assert loaded.mesh is not None, loaded.errors
    context = build_context(loaded.snapshot, loaded.mesh, loaded.helm_values, None, loaded.unknown)
    result = analyze(context)
    table = Table(title="trustmesh analyze examples/insecure")
    for column in ("severity", "rule", "finding"):
        table.add_column(column, overflow="fold")
    for finding in result.findings:
        color = {"error": "red", "warning": "yellow"}.get(finding.severity.label, "cyan")
        table.add_row(
            f"[{color}]{finding.severity.label}[/{color}]",
            finding.rule.id,
            finding.issue.message.replace("[", "\\["),
        )
    console.print(table)
    console.print(
        "Fixes to review: .venv/bin/trustmesh harden -f examples/insecure;"
        " SARIF: .venv/bin/trustmesh analyze -f examples/insecure -o sarif"
    )


if __name__ == "__main__":
    sys.exit(main())
