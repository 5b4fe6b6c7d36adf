"""`make demo`: the istio.io security tasks, offline and then live through real Envoy.

1. For every scenario under examples/scenarios (istio-semantics.md §7) it loads the
   example mesh plus that scenario's Istio YAML, asks each of the scenario's requests, and
   prints the verdict with the rule that decided it, checked against the expectation.
2. `trustmesh up` starts the example mesh as local processes (control plane + CA, a
   sidecar Envoy per injected pod, the sample apps); a handful of scenarios are applied
   to it in turn and their requests sent for real — allow, deny, reset, 401, 502, TCP —
   with the deciding rule read from the sidecar's access log; then `trustmesh down`.
3. The security analyzer on an insecure-by-default install (examples/insecure).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trustmesh.analyze.context import build_context
from trustmesh.analyze.engine import analyze
from trustmesh.config import load_config
from trustmesh.policy.testing import run_case
from trustmesh.runtime.live import LiveRunner
from trustmesh.runtime.running import RunningMesh

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
            for where, case in suite.located_cases():
                result = run_case(loaded.mesh, suite.name, where, case, NOW)
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
    failures += _live(console)
    _analyzer(console)
    return 1 if failures else 0


LOG_EVERY_REQUEST = "\naccessLogFile: /dev/stdout\n"
LIVE_SCENARIOS = (
    "02-deny-get",
    "05-tcp-allow-ports",
    "09-jwt-request-authentication",
    "12-mesh-strict",
    "15-dry-run-deny",
    "17a-registry-only",
)


def _live(console: Console) -> int:
    """Start the example mesh, send some scenarios' requests for real, stop it."""
    work = Path(tempfile.mkdtemp(prefix="trustmesh-demo-"))
    config, state, mesh_file = work / "config", work / "state", work / "mesh.yaml"
    config.mkdir()
    shutil.copy(HERE / "mesh" / "workloads.yaml", config / "workloads.yaml")
    mesh_file.write_text(LOG_EVERY_REQUEST)
    console.print(f"\n[bold]trustmesh up {config}[/bold] (state in {state})")
    env = {**os.environ, "TRUSTMESH_STATE": str(state)}
    trustmesh = [sys.executable, "-m", "trustmesh"]
    started = subprocess.run(
        [*trustmesh, "up", str(config), "--mesh-config", str(mesh_file), "--detach"],
        env=env,
        check=False,
    )
    if started.returncode != 0:
        console.print("[red]the mesh did not start[/red]")
        return 1
    try:
        return _live_table(console, state, config, mesh_file)
    finally:
        subprocess.run([*trustmesh, "down"], env=env, check=False)
        shutil.rmtree(work, ignore_errors=True)


def _live_table(console: Console, state: Path, config: Path, mesh_file: Path) -> int:
    running = RunningMesh.open(state)
    runner = LiveRunner(running.plan, running.layout)
    table = Table(title="the same requests, live through real Envoy sidecars (trustmesh up)")
    for column in ("scenario", "request", "live", "deciding rule (access log)", "offline"):
        table.add_column(column, overflow="fold")
    failures = 0
    for name in LIVE_SCENARIOS:
        scenario = HERE / "scenarios" / name
        (config / "scenario.yaml").write_text((scenario / "config.yaml").read_text())
        mesh_yaml = scenario / "mesh.yaml"
        # Every request logged (Istio's accessLogFile), to show the rule that allowed it.
        mesh_file.write_text(
            (mesh_yaml.read_text() if mesh_yaml.exists() else "") + LOG_EVERY_REQUEST
        )
        asyncio.run(running.wait_synced(timeout=30))  # the files as just written
        loaded = load_config(
            [str(config)], mesh_config=[str(mesh_file)], test_paths=[str(scenario / "test.yaml")]
        )
        assert loaded.mesh is not None, loaded.errors
        suites = [(s.name, s.located_cases()) for s in loaded.tests]
        first = True
        for result in asyncio.run(runner.run(loaded.mesh, suites)):
            live = result.live
            if live is None:
                shown, rule = f"not run: {result.not_run}", "-"
            else:
                shown = live.verdict + (f" {live.status}" if live.status else "")
                rule = (live.rule or "-") if live.rule_known else "(not logged)"
                if live.dry_run:
                    rule += f"; dry-run {', '.join(sorted(live.dry_run))}"
            color = "green" if live is not None and live.verdict == "allow" else "red"
            offline = result.offline.verdict if result.offline else "?"
            ok = result.passed or bool(result.not_run)
            table.add_row(
                name if first else "",
                result.case,
                f"[{color}]{shown}[/{color}]",
                rule.replace("[", "\\["),
                ("[green]✓[/green] " if ok else "[red]✗[/red] ") + offline,
            )
            failures += not ok
            first = False
        table.add_section()
    console.print(table)
    console.print(
        "Try it: .venv/bin/trustmesh up examples/mesh -d; "
        ".venv/bin/trustmesh request --from foo/sleep http://httpbin.foo:8000/headers; "
        ".venv/bin/trustmesh down"
    )
    return failures


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
