"""``trustmesh`` command line.

Exit codes: 0 success (``authz check``: allowed), 1 invalid configuration or failed
tests, 2 bad arguments, 3 ``authz check`` decided not to allow, 4 ``authz check`` cannot
decide it exactly (``unsupported``: e.g. traffic through an ambient waypoint).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Annotated, TypedDict

import typer

from trustmesh.api.loader import ignored_kinds
from trustmesh.cli import mesh as mesh_cli
from trustmesh.cli import render
from trustmesh.cli.agent import agent as agent_command
from trustmesh.cli.analyze import analyze_command, harden_command
from trustmesh.cli.ca import app as ca_app
from trustmesh.cli.graph import graph_command
from trustmesh.cli.insight import generate_command, impact_command, traffic_app
from trustmesh.cli.node import app as node_app
from trustmesh.cli.options import AssumeInjectedOpt, NamespaceOpt, namespace_problem, qualify
from trustmesh.cli.replica import control_plane as control_plane_command
from trustmesh.cli.replica import replica_app
from trustmesh.cli.sample import app as sample_app
from trustmesh.cli.store import apply as apply_command
from trustmesh.cli.store import delete as delete_command
from trustmesh.cli.store import get as get_command
from trustmesh.cli.top import top as top_command
from trustmesh.config import LoadedConfig, load_config
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import RequestError, Verdict
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source
from trustmesh.policy.routing import RouteChoice, sidecar_route
from trustmesh.policy.targets import Destination, Target, request_to, resolve_destination
from trustmesh.policy.testing import run_case
from trustmesh.runtime.layout import DEFAULT_STATE
from trustmesh.runtime.live import LiveRunner

app = typer.Typer(
    name="trustmesh",
    help="Zero-trust service-mesh security that speaks Istio's security API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
authz_app = typer.Typer(help="Authorization questions answered offline.", no_args_is_help=True)
app.add_typer(authz_app, name="authz")
app.add_typer(ca_app, name="ca")
app.add_typer(sample_app, name="sample")
app.add_typer(node_app, name="node")
app.add_typer(replica_app, name="replica")
app.command("agent")(agent_command)
app.command("up")(mesh_cli.up)
app.command("status")(mesh_cli.status)
app.command("logs")(mesh_cli.logs)
app.command("down")(mesh_cli.down)
app.command("proxy-config")(mesh_cli.proxy_config)
app.command("request")(mesh_cli.request)
app.command("top")(top_command)
app.command("analyze")(analyze_command)
app.command("harden")(harden_command)
app.command("graph")(graph_command)
app.command("apply")(apply_command)
app.command("get")(get_command)
app.command("delete")(delete_command)
app.command("control-plane")(control_plane_command)
app.add_typer(traffic_app, name="traffic")
app.command("impact")(impact_command)
app.command("generate")(generate_command)

Files = Annotated[
    list[str],
    typer.Option("-f", "--filename", help="YAML file, directory (recursive) or - for stdin."),
]
MeshConfigOpt = Annotated[
    list[str] | None, typer.Option("--mesh-config", help="MeshConfig or IstioOperator file.")
]
Output = Annotated[str, typer.Option("-o", "--output", help="table or json")]


class UsageError(Exception):
    pass


# --ext-authz answers: allowed, denied, or None for an authorizer that cannot be reached.
_EXT_AUTHZ_ANSWERS: dict[str, bool | None] = {"allow": True, "deny": False, "unreachable": None}


class _EvaluateOptions(TypedDict):
    now: float
    trace: bool
    ext_authz: dict[str, bool | None]


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    return dict(_pairs_list(values, what))


def _pairs_list(values: list[str] | None, what: str) -> list[tuple[str, str]]:
    """``KEY=VALUE`` options in order (repeated keys kept: headers may repeat)."""
    out = []
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} must look like KEY=VALUE, got {item!r}")
        out.append((key, value))
    return out


def _load(files: list[str], mesh_config: list[str] | None, **kwargs: object) -> LoadedConfig:
    with render.LoadProgress() as progress:
        return load_config(
            files,
            mesh_config=mesh_config or (),
            progress=progress,
            **kwargs,  # type: ignore[arg-type]
        )


def _check_output(output: str, namespace: str = "default") -> None:
    if output not in ("table", "json"):
        raise UsageError(f"-o must be table or json, got {output!r}")
    problem = namespace_problem(namespace)
    if problem:
        raise UsageError(problem)


EXIT_ALLOWED, EXIT_NOT_ALLOWED, EXIT_UNSUPPORTED = 0, 3, 4


@app.command()
def validate(
    files: Files,
    mesh_config: MeshConfigOpt = None,
    output: Output = "table",
    namespace: NamespaceOpt = "default",
) -> None:
    """Check configuration the way Istio's admission webhook would."""
    try:
        _check_output(output, namespace)
        loaded = _load(files, mesh_config, compile_policy=False, default_namespace=namespace)
    except UsageError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(2) from None
    render.diagnostics(
        loaded.diagnostics, output, summary=loaded, ignored=ignored_kinds(loaded.unknown)
    )
    raise typer.Exit(1 if loaded.errors else 0)


@authz_app.command("check")
def authz_check(
    files: Files,
    to: Annotated[
        str, typer.Option("--to", help="Destination NS/NAME: a workload or a Service.")
    ] = "",
    to_host: Annotated[
        str, typer.Option("--to-host", help="Egress: a host outside the mesh.")
    ] = "",
    port: Annotated[
        int | None, typer.Option("--port", help="Workload port; for a Service, its port.")
    ] = None,
    from_: Annotated[str, typer.Option("--from", help="Source workload NS/NAME.")] = "",
    principal: Annotated[str, typer.Option("--principal", help="mTLS peer principal.")] = "",
    plaintext: Annotated[bool, typer.Option("--plaintext", help="Client without a cert.")] = False,
    source_ip: Annotated[str, typer.Option("--source-ip")] = "",
    method: Annotated[str, typer.Option("--method")] = "GET",
    path: Annotated[str, typer.Option("--path")] = "/",
    host: Annotated[str, typer.Option("--host", help=":authority (default SVC.NS:PORT)")] = "",
    header: Annotated[list[str] | None, typer.Option("--header", help="K=V, repeatable.")] = None,
    jwt: Annotated[str, typer.Option("--jwt", help="Sent as Authorization: Bearer.")] = "",
    tcp: Annotated[bool, typer.Option("--tcp", help="A plain TCP connection.")] = False,
    jwks: Annotated[list[str] | None, typer.Option("--jwks", help="URI=FILE for jwksUri.")] = None,
    ext_authz: Annotated[
        list[str] | None,
        typer.Option(
            "--ext-authz",
            help="PROVIDER=allow|deny|unreachable for CUSTOM (unreachable: the provider's "
            "failOpen / statusOnError decide).",
        ),
    ] = None,
    now: Annotated[float | None, typer.Option("--now", help="Clock, epoch seconds.")] = None,
    mesh_config: MeshConfigOpt = None,
    output: Output = "table",
    namespace: NamespaceOpt = "default",
    assume_injected: AssumeInjectedOpt = False,
) -> None:
    """Would this request be allowed, and by which rule?

    Exit codes:
    0 allowed;
    3 not allowed (deny, unauthenticated, reset, bad-request);
    4 unsupported: not decidable exactly (ambient waypoint, gateway), the reason says why;
    1 invalid configuration; 2 bad arguments.
    """
    try:
        _check_output(output, namespace)
        sources = [bool(from_), bool(principal), plaintext]
        if sum(sources) != 1:
            raise UsageError("give exactly one of --from, --principal or --plaintext")
        if bool(to) == bool(to_host):
            raise UsageError("give exactly one of --to NS/WORKLOAD or --to-host HOST")
        answers = _pairs(ext_authz, "--ext-authz")
        if any(v not in _EXT_AUTHZ_ANSWERS for v in answers.values()):
            raise UsageError("--ext-authz values are allow, deny or unreachable")
        headers = tuple(_pairs_list(header, "--header"))
        loaded = _load(
            files,
            mesh_config,
            jwks_files=_pairs(jwks, "--jwks"),
            default_namespace=namespace,
            assume_injected=assume_injected,
        )
    except UsageError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(2) from None
    if loaded.mesh is None:
        render.diagnostics(loaded.diagnostics, output, summary=loaded)
        raise typer.Exit(1)
    ip = source_ip or None
    to, from_ = qualify(to, namespace), qualify(from_, namespace)
    if from_:
        source = Source.workload(from_, ip)
    elif principal:
        source = Source.principal(principal, ip)
    else:
        source = Source.plaintext(ip)
    http = None if tcp else HttpRequest(method, path, host or None, headers, jwt or None)
    request = Request(source, to, port, http, to_host or None)
    options = _EvaluateOptions(
        now=time.time() if now is None else now,
        trace=True,
        ext_authz={k: _EXT_AUTHZ_ANSWERS[v] for k, v in answers.items()},
    )
    try:
        if to:
            destination = resolve_destination(loaded.snapshot, to, port)
            request = request_to(request, destination.targets[0])
            if destination.is_service:
                route = _route(loaded.mesh, from_, destination, http)
                targets = destination.targets if route is None else _routed(loaded, route)
                subsets = _subsets(route)
                decisions = [
                    (t, evaluate(loaded.mesh, _via(request, t, subsets), **options))
                    for t in targets
                ]
                render.service_decisions(destination, decisions, output, route)
                allowed = bool(decisions) and all(d.verdict is Verdict.ALLOW for _, d in decisions)
                raise typer.Exit(0 if allowed else 3)
        elif from_ and http is not None:
            route = _egress_route(loaded.mesh, from_, to_host, port, http)
            if route is not None:  # a VirtualService sends it into the mesh (a gateway…)
                # or answers it at the client's sidecar; routed out of the mesh, egress decides
                targets, subsets = _routed(loaded, route), _subsets(route)
                authority = http.host or (to_host if port in (None, 80) else f"{to_host}:{port}")
                into_mesh = dataclasses.replace(
                    request,
                    destination_host=None,
                    http=dataclasses.replace(http, host=authority),
                )
                decisions = [
                    (t, evaluate(loaded.mesh, _via(into_mesh, t, subsets), **options))
                    for t in targets
                ]
                where = Destination(to_host, None, port or 80, targets)
                render.service_decisions(where, decisions, output, route)
                allowed = bool(decisions) and all(d.verdict is Verdict.ALLOW for _, d in decisions)
                raise typer.Exit(0 if allowed else 3)
        decision = evaluate(loaded.mesh, request, **options)
    except RequestError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(2) from None
    render.decision(decision, output)
    if decision.verdict is Verdict.UNSUPPORTED:
        raise typer.Exit(EXIT_UNSUPPORTED)
    raise typer.Exit(EXIT_ALLOWED if decision.verdict is Verdict.ALLOW else EXIT_NOT_ALLOWED)


def _route(
    mesh: MeshPolicy, client: str, destination: Destination, http: HttpRequest | None
) -> RouteChoice | None:
    """The VirtualService route ``client``'s sidecar takes to the Service (None: none)."""
    workload = mesh.snapshot.workload(client) if client else None
    service, port = destination.service, destination.service_port
    if workload is None or not workload.has_sidecar or http is None or service is None:
        return None
    return sidecar_route(mesh, workload, service.hostname, port or service.ports[0].port, http)


def _egress_route(
    mesh: MeshPolicy, client: str, host: str, port: int | None, http: HttpRequest
) -> RouteChoice | None:
    """The VirtualService route ``client``'s sidecar takes to ``host`` (None: none)."""
    workload = mesh.snapshot.workload(client)
    if workload is None or not workload.has_sidecar:
        return None
    route = sidecar_route(mesh, workload, host.lower(), port or 80, http)
    if route is not None and any(d.service is None for d in route.destinations):
        return None  # out of the mesh: the egress decision answers
    return route


def _routed(loaded: LoadedConfig, route: RouteChoice) -> tuple[Target, ...]:
    """The workloads the route reaches, as targets of their own Services' ports."""
    targets: list[Target] = []
    for routed in route.destinations:
        if (
            routed.service is None
            or not routed.workloads
            or (routed.weight == 0 and len(route.destinations) > 1)
        ):
            continue
        ref = f"{routed.service.namespace}/{routed.service.name}"
        wanted = {w.ref for w in routed.workloads}
        try:
            found = resolve_destination(loaded.snapshot, ref, routed.port)
        except RequestError:
            continue
        targets += [t for t in found.targets if t.workload.ref in wanted]
    return tuple({t.workload.ref: t for t in targets}.values())


def _subsets(route: RouteChoice | None) -> dict[str, str]:
    """Workload ref → the DestinationRule subset the route reaches it through."""
    found: dict[str, str] = {}
    for routed in route.destinations if route is not None else ():
        for workload in routed.workloads:
            found.setdefault(workload.ref, routed.subset)
    return found


def _via(request: Request, target: Target, subsets: dict[str, str]) -> Request:
    """``request`` to ``target``, through the subset cluster its route names (if any)."""
    subset = subsets.get(target.workload.ref, "")
    return dataclasses.replace(request_to(request, target), subset=subset)


@app.command("test")
def test_command(
    files: Files,
    test_files: Annotated[list[str], typer.Argument(help="PolicyTest files or directories.")],
    mesh_config: MeshConfigOpt = None,
    jwks: Annotated[list[str] | None, typer.Option("--jwks", help="URI=FILE for jwksUri.")] = None,
    now: Annotated[float | None, typer.Option("--now", help="Clock, epoch seconds.")] = None,
    output: Output = "table",
    live: Annotated[
        bool, typer.Option("--live", help="Send every case through the running mesh.")
    ] = False,
    state: mesh_cli.State = Path(DEFAULT_STATE),
    namespace: NamespaceOpt = "default",
    assume_injected: AssumeInjectedOpt = False,
) -> None:
    """Run PolicyTest cases; exit 0 only when every case passes.

    With --live each case is also sent as a real request through the mesh `trustmesh up`
    runs; a case fails if the live answer misses the expectation or differs from the
    offline verdict.
    """
    try:
        _check_output(output, namespace)
        loaded = _load(
            files,
            mesh_config,
            test_paths=test_files,
            jwks_files=_pairs(jwks, "--jwks"),
            default_namespace=namespace,
            assume_injected=assume_injected,
        )
    except UsageError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(2) from None
    if loaded.mesh is None:
        render.diagnostics(loaded.diagnostics, output, summary=loaded)
        raise typer.Exit(1)
    if not loaded.tests:
        render.usage_error("no PolicyTest found in the given test files")
        raise typer.Exit(1)
    if live:
        raise typer.Exit(_live_tests(loaded, state, output))
    clock = time.time() if now is None else now
    results = [
        run_case(loaded.mesh, suite.name, where, case, clock)
        for suite in loaded.tests
        for where, case in suite.located_cases()
    ]
    render.test_results(results, output)
    raise typer.Exit(0 if all(r.passed for r in results) else 1)


def _live_tests(loaded: LoadedConfig, state: Path, output: str) -> int:
    assert loaded.mesh is not None
    running = mesh_cli._open(state.resolve())
    runner = LiveRunner(running.plan, running.layout)
    suites = [(s.name, s.located_cases()) for s in loaded.tests]
    try:
        asyncio.run(running.wait_synced())
    except (TimeoutError, ValueError) as exc:
        render.usage_error(str(exc))
        return 1
    results = asyncio.run(runner.run(loaded.mesh, suites))
    render.live_results(results, output)
    return 0 if all(r.passed for r in results) else 1


@app.command("version")
def version() -> None:
    """Print the trustmesh version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("trustmesh"))


def run() -> None:
    app()
