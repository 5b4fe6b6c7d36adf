"""``trustmesh traffic export``, ``impact`` and ``generate``: recorded traffic, replayed.

Exit codes — ``traffic export``: 0 written, 1 some lines were not records (each reported
with file:line; the rest is written), 2 bad command line or no mesh state.
``impact``: 0 no request flips, 1 some flip or cannot be decided exactly (listed), 2 bad
input (command line, invalid configuration, bad records, a recorded destination unknown to
the current configuration).
``generate``: 0 written, 1 the proof failed or a request cannot be allowed least-privilege
(nothing written), 2 bad input.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from trustmesh.cli import render
from trustmesh.cli.options import AssumeInjectedOpt, NamespaceOpt
from trustmesh.config import LoadedConfig, load_config
from trustmesh.insight.files import StateError, istio_log_records, mesh_log_records, read_traffic
from trustmesh.insight.generate import (
    GeneratedPolicies,
    ProofFailed,
    compile_with,
    generate_policies,
)
from trustmesh.insight.records import Problem, record_line
from trustmesh.insight.replay import ImpactReport, impact
from trustmesh.insight.traffic import TrafficSet
from trustmesh.runtime.layout import DEFAULT_STATE

__all__ = ["generate_command", "impact_command", "traffic_app"]

_err = Console(stderr=True, highlight=False, soft_wrap=True)
_out = Console(highlight=False, soft_wrap=True)

traffic_app = typer.Typer(help="Recorded traffic of the mesh's sidecars.", no_args_is_help=True)

Files = Annotated[
    list[str], typer.Option("-f", "--filename", help="YAML file or directory (recursive).")
]
TrafficOpt = Annotated[
    list[str], typer.Option("--traffic", help="Records written by `traffic export` (JSON lines).")
]
MeshConfigOpt = Annotated[
    list[str] | None, typer.Option("--mesh-config", help="MeshConfig or IstioOperator file.")
]
NowOpt = Annotated[float | None, typer.Option("--now", help="Clock, epoch seconds.")]
EXIT_BAD_INPUT = 2
SHOWN_PROBLEMS = 20


def _problems(problems: Sequence[Problem], count: int | None = None) -> None:
    total = len(problems) if count is None else count
    for problem in problems[:SHOWN_PROBLEMS]:
        _err.print(f"error: {problem}", markup=False)
    if total > SHOWN_PROBLEMS:
        _err.print(f"error: … and {total - SHOWN_PROBLEMS} more line(s) that are not records")


@traffic_app.command("export")
def export_command(
    out: Annotated[Path, typer.Option("-o", "--output", help="The JSON-lines file to write.")],
    state: Annotated[
        Path, typer.Option("--state", envvar="TRUSTMESH_STATE", help="The mesh's state dir.")
    ] = Path(DEFAULT_STATE),
    envoy_log: Annotated[
        list[str] | None,
        typer.Option(
            "--envoy-log",
            help="NS/NAME=FILE: an Istio sidecar's JSON access log, of workload NS/NAME"
            " (instead of the local mesh's logs).",
        ),
    ] = None,
) -> None:
    """Write the recorded requests and connections as normalized JSON lines.

    From the local mesh's sidecars (`trustmesh up` with meshConfig.accessLogFile set), or
    from Istio sidecars' JSON access logs (--envoy-log, repeatable).
    """
    sources: list[Iterable[Any]] = []
    for item in envoy_log or []:
        workload, sep, file = item.partition("=")
        if not sep or workload.count("/") != 1 or not all(workload.split("/")) or not file:
            render.usage_error(f"--envoy-log must look like NAMESPACE/NAME=FILE, got {item!r}")
            raise typer.Exit(EXIT_BAD_INPUT)
        sources.append(istio_log_records(Path(file), workload))
    progress = render.StepProgress("reading sidecar access logs")
    if not sources:
        sources.append(mesh_log_records(state.resolve(), progress))
    problems: list[Problem] = []
    written = allowed = 0
    try:
        with progress, out.open("wb") as handle:
            for source in sources:
                for found in source:
                    if isinstance(found, Problem):
                        problems.append(found)
                        continue
                    handle.write(record_line(found))
                    written += 1
                    allowed += found.verdict == "allow"
    except StateError as exc:
        out.unlink(missing_ok=True)  # nothing was read: no empty file left looking like one
        render.usage_error(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except OSError as exc:
        render.usage_error(f"cannot write {out}: {exc.strerror or exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    _problems(problems)
    if written and not allowed:
        _err.print(
            "note: every record is a refused request: sidecars log every request only with"
            " meshConfig.accessLogFile set (else refused ones only)",
            markup=False,
        )
    _err.print(
        f"{written} record(s) written to {out}"
        + (f"; {len(problems)} line(s) are not records (above)" if problems else ""),
        markup=False,
    )
    raise typer.Exit(1 if problems else 0)


def _load(
    files: Sequence[str], mesh_config: Sequence[str], namespace: str, assume_injected: bool
) -> LoadedConfig:
    with render.LoadProgress() as progress:
        return load_config(
            files,
            mesh_config=mesh_config,
            progress=progress,
            default_namespace=namespace,
            assume_injected=assume_injected,
        )


def _valid(loaded: LoadedConfig, output: str = "table") -> None:
    if loaded.mesh is None:
        render.diagnostics(loaded.errors, output, summary=loaded)
        raise typer.Exit(EXIT_BAD_INPUT)


def _traffic(paths: Sequence[str]) -> TrafficSet:
    traffic = TrafficSet()
    with render.StepProgress("reading recorded traffic") as progress:
        unreadable = read_traffic(paths, traffic, progress)
    if unreadable or traffic.problem_count:
        _problems([*unreadable, *traffic.problems], len(unreadable) + traffic.problem_count)
        raise typer.Exit(EXIT_BAD_INPUT)
    if not traffic.records:
        render.usage_error(f"no records in {', '.join(paths)}")
        raise typer.Exit(EXIT_BAD_INPUT)
    return traffic


def impact_command(
    traffic_files: TrafficOpt,
    files: Files,
    change: Annotated[
        list[str],
        typer.Option(
            "--change",
            help="Changed resources: each replaces the input's resource of the same"
            " kind/namespace/name, or is added.",
        ),
    ],
    remove: Annotated[
        list[str] | None,
        typer.Option("--remove", help="KIND/NAMESPACE/NAME: a resource the change deletes."),
    ] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table",
    mesh_config: MeshConfigOpt = None,
    now: NowOpt = None,
    namespace: NamespaceOpt = "default",
    assume_injected: AssumeInjectedOpt = False,
) -> None:
    """Replay recorded traffic before and after a change: which requests flip?

    Exit codes: 0 no request flips; 1 some flip (allow→deny or deny→allow, listed) or
    cannot be decided exactly on one side (ambient waypoint, gateway: listed);
    2 bad input (command line, invalid configuration, bad records, a recorded destination
    the current configuration does not have).
    """
    if output not in ("table", "json"):
        render.usage_error(f"-o must be table or json, got {output!r}")
        raise typer.Exit(EXIT_BAD_INPUT)
    removed = []
    for item in remove or []:
        if item.count("/") != 2 or not all(item.split("/")):
            render.usage_error(f"--remove must look like KIND/NAMESPACE/NAME, got {item!r}")
            raise typer.Exit(EXIT_BAD_INPUT)
        removed.append(item)
    config = list(mesh_config or [])
    before = _load(files, config, namespace, assume_injected)
    _valid(before, output)
    after = _load([*files, *change], config, namespace, assume_injected)
    _valid(after, output)
    assert before.mesh is not None and after.mesh is not None
    after_mesh = after.mesh
    if removed:
        keys = {r.key for r in after.snapshot.resources}
        missing = [k for k in removed if k not in keys]
        if missing:
            render.usage_error(f"--remove: no such resource in the input: {', '.join(missing)}")
            raise typer.Exit(EXIT_BAD_INPUT)
        kept = tuple(r for r in after.snapshot.resources if r.key not in set(removed))
        after_mesh = compile_with(dataclasses.replace(after.snapshot, resources=kept), [])
    traffic = _traffic(traffic_files)
    clock = time.time() if now is None else now
    with render.StepProgress("replaying recorded requests") as progress:
        report = impact(traffic.distinct, before.mesh, after_mesh, now=clock, progress=progress)
    if report.unknown:
        for unknown, outcome in report.unknown[:SHOWN_PROBLEMS]:
            _err.print(f"error: {unknown.record.origin}: {outcome.reason}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    if output == "json":
        sys.stdout.write(json.dumps(impact_json(report), indent=2) + "\n")
    else:
        _impact_table(report)
    raise typer.Exit(1 if report.flips or report.undecidable else 0)


def impact_json(report: ImpactReport) -> dict[str, Any]:
    """The impact report as JSON (``trustmesh.dev/impact/v1``)."""
    return {
        "schema": "trustmesh.dev/impact/v1",
        "records": report.records,
        "distinct_requests": report.distinct,
        "flipped_requests": len(report.flips),
        "flipped_records": sum(f.observed.count for f in report.flips),
        "inexact": [i.record.origin for i in report.inexact],
        "recorded_otherwise": [
            {
                "origin": item.record.origin,
                "recorded": sorted(item.verdicts),
                "replayed": {"verdict": outcome.verdict, "rule": outcome.rule},
            }
            for item, outcome in report.mismatched
        ],
        "undecidable": [
            {
                "origin": f.observed.record.origin,
                "records": f.observed.count,
                "before": {"verdict": f.before.verdict, "reason": f.before.reason},
                "after": {"verdict": f.after.verdict, "reason": f.after.reason},
            }
            for f in report.undecidable
        ],
        "groups": [
            {
                "direction": g.direction,
                "source": g.source,
                "destination": g.destination,
                "rule_before": g.rule_before,
                "rule_after": g.rule_after,
                "records": g.records,
                "requests": [
                    {
                        "protocol": f.observed.record.protocol.value,
                        "method": f.observed.record.method,
                        "path": f.observed.record.path,
                        "host": f.observed.record.host,
                        "records": f.observed.count,
                        "before": {"verdict": f.before.verdict, "rule": f.before.rule},
                        "after": {
                            "verdict": f.after.verdict,
                            "rule": f.after.rule,
                            "reason": f.after.reason,
                        },
                        "origins": f.observed.origins,
                    }
                    for f in g.flips
                ],
            }
            for g in report.groups()
        ],
    }


def _impact_table(report: ImpactReport) -> None:
    """Each group, then its requests; plain text (rule ids hold brackets, lines stay whole
    however narrow the terminal)."""
    for g in report.groups():
        _out.print(
            f"{g.direction}  {g.source} → {g.destination}  ({g.records} record(s))\n"
            f"  rule before: {g.rule_before or '-'}   rule after: {g.rule_after or '-'}",
            markup=False,
        )
        for f in g.flips:
            record = f.observed.record
            what = f"{record.method} {record.path}" if record.method else "tcp connection"
            _out.print(
                f"    {what} ×{f.observed.count}  [{', '.join(f.observed.origins)}]",
                markup=False,
            )
    flipped = sum(f.observed.count for f in report.flips)
    _out.print(
        f"{report.records} record(s), {report.distinct} distinct request(s):"
        f" {len(report.flips)} distinct ({flipped} record(s)) flip",
        markup=False,
    )
    for flip in report.undecidable:
        record = flip.observed.record
        side = flip.before if flip.before.verdict == "unsupported" else flip.after
        _out.print(
            f"undecidable: {record.describe_source()} → {record.destination}:{record.port}"
            f" ×{flip.observed.count} [{record.origin}]: {side.reason}",
            markup=False,
        )
    if report.mismatched:
        item, outcome = report.mismatched[0]
        _err.print(
            f"note: {len(report.mismatched)} replayed request(s) were recorded with another"
            f" verdict than the current files give (e.g. {item.record.origin}: recorded"
            f" {', '.join(sorted(item.verdicts))}, replayed {outcome.verdict}): are these the"
            " files that were running?",
            markup=False,
        )
    if report.inexact:
        _err.print(
            f"note: {len(report.inexact)} request(s) carried a JWT, not in the log: replayed"
            " without one",
            markup=False,
        )


def generate_command(
    traffic_files: TrafficOpt,
    files: Files,
    out: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the YAML here (default stdout).")
    ] = None,
    exact_paths: Annotated[
        bool,
        typer.Option(
            "--exact-paths",
            help="No {*} path templates: each observed path exactly (Istio releases without"
            " path templating).",
        ),
    ] = False,
    mesh_config: MeshConfigOpt = None,
    now: NowOpt = None,
    namespace: NamespaceOpt = "default",
    assume_injected: AssumeInjectedOpt = False,
) -> None:
    """Least-privilege AuthorizationPolicies from recorded traffic, proven by replay.

    Exit codes: 0 written; 1 the proof failed or a request cannot be allowed
    least-privilege (nothing written); 2 bad input.
    """
    loaded = _load(files, list(mesh_config or []), namespace, assume_injected)
    _valid(loaded)
    assert loaded.mesh is not None
    traffic = _traffic(traffic_files)
    clock = time.time() if now is None else now
    generated = generate_from(loaded, traffic, clock, templates=not exact_paths)
    text = generated.render()
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
    excluded = ", ".join(f"{n} {v}" for v, n in sorted(generated.excluded.items()))
    _err.print(
        f"# {len(generated.documents)} policy(ies) from {generated.used} distinct allowed"
        f" request(s)"
        + (f"; records not allowed when recorded, not used: {excluded}" if excluded else ""),
        markup=False,
    )


def generate_from(
    loaded: LoadedConfig, traffic: TrafficSet, now: float, *, templates: bool = True
) -> GeneratedPolicies:
    """:func:`generate_policies`, its failure rendered and turned into exit 1."""
    assert loaded.mesh is not None
    try:
        with render.StepProgress("proving generated policies by replay") as progress:
            generated = generate_policies(
                loaded.snapshot,
                loaded.mesh,
                traffic.distinct,
                now=now,
                templates=templates,
                progress=progress,
            )
    except ProofFailed as exc:
        for failure in exc.failures:
            _err.print(f"error: {failure}", markup=False)
        _err.print("error: no policy written: the proof above failed", markup=False)
        raise typer.Exit(1) from None
    if not generated.used:
        refused = sum(generated.excluded.values())
        render.usage_error(
            f"no allowed request among the records ({refused} refused): nothing to allow."
            " Sidecars log every request only with meshConfig.accessLogFile set"
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    return generated
